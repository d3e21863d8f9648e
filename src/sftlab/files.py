"""File helpers shared by the model cache, the tokenization cache and checkpoints, and where the cache lives."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def cache_root() -> Path:
    base = os.environ.get("SFTLAB_CACHE")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(xdg) / "sftlab"


def scratch_dir(prefix: str) -> Path:
    """A new directory under the cache root (not /tmp, which may be a small tmpfs), removed when the process
    ends: for data too large for memory that no later run reuses."""
    import atexit

    (cache_root() / "scratch").mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=cache_root() / "scratch"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small file so that a reader or a kill sees the old or the new content, never half."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def fsync_path(path: Path) -> None:
    """Flush a file, or a directory's entries, to the disk."""
    if os.name == "nt" and Path(path).is_dir():  # Windows cannot open a directory to sync it
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # a filesystem that cannot sync directories (some network mounts) keeps its own order
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def sync_tree(root: Path) -> None:
    """fsync every file under `root`, then every directory, deepest first."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def aside(target: Path) -> Path:
    """Where `target` waits while its replacement is renamed in."""
    return target.parent / f".old-{target.name}"


def recover(target: Path) -> bool:
    """Finish a replacement of `target` that a kill cut short; True when there was one. The old directory
    aside without a `target` goes back into place; beside a `target` (the new one made it) it goes."""
    old = aside(target)
    if not old.exists():
        return False
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.rename(target)
        fsync_path(target.parent)
    return True


def remove_stale(parent: Path, pattern: str) -> list[str]:
    """Remove the temporary directories a kill left behind for targets named like `pattern` in `parent`
    (atomic_dir's `.tmp-*`) and finish their cut-short replacements; returns the names dealt with.
    Only for directories no other process is writing into."""
    if not parent.is_dir():
        return []
    done = []
    for tmp in parent.glob(f".tmp-{pattern}.*"):
        shutil.rmtree(tmp, ignore_errors=True)
        done.append(tmp.name)
    for old in parent.glob(f".old-{pattern}"):
        if recover(parent / old.name.removeprefix(".old-")):
            done.append(old.name)
    return done


def _swap_in(new: Path, target: Path, durable: bool) -> None:
    """Rename `new` to `target`, which keeps existing (as its aside) until `new` is in place."""
    recover(target)
    old = aside(target)
    if target.exists():
        target.rename(old)
    new.rename(target)  # a kill between the two renames leaves `old` for recover()
    if durable:
        fsync_path(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def _rename_in(new: Path, target: Path, durable: bool) -> None:
    try:
        new.rename(target)
    except OSError:
        if not target.exists():
            raise
    if durable:
        fsync_path(target.parent)


@contextmanager
def atomic_dir(target: Path, replace: bool = False, durable: bool = False):
    """Yield a temporary directory beside `target` and rename it into place when the block succeeds,
    so a crash never leaves a `target` that looks complete. With replace=False, a `target` that
    another process completed first is kept (theirs is as good as ours); with replace=True the old
    `target` is renamed aside and deleted only once the new one is in place.

    durable=True: every file and the directory reach the disk before the rename, and the rename
    before this returns, so a power cut leaves the old `target` or the whole new one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}.", dir=target.parent))
    try:
        yield tmp
        if durable:
            sync_tree(tmp)
        (_swap_in if replace else _rename_in)(tmp, target, durable)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
