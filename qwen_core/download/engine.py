"""The ranged HTTP engine: one file from a Hub-compatible server into ``<root>/<path>``, resumable across kills.

Files live as layout.py describes. Resume rule: a ``.part`` is continued only when its sidecar describes the
same content (size + sha256 for LFS files, size + git blob id otherwise); its bytes are re-hashed before new
ones are appended, and the whole file is verified before ``os.replace``. Everything else (changed source,
unreadable sidecar, bad hash) is discarded with a log line and fetched again. The ``.ok`` record lets a later
run skip a 40 GB re-hash while still noticing a file whose size or mtime changed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import requests

from qwen_core.download.file_lock import FileLock, read_holder
from qwen_core.download.layout import Staging, write_json_atomic
from qwen_core.download.retry import backoff_delay, parse_retry_after, sleep_unless_cancelled
from qwen_core.download.transport import HubClient
from qwen_core.download.types import (
    EXIT_AUTH,
    EXIT_DISK,
    EXIT_ERROR,
    EXIT_NETWORK,
    EXIT_NOT_FOUND,
    EXIT_VERIFY,
    DiskFullError,
    FileOutcome,
    HttpConfig,
    RemoteFile,
)
from qwen_core.download.verify import (
    HashPipe,
    expected_digest,
    hash_file,
    new_hasher,
    record_matches,
    verify_existing,
    write_record,
)
from qwen_core.errors import DownloadCancelled, DownloadError
from qwen_core.paths import safe_join


@dataclass
class Job:
    """State shared by the workers of one download_repo call."""

    root: Path
    client: HubClient
    repo_id: str
    commit: str
    log: Callable[[str], None]
    cancel: threading.Event = field(default_factory=threading.Event)
    done_bytes: int = 0  # bytes that count toward the progress bar (resumed + fetched + present)
    fetched_bytes: int = 0  # bytes received over the network in this run
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def config(self) -> HttpConfig:
        return self.client.config

    def add(self, done: int, fetched: int = 0) -> None:
        with self._lock:
            self.done_bytes += done
            self.fetched_bytes += fetched

    def url(self, path: str) -> str:
        endpoint = self.client.endpoint.url.rstrip("/")
        return f"{endpoint}/{self.repo_id}/resolve/{quote(self.commit, safe='')}/{quote(path)}"

    def check_cancel(self) -> None:
        if self.cancel.is_set():
            raise DownloadCancelled("Download cancelled; partial files are kept and the next run resumes them.")


# -- one file ------------------------------------------------------------------------------------------
def fetch_file(remote: RemoteFile, job: Job) -> FileOutcome:
    """Make ``<root>/<remote.path>`` a verified copy of the remote file; resumes or skips where it can."""
    final = safe_join(job.root, remote.path)
    stage = Staging.for_file(job.root, remote.path)
    if record_matches(remote, final, stage):
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
    try:
        if lock.waited and record_matches(remote, final, stage):  # another process just finished it
            job.add(remote.size)
            return FileOutcome(remote.path, "present", 0)
        if final.exists() or final.is_symlink():
            if verify_existing(remote, final):
                write_record(remote, final, stage, job.commit)
                job.add(remote.size)
                return FileOutcome(remote.path, "present", 0)
            job.log(f"{remote.path}: the local copy does not match the repo (size/hash); fetching it again")
        return _download(remote, final, stage, job)
    finally:
        lock.release()


@dataclass
class _PartState:
    offset: int
    hasher: hashlib._Hash | None


class _Retryable(Exception):
    def __init__(self, reason: str, *, progressed: bool = False, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.progressed = progressed
        self.retry_after = retry_after


def _open_part(remote: RemoteFile, stage: Staging, job: Job) -> _PartState:
    """Continue a valid .part (re-hashing its bytes) or start a fresh one with a new sidecar."""
    if stage.part.exists():
        reason = _part_problem(remote, stage)
        if reason is None:
            offset = stage.part.stat().st_size
            job.log(f"{remote.path}: resuming at {offset / 1e6:.1f} MB of {remote.size / 1e6:.1f} MB")
            hasher = hash_file(stage.part, remote, limit=offset)  # the final check covers every byte
            job.add(offset)
            return _PartState(offset, hasher)
        job.log(f"{remote.path}: discarding partial download ({reason}); fetching from the start")
        stage.part.unlink()
    stage.part.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(stage.sidecar, {**remote.identity(), "commit": job.commit, "url": job.url(remote.path)})
    stage.part.touch()
    return _PartState(0, new_hasher(remote))


def _part_problem(remote: RemoteFile, stage: Staging) -> str | None:
    try:
        side = json.loads(stage.sidecar.read_text())
    except (OSError, ValueError):
        return "no readable sidecar, so its source is unknown"
    if {k: side.get(k) for k in ("path", "size", "sha256", "etag")} != remote.identity():
        return "the file changed on the server since it was started"
    if stage.part.stat().st_size > remote.size:
        return "it is larger than the file"
    return None


def _download(remote: RemoteFile, final: Path, stage: Staging, job: Job) -> FileOutcome:
    state = _open_part(remote, stage, job)
    fetched_before = state.offset
    refetched = False
    while True:
        _transfer(remote, stage, state, job)
        actual = state.hasher.hexdigest() if state.hasher is not None else None
        if stage.part.stat().st_size == remote.size and actual == expected_digest(remote):
            break
        # Bytes that don't verify are never kept: throw the partial away and fetch once more from zero.
        job.log(f"{remote.path}: verification failed (expected {expected_digest(remote) or remote.size}, "
                f"got {actual or stage.part.stat().st_size}); discarding and fetching again")
        job.add(-state.offset)
        stage.part.unlink()
        if refetched:
            raise DownloadError(
                f"{remote.path} failed verification twice: the server sends content that does not match the "
                f"repo listing.", fix="Retry later or use another endpoint/mirror.", exit_code=EXIT_VERIFY)
        refetched = True
        state = _open_part(remote, stage, job)
    if new_hasher(remote) is None:
        job.log(f"{remote.path}: the server gave no hash for this file; verified by size only")
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(stage.part, final)  # atomic: a reader sees the old file or the complete new one, never half
    write_record(remote, final, stage, job.commit)
    stage.sidecar.unlink(missing_ok=True)
    status = "resumed" if fetched_before else "downloaded"
    return FileOutcome(remote.path, status, remote.size - fetched_before)


def _transfer(remote: RemoteFile, stage: Staging, state: _PartState, job: Job) -> None:
    """Fetch until the .part has ``remote.size`` bytes, retrying transient failures with backoff."""
    cfg = job.config
    failures = 0
    while state.offset < remote.size:
        job.check_cancel()
        try:
            _attempt(remote, stage, state, job)
            if state.offset >= remote.size:
                return
            raise _Retryable("connection closed before the end of the file", progressed=True)
        except _Retryable as err:
            failures = 0 if err.progressed else failures + 1
            if failures > cfg.retries:
                raise DownloadError(
                    f"{remote.path}: giving up after {cfg.retries + 1} attempts without progress ({err}).",
                    fix="Check the network/endpoint and run the same command again: it resumes where it stopped.",
                    exit_code=EXIT_NETWORK) from err
            delay = err.retry_after if err.retry_after is not None else backoff_delay(failures, cfg)
            job.log(f"{remote.path}: {err}; retrying in {delay:.1f} s (at {state.offset / 1e6:.1f} MB)")
            sleep_unless_cancelled(delay, job.check_cancel)


def _attempt(remote: RemoteFile, stage: Staging, state: _PartState, job: Job) -> None:
    cfg = job.config
    headers = job.client.headers({"Accept-Encoding": "identity"})
    if state.offset:
        headers["Range"] = f"bytes={state.offset}-"
    start = state.offset
    try:
        with job.client.session().get(job.url(remote.path), headers=headers, stream=True,
                               timeout=(cfg.connect_timeout, cfg.read_timeout)) as resp:
            _check_status(resp, remote, state, job)
            if resp.status_code == 416:
                return
            _stream(resp, stage, state, job)
    except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as err:
        kind = "server stalled (read timeout)" if "timed out" in str(err).lower() else "connection error"
        raise _Retryable(f"{kind}: {type(err).__name__}", progressed=state.offset > start) from err


def _check_status(resp: requests.Response, remote: RemoteFile, state: _PartState, job: Job) -> None:
    code = resp.status_code
    if code in (401, 403):
        raise DownloadError(
            f"{job.repo_id}: access denied ({code}) for {remote.path}. The repo is gated or private, or the token "
            f"lacks access.", fix="Accept the model's terms on its page, then set HF_TOKEN or run `hf auth login`.",
            exit_code=EXIT_AUTH)
    if code == 404:
        raise DownloadError(
            f"{job.repo_id}@{job.commit}: {remote.path} not found ({resp.headers.get('X-Error-Code', '404')}).",
            fix="Check the repo id and --revision.", exit_code=EXIT_NOT_FOUND)
    if code == 429 or code >= 500:
        raise _Retryable(f"server answered {code}",
                         retry_after=parse_retry_after(resp.headers.get("Retry-After"), job.config.retry_after_max))
    if code == 416:
        # Our offset is at/after the end: complete if the size matches, else the partial is unusable.
        if state.offset != remote.size:
            _restart(state, remote, job)
            raise _Retryable("server rejected the range (416); restarting the file from 0")
        return
    if code >= 400:
        raise DownloadError(f"{remote.path}: unexpected HTTP {code} from the server.", exit_code=EXIT_ERROR)
    if state.offset and code == 200:
        job.log(f"{remote.path}: the server ignores Range requests; restarting this file from 0")
        _restart(state, remote, job)
    elif code == 206 and not resp.headers.get("Content-Range", "").startswith(f"bytes {state.offset}-"):
        raise _Retryable(f"unexpected Content-Range {resp.headers.get('Content-Range')!r}")


def _restart(state: _PartState, remote: RemoteFile, job: Job) -> None:
    job.add(-state.offset)
    state.offset = 0
    state.hasher = new_hasher(remote)


def _stream(resp: requests.Response, stage: Staging, state: _PartState, job: Job) -> None:
    # Unbuffered writes of whole chunks: what is on disk is exactly what the hasher has seen, so a killed or
    # failed run leaves a .part whose length is a valid resume offset.
    # Keep the bytes of a body cut short (urllib3 would raise IncompleteRead and drop its buffer): we notice the
    # short file ourselves and resume from exactly what arrived.
    if hasattr(resp.raw, "enforce_content_length"):
        resp.raw.enforce_content_length = False
    pipe = HashPipe(state.hasher) if job.config.pipeline_hash and state.hasher is not None else None
    try:
        _stream_into(resp, stage, state, job, pipe)
    finally:
        if pipe is not None:
            pipe.close()  # the hasher has seen exactly the bytes on disk again, also after an error


def _stream_into(resp: requests.Response, stage: Staging, state: _PartState, job: Job, pipe: HashPipe | None) -> None:
    with stage.part.open("r+b", buffering=0) as f:
        f.seek(state.offset)
        f.truncate()
        for chunk in resp.iter_content(chunk_size=job.config.chunk_size):
            try:
                _write_all(f, chunk)
            except OSError as err:
                if err.errno in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", -1)):
                    f.truncate(state.offset)  # drop a torn chunk so the partial stays a clean prefix
                    raise DiskFullError(f"No space left while writing {stage.part} ({os.strerror(err.errno)}).",
                                        exit_code=EXIT_DISK) from err
                raise
            if pipe is not None:
                pipe.update(chunk)
            elif state.hasher is not None:
                state.hasher.update(chunk)
            state.offset += len(chunk)
            job.add(len(chunk), len(chunk))
            job.check_cancel()  # after the write: a chunk that already arrived is kept for the resume


def _write_all(f, data: bytes) -> None:  # noqa: ANN001 - raw file
    # A raw write may be short (e.g. at a file-size limit); the next call then raises EFBIG/ENOSPC.
    view = memoryview(data)
    while view:
        view = view[f.write(view):]
