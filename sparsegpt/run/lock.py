"""One writer per run dir: `RUN_DIR/.lock`, taken by the main process before it writes anything, released at exit.

What it relies on (NFS, Lustre and local disks alike):
- creating the lock is a hard link from a private, complete temp file to `.lock` (fails if the name exists,
  atomically, on every POSIX filesystem and NFS), so no starter ever reads a half-written lock and refuses
  naming "an unknown process"; where hard links are unsupported, `open(O_CREAT | O_EXCL)` then a write;
- the lock names its holder: host, pid, the pid's start time and the boot id (so a reused pid or a rebooted host
  is not mistaken for the holder), the start time, a random token;
- a heartbeat thread refreshes the lock's mtime every `HEARTBEAT_S`; a holder on another host is presumed alive
  until its heartbeat is `STALE_AFTER` intervals old (a lost node's lock is taken over after that), a holder on
  this host is alive exactly while its process is (checked through /proc, no waiting);
- `flock` on the open lock file as an extra guard where it works (one host; NFS with lockd): a held flock is a live
  holder whatever the file says;
- a takeover (of a stale lock) goes through its own O_EXCL file, `.lock.takeover`, so two starters cannot both
  replace the same stale lock; the stale one is re-read under it and must be the one judged stale.
No `--force`: a holder whose heartbeat is fresh may be writing checkpoints this second, and a dead one's lock is
taken over without asking, so forcing has no case where it is both needed and safe.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import socket
import threading
import time
from datetime import datetime
from pathlib import Path

from sparsegpt.core.errors import UserError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
HEARTBEAT_S = 10.0
STALE_AFTER = 6  # heartbeats missed before another host's lock counts as abandoned (60 s)
TAKEOVER_STALE_S = 30.0  # a takeover is a few file operations: its file older than this was left by a killed one


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def pid_start(pid: int) -> str:
    """The start time of process `pid` in clock ticks since boot ('' when it does not exist or /proc is absent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rpartition(")")[2].split()[19]  # field 22; the command name (field 2) may hold spaces


class RunLock:
    """The lock of one run dir. `acquire()` (UserError naming the holder if it is alive), `release()`."""

    def __init__(self, root: Path, *, heartbeat_s: float = HEARTBEAT_S):
        self.root, self.path = Path(root), Path(root) / LOCK_NAME
        self.heartbeat_s = heartbeat_s
        self._fd: int | None = None
        self._made_root = False
        self._token = secrets.token_hex(8)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def info(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": pid_start(os.getpid()),
                "boot_id": boot_id(), "started": time.time(), "token": self._token}

    def acquire(self) -> None:
        """Take the lock, taking over an abandoned one; UserError naming a live holder. Creates the run dir."""
        self._made_root = not self.root.exists()
        self.root.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a holder that releases while we look: try again
            if self._create():
                break
            holder = self._read()
            why = self._abandoned(holder)
            if why is None:
                self._remove_root_if_made()
                raise UserError(f"run dir {self.root} is in use by {describe(holder)} ({self.path}); wait for that "
                                f"run to end or stop it (a dead holder's lock is taken over automatically, another "
                                f"host's after {HEARTBEAT_S * STALE_AFTER:g} s without heartbeat)")
            if self._take_over(holder, why):
                break
        else:
            raise UserError(f"could not take the lock {self.path}: other processes keep taking it; start one run")
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat, remove the lock if it is still ours; remove the run dir if we made it and it is empty."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._fd is not None:
            if (self._read() or {}).get("token") == self._token:
                self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None
        self._remove_root_if_made()

    # -- internals ----------------------------------------------------------------------------------------------
    def _create(self) -> bool:
        """Create the lock whole (module docstring); False if it exists."""
        tmp = self.path.with_name(f"{LOCK_NAME}.{self._token}.tmp")
        with open(tmp, "wb") as f:
            f.write(json.dumps(self.info()).encode())
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.path)
            fd = os.open(self.path, os.O_WRONLY)
        except FileExistsError:
            return False
        except OSError:  # no hard links on this filesystem: create-exclusive, then write (a reader may see it empty)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            os.write(fd, json.dumps(self.info()).encode())
            os.fsync(fd)
        finally:
            tmp.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # extra guard only: unsupported on some network filesystems
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._fd = fd
        return True

    def _read(self) -> dict | None:
        """The holder as the lock file names it ({} if unreadable, e.g. a holder killed mid-write), None if gone."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            return {**json.loads(text), "mtime": self.path.stat().st_mtime}
        except (ValueError, OSError):
            return {"mtime": _mtime(self.path)}

    def _abandoned(self, holder: dict | None) -> str | None:
        """Why the lock's holder is gone, or None when it may be alive."""
        if holder is None:
            return "released"
        if _flock_held(self.path):
            return None
        age = time.time() - holder.get("mtime", time.time())
        if holder.get("host") == socket.gethostname() and holder.get("boot_id") == boot_id() and "pid" in holder:
            if pid_start(int(holder["pid"])) != holder.get("pid_start"):
                return f"its process {holder['pid']} on this host has exited"
            return None
        if holder.get("host") == socket.gethostname() and holder.get("boot_id") not in (None, boot_id()):
            return "this host rebooted since"
        if age > self.heartbeat_s * STALE_AFTER:
            return f"no heartbeat for {age:.0f} s"
        return None

    def _take_over(self, holder: dict | None, why: str) -> bool:
        """Replace the abandoned lock under the takeover file; False if someone else moved first."""
        if holder is None:
            return self._create()
        guard = self.path.with_name(LOCK_NAME + ".takeover")
        if _mtime(guard) and time.time() - _mtime(guard) > TAKEOVER_STALE_S:
            guard.unlink(missing_ok=True)
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            time.sleep(0.5)
            return False
        try:
            now = self._read()
            if now is None or now.get("token") != holder.get("token") or now.get("mtime") != holder.get("mtime"):
                return self._create() if now is None else False
            self.path.unlink()
            if not self._create():
                return False
        finally:
            os.close(fd)
            guard.unlink(missing_ok=True)
        log.warning("took over the lock of %s: %s held it, %s", self.root, describe(holder), why)
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError as e:
                log.error("run dir lock %s: heartbeat failed (%s)", self.path, e)

    def _remove_root_if_made(self) -> None:
        if self._made_root:
            with contextlib.suppress(OSError):
                self.root.rmdir()  # only when empty: nothing else was written


def describe(holder: dict | None) -> str:
    if not holder or "pid" not in holder:
        return "an unknown process (unreadable lock)"
    started = datetime.fromtimestamp(holder.get("started", 0)).strftime("%Y-%m-%d %H:%M:%S")
    return f"pid {holder['pid']} on {holder.get('host', '?')} since {started}"


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _flock_held(path: Path) -> bool:
    """Whether another open file description holds an flock on `path` (False where flock does not work)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError as e:
        return e.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
    finally:
        os.close(fd)
