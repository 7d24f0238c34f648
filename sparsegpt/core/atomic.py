"""Atomic writes: readers (and a resumed run) see a file or folder whole, old or new, never torn.

`atomic_file` / `atomic_write_text` for files (temp beside the target, fsync, rename); `write_dir_atomically`
for folders (built beside the target, then renamed in; `save/before-rename` is the kill tests' failpoint).
Temp folders carry their writer's host and pid (`.NAME.tmp-HOST-PID-XXXX`, `.NAME.old-HOST-PID-XXXX`), so
`recover_tree` can tell a dead writer's leftovers from a live one's: it removes the dead ones' temp folders (a
70B checkpoint's are hundreds of GB) and, where a replace was killed between its two renames, puts the parked
complete old folder back.
A write that fails because the disk (or quota) is full raises `DiskFull` (a `UserError`: one line naming the
folder, the bytes needed when the caller knows them, and the bytes free), its temp file or folder removed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from sparsegpt.core.errors import UserError
from sparsegpt.core.failpoints import failpoint

logger = logging.getLogger(__name__)

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
NEARLY_FULL = 64 << 20  # free bytes under which a failed write is put down to a full disk whatever its message
_NO_SPACE_TEXT = ("no space left", "disk quota exceeded", "os error 28", "os error 122")


class DiskFull(UserError):
    """A write into `folder` ran out of disk space (or quota)."""

    def __init__(self, folder: str | os.PathLike, need: int | None = None):
        self.folder, self.need, self.free = Path(folder), need, free_bytes(folder)
        needed = f"about {size_text(need)} needed, " if need else ""
        super().__init__(f"no space left on the device of {self.folder} ({needed}{size_text(self.free)} free); "
                         "free some space (or point --run-dir elsewhere) and run the same command again: it resumes")

    def needing(self, need: int) -> DiskFull:
        """The same error with the bytes the whole write needs (as the caller estimates them)."""
        return DiskFull(self.folder, need) if self.need is None else self


def free_bytes(folder: str | os.PathLike) -> int:
    """Bytes an unprivileged writer may still use on `folder`'s filesystem (its nearest existing parent's)."""
    path = Path(folder)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def is_disk_full(error: BaseException, folder: str | os.PathLike) -> bool:
    """Whether a failed write into `folder` failed for lack of space: ENOSPC/EDQUOT anywhere in the exception's
    chain, a message saying so (safetensors), or any write error with the disk nearly full (torch.save's
    `unexpected pos` says nothing of the cause)."""
    seen, e = set(), error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in NO_SPACE or any(t in str(e).lower() for t in _NO_SPACE_TEXT):
            return True
        e = e.__cause__ or e.__context__
    return isinstance(error, (OSError, RuntimeError)) and free_bytes(folder) < NEARLY_FULL


@contextlib.contextmanager
def disk_full_as_error(folder: str | os.PathLike, need: int | None = None) -> Iterator[None]:
    """Re-raise a failed write into `folder` that ran out of space as `DiskFull`; other errors pass unchanged."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as e:
        if is_disk_full(e, folder):
            raise DiskFull(folder, need) from e
        raise


def size_text(n: int) -> str:
    """A byte count for messages: GiB from 128 MiB up, MiB below."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; when the block completes it is fsynced and renamed onto `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with disk_full_as_error(path.parent):
            yield tmp
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file so that readers see the old or the new content, never a torn one."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_dir_atomically(out_dir: Path, write: Callable[[Path], None], *, replace: bool,
                         need: int | None = None) -> None:
    """Run write(tmp) on a fresh folder next to out_dir, then rename it to out_dir.

    An existing out_dir is swapped out only after the new folder is complete (replace=True), or kept as
    it is (replace=False: another process finished the same work first). Out of space: `DiskFull` (`need`: the
    bytes the folder takes, if the caller knows), the temp folder removed.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    recover_tree(out_dir.parent, names=(out_dir.name,))
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{_writer()}-", dir=out_dir.parent))
    try:
        with disk_full_as_error(out_dir.parent, need):
            write(tmp)
        failpoint("save/before-rename")
        if replace and out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-{_writer()}-", dir=out_dir.parent))
            os.replace(out_dir, old)  # renaming a folder onto an empty one is allowed
            failpoint("save/between-renames")
            try:
                os.replace(tmp, out_dir)
            except OSError:
                os.replace(old, out_dir)
                raise
            shutil.rmtree(old)
        else:
            try:
                os.replace(tmp, out_dir)
            except OSError:
                if replace or not out_dir.is_dir():
                    raise
                logger.info("%s was written by another process meanwhile; using it", out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename


def _host() -> str:
    """This host's name as temp folder names carry it ('-' separates the name's fields)."""
    return socket.gethostname().replace("-", "_")


def _writer() -> str:
    return f"{_host()}-{os.getpid()}"


def _dead_writer(entry: Path) -> tuple[str, str] | None:
    """(kind 'tmp'/'old', target name) when `entry` is a temp folder of a writer on this host that has exited."""
    head, sep, tail = entry.name.rpartition(".tmp-") if ".tmp-" in entry.name else entry.name.rpartition(".old-")
    if not sep or not head.startswith("."):
        return None
    host, _, rest = tail.partition("-")
    pid = rest.partition("-")[0]
    if host != _host() or not pid.isdigit():
        return None  # another host's writer (shared file system) or an old-style name: not ours to judge
    try:
        os.kill(int(pid), 0)
        return None  # alive (or the pid was reused: then the folder stays, which is safe)
    except ProcessLookupError:
        return ("tmp" if sep == ".tmp-" else "old"), head[1:]
    except PermissionError:
        return None


def recover_tree(root: str | os.PathLike, *, names: tuple[str, ...] | None = None) -> None:
    """Undo what writers killed mid-write left under `root` (only `names` directly in root when given): a
    folder missing because its replace died between the renames gets its parked old copy back; dead writers'
    temp folders are removed. Live writers' folders are left alone."""
    root = Path(root)
    if names is None:
        entries = [*root.rglob(".*.tmp-*"), *root.rglob(".*.old-*")]
    else:
        entries = [e for n in names for pattern in (f".{n}.tmp-*", f".{n}.old-*") for e in root.glob(pattern)]
    for entry in sorted(entries, key=lambda e: ".old-" not in e.name):  # restores before removals
        dead = _dead_writer(entry)
        if dead is None or not entry.exists():
            continue
        kind, name = dead
        target = entry.parent / name
        if kind == "old" and not target.exists():
            os.replace(entry, target)
            logger.warning("%s: restored from %s (a replace was killed between its renames)", target, entry.name)
        elif entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
            logger.info("removed %s, left by a writer that was killed", entry)
