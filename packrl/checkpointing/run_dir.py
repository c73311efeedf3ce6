"""One run per output directory.

``claim_output_dir`` is called once per run, by rank 0, before anything is written:

- **A lock** (``output_dir/.packrl-run.lock``, ``fcntl.flock``) keeps a second live run out;
  the file holds the owner's pid, host and start time, which the refused run prints. The
  kernel drops a flock when its process dies, so a lock file that exists but is not locked
  was left by a run that was killed or crashed: it is reported (a warning) and taken over.
- **A fresh run** (``resume=False``) into a directory that holds another run's checkpoints,
  metrics or completions stops with an error that says what is there and the three choices:
  ``resume_from_checkpoint: true``, another ``output_dir``, or ``overwrite: true``.
  ``overwrite`` moves the old run's files into ``output_dir/overwritten-<UTC time>/`` (one
  rename, nothing deleted: delete that folder when it is no longer needed).
- **A resume** needs a checkpoint in ``output_dir/checkpoints``; it appends to the metrics.
"""

import errno
import fcntl
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from packrl.checkpointing.layout import LATEST_FILE, latest_checkpoint, step_dirs

log = logging.getLogger(__name__)

LOCK_FILE = ".packrl-run.lock"
CHECKPOINTS_DIR = "checkpoints"
# What a run writes into its output_dir (recipes/grpo.py). overwrite=True moves these aside.
RUN_FILES = ("checkpoints", "metrics.jsonl", "completions.jsonl", "reward.png")
OVERWRITTEN_PREFIX = "overwritten-"


class OutputDirError(RuntimeError):
    """The output directory is in use by another run, or holds a run this one would mix
    with."""


@dataclass
class RunLock:
    """A held claim on ``output_dir``; ``release()`` (or leaving a ``with`` block) frees it.

    ``stale`` is the record (pid, host, started) of a dead run whose lock was taken over;
    ``moved_to`` is where ``overwrite=True`` moved the previous run's files.
    """

    output_dir: Path
    path: Path
    stale: dict | None = None
    moved_to: Path | None = None
    _fd: int | None = field(default=None, repr=False)

    def release(self) -> None:
        """Remove the lock file and unlock it. Removing it while still holding the lock is
        safe: a run waiting on the old file sees that the path no longer names it and retries
        on a new one. Idempotent."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_record(fd: int) -> dict | None:
    data = os.pread(fd, 4096, 0)
    if not data.strip():
        return None
    try:
        return json.loads(data)
    except ValueError:
        return {"unreadable": data[:200].decode(errors="replace")}


def _describe_owner(record: dict | None) -> str:
    if not record or "pid" not in record:
        return f"owner unknown: {record}"
    return f"pid {record['pid']} on host {record['host']}, started {record['started']}"


def _acquire(path: Path) -> tuple[int, dict | None]:
    """flock ``path`` (created if absent) without waiting; returns the fd and the record a
    previous owner left in it (None if none). Raises OutputDirError if a live run holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            record = _read_record(fd)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise OutputDirError(
                f"output_dir={path.parent} is in use by another run ({_describe_owner(record)}). "
                "Wait for it to finish, stop it, or give this run another output_dir."
            ) from None
        try:  # the owner may have released and removed the file between our open and lock
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd, _read_record(fd)
        except FileNotFoundError:
            pass
        os.close(fd)


def _jsonl_summary(path: Path) -> str | None:
    """``"metrics.jsonl (15 records, last step 15)"``, or None when absent or empty."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        return None
    try:
        last = f", last step {json.loads(lines[-1])['step']}"
    except (ValueError, KeyError, TypeError):
        last = ""
    return f"{path.name} ({len(lines)} records{last})"


def _previous_run(output_dir: Path) -> list[str]:
    """What an earlier run left in ``output_dir`` that a fresh run would mix with."""
    found = []
    checkpoints = output_dir / CHECKPOINTS_DIR
    steps = [p.name for _, p in step_dirs(checkpoints)]
    pointer = checkpoints / LATEST_FILE
    if steps or pointer.exists():
        span = f"{steps[0]} .. {steps[-1]}" if len(steps) > 1 else "".join(steps)
        latest = pointer.read_text().strip() if pointer.is_file() else None
        dirs = f"{len(steps)} step dir{'' if len(steps) == 1 else 's'}"
        found.append(f"checkpoints/ ({dirs} {span}, latest: {latest})")
    for name in ("metrics.jsonl", "completions.jsonl"):
        summary = _jsonl_summary(output_dir / name)
        if summary:
            found.append(summary)
    return found


def _move_aside(output_dir: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = output_dir / f"{OVERWRITTEN_PREFIX}{stamp}"
    n = 1
    while dest.exists():
        n += 1
        dest = output_dir / f"{OVERWRITTEN_PREFIX}{stamp}-{n}"
    dest.mkdir()
    for name in RUN_FILES:
        if (output_dir / name).exists():
            os.replace(output_dir / name, dest / name)
    return dest


def claim_output_dir(output_dir: str | Path, *, resume: bool, overwrite: bool) -> RunLock:
    """Lock ``output_dir`` for this run and check that the run may write there.

    Call it on rank 0 only, before the model loads; keep the returned RunLock for the whole
    run and ``release()`` it at the end (a crash releases it too: the kernel drops the flock).

    - ``resume=True``: ``output_dir/checkpoints`` must hold a checkpoint.
    - ``resume=False`` into a dir with another run's checkpoints/metrics/completions: an
      OutputDirError listing them and the choices, unless ``overwrite=True``, which moves
      them into ``output_dir/overwritten-<UTC time>/`` (see ``RunLock.moved_to``).

    Raises OutputDirError (another live run holds the lock; a previous run is there; nothing
    to resume) and ValueError (``resume`` and ``overwrite`` both set). A stale lock of a dead
    run is logged as a warning and taken over (``RunLock.stale``).
    """
    if resume and overwrite:
        raise ValueError(
            "resume_from_checkpoint: true and overwrite: true contradict each other: resume "
            "continues the run in output_dir, overwrite moves it aside. Set one of them."
        )
    output_dir = Path(output_dir).expanduser()
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LOCK_FILE
    fd, previous = _acquire(path)
    lock = RunLock(output_dir=output_dir, path=path, _fd=fd)
    try:
        if previous is not None:
            lock.stale = previous
            other_host = previous.get("host") not in (None, socket.gethostname())
            log.warning(
                f"output_dir={output_dir}: taking over a stale lock ({_describe_owner(previous)}"
                "): that run ended without releasing it (killed or crashed), so its metrics may "
                "run past its last checkpoint."
                + (
                    " It ran on another host: if it is still alive there, this filesystem does "
                    "not share locks between hosts; stop this run."
                    if other_host
                    else ""
                )
            )
        _check_contents(lock, resume=resume, overwrite=overwrite)
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
    except BaseException:
        lock.release()
        raise
    return lock


def _check_contents(lock: RunLock, *, resume: bool, overwrite: bool) -> None:
    output_dir = lock.output_dir
    if resume:
        if latest_checkpoint(output_dir / CHECKPOINTS_DIR) is None:
            raise OutputDirError(
                f"resume_from_checkpoint: true, but {output_dir / CHECKPOINTS_DIR} holds no "
                f"checkpoint (no {LATEST_FILE!r} file). Set resume_from_checkpoint: false to "
                "start a fresh run, or point output_dir at the run to resume."
            )
        return
    found = _previous_run(output_dir)
    if not found:
        return
    if overwrite:
        lock.moved_to = _move_aside(output_dir)
        log.warning(
            f"overwrite: true: moved the previous run in {output_dir} ({'; '.join(found)}) to "
            f"{lock.moved_to}; delete that folder when you no longer need it"
        )
        return
    raise OutputDirError(
        f"output_dir={output_dir} already holds a run: {'; '.join(found)}. A fresh run would "
        "replace its checkpoints and append to its logs. Choose one: "
        "resume_from_checkpoint: true to continue it; output_dir=<a new directory> for a new "
        f"run; or overwrite: true to move it aside (into {output_dir}/{OVERWRITTEN_PREFIX}"
        "<time>/) and start again."
    )
