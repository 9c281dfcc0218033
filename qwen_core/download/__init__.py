"""Resumable, verified, parallel downloads of Hub model repos into plain folders.

    from qwen_core.download import DownloadOptions, download_repo, resolve_endpoint
    result = download_repo("Qwen/Qwen-Image", DownloadOptions(local_dir="models/Qwen-Image"))

Modules, lowest layer first (each imports only modules above it in this list, never the package itself):

    types.py      plain types: options, hooks, progress, result, Endpoint, HttpConfig, exit codes
    endpoint.py   resolve_endpoint(): the one place an Endpoint is decided (workflow field, CLI flag, HF_ENDPOINT)
    layout.py     where files go (Placement: the diffusers tree or ComfyUI's folders), the bookkeeping folder
                  .qwen_download/ and atomic JSON writes
    selection.py  which files a download takes per layout (patterns; configs only; ComfyUI split files)
    layout.py     also: file-system errors (ENOSPC, EFBIG, ENAMETOOLONG, ...) as messages with a fix
    retry.py      backoff, Retry-After, cancellable sleeps
    file_lock.py  per-file inter-process lock (in-process fallback where the file system has no flock)
    verify.py     sha256 / git blob checks, verified-file records, hashing off the read path
    transport.py  HubClient: per-thread sessions with the token decision and the redirect checks
    plan.py       the plan (commit + files), its checks, plan.json (a damaged one is rebuilt), offline verification
    listing.py    the repo listing from the Hub API (guarded like file requests)
    job.py        state shared by the workers of one download
    attempt.py    one ranged GET: status and body checks before writing, writes capped at the listed size
    engine.py     one file: resume, bounded attempts (progress = new bytes), verification, atomic placement
    xet.py        --engine xet (huggingface_hub + hf_xet), verified by us
    cleanup.py    --cleanup of abandoned partials
    workers.py    the thread pool, cancel polling, progress meter
    target.py     the target folder before writing: writable, names that fit, free space
    repo.py       download_repo(repo_id, options, hooks): the flow, and every error to the session log
    cli.py        python -m qwen_core download / tools/robust_download.py
"""

from qwen_core.download.endpoint import DEFAULT_ENDPOINT, resolve_endpoint
from qwen_core.download.repo import download_repo
from qwen_core.download.selection import COMFY_REPOS, CONFIG_PATTERNS, ComfyRepo
from qwen_core.download.types import (
    CLI_WORDS,
    NODE_WORDS,
    DownloadHooks,
    DownloadOptions,
    DownloadProgress,
    DownloadResult,
    Endpoint,
    EndpointSource,
    Engine,
    HttpConfig,
    Layout,
    Words,
)

__all__ = [
    "CLI_WORDS",
    "COMFY_REPOS",
    "CONFIG_PATTERNS",
    "ComfyRepo",
    "DEFAULT_ENDPOINT",
    "DownloadHooks",
    "DownloadOptions",
    "DownloadProgress",
    "DownloadResult",
    "Endpoint",
    "EndpointSource",
    "Engine",
    "HttpConfig",
    "Layout",
    "NODE_WORDS",
    "Words",
    "download_repo",
    "resolve_endpoint",
]
