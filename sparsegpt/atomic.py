"""Atomic writes: readers (and a resumed run) see a file or folder whole, old or new, never torn.

`atomic_file` / `atomic_write_text` for files (temp beside the target, fsync, rename); `write_dir_atomically`
for folders (built beside the target, then renamed in; `save/before-rename` is the kill tests' failpoint).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from sparsegpt.failpoints import failpoint

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
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        write(tmp)
        failpoint("save/before-rename")
        if replace and out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old)  # renaming a folder onto an empty one is allowed
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

