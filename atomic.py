"""Nothing half-written is ever taken for good: every file and folder the toolkit writes is written here.

A writer fills a temporary sibling of its destination (`.NAME.tmp-PID-NS`), flushes it to disk and renames it into
place. A folder that already exists is first renamed aside (`.NAME.old-PID-NS`) and removed last, since one rename
cannot replace a folder that holds files. So a kill at any moment leaves the destination as it was before or
complete, never half of each; and the next write to the same destination cleans up after a killed writer: it removes
the temporaries of writers that no longer run and puts back a folder that one had moved aside but not replaced.
"""

from __future__ import annotations

import glob
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename into it, a new file) to disk."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename/write is still ordered there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush a file, or a folder's files, to disk, so that a rename into place (or a marker file written after
    them) never reaches the disk before their contents."""
    path = Path(path)
    for p in ([path] if path.is_file() else path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(path if path.is_dir() else path.parent)


def _sibling(dest: Path, kind: str) -> Path:
    return dest.with_name(f".{dest.name}.{kind}-{os.getpid()}-{time.time_ns()}")


def _writer_pid(leftover: Path, dest: Path) -> tuple[str, int] | None:
    """("tmp" | "old", pid) for a sibling named by _sibling for dest, else None."""
    kind, _, rest = leftover.name[len(dest.name) + 2:].partition("-")
    pid, _, ns = rest.partition("-")
    return (kind, int(pid)) if kind in ("tmp", "old") and pid.isdigit() and ns.isdigit() else None


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: running
        return True
    return True


def remove(path: Path) -> None:
    """Delete a file or folder if it is there."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_leftovers(dest: Path) -> None:
    """Remove what killed writers left beside dest; put back a folder one moved aside and never replaced."""
    dest = Path(dest)
    if not dest.parent.is_dir():
        return
    for leftover in sorted(dest.parent.glob(f".{glob.escape(dest.name)}.*-*-*")):
        found = _writer_pid(leftover, dest)
        if found is None or _running(found[1]):
            continue
        kind, _ = found
        if kind == "old" and not dest.exists():
            os.replace(leftover, dest)  # killed between its two renames: the old folder is the last complete one
        else:
            remove(leftover)


def install(tmp: Path, dest: Path, replace: bool = True) -> bool:
    """Move a fully written file or folder tmp onto dest, flushed first. An existing folder dest is renamed aside
    and removed after. replace=False keeps an existing dest (another process finished the same thing first) and
    discards tmp. Returns whether tmp was installed."""
    tmp, dest = Path(tmp), Path(dest)
    if not replace and dest.exists():
        remove(tmp)
        return False
    fsync_tree(tmp)
    old = None
    if replace and tmp.is_dir() and dest.is_dir() and not dest.is_symlink():
        old = _sibling(dest, "old")
        os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except OSError:
        if old is not None:
            os.replace(old, dest)
        elif not replace and dest.exists():  # another process's folder arrived first: theirs is as good as ours
            remove(tmp)
            return False
        raise
    fsync_dir(dest.parent)
    if old is not None:
        remove(old)
    return True


def temp_beside(dest: str | Path, folder: bool = False) -> Path:
    """A new temporary path beside dest (a folder created when folder=True), to fill and then install(); the
    leftovers of killed writers to dest are cleaned first. atomic_path does all three; this is for writers that
    must share the path with other processes (every rank of a distributed run saves into one folder)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(dest)
    tmp = _sibling(dest, "tmp")
    if folder:
        tmp.mkdir()
    return tmp


def destination_problem(dest: str | Path, folder: bool, replaceable: Callable[[Path], bool]) -> str | None:
    """Why dest cannot be written, checked before the long work that makes it, or None: a file where one of its
    folders should be, a file where the folder goes (or the other way round), something already there that
    replaceable(dest) says this writer may not replace (a file it did not make), or a folder it cannot write into
    (probed by making and removing a temporary beside dest). The caller raises its own error with the reason."""
    dest = Path(dest)
    blocking = next((p for p in reversed(dest.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        return f"{blocking} is a file, not a folder"
    if dest.exists():
        if dest.is_dir() != folder:
            return f"{dest} is a {'folder' if dest.is_dir() else 'file'}, not a {'folder' if folder else 'file'}"
        if not replaceable(dest):
            return f"{dest} already exists and is not one this writer made"
    try:
        remove(temp_beside(dest))
    except OSError as e:
        return f"{dest.parent} cannot be written ({e.strerror or e})"
    return None


@contextmanager
def atomic_path(dest: str | Path, folder: bool = False, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside dest to write (a folder already created when folder=True); when the block
    ends without an error it is flushed and moved onto dest (see install), otherwise it is removed.

        with atomic_path("out/model.gguf") as tmp:
            writer.write(tmp)
    """
    dest = Path(dest)
    tmp = temp_beside(dest, folder)
    try:
        yield tmp
        install(tmp, dest, replace=replace)
    finally:
        remove(tmp)


def write_atomic(dest: str | Path, data: str | bytes) -> None:
    """Write a whole file at once: a kill or a full disk mid-write leaves the previous file, never half of one."""
    with atomic_path(dest) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8", newline="")
        else:
            tmp.write_bytes(data)
