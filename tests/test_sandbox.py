"""Hostile programs in the sandbox: each ends within its limit, the parent survives, and the
thing it tried did not happen. Only 127.0.0.1 is ever touched."""

import dataclasses
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from packrl.execution.cgroup import PREFIX, parent_dirs, remove_stale
from packrl.execution.sandbox import UID_BASE, Limits, isolation, run_python

ISO = isolation()
# Slack for process start-up and the kill on a loaded 2-core machine.
SLACK_S = 5.0


def sandbox_pids() -> list[int]:
    """Live processes on the host owned by sandbox uids (zombies are dead: not counted)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid < UID_BASE:
                    continue
                with open(f"/proc/{entry}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z":
                pids.append(int(entry))
    return pids


def assert_clean_after():
    if ISO.user_switch:
        assert sandbox_pids() == [], "sandbox processes outlived the run"
    assert run_python("print(6 * 7)").stdout == "42\n"  # the sandbox still works


def test_isolation_layers_on_this_machine():
    # The dev/CI machines have unshare, libseccomp and cgroup v1 (as root); a partial setup
    # must be visible.
    assert ISO.namespaces and ISO.seccomp, ISO.describe()
    if os.geteuid() == 0:
        assert ISO.cgroup, ISO.describe()


def test_normal_program_runs_and_can_use_its_tmp():
    res = run_python(
        "import os, sys\n"
        "open('scratch.txt', 'w').write('hi')\n"
        "print(open('scratch.txt').read(), os.getcwd() == os.environ['TMPDIR'], sys.argv[1])\n",
        argv=["arg"],
    )
    assert res.ok, res
    assert res.stdout == "hi True arg\n"


def test_fork_bomb():
    limits = Limits(timeout_s=3, max_processes=16)
    peak = [0]
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], len(sandbox_pids()))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    start = time.monotonic()
    res = run_python(
        "import os, time\n"
        "while True:\n"
        "    try:\n"
        "        os.fork()\n"
        "    except OSError:\n"
        "        time.sleep(0.001)\n",
        limits,
    )
    done.set()
    watcher.join()
    assert time.monotonic() - start < limits.timeout_s + SLACK_S
    assert res.timed_out and not res.ok
    if ISO.user_switch:  # RLIMIT_NPROC held: the sandbox user never had more processes
        assert 0 < peak[0] <= limits.max_processes, peak[0]
    assert_clean_after()


def test_infinite_loop():
    start = time.monotonic()
    res = run_python("while True:\n    pass\n", Limits(timeout_s=2))
    assert time.monotonic() - start < 2 + SLACK_S
    assert not res.ok and res.returncode != 0
    assert_clean_after()


def test_memory_bomb():
    res = run_python(
        "chunks = []\n"
        "try:\n"
        "    while True:\n"
        "        chunks.append(bytearray(10 * 2**20))\n"
        "except MemoryError:\n"
        "    print(len(chunks) * 10)\n"
        "    raise\n",
        Limits(timeout_s=10, memory_mb=256, max_processes=4),
    )
    assert not res.ok and "MemoryError" in res.stderr
    assert int(res.stdout) < 256  # never got past the address-space limit
    assert not res.timed_out
    assert_clean_after()


def test_output_flood():
    limits = Limits(timeout_s=10, max_output_bytes=100_000)
    start = time.monotonic()
    res = run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 4096)\n", limits)
    assert time.monotonic() - start < 5  # killed at the cap, not at the deadline
    assert res.output_truncated and not res.timed_out and not res.ok
    assert len(res.stdout) <= limits.max_output_bytes
    assert_clean_after()


def test_write_outside_tmp(tmp_path):
    tag = uuid.uuid4().hex
    host_dir = tmp_path / "victim"
    host_dir.mkdir()
    os.chmod(host_dir, 0o777)  # even a world-writable host directory must stay untouched
    os.chmod(tmp_path, 0o755)
    targets = [
        host_dir / f"evil-{tag}",
        f"/tmp/evil-{tag}",
        f"/var/tmp/evil-{tag}",
        f"/dev/shm/evil-{tag}",
        os.path.join(os.getcwd(), f"evil-{tag}"),
    ]
    code = (
        "import sys\n"
        "written = []\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        open(path, 'w').write('pwned')\n"
        "        written.append(path)\n"
        "    except OSError:\n"
        "        pass\n"
        "open('own-file', 'w').write('fine')\n"
        "print(len(written), open('own-file').read())\n"
    )
    res = run_python(code, Limits(timeout_s=10), argv=[str(t) for t in targets])
    assert res.ok, res
    for target in targets:
        assert not os.path.exists(target), target
    if ISO.namespaces:  # /tmp and /dev/shm inside are private tmpfs; the rest is read-only
        assert res.stdout == "2 fine\n"
    assert_clean_after()


LAYERS = [pytest.param(ISO, id="all-layers")]
if ISO.namespaces:
    LAYERS.append(pytest.param(dataclasses.replace(ISO, seccomp=False), id="netns-only"))
if ISO.seccomp:
    LAYERS.append(pytest.param(dataclasses.replace(ISO, namespaces=False), id="seccomp-only"))


@pytest.mark.parametrize("layers", LAYERS)
def test_signal_parent_and_others(layers):
    victim = subprocess.Popen(["sleep", "60"])
    try:
        res = run_python(
            "import os, signal, sys\n"
            "for pid in [os.getppid(), *map(int, sys.argv[1:])]:\n"
            "    for sig in (signal.SIGKILL, signal.SIGTERM):\n"
            "        try:\n"
            "            os.kill(pid, sig)\n"
            "        except OSError:\n"
            "            pass\n"
            "try:\n"
            "    os.killpg(int(sys.argv[1]), signal.SIGKILL)\n"
            "except OSError:\n"
            "    pass\n"
            "os.kill(-1, signal.SIGKILL)  # everything it may signal\n",
            Limits(timeout_s=10),
            argv=[str(os.getpid()), str(victim.pid), str(os.getpgid(0))],
            layers=layers,
        )
        time.sleep(0.2)
        assert victim.poll() is None, "the sandbox killed a host process"
        assert not res.timed_out
    finally:
        victim.kill()
        victim.wait()
    assert_clean_after()


@pytest.mark.parametrize("layers", LAYERS)
def test_socket_to_local_listener(layers):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        res = run_python(
            "import socket, sys\n"
            "try:\n"
            "    s = socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=2)\n"
            "    s.sendall(b'leak')\n"
            "    print('connected')\n"
            "except OSError as e:\n"
            "    print('blocked', type(e).__name__)\n",
            Limits(timeout_s=10),
            argv=[str(port)],
            layers=layers,
        )
        assert res.ok, res
        assert res.stdout.startswith("blocked"), res.stdout
        with pytest.raises(TimeoutError):
            server.accept()  # nobody ever connected
    finally:
        server.close()


def test_sleep_past_deadline_and_lingering_children():
    start = time.monotonic()
    res = run_python(
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()  # try to escape the process group\n"
        "    time.sleep(60)\n"
        "time.sleep(60)\n",
        Limits(timeout_s=1),
    )
    assert res.timed_out
    assert time.monotonic() - start < 1 + SLACK_S
    assert_clean_after()


def test_program_has_no_capabilities_to_undo_isolation():
    res = run_python(
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "MS_REMOUNT, MS_BIND = 0x20, 0x1000\n"
        "print(libc.mount(None, b'/', None, ctypes.c_ulong(MS_REMOUNT | MS_BIND), None))\n"
        "print(open('/proc/self/status').read().split('CapEff:')[1].split()[0])\n"
    )
    assert res.ok, res
    assert res.stdout.split() == ["-1", "0000000000000000"]


def test_sandbox_dies_with_the_trainer():
    # A "trainer" process starts a long sandbox run and is SIGKILLed mid-run.
    trainer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from packrl.execution.sandbox import Limits, isolation, run_python\n"
            "isolation()  # its probe runs are not the sandbox we are after\n"
            "print('started', flush=True)\n"
            "run_python('import time\\ntime.sleep(60)', Limits(timeout_s=60))\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert trainer.stdout.readline() == "started\n"
    deadline = time.monotonic() + 20
    while not sandbox_pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandbox_pids(), "the sandbox never started"
    trainer.kill()
    trainer.wait()
    deadline = time.monotonic() + 5
    while sandbox_pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandbox_pids() == [], "the sandbox outlived its trainer"
    if ISO.cgroup:  # the dead trainer could not remove its run's groups; the next one does
        leftovers = [d / f"{PREFIX}{trainer.pid}-1" for d in parent_dirs().values()]
        remove_stale()
        assert not any(d.exists() for d in leftovers)


# The case: memory_mb=64 and max_processes=8 let seven forked children hold 40 MiB
# each (281 MiB in all) when the limit was per process. With a cgroup, 64 MiB is for the
# whole sandbox; without one, each process gets memory_mb / max_processes.
MEMORY_CASES = []
if ISO.cgroup:
    MEMORY_CASES.append(pytest.param(ISO, 64, id="cgroup"))
MEMORY_CASES.append(pytest.param(dataclasses.replace(ISO, cgroup=False), 8 * 48, id="split"))
# Seven children each fill 40 MiB, say so, and stay. After 3 s the parent prints how many
# MiB the children still alive hold at once (to keep within a cgroup's limit the kernel
# kills some of them).
FORKING_MEMORY_HOG = """
import os, select, struct, time
r, w = os.pipe()
for _ in range(7):
    if os.fork() == 0:
        try:
            block = bytearray(b'1') * (40 << 20)
            os.write(w, struct.pack('i', os.getpid()))
        except MemoryError:
            pass
        time.sleep(60)
        os._exit(0)
holders, end = [], time.monotonic() + 3
while time.monotonic() < end:
    if select.select([r], [], [], 0.1)[0]:
        holders.append(struct.unpack('i', os.read(r, 4))[0])
alive = [pid for pid in holders if os.waitpid(pid, os.WNOHANG) == (0, 0)]
print(40 * len(alive), flush=True)
"""


@pytest.mark.parametrize("layers,memory_mb", MEMORY_CASES)
def test_forking_program_memory_is_bounded_for_the_whole_sandbox(layers, memory_mb):
    limits = Limits(timeout_s=10, memory_mb=memory_mb, max_processes=8)
    res = run_python(FORKING_MEMORY_HOG, limits, layers=layers)
    held_mib = int(res.stdout or 0)  # no output: the kernel killed the parent instead
    assert held_mib <= memory_mb, (held_mib, res)
    assert not res.timed_out
    assert_clean_after()


HOST_SOCKET_DIRS = ["/dev/shm", "/tmp", "/var/tmp"]


@pytest.mark.parametrize("layers", LAYERS)
def test_host_unix_sockets_unreachable(layers):
    # Without seccomp only the directories the mount namespace hides are out of reach.
    dirs = HOST_SOCKET_DIRS if layers.seccomp else ["/dev/shm", "/tmp"]
    tag = uuid.uuid4().hex
    servers, paths = [], []
    try:
        for d in dirs:
            for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                path = f"{d}/packrl-test-{tag}-{kind}.sock"
                server = socket.socket(socket.AF_UNIX, kind)
                server.bind(path)
                os.chmod(path, 0o777)  # world-writable: any local user could connect
                if kind == socket.SOCK_STREAM:
                    server.listen(4)
                server.settimeout(0.3)
                servers.append((server, kind))
                paths.append(path)
        res = run_python(
            "import socket, sys\n"
            "a, b = socket.socketpair()\n"
            "a.sendall(b'ping')\n"
            "print('socketpair', b.recv(4).decode())\n"
            "for path in sys.argv[1:]:\n"
            "    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):\n"
            "        try:\n"
            "            s = socket.socket(socket.AF_UNIX, kind)\n"
            "            s.connect(path)\n"
            "            s.send(b'leak')\n"
            "            print('reached', path)\n"
            "        except OSError:\n"
            "            pass\n"
            "    for kind in (socket.SOCK_DGRAM, socket.SOCK_SEQPACKET, socket.SOCK_STREAM):\n"
            "        try:\n"
            "            socket.socketpair(socket.AF_UNIX, kind)[0].sendto(b'leak', path)\n"
            "            print('reached by socketpair', path)\n"
            "        except OSError:\n"
            "            pass\n",
            Limits(timeout_s=10),
            argv=paths,
            layers=layers,
        )
        assert res.ok, res
        assert res.stdout.splitlines() == ["socketpair ping"], res.stdout
        for server, kind in servers:
            with pytest.raises(TimeoutError):  # nothing ever arrived
                server.accept() if kind == socket.SOCK_STREAM else server.recv(16)
    finally:
        for server, _ in servers:
            server.close()
        for path in paths:
            os.unlink(path)
