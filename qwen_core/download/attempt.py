"""One ranged GET of one file into its ``.part``: status checks, body checks before writing, capped writes.

A body is rejected before a byte of it reaches the ``.part`` when it cannot be the file: a length that is not
the listed size (or the rest of it), a Content-Range for another offset or another size, an HTML page where no
HTML is expected, or a Git-LFS pointer where the large file is expected; those are what a proxy, a captive
portal or a half-configured mirror answers. Writes stop at the listed size whatever the server keeps sending.
"""

from __future__ import annotations

import contextlib
import errno
import re
from collections.abc import Iterator
from typing import BinaryIO

import requests

from qwen_core.download.job import Job, PartState, Retryable
from qwen_core.download.layout import Staging, fs_error
from qwen_core.download.retry import parse_retry_after
from qwen_core.download.transport import MAX_REDIRECTS
from qwen_core.download.types import (
    EXIT_AUTH,
    EXIT_ERROR,
    EXIT_NOT_FOUND,
    EXIT_UNSAFE,
    EXIT_VERIFY,
    RemoteFile,
)
from qwen_core.download.verify import HashPipe, new_hasher
from qwen_core.errors import DownloadError

SNIFF_BYTES = 512  # how much of a body is looked at before the first write
_HTML_NAMES = (".html", ".htm", ".md", ".txt", ".xml", ".svg")
_HTML_START = re.compile(rb"^\s*(<!doctype html|<html|<head|<body)", re.IGNORECASE)
_LFS_POINTER = b"version https://git-lfs.github.com/spec/"
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_FROM_START = "restarting the file from 0"


def attempt(remote: RemoteFile, stage: Staging, state: PartState, job: Job) -> None:
    """One GET from ``state.offset``; raises Retryable (the caller counts it) or DownloadError (final)."""
    headers = job.client.headers({"Accept-Encoding": "identity"})
    if state.offset:
        headers["Range"] = f"bytes={state.offset}-"
    try:
        with job.client.session().get(job.url(remote.path), headers=headers, stream=True,
                                      timeout=job.client.timeout()) as resp:
            if _check_status(resp, remote, state, job):
                _check_headers(resp, remote, state, job)
                _stream(resp, stage, state, job, remote)
    except requests.TooManyRedirects as err:
        raise Retryable(f"{job.host} keeps redirecting (more than {MAX_REDIRECTS} hops: a redirect loop)",
                        fix="Use another endpoint/mirror: this one's redirects go round in a circle.") from err
    except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as err:
        kind = "server stalled (read timeout)" if "timed out" in str(err).lower() else "connection error"
        raise Retryable(f"{kind}: {type(err).__name__}") from err
    except requests.RequestException as err:  # what else requests raises: never a traceback
        raise Retryable(f"request failed: {type(err).__name__}: {err}") from err
    except (ConnectionError, TimeoutError) as err:  # a socket error that reached us unwrapped: not the disk's
        raise Retryable(f"connection error: {type(err).__name__}") from err


def _wrong_body(job: Job, remote: RemoteFile, what: str) -> Retryable:
    return Retryable(f"{job.host} answered {what} instead of {remote.path} ({remote.size:,} bytes): a proxy, mirror "
                     f"or login portal answered instead of the file; nothing of it was written",
                     exit_code=EXIT_VERIFY,
                     fix=f"Check the network (a captive portal or proxy?) or use another endpoint: "
                     f"{job.words.endpoint}.")


def _check_status(resp: requests.Response, remote: RemoteFile, state: PartState, job: Job) -> bool:
    """True when the body should be streamed; False when the file is complete (416 at its end)."""
    code = resp.status_code
    if code in (401, 403):
        raise DownloadError(
            f"{job.repo_id}: access denied ({code}) by {job.host} for {remote.path}. The repo is gated or private, "
            f"or the token lacks access.",
            fix="Accept the model's terms on its page, then set HF_TOKEN or run `hf auth login`.", exit_code=EXIT_AUTH)
    if code == 404:
        raise DownloadError(
            f"{job.repo_id}@{job.commit}: {remote.path} not found at {job.host} "
            f"({resp.headers.get('X-Error-Code', '404')}).",
            fix=f"Check the repo id and {job.words.revision}.", exit_code=EXIT_NOT_FOUND)
    if code == 429 or code >= 500:
        raise Retryable(f"server answered {code}",
                        retry_after=parse_retry_after(resp.headers.get("Retry-After"), job.config.retry_after_max))
    if code == 416:
        # Our offset is at/after the end: complete if the size matches, else the partial is unusable.
        if state.offset == remote.size:
            return False
        _restart(state, remote, job)
        raise Retryable(f"server rejected the range (416); {_FROM_START}")
    if 300 <= code < 400:
        raise DownloadError(f"{job.host} answered {code} for {remote.path} without a usable Location.",
                            fix="Use another endpoint/mirror.", exit_code=EXIT_UNSAFE)
    if code >= 400:
        raise DownloadError(f"{remote.path}: unexpected HTTP {code} from {job.host}.",
                            fix=f"Check {job.words.endpoint}; a Hub answers 200, 206 or 302 here.",
                            exit_code=EXIT_ERROR)
    if code not in (200, 206):
        raise _wrong_body(job, remote, f"HTTP {code}")
    if state.offset and code == 200:
        job.log(f"{remote.path}: the server ignores Range requests; {_FROM_START}")
        _restart(state, remote, job)
    return True


def _check_headers(resp: requests.Response, remote: RemoteFile, state: PartState, job: Job) -> None:
    """Refuse a body that cannot be the (rest of the) file, from its headers alone."""
    expected = remote.size - state.offset
    if resp.status_code == 206:
        m = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", "").strip())
        if not m or int(m.group(1)) != state.offset:
            raise Retryable(f"unexpected Content-Range {resp.headers.get('Content-Range')!r} for bytes "
                            f"{state.offset}- of {remote.path}")
        if m.group(3) != "*" and int(m.group(3)) != remote.size:
            raise _wrong_body(job, remote, f"a {int(m.group(3)):,}-byte file")
        expected = int(m.group(2)) - int(m.group(1)) + 1
        if expected <= 0 or int(m.group(2)) >= remote.size:
            raise Retryable(f"unexpected Content-Range {resp.headers.get('Content-Range')!r}")
    kind = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if kind in ("text/html", "application/xhtml+xml") and not remote.path.lower().endswith(_HTML_NAMES):
        raise _wrong_body(job, remote, "an HTML page")
    length = resp.headers.get("Content-Length")
    encoded = resp.headers.get("Content-Encoding", "identity").strip().lower() not in ("", "identity")
    if length is not None and not encoded and (not length.strip().isdigit() or int(length) != expected):
        raise _wrong_body(job, remote, f"a body of {length} bytes (expected {expected:,})")


def _restart(state: PartState, remote: RemoteFile, job: Job) -> None:
    job.add(-state.offset)
    state.offset = 0
    state.hasher = new_hasher(remote)


def _sniffed(chunks: Iterator[bytes], state: PartState, remote: RemoteFile, job: Job) -> Iterator[bytes]:
    """The body's chunks, after checking its first bytes (at offset 0) for an HTML page or an LFS pointer."""
    if state.offset:
        yield from chunks
        return
    head: list[bytes] = []
    size = 0
    for chunk in chunks:
        head.append(chunk)
        size += len(chunk)
        if size >= SNIFF_BYTES:
            break
    first = b"".join(head)
    if _HTML_START.match(first[:SNIFF_BYTES]) and not remote.path.lower().endswith(_HTML_NAMES):
        raise _wrong_body(job, remote, "an HTML page")
    if remote.sha256 and first.startswith(_LFS_POINTER) and remote.size != len(first):
        raise _wrong_body(job, remote, "a Git-LFS pointer (the small text that stands for the large file)")
    yield from head
    yield from chunks


def _stream(resp: requests.Response, stage: Staging, state: PartState, job: Job, remote: RemoteFile) -> None:
    # Unbuffered writes of whole chunks: what is on disk is exactly what the hasher has seen, so a killed or
    # failed run leaves a .part whose length is a valid resume offset.
    # Keep the bytes of a body cut short (urllib3 would raise IncompleteRead and drop its buffer): we notice the
    # short file ourselves and resume from exactly what arrived.
    if hasattr(resp.raw, "enforce_content_length"):
        resp.raw.enforce_content_length = False
    pipe = HashPipe(state.hasher) if job.config.pipeline_hash and state.hasher is not None else None
    try:
        chunks = _sniffed(resp.iter_content(chunk_size=job.config.chunk_size), state, remote, job)
        with stage.part.open("r+b", buffering=0) as f:
            f.seek(state.offset)
            f.truncate()
            _write_chunks(f, chunks, stage, state, job, remote, pipe)
    finally:
        if pipe is not None:
            pipe.close()  # the hasher has seen exactly the bytes on disk again, also after an error


def _write_chunks(f: BinaryIO, chunks: Iterator[bytes], stage: Staging, state: PartState, job: Job,
                  remote: RemoteFile, pipe: HashPipe | None) -> None:
    for chunk in chunks:
        room = remote.size - state.offset
        if len(chunk) > room:  # the server sends more than the file: never grow the .part past its size
            job.log(f"{remote.path}: {job.host} sent more than the listed {remote.size:,} bytes; "
                    f"stopped writing at the listed size")
            chunk = chunk[:room]
        try:
            _write_all(f, chunk)
        except OSError as err:
            with contextlib.suppress(OSError):
                f.truncate(state.offset)  # drop a torn chunk so the partial stays a clean prefix
            raise fs_error(err, stage.part, job.words) from err
        if pipe is not None:
            pipe.update(chunk)
        elif state.hasher is not None:
            state.hasher.update(chunk)
        state.offset += len(chunk)
        job.add(len(chunk), len(chunk))
        job.check_cancel()  # after the write: a chunk that already arrived is kept for the resume
        if state.offset >= remote.size:
            return  # the rest of an endless body is never read


def _write_all(f: BinaryIO, data: bytes) -> None:
    # A raw write may be short (e.g. at a file-size limit); the next call then raises EFBIG/ENOSPC.
    view = memoryview(data)
    while view:
        written = f.write(view)
        if not written:
            raise OSError(errno.ENOSPC, "the disk accepted no more bytes")
        view = view[written:]
