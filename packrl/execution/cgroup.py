"""One control group per sandbox run: memory and process count bounded for the whole sandbox.

Control groups v1 (the ``memory`` and ``pids`` hierarchies, as mounted on the dev and CI
machines; v2 is not mounted there). A run's group is made under the trainer's own group in
each hierarchy (``/proc/self/cgroup``), so the sandbox also stays inside whatever limits the
trainer itself runs under, and is removed when the run ends:

- ``memory.limit_in_bytes`` (and ``memory.memsw.limit_in_bytes``, when swap is accounted):
  all the sandbox's processes together, tmpfs pages included. Past it, the kernel reclaims
  cache and then OOM-kills a process of the group (SIGKILL), never one outside it.
- ``pids.max``: all its processes and threads together.

The sandbox's first process joins the groups itself (it writes ``0`` to ``cgroup.procs``)
before anything else runs, so every process of the run is born inside them. Needs root (or
a delegated hierarchy); ``CgroupRun.create`` raises ``OSError`` where it cannot.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CONTROLLERS = ("memory", "pids")
PREFIX = "packrl-sandbox-"
_counter = itertools.count()


def _mounts() -> dict[str, tuple[str, str]]:
    """controller -> (mount point, root of the hierarchy inside that mount), cgroup v1 only."""
    found = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, (fstype, _source, options) = left.split(), right.split()[:3]
            if fstype != "cgroup":
                continue
            for controller in CONTROLLERS:
                if controller in options.split(","):
                    found[controller] = (fields[4], fields[3])
    return found


def _own_paths() -> dict[str, str]:
    """controller -> this process's group in that hierarchy (from /proc/self/cgroup)."""
    paths = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, names, path = line.rstrip("\n").split(":", 2)
            for name in names.split(","):
                paths[name] = path
    return paths


def parent_dirs() -> dict[str, Path]:
    """controller -> the directory under which this process may make run groups.

    Raises OSError when a controller is not mounted (v1) here.
    """
    mounts, own = _mounts(), _own_paths()
    dirs = {}
    for controller in CONTROLLERS:
        if controller not in mounts or controller not in own:
            raise OSError(f"cgroup v1 controller {controller!r} is not mounted")
        mount_point, mount_root = mounts[controller]
        rel = os.path.relpath(own[controller], mount_root)
        dirs[controller] = Path(mount_point) if rel == "." else Path(mount_point) / rel
    return dirs


@dataclass
class CgroupRun:
    """The groups of one sandbox run (one directory per controller)."""

    dirs: list[Path]

    @classmethod
    def create(cls, memory_bytes: int, max_pids: int) -> CgroupRun:
        """Makes the groups and sets their limits. Raises OSError if it cannot."""
        name = f"{PREFIX}{os.getpid()}-{next(_counter)}"
        parents = parent_dirs()
        run = cls([])
        try:
            for controller in CONTROLLERS:
                d = parents[controller] / name
                d.mkdir()
                run.dirs.append(d)
            mem = parents["memory"] / name
            (mem / "memory.limit_in_bytes").write_text(str(memory_bytes))
            if (mem / "memory.memsw.limit_in_bytes").exists():  # no swapping past the limit
                (mem / "memory.memsw.limit_in_bytes").write_text(str(memory_bytes))
            (parents["pids"] / name / "pids.max").write_text(str(max_pids))
        except OSError:
            run.destroy()
            raise
        return run

    @property
    def procs_files(self) -> list[str]:
        """The ``cgroup.procs`` files the sandbox's first process writes ``0`` to."""
        return [str(d / "cgroup.procs") for d in self.dirs]

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.dirs[0] / "cgroup.procs").read_text().split()]
        except (OSError, IndexError):
            return []

    def peak_memory_bytes(self) -> int:
        """``memory.max_usage_in_bytes``: the group's peak, page cache included."""
        for d in self.dirs:
            f = d / "memory.max_usage_in_bytes"
            if f.exists():
                return int(f.read_text())
        return 0

    def destroy(self, timeout_s: float = 5.0) -> None:
        """SIGKILLs whatever is still in the groups, then removes them (retrying while the
        kernel finishes reaping)."""
        deadline = time.monotonic() + timeout_s
        while self.dirs:
            for pid in self.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            for d in list(self.dirs):
                try:
                    d.rmdir()
                    self.dirs.remove(d)
                except FileNotFoundError:
                    self.dirs.remove(d)
                except OSError:
                    pass
            if self.dirs:
                if time.monotonic() > deadline:
                    log.error("sandbox: could not remove cgroups %s", self.dirs)
                    return
                time.sleep(0.01)


def remove_stale() -> None:
    """Removes empty run groups left by trainers that were killed mid-run."""
    try:
        parents = parent_dirs()
    except OSError:
        return
    for parent in parents.values():
        for d in parent.glob(PREFIX + "*"):
            pid = d.name[len(PREFIX) :].split("-")[0]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                try:
                    d.rmdir()
                except OSError:
                    pass
