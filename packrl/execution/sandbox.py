"""Running untrusted Python locally, with limits that hold.

``run_python(code, limits)`` runs ``code`` as ``python -I main.py`` in a fresh process tree:

- **namespaces** (``unshare``, util-linux): new network namespace (only a downed loopback,
  so no connection reaches any host, not even 127.0.0.1), new PID namespace (the program
  cannot see or signal anything outside; when it exits, everything it started dies), and new
  mount namespace: every mount is read-only, ``/tmp`` is a fresh tmpfs of
  ``limits.tmpfs_mb`` that is the program's own temporary directory and working directory,
  ``/dev/shm`` is private and ``/run`` empty (host sockets live there).
  Without root this uses a user namespace (``unshare --user --map-root-user``).
- **a user of its own**: as root, the program runs as an otherwise unused uid
  (``UID_BASE + slot``, one per concurrently running sandbox), so ``RLIMIT_NPROC`` bites per
  sandbox and the program owns no host file.
- **a cgroup** (v1 ``memory`` and ``pids``, as root; ``packrl.execution.cgroup``): memory
  and processes bounded for the whole sandbox, not per process. Without one, the memory
  budget is split evenly across ``max_processes`` (RLIMIT_AS each), so the sum is bounded.
- **resource limits**: CPU seconds, address space, processes, file size, open files, no core.
- **seccomp** (when libseccomp is installed): ``socket()`` fails for every family, and
  ``socketpair()`` for datagram sockets: no network and no host Unix socket, whatever its
  path, while connected stream pairs still work.
- **deadline and output cap**: at ``limits.timeout_s`` or once stdout+stderr pass
  ``limits.max_output_bytes``, the whole process group is killed (SIGKILL). If the trainer
  itself dies, ``setpriv --pdeathsig KILL`` takes the sandbox down with it.

Fallback when ``unshare`` cannot create namespaces (for example inside a container that
forbids them): the program runs in a plain subprocess with the same user switch, limits,
seccomp, deadline and output cap, in a private directory made by the parent. What is lost,
and logged once: no PID namespace (a process that calls ``setsid`` can outlive the deadline
until its CPU limit) and no read-only file system (as root the sandbox user cannot write the
host's files, but can write world-writable places such as /tmp; without root it can write
everything the user can). The network stays blocked only if libseccomp is present.
``isolation()`` tells which layers this machine has.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from packrl.execution.cgroup import CgroupRun, remove_stale

log = logging.getLogger(__name__)

CHILD_SCRIPT = str(Path(__file__).with_name("sandbox_child.py"))
# Sandbox uids, one per concurrently running sandbox; far above normal and subordinate ids.
UID_BASE = 1_990_000_000
# Address space below which the sandbox's Python cannot start with the standard library.
MIN_PROCESS_MEMORY = 24 * 2**20
NAMESPACE_FLAGS = ["--net", "--pid", "--mount", "--fork", "--kill-child", "--mount-proc"]


@dataclass
class Limits:
    """Limits for one sandboxed run.

    Attributes:
        timeout_s: wall-clock deadline; the process group is killed at it.
        cpu_s: CPU seconds (RLIMIT_CPU); default: ``timeout_s`` rounded up.
        memory_mb: memory of the whole sandbox, all its processes together: the limit of
            its cgroup where the machine has one (each process also gets it as RLIMIT_AS);
            otherwise RLIMIT_AS of ``memory_mb / max_processes`` per process, so that the
            sum stays bounded.
        max_processes: processes (and threads) of the sandbox: its cgroup's ``pids.max``
            and the sandbox user's RLIMIT_NPROC.
        max_output_bytes: stdout + stderr kept; more kills the program.
        max_file_mb: largest file it may write (RLIMIT_FSIZE).
        tmpfs_mb: size of its private /tmp (namespaces only).
    """

    timeout_s: float = 10.0
    cpu_s: int | None = None
    memory_mb: int = 1024
    max_processes: int = 32
    max_output_bytes: int = 1 << 20
    max_file_mb: int = 16
    tmpfs_mb: int = 64


@dataclass
class SandboxResult:
    """What a sandboxed run did. ``returncode`` < 0 means killed by that signal."""

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    output_truncated: bool
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.output_truncated


@dataclass(frozen=True)
class Isolation:
    """The isolation layers this machine gives (see module docstring)."""

    namespaces: bool
    user_switch: bool
    seccomp: bool
    python: str
    cgroup: bool = False

    def describe(self) -> str:
        parts = [
            "network+PID+mount namespaces" if self.namespaces else "NO namespaces",
            "own uid" if self.user_switch else "same uid as the trainer",
            "seccomp socket filter" if self.seccomp else "NO seccomp (host Unix sockets reachable)",
            "cgroup memory+pids for the whole sandbox"
            if self.cgroup
            else "no cgroup (memory split evenly across max_processes)",
        ]
        return ", ".join(parts) + f", python {self.python}"


class _UidSlots:
    """Hands out sandbox uids so that concurrent sandboxes never share one."""

    def __init__(self) -> None:
        self._free: list[int] = []
        self._next = 0
        self._lock = threading.Lock()

    def take(self) -> int:
        with self._lock:
            if self._free:
                return self._free.pop()
            self._next += 1
            return UID_BASE + self._next

    def give_back(self, uid: int) -> None:
        with self._lock:
            self._free.append(uid)


_uids = _UidSlots()


def _sandbox_python() -> str:
    """An interpreter the sandbox user may execute: as root, one outside /root."""
    if os.geteuid() == 0:
        for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
            if os.access(candidate, os.X_OK) and _world_executable(candidate):
                return candidate
        raise RuntimeError(
            "sandbox: running as root needs a world-executable python3 (e.g. /usr/bin/python3) "
            "for the sandbox user; install python3 from the system packages"
        )
    return sys.executable


def _world_executable(path: str) -> bool:
    p = Path(os.path.realpath(path))
    return all(os.stat(d).st_mode & 0o001 for d in [p, *p.parents])


@functools.cache
def _die_with_parent() -> list[str]:
    """``setpriv --pdeathsig KILL`` when available: if the trainer dies mid-run, its sandbox
    gets SIGKILL (and with it the whole namespace) instead of living on."""
    cmd = ["setpriv", "--pdeathsig", "KILL"]
    if shutil.which("setpriv") is None:
        return []
    ok = subprocess.run([*cmd, "true"], capture_output=True).returncode == 0
    return cmd if ok else []


@functools.cache
def isolation() -> Isolation:
    """Probes once which layers work here, by running a trivial program through each."""
    python = _sandbox_python()
    root = os.geteuid() == 0
    seccomp = _probe(python, namespaces=False, seccomp=True)
    namespaces = shutil.which("unshare") is not None and _probe(python, True, seccomp)
    remove_stale()
    with_cgroup = _probe(python, namespaces, seccomp, with_cgroup=True)
    iso = Isolation(namespaces, root, seccomp, python, with_cgroup)
    if not (namespaces and seccomp and with_cgroup):
        log.warning("sandbox isolation is partial on this machine: %s", iso.describe())
    return iso


def _probe(python: str, namespaces: bool, seccomp: bool, with_cgroup: bool = False) -> bool:
    iso = Isolation(namespaces, os.geteuid() == 0, seccomp, python, with_cgroup)
    result = _run(iso, "print('ok')", Limits(timeout_s=30), probing=True)
    return result.returncode == 0 and result.stdout.strip() == "ok"


def run_python(
    code: str,
    limits: Limits | None = None,
    argv: list[str] | None = None,
    layers: Isolation | None = None,
    files: dict[str, str] | None = None,
) -> SandboxResult:
    """Runs ``code`` in the sandbox and returns its exit status and (capped) output.

    Args:
        code: the program (``main.py``); ``argv`` becomes its ``sys.argv[1:]``.
        limits: see ``Limits``.
        layers: isolation layers to use (default: all that ``isolation()`` found); tests
            use it to check each fallback on its own.
        files: more files for the program's working directory, name -> text.

    Raises:
        ValueError: a name in ``files`` that is not a plain file name, or ``main.py``.
    """
    files = files or {}
    for name in files:
        if name in ("", ".", "..", "main.py") or "/" in name or "\0" in name:
            raise ValueError(f"run_python: files[{name!r}]: use a plain file name, not main.py")
    return _run(layers or isolation(), code, limits or Limits(), argv=argv or [], files=files)


def _user_process_count(uid: int) -> int:
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    count += 1
            except OSError:
                pass
    return count


def _run(
    iso: Isolation,
    code: str,
    limits: Limits,
    argv: list[str] | None = None,
    probing: bool = False,
    files: dict[str, str] | None = None,
) -> SandboxResult:
    root = os.geteuid() == 0
    uid = _uids.take() if iso.user_switch else None
    hostdir = None
    group = None
    try:
        memory = limits.memory_mb * 2**20
        if iso.cgroup:
            try:
                group = CgroupRun.create(memory, limits.max_processes)
            except OSError as e:
                if probing:
                    raise
                log.warning("sandbox: no cgroup for this run (%s); splitting memory instead", e)
        if group is None:  # no group to bound the sum: each process gets its share
            memory //= limits.max_processes
            if memory < MIN_PROCESS_MEMORY and not probing:
                log.warning(
                    "sandbox: without a cgroup each process gets memory_mb / max_processes = "
                    "%d MiB, too little for Python to start; raise Limits.memory_mb or lower "
                    "Limits.max_processes",
                    memory >> 20,
                )
        if iso.namespaces:
            workdir = "/tmp"  # the fresh tmpfs inside the mount namespace
            prefix = ["unshare", *NAMESPACE_FLAGS] + ([] if root else ["--map-root-user"])
            prefix = _die_with_parent() + prefix
        else:
            hostdir = tempfile.mkdtemp(prefix="packrl-sandbox-")
            workdir = hostdir
            if uid is not None:
                os.chown(hostdir, uid, uid)
            prefix = _die_with_parent()
        nproc = limits.max_processes
        if uid is None:  # RLIMIT_NPROC counts all of this user's processes
            nproc += _user_process_count(os.getuid())
        cpu_s = limits.cpu_s or int(limits.timeout_s + 0.999)
        config = {
            "workdir": workdir,
            "private_fs": iso.namespaces,
            "uid": uid,
            "gid": uid,
            "tmpfs_mb": limits.tmpfs_mb,
            "seccomp": iso.seccomp,
            "cgroups": group.procs_files if group else [],
            "argv": argv or [],
            "rlimits": {
                "RLIMIT_CPU": cpu_s,
                "RLIMIT_AS": memory,
                "RLIMIT_NPROC": nproc,
                "RLIMIT_FSIZE": limits.max_file_mb * 2**20,
                "RLIMIT_NOFILE": 256,
                "RLIMIT_CORE": 0,
            },
        }
        cmd = [*prefix, iso.python, "-I", "-S", CHILD_SCRIPT, json.dumps(config)]
        payload = json.dumps({**(files or {}), "main.py": code}).encode()
        return _communicate(cmd, payload, limits)
    except Exception:
        if probing:
            return SandboxResult(-1, "", "", False, False, 0.0)
        raise
    finally:
        if group is not None:  # also kills what is left: processes that escaped the group kill
            group.destroy()
        if uid is not None:
            _uids.give_back(uid)
        if hostdir is not None:
            shutil.rmtree(hostdir, ignore_errors=True)


def _communicate(cmd: list[str], stdin: bytes, limits: Limits) -> SandboxResult:
    """Runs ``cmd`` in its own process group, feeding ``stdin``; kills the group at the limits."""
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, killed as a whole
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"},
    )
    out = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    timed_out = truncated = False
    sel = selectors.DefaultSelector()
    sel.register(proc.stdin, selectors.EVENT_WRITE)
    sel.register(proc.stdout, selectors.EVENT_READ)
    sel.register(proc.stderr, selectors.EVENT_READ)
    pending = memoryview(stdin)
    deadline = start + limits.timeout_s
    try:
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            for key, _ in sel.select(timeout=left):
                if key.fileobj is proc.stdin:
                    try:
                        n = os.write(proc.stdin.fileno(), pending[:65536])
                    except BrokenPipeError:
                        n = len(pending)
                    pending = pending[n:]
                    if not pending:
                        sel.unregister(proc.stdin)
                        proc.stdin.close()
                    continue
                chunk = os.read(key.fileobj.fileno(), 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                out[key.fileobj] += chunk
                if sum(len(b) for b in out.values()) > limits.max_output_bytes:
                    truncated = True
                    break
            if truncated:
                break
    finally:
        sel.close()
        if proc.poll() is None:
            # Kill unshare's child first (the namespace's PID 1) and let unshare reap it: PID 1
            # is reaped only after the kernel has killed and reaped everything in its
            # namespace, so when unshare exits, nothing of the program is left.
            for child in _children(proc.pid):
                _kill(child)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        _kill(-proc.pid)  # the process group, also after a normal exit: nothing may linger
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # should not happen after SIGKILL; do not hang
            log.error("sandbox: process group %d survived SIGKILL", proc.pid)
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if not f.closed:
                f.close()
    cap = limits.max_output_bytes

    def text(b: bytearray) -> str:
        return bytes(b[:cap]).decode("utf-8", errors="replace")

    return SandboxResult(
        returncode=proc.returncode if proc.returncode is not None else -signal.SIGKILL,
        stdout=text(out[proc.stdout]),
        stderr=text(out[proc.stderr]),
        timed_out=timed_out,
        output_truncated=truncated,
        duration_s=time.monotonic() - start,
    )


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def _kill(pid: int) -> None:
    """SIGKILL a process (``pid`` > 0) or a process group (``pid`` < 0); gone is fine."""
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


__all__ = ["Isolation", "Limits", "SandboxResult", "isolation", "run_python"]
