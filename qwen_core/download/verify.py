"""Verification for the downloader: content hashes, verified-file records, and hashing off the read path.

LFS files are checked against their sha256, other files against their git blob id (sha1 of
``"blob <size>\0" + content``, the ETag the Hub sends for them). A verified file gets a small record
(``.qwen_download/<path>.ok``: identity, mtime) so later runs skip re-hashing 40 GB yet notice a file whose
size or mtime changed.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from qwen_core.download.layout import Staging, read_json_object, write_json_atomic
from qwen_core.download.types import RemoteFile

_SHA1_RE = re.compile(r"[0-9a-f]{40}")


def new_hasher(remote: RemoteFile) -> hashlib._Hash | None:
    if remote.sha256:
        return hashlib.sha256()
    if remote.etag and _SHA1_RE.fullmatch(remote.etag):
        h = hashlib.sha1()
        h.update(b"blob %d\0" % remote.size)
        return h
    return None  # the server gave no checkable hash: size only (logged once per file)


def expected_digest(remote: RemoteFile) -> str | None:
    return remote.sha256 or (remote.etag if remote.etag and _SHA1_RE.fullmatch(remote.etag) else None)


def hash_file(path: Path, remote: RemoteFile, hasher: hashlib._Hash | None = None, limit: int | None = None) -> hashlib._Hash | None:
    hasher = hasher if hasher is not None else new_hasher(remote)
    if hasher is None:
        return None
    remaining = limit if limit is not None else path.stat().st_size
    with path.open("rb") as f:
        while remaining > 0:
            block = f.read(min(8 * 1024 * 1024, remaining))
            if not block:
                break
            hasher.update(block)
            remaining -= len(block)
    return hasher


def record_matches(remote: RemoteFile, final: Path, stage: Staging) -> bool:
    """True when `final` was verified earlier and is unchanged since (size + mtime), without re-hashing.

    Reads only: a complete model is reported complete without writing anything (a full disk is fine)."""
    rec = read_json_object(stage.record)  # damaged or of the wrong shape: not a match, never an error
    if rec is None:
        return False
    try:
        st = os.lstat(final)
    except OSError:
        return False
    return (
        stat.S_ISREG(st.st_mode)
        and rec.get("identity") == remote.identity()
        and st.st_size == remote.size
        and rec.get("mtime_ns") == st.st_mtime_ns
    )


def write_record(remote: RemoteFile, final: Path, stage: Staging, commit: str) -> None:
    """Record ``final`` as verified; no write when the same record is already there (a full disk is fine)."""
    record = {"identity": remote.identity(), "mtime_ns": final.stat().st_mtime_ns, "commit": commit}
    if read_json_object(stage.record) != record:
        write_json_atomic(stage.record, record)


def verify_existing(remote: RemoteFile, final: Path) -> bool:
    if final.is_symlink() or not final.is_file() or final.stat().st_size != remote.size:
        return False
    hasher = hash_file(final, remote)
    return hasher is None or hasher.hexdigest() == expected_digest(remote)


class HashPipe:
    """Hash chunks on a helper thread while the worker reads the next ones from the socket.

    sha256 costs about as much CPU as receiving the bytes; overlapping the two keeps a lone stream (the last big
    file of a repo) from waiting on its own hashing (hashlib releases the GIL). Chunks go over in batches of
    ``batch`` bytes to keep the hand-off cost small, and at most ``depth`` batches wait, so memory stays bounded.
    """

    def __init__(self, hasher: hashlib._Hash, batch: int = 4 << 20, depth: int = 2) -> None:
        self.hasher = hasher
        self.batch, self.depth = batch, depth
        self.buffer: list[bytes] = []
        self.buffered = 0
        self.pending: deque[Future] = deque()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qwen-hash")

    def _hash(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.hasher.update(chunk)

    def _flush(self) -> None:
        if self.buffer:
            self.pending.append(self.pool.submit(self._hash, self.buffer))
            self.buffer, self.buffered = [], 0
        while len(self.pending) > self.depth:
            self.pending.popleft().result()

    def update(self, chunk: bytes) -> None:
        self.buffer.append(chunk)
        self.buffered += len(chunk)
        if self.buffered >= self.batch:
            self._flush()

    def close(self) -> None:
        self._flush()
        while self.pending:
            self.pending.popleft().result()
        self.pool.shutdown(wait=True)
