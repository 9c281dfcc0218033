"""An inter-process lock per downloaded file.

Why an OS lock (fcntl/msvcrt) on an open file rather than "the lock file exists": the kernel drops the lock
when its holder dies, even by SIGKILL, so a stale lock file left by a killed run never blocks a later one.
The holder writes its PID into the file only so that a waiting process can say who it is waiting for.
Some file systems (some NFS/SMB/FUSE mounts) have no ``flock``: there the lock falls back to one within this
process (two nodes or threads still take turns) and ``unsupported`` is set, so the caller can warn once that
two processes must not download into that folder at the same time.
A waiter gives up after ``timeout`` seconds *without progress* of the holder (``progress_path`` growing
counts as progress), so a slow but live download is waited for and a wedged one is reported.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from qwen_core.download.types import EXIT_LOCKED
from qwen_core.errors import DownloadError

# errno values of a file system that does not implement flock at all (as opposed to "held by someone").
_NO_LOCKS = {getattr(errno, name) for name in ("ENOLCK", "EOPNOTSUPP", "ENOTSUP", "ENOSYS", "EINVAL") if hasattr(errno, name)}


class LocksUnsupported(OSError):
    """The file system of the lock file has no flock."""


# Fallback when flock is missing: a lock per path within this process.
_local_locks: dict[str, threading.Lock] = {}
_local_locks_guard = threading.Lock()


def _local_lock(path: Path) -> threading.Lock:
    with _local_locks_guard:
        return _local_locks.setdefault(os.path.abspath(path), threading.Lock())


if os.name == "nt":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as err:
            if err.errno in _NO_LOCKS:
                raise LocksUnsupported(err.errno, err.strerror) from err
            raise

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)


def read_holder(lock_path: Path) -> dict:
    """The PID/host/time the current (or last) holder wrote; {} when unreadable."""
    try:
        data = json.loads(lock_path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class FileLock:
    """``with FileLock(path, timeout=...)``: exclusive across processes and threads of this process."""

    def __init__(
        self,
        path: Path,
        *,
        timeout: float = 120.0,
        poll: float = 0.05,
        progress_path: Path | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self.poll = poll
        self.progress_path = progress_path
        self.should_stop = should_stop
        self._fd: int | None = None
        self._local: threading.Lock | None = None
        self.waited = False
        self.unsupported = False  # True when the file system has no flock (see the module docstring)

    def try_acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            locked = _try_lock(fd)
        except LocksUnsupported:
            os.close(fd)
            return self._try_local()
        except BaseException:
            os.close(fd)
            raise
        if not locked:
            os.close(fd)
            return False
        if not _same_file(fd, self.path):
            # The previous holder unlinked the path between our open and our lock: this inode is dead.
            _unlock(fd)
            os.close(fd)
            return False
        self._fd = fd
        # Byte 0 stays the lock byte on Windows; the note is informational only, so a full disk may refuse it.
        note = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, note.encode(), 0) if hasattr(os, "pwrite") else os.write(fd, note.encode())
        return True

    def _try_local(self) -> bool:
        self.unsupported = True
        lock = _local_lock(self.path)
        if not lock.acquire(blocking=False):
            return False
        self._local = lock
        return True

    def acquire(self) -> None:
        last_progress = time.monotonic()
        last_size = -1
        while not self.try_acquire():
            self.waited = True
            if self.should_stop and self.should_stop():
                raise InterruptedError("stopped while waiting for a lock")
            size = _size(self.progress_path)
            if size != last_size:
                last_size, last_progress = size, time.monotonic()
            if time.monotonic() - last_progress > self.timeout:
                holder = read_holder(self.path)
                raise DownloadError(
                    f"Timed out after {self.timeout:.0f} s waiting for {self.path.name}: another download "
                    f"(pid {holder.get('pid', '?')} on {holder.get('host', '?')}) holds it and made no progress.",
                    fix=f"Wait for that download to finish, or stop it; a lock held by a dead process is released "
                    f"automatically. Lock file: {self.path}",
                    exit_code=EXIT_LOCKED,
                )
            time.sleep(self.poll)

    def release(self) -> None:
        if self._local is not None:
            local, self._local = self._local, None
            local.release()
            return
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        if os.name != "nt":
            # Unlink while still holding the lock; a waiter that then locks the dead inode notices
            # (_same_file) and retries on a fresh file, so no two holders ever coexist.
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        _unlock(fd)
        os.close(fd)

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def _size(path: Path | None) -> int:
    if path is None:
        return -1
    try:
        return path.stat().st_size
    except OSError:
        return -1
