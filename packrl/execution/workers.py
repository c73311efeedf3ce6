"""A small process pool whose calls have a hard deadline.

Reward code such as math-verify can hang inside C code (``10^{10^{10}}``), and its own
timeouts use ``signal.alarm``, which only works in a main thread. So such calls run in the
main thread of worker processes, and a call that passes its deadline gets its worker killed
(SIGKILL) and replaced. ``concurrent.futures.ProcessPoolExecutor`` cannot kill one stuck
task, hence this pool.

Workers are fresh interpreters (``python -m packrl.execution.workers``), never forks: the trainer has
torch threads, and a forked copy of a multi-threaded process can deadlock. Unlike
multiprocessing's ``spawn`` they do not re-import the trainer's ``__main__`` (under
``tune run`` that is the recipe, with torch). They import only the called function's module,
so keep torch out of modules whose functions run here.
"""

from __future__ import annotations

import atexit
import importlib
import logging
import os
import resource
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

log = logging.getLogger(__name__)


def default_num_workers() -> int:
    """Worker processes for this machine: one per usable core, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


@dataclass
class CallResult:
    """Outcome of one call: ``ok`` with ``value``, or an ``error`` summary ("timeout" on deadline)."""

    ok: bool
    value: Any = None
    error: str = ""


def _worker_main(conn: _Duplex, memory_mb: int | None, preload: list[str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle
    if memory_mb:  # an answer like 9^{9^{9^9}} must fail with MemoryError, not swap the host
        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    for path in preload:  # warm up before "ready", so start-up never eats into a deadline
        try:
            module, _, fn = path.rpartition(".")
            getattr(importlib.import_module(module), fn)()
        except Exception as e:  # noqa: BLE001 - the calls themselves will report it
            print(f"packrl worker: warm-up {path} failed: {e}", file=sys.stderr)
    try:
        conn.send("ready")
    except OSError:  # the pool was closed while this worker started
        return
    while True:
        try:
            fn, args = conn.recv()
        except (EOFError, OSError):  # parent went away
            return
        # Plain tuples: this module is __main__ here, so its classes would not unpickle.
        try:
            conn.send((True, fn(*args), ""))
        except BaseException as e:  # noqa: BLE001 - any failure is reported, the worker lives on
            tb = traceback.extract_tb(e.__traceback__)
            where = f" at {tb[-1].filename}:{tb[-1].lineno}" if tb else ""
            conn.send((False, None, f"{type(e).__name__}: {e}{where}"))


class _Duplex:
    """Two one-way connections used as one; ``fileno`` is the reading end, for ``wait``."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.reader = Connection(read_fd, writable=False)
        self.writer = Connection(write_fd, readable=False)

    def send(self, obj: Any) -> None:
        self.writer.send(obj)

    def recv(self) -> Any:
        return self.reader.recv()

    def fileno(self) -> int:
        return self.reader.fileno()

    def close(self) -> None:
        self.reader.close()
        self.writer.close()


class _Worker:
    """One worker interpreter, talking over a pair of pipes; usable once ``ready``."""

    def __init__(self, memory_mb: int | None, preload: Sequence[str]) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        # The child sees the parent's import path, so user reward modules import there too.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        cmd = [sys.executable, "-m", "packrl.execution.workers", str(to_child_r), str(from_child_w)]
        cmd += [str(memory_mb or 0), *preload]
        self.proc = subprocess.Popen(cmd, pass_fds=(to_child_r, from_child_w), env=env)
        os.close(to_child_r)
        os.close(from_child_w)
        self.conn = _Duplex(from_child_r, to_child_w)
        self.ready = False

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.conn.close()


class DeadlinePool:
    """Runs ``fn(*args)`` for many argument tuples in worker processes, each call with a deadline.

    Args:
        num_workers: worker processes; default: one per core (at most 8).
        memory_mb: address-space limit per worker (None: no limit).
        preload: dotted paths of functions each worker calls (no arguments) before it takes
            calls, to import and warm up libraries outside the calls' deadlines.

    ``map`` is thread-safe (calls from several threads take turns) and never runs past
    ``total_timeout_s``, so a stuck input cannot hold the pool beyond one call.
    """

    def __init__(
        self,
        num_workers: int | None = None,
        memory_mb: int | None = 4096,
        preload: Sequence[str] = (),
    ) -> None:
        self.num_workers = num_workers or default_num_workers()
        self.memory_mb = memory_mb
        self.preload = list(preload)
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()

    def map(
        self,
        fn: Callable[..., Any],
        args_list: Sequence[tuple],
        timeout_s: float,
        total_timeout_s: float | None = None,
    ) -> list[CallResult]:
        """Returns one ``CallResult`` per argument tuple, in order.

        ``fn`` must be a module-level function (it is pickled by name). A call running for
        more than ``timeout_s`` seconds, or still unfinished after ``total_timeout_s``
        (default: enough for every call to time out one after another, plus a minute for
        start-up), gives ``CallResult(False, error="timeout")``; its worker is replaced.
        """
        results: list[CallResult | None] = [None] * len(args_list)
        if total_timeout_s is None:
            total_timeout_s = timeout_s * len(args_list) + 60.0
        with self._lock:
            end = time.monotonic() + total_timeout_s
            while len(self._workers) < self.num_workers:
                self._workers.append(_Worker(self.memory_mb, self.preload))
            todo = list(range(len(args_list)))[::-1]  # pop() takes the next index
            busy: dict[int, tuple[int, float]] = {}  # worker slot -> (item index, deadline)
            idle = [s for s, w in enumerate(self._workers) if w.ready]
            while todo or busy:
                now = time.monotonic()
                if now >= end:
                    break
                while todo and idle:
                    slot, i = idle.pop(), todo.pop()
                    self._workers[slot].conn.send((fn, args_list[i]))
                    busy[slot] = (i, min(now + timeout_s, end))
                next_deadline = min([d for _, d in busy.values()] + [end])
                conns = {w.conn: s for s, w in enumerate(self._workers) if s in busy or not w.ready}
                for conn in wait(list(conns), timeout=max(0.0, next_deadline - time.monotonic())):
                    slot = conns[conn]
                    try:
                        message = conn.recv()
                    except (EOFError, OSError):  # the worker died (e.g. killed by the OOM killer)
                        message = (False, None, "worker process died")
                        self._replace(slot)
                    if slot in busy:
                        i, _ = busy.pop(slot)
                        results[i] = CallResult(*message)
                    elif message == "ready":
                        self._workers[slot].ready = True
                    if self._workers[slot].ready:
                        idle.append(slot)
                now = time.monotonic()
                for slot, (i, deadline) in list(busy.items()):
                    if now >= deadline:
                        del busy[slot]
                        results[i] = CallResult(False, error="timeout")
                        self._replace(slot)
            for slot, (i, _) in busy.items():  # out of total time: stop what still runs
                results[i] = CallResult(False, error="timeout")
                self._replace(slot)
        return [r or CallResult(False, error="timeout") for r in results]

    def _replace(self, slot: int) -> None:
        self._workers[slot].kill()
        self._workers[slot] = _Worker(self.memory_mb, self.preload)

    def close(self) -> None:
        with self._lock:
            for w in self._workers:
                w.kill()
            self._workers = []


# The shared pool's main user is the math reward; warming math-verify up front (import and
# first parse: about 1-2 s) keeps that out of the first calls' deadlines. Workers start only
# when first used.
SHARED_PRELOAD = ("packrl.tasks.math.warm_up",)
_shared: DeadlinePool | None = None
_shared_lock = threading.Lock()


def shared_pool(num_workers: int | None = None) -> DeadlinePool:
    """The process-wide pool that reward functions share (created on first use).

    ``num_workers`` resizes it (used by ``RewardScorer(max_workers=...)``).
    """
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = DeadlinePool(num_workers, preload=SHARED_PRELOAD)
            atexit.register(_shared.close)
        elif num_workers and num_workers != _shared.num_workers:
            _shared.close()
            _shared.num_workers = num_workers
        return _shared


# A worker: python -m packrl.execution.workers READ_FD WRITE_FD MEMORY_MB [WARM_UP_FN...]
if __name__ == "__main__":
    _worker_main(
        _Duplex(int(sys.argv[1]), int(sys.argv[2])), int(sys.argv[3]) or None, sys.argv[4:]
    )
