"""``--engine xet``: let huggingface_hub (and its Rust hf_xet client) fetch each file, then verify it ourselves.

hf_xet downloads content-defined chunks from the Xet CAS and is the fastest path on Xet-backed repos, but an
interrupted file starts over on the next run (huggingface_hub keeps no resumable partial across processes),
and cancel takes effect only between files. We still take our per-file lock and check sha256 before a file
counts as done, because hf_xet once reported a short file as success.
"""

from __future__ import annotations

import os
from pathlib import Path

import requests

from qwen_core.download.file_lock import FileLock
from qwen_core.download.job import Job
from qwen_core.download.layout import fs_error
from qwen_core.download.plan import DownloadPlan
from qwen_core.download.types import (
    EXIT_AUTH,
    EXIT_NETWORK,
    EXIT_NOT_FOUND,
    EXIT_VERIFY,
    FileOutcome,
    RemoteFile,
)
from qwen_core.download.verify import record_matches, verify_existing, write_record
from qwen_core.errors import DownloadError


def server_offers_xet(plan: DownloadPlan, job: Job) -> bool:
    """A HEAD on the largest LFS file answers ``X-Xet-Hash`` when the repo is served through Xet."""
    lfs = [f for f in plan.files if f.sha256]
    if not lfs:
        return False
    target = max(lfs, key=lambda f: f.size)
    try:
        resp = job.client.session().head(job.url(target.path), headers=job.client.headers(), allow_redirects=False,
                                  timeout=(job.config.connect_timeout, job.config.read_timeout))
    except requests.RequestException:
        return False
    return bool(resp.headers.get("X-Xet-Hash"))


def fetch_file_xet(remote: RemoteFile, job: Job) -> FileOutcome:
    final = job.where.final(remote.path)
    try:
        return _fetch_file_xet(remote, final, job)
    except InterruptedError:
        raise
    except OSError as err:
        raise fs_error(err, final, job.words) from err


def _fetch_file_xet(remote: RemoteFile, final: Path, job: Job) -> FileOutcome:
    from huggingface_hub import hf_hub_download

    # Read by hf_xet when it starts: more parallel chunk fetches, more memory. The user's own value wins.
    os.environ.setdefault("HF_XET_HIGH_PERFORMANCE", "1")
    job.check_cancel()
    stage = job.where.stage(remote.path)
    if not job.verify and record_matches(remote, final, stage):
        job.add(remote.size)
        return FileOutcome(remote.path, "present", 0)
    lock = FileLock(stage.lock, timeout=job.config.lock_timeout, should_stop=job.cancel.is_set)
    try:
        lock.acquire()
    except InterruptedError:  # cancelled while another download held the file: say so like the http engine
        job.check_cancel()
        raise
    try:
        if final.exists() and verify_existing(remote, final):
            write_record(remote, final, stage, job.commit)
            job.add(remote.size)
            return FileOutcome(remote.path, "present", 0)
        try:
            got = hf_hub_download(job.repo_id, remote.path, revision=job.commit, local_dir=job.root,
                                  endpoint=job.client.endpoint.url, token=job.client.token or False)
        except Exception as err:  # huggingface_hub/hf_xet errors -> our exit codes, with the http way out
            raise _as_download_error(remote, err) from err
        if os.path.realpath(got) != os.path.realpath(final) or not verify_existing(remote, final):
            final.unlink(missing_ok=True)
            raise DownloadError(f"{remote.path}: the file hf_xet/huggingface_hub wrote does not match the repo's "
                                f"size/sha256; it was deleted.", fix="Run again with --engine http.",
                                exit_code=EXIT_VERIFY)
        write_record(remote, final, stage, job.commit)
        job.add(remote.size, remote.size)
        return FileOutcome(remote.path, "downloaded", remote.size)
    finally:
        lock.release()


def _as_download_error(remote: RemoteFile, err: Exception) -> DownloadError:
    status = getattr(getattr(err, "response", None), "status_code", None)
    code = EXIT_AUTH if status in (401, 403) else EXIT_NOT_FOUND if status == 404 else EXIT_NETWORK
    return DownloadError(f"{remote.path}: the xet engine failed ({type(err).__name__}: {err}).",
                         fix="Run again with --engine http: it resumes partial files across runs.", exit_code=code)
