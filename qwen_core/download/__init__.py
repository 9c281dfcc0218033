"""Resumable, verified, parallel downloads of Hub model repos into plain folders.

    from qwen_core.download import DownloadOptions, download_repo, resolve_endpoint
    result = download_repo("Qwen/Qwen-Image", DownloadOptions(local_dir="models/Qwen-Image"))

Modules, lowest layer first (each imports only modules above it in this list, never the package itself):

    types.py      plain types: options, hooks, progress, result, Endpoint, HttpConfig, exit codes
    endpoint.py   resolve_endpoint(): the one place an Endpoint is decided (workflow field, CLI flag, HF_ENDPOINT)
    layout.py     the bookkeeping folder .qwen_download/ and atomic JSON writes
    retry.py      backoff, Retry-After, cancellable sleeps
    file_lock.py  per-file inter-process lock
    verify.py     sha256 / git blob checks, verified-file records, hashing off the read path
    transport.py  HubClient: per-thread sessions with the token decision and the redirect guard
    plan.py       the plan (commit + files), plan.json, offline verification
    listing.py    the repo listing from the Hub API (guarded like file requests)
    engine.py     one file over ranged HTTP, resumable across kills
    xet.py        --engine xet (huggingface_hub + hf_xet), verified by us
    cleanup.py    --cleanup of abandoned partials
    workers.py    the thread pool, cancel polling, progress meter
    repo.py       download_repo(repo_id, options, hooks)
    cli.py        python -m qwen_core download / tools/robust_download.py
"""

from qwen_core.download.endpoint import DEFAULT_ENDPOINT, resolve_endpoint
from qwen_core.download.repo import download_repo
from qwen_core.download.types import (
    DownloadHooks,
    DownloadOptions,
    DownloadProgress,
    DownloadResult,
    Endpoint,
    EndpointSource,
    Engine,
    HttpConfig,
)

__all__ = [
    "DEFAULT_ENDPOINT",
    "DownloadHooks",
    "DownloadOptions",
    "DownloadProgress",
    "DownloadResult",
    "Endpoint",
    "EndpointSource",
    "Engine",
    "HttpConfig",
    "download_repo",
    "resolve_endpoint",
]
