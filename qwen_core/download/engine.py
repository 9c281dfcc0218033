"""The ranged HTTP engine: one file from a Hub-compatible server into ``<root>/<path>``, resumable across kills.

Files live as layout.py describes. Resume rule: a ``.part`` is continued only when its sidecar describes the
same content (size + sha256 for LFS files, size + git blob id otherwise); its bytes are re-hashed before new
ones are appended, and the whole file is verified before ``os.replace``. Everything else (changed source,
unreadable sidecar, bad hash) is discarded with a log line and fetched again. The ``.ok`` record lets a later
run skip a 40 GB re-hash while still noticing a file whose size or mtime changed (``verify`` re-hashes anyway).

Progress means new bytes: an attempt counts as progress only when it takes the ``.part`` at least PROGRESS_MIN
bytes (or to the end) beyond the most this file has held in this run. Anything else (a body cut short, a 416
that restarts the file, a rejected body, a 5xx) is a failed attempt; ``retries`` of them in a row, with backoff,
end the file with an exit code. A file that fails verification is fetched again at most once (none with
``retries`` 0).
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from qwen_core.download.attempt import attempt
from qwen_core.download.file_lock import FileLock, read_holder
from qwen_core.download.job import Job, PartState, Retryable
from qwen_core.download.layout import STAGING_DIR, Staging, fs_error, read_json_object, write_json_atomic
from qwen_core.download.retry import backoff_delay, sleep_unless_cancelled
from qwen_core.download.types import EXIT_DISK, EXIT_VERIFY, PROGRESS_MIN, FileOutcome, RemoteFile
from qwen_core.download.verify import (
    expected_digest,
    hash_file,
    new_hasher,
    record_matches,
    verify_existing,
    write_record,
)
from qwen_core.errors import DownloadError


def fetch_file(remote: RemoteFile, job: Job) -> FileOutcome:
    """Make ``<root>/<remote.path>`` a verified copy of the remote file; resumes or skips where it can."""
    final = job.where.final(remote.path)
    try:
        return _fetch_file(remote, final, job)
    except InterruptedError:
        raise
    except OSError as err:  # the file system refused something: a message, never a traceback
        raise fs_error(err, final, job.words) from err


def _fetch_file(remote: RemoteFile, final: Path, job: Job) -> FileOutcome:
    stage = job.where.stage(remote.path)
    if not job.verify and record_matches(remote, final, stage):
        job.add(remote.size)
        return FileOutcome(remote.path, "present", 0)
    lock = FileLock(stage.lock, timeout=job.config.lock_timeout, progress_path=stage.part, should_stop=job.cancel.is_set)
    if not lock.try_acquire():
        holder = read_holder(stage.lock)
        job.log(f"{remote.path}: another download (pid {holder.get('pid', '?')}) is fetching it; waiting for it")
        try:
            lock.acquire()
        except InterruptedError:
            job.check_cancel()
            raise
        lock.waited = True
    if lock.unsupported:
        job.warn_once("flock", f"the file system of {job.root} has no file locks (flock); downloads of this folder "
                      f"by two processes at the same time are not safe there: run one at a time")
    try:
        if lock.waited and not job.verify and record_matches(remote, final, stage):  # another process finished it
            job.add(remote.size)
            return FileOutcome(remote.path, "present", 0)
        if final.exists() or final.is_symlink():
            if verify_existing(remote, final):
                write_record(remote, final, stage, job.commit)
                job.add(remote.size)
                return FileOutcome(remote.path, "present", 0)
            what = "sha256/git blob id" if job.verify else "size/hash"
            job.log(f"{remote.path}: the local copy does not match the repo ({what}); fetching it again")
        _check_in_the_way(final)
        return _download(remote, final, stage, job)
    finally:
        lock.release()


def _check_in_the_way(final: Path) -> None:
    """Fail before fetching, not after: a folder where the file goes, or a file where a folder goes."""
    if final.is_dir() and not final.is_symlink():
        raise IsADirectoryError(errno.EISDIR, "a folder is where the downloaded file goes", str(final))
    final.parent.mkdir(parents=True, exist_ok=True)  # FileExistsError / NotADirectoryError name the culprit


class Attempts:
    """Failed attempts of one file, bounded by ``retries``; see the module docstring for what counts."""

    def __init__(self, remote: RemoteFile, job: Job, high_water: int) -> None:
        self.remote, self.job = remote, job
        self.high_water = high_water
        self.failures = 0
        self.verify_failures = 0

    def failed(self, err: Retryable, offset: int) -> None:
        """Count one attempt that ended at ``offset``; back off, or raise when the retries are used up."""
        cfg = self.job.config
        gained = offset - self.high_water
        progressed = gained > 0 and (gained >= PROGRESS_MIN or offset >= self.remote.size)
        self.high_water = max(self.high_water, offset)
        self.failures = 0 if progressed else self.failures + 1
        if self.failures > cfg.retries:
            raise DownloadError(
                f"{self.remote.path} from {self.job.host}: giving up after {self.failures} attempts in a row "
                f"without new bytes (last: {err}).",
                fix=err.fix or f"Check the network or {self.job.words.endpoint}, then {self.job.words.rerun}: it "
                f"resumes where it stopped.", exit_code=err.exit_code) from err
        delay = err.retry_after if err.retry_after is not None else backoff_delay(max(self.failures, 1), cfg)
        self.job.log(f"{self.remote.path}: {err}; retrying in {delay:.1f} s (at {offset / 1e6:.1f} MB)")
        sleep_unless_cancelled(delay, self.job.check_cancel)

    def verification_failed(self, got: str) -> None:
        """The whole file arrived and does not verify: fetch it once more from zero, or give up (exit 6)."""
        self.verify_failures += 1
        if self.verify_failures > min(self.job.config.retries, 1):
            raise DownloadError(
                f"{self.remote.path} from {self.job.host} failed verification {self.verify_failures} times "
                f"(expected {expected_digest(self.remote) or self.remote.size}, got {got}): the server sends content "
                f"that does not match the repo listing.",
                fix=f"Retry later or use another endpoint/mirror ({self.job.words.endpoint}).", exit_code=EXIT_VERIFY)
        self.high_water = 0  # the bytes never verified: the fetch from zero starts a fresh count
        self.failures = 0
        delay = backoff_delay(self.verify_failures, self.job.config)
        self.job.log(f"{self.remote.path}: verification failed (expected "
                     f"{expected_digest(self.remote) or self.remote.size}, got {got}); discarding and fetching again "
                     f"in {delay:.1f} s")
        sleep_unless_cancelled(delay, self.job.check_cancel)


def _open_part(remote: RemoteFile, stage: Staging, job: Job) -> PartState:
    """Continue a valid .part (re-hashing its bytes) or start a fresh one with a new sidecar."""
    if stage.part.exists():
        reason = _part_problem(remote, stage)
        if reason is None:
            offset = stage.part.stat().st_size
            job.log(f"{remote.path}: resuming at {offset / 1e6:.1f} MB of {remote.size / 1e6:.1f} MB")
            hasher = hash_file(stage.part, remote, limit=offset)  # the final check covers every byte
            job.add(offset)
            return PartState(offset, hasher)
        job.log(f"{remote.path}: discarding partial download ({reason}); fetching from the start")
        stage.part.unlink()
    stage.part.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(stage.sidecar, {**remote.identity(), "commit": job.commit, "url": job.url(remote.path)})
    stage.part.touch()
    return PartState(0, new_hasher(remote))


def _part_problem(remote: RemoteFile, stage: Staging) -> str | None:
    side = read_json_object(stage.sidecar)
    if side is None:
        return "no readable sidecar, so its source is unknown"
    if {k: side.get(k) for k in ("path", "size", "sha256", "etag")} != remote.identity():
        return "the file changed on the server since it was started"
    if stage.part.stat().st_size > remote.size:
        return "it is larger than the file"
    return None


def _download(remote: RemoteFile, final: Path, stage: Staging, job: Job) -> FileOutcome:
    state = _open_part(remote, stage, job)
    fetched_before = state.offset
    attempts = Attempts(remote, job, high_water=state.offset)
    while True:
        _transfer(remote, stage, state, job, attempts)
        actual = state.hasher.hexdigest() if state.hasher is not None else None
        size = stage.part.stat().st_size
        if size == remote.size and actual == expected_digest(remote):
            break
        # Bytes that don't verify are never kept: throw the partial away and fetch once more from zero.
        job.add(-state.offset)
        stage.part.unlink()
        attempts.verification_failed(actual or f"{size} bytes")
        state = _open_part(remote, stage, job)
    if new_hasher(remote) is None:
        job.log(f"{remote.path}: the server gave no hash for this file; verified by size only")
    _place(stage, final)
    write_record(remote, final, stage, job.commit)
    status = "resumed" if fetched_before else "downloaded"
    return FileOutcome(remote.path, status, remote.size - fetched_before)


def _place(stage: Staging, final: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(stage.part, final)  # atomic: a reader sees the old file or the complete new one, never half
    except IsADirectoryError as err:
        raise DownloadError(f"A folder is in the way at {final}; the verified download stays in {stage.part}.",
                            fix="Move that folder out of the model folder, then run the download again.",
                            exit_code=EXIT_DISK) from err
    stage.sidecar.unlink(missing_ok=True)
    if stage.part.parent.name == STAGING_DIR and stage.part.parent.parent == final.parent:
        with contextlib.suppress(OSError):  # a component folder's own staging folder (other disk), if now empty
            stage.part.parent.rmdir()


def _transfer(remote: RemoteFile, stage: Staging, state: PartState, job: Job, attempts: Attempts) -> None:
    """Fetch until the .part has ``remote.size`` bytes, retrying failed attempts with backoff."""
    while state.offset < remote.size:
        job.check_cancel()
        try:
            attempt(remote, stage, state, job)
            if state.offset >= remote.size:
                return
            raise Retryable("the connection closed before the end of the file")
        except Retryable as err:
            attempts.failed(err, state.offset)
