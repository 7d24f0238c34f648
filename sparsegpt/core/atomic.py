"""Atomic writes: readers (and a resumed run) see a file or folder whole, old or new, never torn.

`atomic_file` / `atomic_write_text` for files (temp beside the target, fsync, rename); `write_dir_atomically`
for folders (built beside the target, then renamed in; `save/before-rename` is the kill tests' failpoint).
Temp folders carry their writer's host and pid (`.NAME.tmp-HOST-PID-XXXX`, `.NAME.old-HOST-PID-XXXX`), so
`recover_tree` can tell a dead writer's leftovers from a live one's: it removes the dead ones' temp folders (a
70B checkpoint's are hundreds of GB) and, where a replace was killed between its two renames, puts the parked
complete old folder back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from sparsegpt.core.failpoints import failpoint

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; when the block completes it is fsynced and renamed onto `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
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


def write_dir_atomically(out_dir: Path, write: Callable[[Path], None], *, replace: bool) -> None:
    """Run write(tmp) on a fresh folder next to out_dir, then rename it to out_dir.

    An existing out_dir is swapped out only after the new folder is complete (replace=True), or kept as
    it is (replace=False: another process finished the same work first).
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    recover_tree(out_dir.parent, names=(out_dir.name,))
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{_writer()}-", dir=out_dir.parent))
    try:
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
