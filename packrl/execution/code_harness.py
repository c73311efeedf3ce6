"""The code reward's test harness: runs inside the sandbox, where the solution cannot reach it.

Never imported by the trainer: ``packrl.tasks.code`` sends this file's text, followed by a
call to ``main()``, to ``run_python`` as the sandbox's program, with the job (tests, token,
solution) in ``job.json`` next to it. Standard library only (it runs under the sandbox's
interpreter).

Why a solution cannot tamper with the tests: they never share a process.

    H  harness (the sandbox's first process; holds the tests; writes the report to stdout)
    |-- T_i  one per test, forked from H: runs the preamble and the test (trusted code)
    `-- Z  zygote, forked from H before H read job.json (so it never held the tests or the
        |  report token): runs the preamble and the solution once
        `-- S_i  one per test, forked from Z: serves T_i's calls into the solution

The test in ``T_i`` calls the solution's functions through proxies (``Remote``); each call
crosses a socket to ``S_i`` as JSON. Arguments and results cross **by value** as plain data
(None, bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset, Fraction,
Decimal, and their subclasses converted to the base type); any other object stays in
``S_i`` and ``T_i`` gets a handle to it that forwards calls, attribute reads, iteration,
``len``, indexing, ``in``, ``bool`` and ``repr``, and compares by identity only.

So whatever the solution does to its own process (patched builtins, a replaced
``AssertionError``, ``sys.modules`` entries, ``sys.exit(0)``, forged output, objects whose
``__eq__`` is always True) changes only what ``S_i`` answers, never how ``T_i`` checks it.
``H`` and ``T_i`` are made non-dumpable, so the solution (same uid, no capabilities) cannot
ptrace them, read their memory or open their file descriptors through ``/proc``; the
sandbox's stdout is held by ``H`` alone; ``job.json`` (the tests and the token) is read and
deleted before ``Z`` gets the solution. A test passes only when ``T_i`` writes ``PASS`` on its private
pipe to ``H`` after the test returned.

Names the test sees from the solution: the entry point, plus names the solution binds that
neither the preamble nor the builtins define. Standard-library module names (``math``) and
modules the solution imported are imported by ``T_i`` itself, never taken from ``S_i``.

Limits of the by-value boundary: the test's arguments are copies (a solution that sorts a
list in place is not seen doing so), functions or preamble objects cannot be passed to the
solution, and exception types other than the builtin ones arrive as ``RemoteError``.
"""

import builtins
import ctypes
import decimal
import fractions
import importlib
import json
import os
import select
import signal
import socket
import struct
import sys
import time

PRELOAD = (
    "typing",
    "math",
    "re",
    "collections",
    "itertools",
    "functools",
    "heapq",
    "string",
    "random",
    "copy",
    "hashlib",
    "bisect",
    "statistics",
)
MAX_MESSAGE = 64 << 20  # bytes of one JSON message; more is a failed call
PR_SET_DUMPABLE = 4


def preload() -> None:
    """Imports the modules tests and solutions use most, once per process tree (typing alone
    takes 20-40 ms), so forked test processes start warm."""
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass


# --- wire format: 4-byte big-endian length, then JSON ----------------------------------


def send_msg(sock: socket.socket, obj) -> None:
    data = json.dumps(obj).encode()
    sock.sendall(struct.pack(">I", len(data)) + data)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError("the solution's process closed the connection")
        buf += chunk
    return bytes(buf)


def recv_msg(sock: socket.socket):
    (n,) = struct.unpack(">I", recv_exact(sock, 4))
    if n > MAX_MESSAGE:
        raise ValueError(f"message of {n} bytes from the solution's process")
    return json.loads(recv_exact(sock, n))


def encode(v, handle):
    """Plain data as JSON; anything else as ``handle(v)`` (a ``{"ref": n}``, or an error)."""
    if v is None or v is True or v is False:
        return v
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        return float(v)
    if isinstance(v, str):
        return str(v)
    if isinstance(v, list):
        return [encode(x, handle) for x in list.__iter__(v)]
    if isinstance(v, tuple):
        return {"tuple": [encode(x, handle) for x in tuple.__iter__(v)]}
    if isinstance(v, dict):
        return {"dict": [[encode(k, handle), encode(x, handle)] for k, x in dict.items(v)]}
    if isinstance(v, frozenset):
        return {"frozenset": [encode(x, handle) for x in frozenset.__iter__(v)]}
    if isinstance(v, set):
        return {"set": [encode(x, handle) for x in set.__iter__(v)]}
    if isinstance(v, (bytes, bytearray)):
        return {"bytes": bytes(v).hex()}
    if isinstance(v, complex):
        return {"complex": [v.real, v.imag]}
    if isinstance(v, fractions.Fraction):
        return {"fraction": [int(v.numerator), int(v.denominator)]}
    if isinstance(v, decimal.Decimal):
        return {"decimal": decimal.Decimal.__str__(v)}
    return handle(v)


def decode(x, ref):
    """The inverse of ``encode``; ``ref(n)`` turns a handle back into an object."""
    if not isinstance(x, (list, dict)):
        return x
    if isinstance(x, list):
        return [decode(y, ref) for y in x]
    if len(x) != 1:
        raise ValueError("malformed value from the solution's process")
    ((tag, v),) = x.items()
    if tag == "tuple":
        return tuple(decode(y, ref) for y in v)
    if tag == "dict":
        return {decode(k, ref): decode(y, ref) for k, y in v}
    if tag == "set":
        return {decode(y, ref) for y in v}
    if tag == "frozenset":
        return frozenset(decode(y, ref) for y in v)
    if tag == "bytes":
        return bytes.fromhex(v)
    if tag == "complex":
        return complex(float(v[0]), float(v[1]))
    if tag == "fraction":
        return fractions.Fraction(int(v[0]), int(v[1]))
    if tag == "decimal":
        return decimal.Decimal(str(v))
    if tag == "ref":
        return ref(int(v))
    raise ValueError(f"unknown value tag {tag!r} from the solution's process")


# --- T: the test's side ------------------------------------------------------------------


class RemoteError(Exception):
    """An exception raised in the solution's process whose type is not a builtin one."""


class Remote:
    """A handle to an object that lives in the solution's process. Comparisons are by
    identity: the solution cannot make it equal to anything."""

    __slots__ = ("_ref", "_conn")

    def __init__(self, ref: int, conn: "Connection") -> None:
        object.__setattr__(self, "_ref", ref)
        object.__setattr__(self, "_conn", conn)

    def __call__(self, *args, **kwargs):
        return self._conn.request("call", self._ref, list(args), kwargs)

    def __getattr__(self, name: str):
        return self._conn.request("getattr", self._ref, name)

    def _op(self, op: str, *args):
        return self._conn.request("op", self._ref, op, list(args))

    def __iter__(self):
        return self._op("iter")

    def __next__(self):
        return self._op("next")

    def __len__(self) -> int:
        return self._op("len")

    def __bool__(self) -> bool:
        return self._op("bool") is True

    def __getitem__(self, key):
        return self._op("getitem", key)

    def __contains__(self, item) -> bool:
        return self._op("contains", item) is True

    def __repr__(self) -> str:
        r = self._op("repr")
        return r if isinstance(r, str) else "<remote>"

    __str__ = __repr__


class Connection:
    """The test's end of the socket to the solution's process."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.remotes: dict = {}

    def ref(self, n: int) -> Remote:
        if n not in self.remotes:
            self.remotes[n] = Remote(n, self)
        return self.remotes[n]

    def handle(self, v):
        if isinstance(v, Remote):
            return {"ref": v._ref}
        raise TypeError(
            f"a {type(v).__name__} cannot be passed to the solution: arguments cross to its "
            "process by value, as plain data"
        )

    def request(self, op: str, *args):
        if op == "call":
            ref, pos, kw = args
            args = (
                ref,
                encode(pos, self.handle),
                {k: encode(v, self.handle) for k, v in kw.items()},
            )
        elif op == "op":
            ref, name, extra = args
            args = (ref, name, encode(extra, self.handle))
        send_msg(self.sock, [op, *args])
        reply = recv_msg(self.sock)
        if not isinstance(reply, list) or not reply:
            raise RemoteError("malformed reply from the solution's process")
        if reply[0] == "ok" and len(reply) == 2:
            return decode(reply[1], self.ref)
        name, message = str(reply[1]), str(reply[2])[:1000]
        exc = getattr(builtins, name, None)
        if isinstance(exc, type) and issubclass(exc, Exception):
            raise exc(message)
        raise RemoteError(f"{name}: {message}")


def run_test(sock: socket.socket, preamble: str, test: str, index: int, entry_point) -> None:
    """T: the preamble, then the solution's names as proxies, then the test. Raises if the
    test fails."""
    conn = Connection(sock)
    ns = {"__name__": "solution"}
    exec(compile(preamble, "preamble.py", "exec"), ns)
    ready = recv_msg(sock)
    if not (isinstance(ready, list) and len(ready) == 2 and ready[0] in ("ready", "failed")):
        raise RemoteError("malformed start message from the solution's process")
    if ready[0] == "failed":
        raise RemoteError(f"the solution failed to load: {str(ready[1])[:300]}")
    if not isinstance(ready[1], dict):
        raise RemoteError("malformed start message from the solution's process")
    for name, value in ready[1].items():
        if not (isinstance(name, str) and name.isidentifier()) or name.startswith("__"):
            continue
        if name != entry_point and (name in ns or hasattr(builtins, name)):
            continue  # the preamble's helpers and the builtins stay the test's own
        module = value.get("module") if isinstance(value, dict) and len(value) == 1 else None
        if name != entry_point and name in sys.stdlib_module_names:
            module = name  # ``math`` is always the real math module
        if isinstance(module, str):
            try:
                ns[name] = importlib.import_module(module)
            except Exception:  # noqa: BLE001 - unbound: the test's NameError says it
                pass
        else:
            ns[name] = decode(value, conn.ref)
    exec(compile(test, f"test_{index}.py", "exec"), ns)


def test_process(sock: socket.socket, result_fd: int, job: dict, index: int) -> None:
    """T's body (in the forked child): isolate stdio, run the test, report on the pipe."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # the test's output never reaches the report
        os.dup2(null, fd)
    try:
        run_test(sock, job["preamble"], job["tests"][index], index, job["entry_point"])
        report = b"PASS"
    except BaseException as e:  # noqa: BLE001 - any failure fails the test
        report = f"FAIL {type(e).__name__}: {e}"[:300].encode("utf-8", "replace")
    os.write(result_fd, report)
    os._exit(0)


# --- Z and S: the solution's side ------------------------------------------------------


def serve(sock: socket.socket, ns: dict, exports: list, load_error) -> None:
    """S: tells T the solution's names, then answers its calls until T hangs up."""
    objects: dict = {}
    refs: dict = {}

    def handle(v):
        if type(v).__name__ == "module" and isinstance(getattr(v, "__name__", None), str):
            return {"module": v.__name__}
        n = refs.get(id(v))
        if n is None:
            n = refs[id(v)] = len(objects) + 1
            objects[n] = v
        return {"ref": n}

    def ref(n):
        return objects[n]

    ops = {
        "iter": iter,
        "next": next,
        "len": len,
        "bool": bool,
        "repr": repr,
        "getitem": lambda obj, key: obj[key],
        "contains": lambda obj, item: item in obj,
    }
    if load_error is not None:
        send_msg(sock, ["failed", load_error])
        return
    send_msg(sock, ["ready", {name: encode(ns[name], handle) for name in exports}])
    while True:
        try:
            msg = recv_msg(sock)
        except (EOFError, OSError, ValueError):
            return
        try:
            if msg[0] == "call":
                kwargs = {str(k): decode(v, ref) for k, v in msg[3].items()}
                result = ref(msg[1])(*decode(msg[2], ref), **kwargs)
            elif msg[0] == "getattr":
                result = getattr(ref(msg[1]), msg[2])
            else:
                result = ops[msg[2]](ref(msg[1]), *decode(msg[3], ref))
            reply = ["ok", encode(result, handle)]
        except BaseException as e:  # noqa: BLE001 - any failure is the call's answer
            try:
                text = str(e)
            except BaseException:  # noqa: BLE001
                text = "?"
            reply = ["err", type(e).__name__, text[:1000]]
        send_msg(sock, reply)


def zygote(control_fd: int) -> None:
    """Z: runs the preamble and the solution once, then forks one server per test."""
    control = socket.socket(fileno=control_fd)
    job = recv_msg(control)
    preload()
    ns = {"__name__": "solution"}
    load_error = None
    try:
        exec(compile(job["preamble"], "preamble.py", "exec"), ns)
        before = dict(ns)
        exec(compile(job["solution"], "solution.py", "exec"), ns)
    except BaseException as e:  # noqa: BLE001 - every test fails, saying why
        load_error = f"{type(e).__name__}: {e}"[:300]
        before = {}
    exports = [n for n in ns if n not in before or ns[n] is not before[n]]
    if job["entry_point"] in ns and job["entry_point"] not in exports:
        exports.append(job["entry_point"])
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # servers are reaped by the kernel
    server = 0
    while True:
        try:
            _, fds, _, _ = socket.recv_fds(control, 16, 1)
        except OSError:
            os._exit(0)
        if not fds:
            os._exit(0)  # H hung up: the run is over
        if server:
            try:
                os.kill(server, signal.SIGKILL)  # the previous test's server
            except OSError:
                pass
        server = os.fork()
        if server == 0:
            control.close()
            serve(socket.socket(fileno=fds[0]), ns, exports, load_error)
            os._exit(0)
        os.close(fds[0])


# --- H: the harness ------------------------------------------------------------------


def start_zygote() -> socket.socket:
    """Forks Z; returns H's end of the control socket."""
    mine, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        mine.close()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):  # the sandbox's stdout is H's alone
            os.dup2(null, fd)
        try:
            zygote(theirs.fileno())
        finally:
            os._exit(0)
    theirs.close()
    return mine


def run_one(index: int, job: dict, control: socket.socket) -> str:
    """Runs test ``index``: asks Z for S, forks T, waits for T's report; returns PASS or FAIL..."""
    mine, theirs = socket.socketpair()
    try:  # first, so that S starts while T runs the preamble
        socket.send_fds(control, [b"s"], [theirs.fileno()])
    except OSError:
        pass  # Z is gone: T sees the closed socket and fails
    theirs.close()
    r, w = os.pipe()
    try:
        pid = os.fork()
    except OSError as e:
        mine.close()
        os.close(r)
        os.close(w)
        return f"FAIL fork: {e}"
    if pid == 0:
        os.close(r)
        control.close()
        test_process(mine, w, job, index)
    os.close(w)
    mine.close()
    data, deadline = b"", time.monotonic() + job["timeout"]
    while len(data) < 4096:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([r], [], [], left)[0]:
            data = b"FAIL timeout"
            break
        chunk = os.read(r, 4096)
        if not chunk:
            break
        data += chunk
    os.close(r)
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
    os.waitpid(pid, 0)
    try:  # orphans of earlier servers, re-parented to us when we are PID 1
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass
    return "PASS" if data == b"PASS" else (data.decode("utf-8", "replace") or "FAIL no report")


def main() -> None:
    """H. Reads ``job.json`` (token, preamble, solution, tests, entry_point, timeout (s per
    test), stop_on_fail) and prints ``TOKEN INDEX PASS|FAIL...`` per test."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:  # no ptrace or /proc/PID/{mem,fd}
        sys.exit("packrl harness: prctl(PR_SET_DUMPABLE) failed")
    sys.path[:] = [p for p in sys.path if p and os.path.abspath(p) != os.getcwd()]
    preload()
    control = start_zygote()  # before the job is in this process's memory
    with open("job.json") as f:
        job = json.load(f)
    os.unlink("job.json")
    send_msg(control, {k: job[k] for k in ("preamble", "solution", "entry_point")})
    control.setblocking(False)  # a zygote stuck in the solution never blocks the harness
    for i in range(len(job["tests"])):
        status = run_one(i, job, control)
        status = status.replace("\n", " ")
        sys.stdout.write(f"{job['token']} {i} {status}\n")
        sys.stdout.flush()
        if job["stop_on_fail"] and status != "PASS":
            break
