"""Write a directory (or a small file) so that readers see all of it or none of it.

    with staged_dir(target) as tmp:    # .tmp-<name>-XXXX beside target, removed on exit
        ...write files into tmp...
        publish_dir(tmp, target)       # fsync, then one rename: target is complete or absent

A crash before ``publish_dir`` leaves only a ``.tmp-*`` dir (``remove_staged`` clears such
leftovers where one writer owns the parent); a crash after it leaves the complete ``target``.
Used by the checkpoint writer and the offline SmolLM2 conversion.
"""

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STAGING_PREFIX = ".tmp-"


def fsync_path(path: Path) -> None:
    """Flush a file or directory to disk (directories: so that renames in them persist)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def staged_dir(target: Path) -> Iterator[Path]:
    """A new empty directory beside ``target`` (same filesystem, so the rename is atomic),
    named ``.tmp-<target name>-XXXX``; it is removed on exit unless ``publish_dir`` moved it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{target.name}-", dir=target.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(staged: Path, target: Path) -> None:
    """Move the filled ``staged`` dir to ``target`` in one rename, durably.

    Files become 0o644 and the dir 0o755 (``mkdtemp`` makes it private; other tools read
    these dirs), everything is fsynced before the rename and the parent after it. An existing
    ``target`` is first renamed aside and removed, because a rename cannot replace a non-empty
    directory. Raises OSError (ENOTEMPTY/EEXIST) if another writer published ``target`` in
    between.
    """
    for f in staged.iterdir():
        f.chmod(0o644)
        fsync_path(f)
    staged.chmod(0o755)
    fsync_path(staged)
    if target.exists():
        old = Path(
            tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{target.name}.old-", dir=target.parent)
        )
        os.replace(target, old / target.name)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(staged, target)
    fsync_path(target.parent)


def write_file_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` by writing a fsynced ``.tmp-<name>`` and renaming it."""
    tmp = path.parent / f"{STAGING_PREFIX}{path.name}"
    tmp.write_text(text)
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def remove_staged(parent: Path) -> None:
    """Remove the ``.tmp-*`` leftovers of crashed writes in ``parent``. Only for a directory
    with one writer: it would delete another writer's work in progress."""
    for stale in parent.glob(STAGING_PREFIX + "*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
