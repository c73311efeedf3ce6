"""The sandbox's first process: isolates itself, then becomes ``python -I main.py``.

Run by ``packrl.execution.sandbox`` (never imported), as
``python -I -S sandbox_child.py CONFIG_JSON`` with the program's files on stdin (a JSON
object, name -> text; ``main.py`` is the program), inside ``unshare``'s new network, PID and mount
namespaces when those are available. Standard library only: it runs under the sandbox's
interpreter (``/usr/bin/python3`` when root), which need not have packrl installed.

Steps, each only when the config asks for it:
1. read the files from stdin, then point stdin at /dev/null; join the run's cgroups;
2. private file system: every mount read-only (recursively), a fresh size-limited tmpfs
   on /tmp as the program's own temporary directory (gone when the namespace dies), a
   private /dev/shm and an empty /run;
3. write ``main.py`` (and any other files) into the work directory and hand them to the
   sandbox user;
4. empty the capability bounding set (so even namespace root gets no capabilities at exec),
   drop to that user (root only), set resource limits, block ``socket()`` with seccomp
   (when libseccomp is present), and exec the interpreter.
A step that fails exits with status 125 and a message: the program never runs half-isolated.
"""

import ctypes
import ctypes.util
import json
import os
import resource
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND = 0x1, 0x2, 0x4, 0x20, 0x1000
MS_REC, MS_PRIVATE = 0x4000, 1 << 18
AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = -100, 0x8000, 0x1
SYS_MOUNT_SETATTR = 442  # same number on every architecture (new syscall table)
PR_SET_PDEATHSIG, PR_CAPBSET_DROP = 1, 24

libc = ctypes.CDLL(None, use_errno=True)


def fail(step: str) -> None:
    err = ctypes.get_errno()
    sys.stderr.write(f"packrl sandbox: {step} failed: {os.strerror(err) if err else 'error'}\n")
    sys.stderr.flush()
    os._exit(125)


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    enc = [None if s is None else s.encode() for s in (source, target, fstype)]
    if libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), data.encode() or None) != 0:
        fail(f"mount {target}")


class MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def make_everything_read_only() -> None:
    attr = MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)
    if (
        libc.syscall(
            SYS_MOUNT_SETATTR,
            AT_FDCWD,
            b"/",
            AT_RECURSIVE,
            ctypes.byref(attr),
            ctypes.sizeof(attr),
        )
        == 0
    ):
        return
    # Kernels before 5.12: remount each mount read-only, one by one.
    with open("/proc/self/mounts") as f:
        targets = [line.split()[1].replace("\\040", " ") for line in f]
    for target in targets:
        if libc.mount(None, target.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY, None) != 0:
            if ctypes.get_errno() not in (2, 13):  # vanished or shadowed mounts: nothing to write
                fail(f"read-only remount of {target}")


def block_sockets() -> bool:
    """seccomp: ``socket()`` fails with EPERM for every family, and ``socketpair()`` for
    datagram sockets. Without ``socket()`` nothing can reach the network or a host Unix
    socket by path; the stream and seqpacket pairs that ``socketpair()`` still makes are
    connected to each other only (``connect``/``sendto`` on them fail with EISCONN), while a
    datagram pair could ``sendto`` any path (/dev/log). False if libseccomp is missing."""
    path = ctypes.util.find_library("seccomp")
    if not path:
        return False
    try:
        sec = ctypes.CDLL(path)
    except OSError:
        return False

    class ArgCmp(ctypes.Structure):
        _fields_ = [
            ("arg", ctypes.c_uint),
            ("op", ctypes.c_int),
            ("datum_a", ctypes.c_uint64),
            ("datum_b", ctypes.c_uint64),
        ]

    # Constants from seccomp.h: SCMP_ACT_ALLOW, SCMP_ACT_ERRNO(EPERM), SCMP_CMP_MASKED_EQ.
    scmp_act_allow, scmp_act_eperm, scmp_cmp_masked_eq = 0x7FFF0000, 0x00050000 | 1, 7
    sock_type_mask, sock_dgram = 0xF, 2  # the type argument also carries SOCK_CLOEXEC etc.
    sec.seccomp_init.restype = ctypes.c_void_p
    ctx = ctypes.c_void_p(sec.seccomp_init(ctypes.c_uint32(scmp_act_allow)))
    if not ctx:
        fail("seccomp_init")
    eperm = ctypes.c_uint32(scmp_act_eperm)
    if sec.seccomp_rule_add_array(ctx, eperm, sec.seccomp_syscall_resolve_name(b"socket"), 0, None):
        fail("seccomp_rule_add socket")
    dgram = ArgCmp(1, scmp_cmp_masked_eq, sock_type_mask, sock_dgram)
    nr = sec.seccomp_syscall_resolve_name(b"socketpair")
    if sec.seccomp_rule_add_array(ctx, eperm, nr, 1, ctypes.byref(dgram)):
        fail("seccomp_rule_add socketpair")
    if sec.seccomp_load(ctx):  # also sets no_new_privs
        fail("seccomp_load")
    return True


def main() -> None:
    cfg = json.loads(sys.argv[1])
    files = json.loads(sys.stdin.buffer.read())  # name -> text; main.py is the program
    devnull = os.open("/dev/null", os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)

    for procs in cfg["cgroups"]:  # first, so that every process of the run is born inside
        try:
            with open(procs, "w") as f:
                f.write("0")  # cgroup v1: "0" moves the writing process
        except OSError as e:
            ctypes.set_errno(e.errno or 0)
            fail(f"joining cgroup {procs}")

    workdir = cfg["workdir"]
    uid, gid = cfg["uid"], cfg["gid"]
    if cfg["private_fs"]:
        mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing leaks back to the host
        make_everything_read_only()
        owner = f",uid={uid},gid={gid}" if uid is not None else ""
        size = f"size={cfg['tmpfs_mb']}m"
        mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV, f"{size},mode=0700{owner}")
        # Host sockets and shared memory live in /dev/shm and /run (docker.sock, D-Bus,
        # journald): a private /dev/shm and an empty read-only /run hide them even where
        # seccomp is missing. /tmp is already private.
        if os.path.isdir("/dev/shm"):
            mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, f"{size},mode=0700{owner}")
        if os.path.isdir("/run"):
            mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV | MS_RDONLY, "size=16k,mode=0755")
    paths = []
    for name, text in files.items():
        paths.append(os.path.join(workdir, name))
        with open(paths[-1], "w", encoding="utf-8") as f:
            f.write(text)
    # An empty capability bounding set: the program gets no capability even as (namespace)
    # root, so it cannot undo the read-only mounts or the limits. Not being root, there is
    # nothing to drop (and no right to drop it).
    if os.geteuid() == 0:
        for cap in range(64):
            if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() != 22:
                fail(f"dropping capability {cap}")  # 22 (EINVAL): no such capability
    if uid is not None:
        for path in paths:
            os.chown(path, uid, gid)
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    # Die with our parent (unshare, or the trainer without namespaces). The kernel clears
    # this on setuid, which is why unshare's --kill-child alone is not enough.
    if libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0) != 0:
        fail("PR_SET_PDEATHSIG")
    if cfg["seccomp"] and not block_sockets():  # before the limits: loading it takes memory
        fail("seccomp (libseccomp not found)")
    for name, value in cfg["rlimits"].items():
        limit = int(value)
        resource.setrlimit(getattr(resource, name), (limit, limit))
    os.chdir(workdir)
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    os.execve(sys.executable, [sys.executable, "-I", "main.py", *cfg["argv"]], env)


if __name__ == "__main__":
    main()
