"""Resumable, verified, parallel download of a Hub model repo into a plain folder: ``download_repo()``.

Why not ``snapshot_download``: huggingface_hub >= 1.18 forgets a half-downloaded file when the process dies
(a 40 GB repo interrupted at 90 % starts over), checks sizes but never sha256, and names files through
symlinks into its blob cache. Here the listing comes from the Hub's API (listing.py: same endpoints as
HfApi, through our guarded client) and the bytes from our ranged HTTP engine (engine.py): each file is
written to a ``.part`` with a sidecar, resumed with HTTP Range after any interruption, verified (sha256 for
LFS files, git blob id otherwise) and only then renamed into place.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from qwen_core.download.endpoint import resolve_endpoint
from qwen_core.download.engine import Job, fetch_file
from qwen_core.download.layout import STAGING_DIR
from qwen_core.download.listing import resolve_plan
from qwen_core.download.plan import DownloadPlan, load_plan, save_plan, verify_offline
from qwen_core.download.transport import HubClient
from qwen_core.download.types import (
    EXIT_DISK,
    EXIT_NETWORK,
    EXIT_USAGE,
    DiskFullError,
    DownloadHooks,
    DownloadOptions,
    DownloadProgress,
    DownloadResult,
    Engine,
    FileOutcome,
    fmt_bytes,
)
from qwen_core.download.workers import FetchOne, run_workers
from qwen_core.errors import DownloadCancelled, DownloadError, InvalidInputError
from qwen_core.paths import repo_folder, validate_repo_id
from qwen_core.session_log import get_session_log, redact

logger = logging.getLogger("qwen_core.download")


def resolve_token(token: str | bool | None) -> str | None:
    """False = anonymous; a string = that token; None = HF_TOKEN or the `hf auth login` token. Never logged."""
    if token is False:
        return None
    if isinstance(token, str) and token:
        return token
    from huggingface_hub import get_token

    return get_token()


def is_offline(offline: bool | None) -> bool:
    if offline is not None:
        return offline
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def download_repo(repo_id: str, options: DownloadOptions | None = None,
                  hooks: DownloadHooks | None = None) -> DownloadResult:
    """Download (or resume, or just verify) ``repo_id`` as ``options`` say, into a folder of real files.

    Returns when every selected file is present and verified. Raises DownloadError (``.exit_code``) for
    auth/not-found/network/disk/verify problems, DownloadCancelled when ``hooks.should_cancel()`` turned true
    or ``hooks.progress`` raised (partials are kept), and InvalidInputError for bad arguments. Complete verified
    files are never fetched again.
    """
    started = time.monotonic()
    repo_id = validate_repo_id(repo_id)
    options = options or DownloadOptions()
    hooks = hooks or DownloadHooks()
    root = options.local_dir if options.local_dir is not None else repo_folder(repo_id)
    say = _messenger(hooks.on_message)
    if os.environ.get("HF_HUB_ENABLE_HF_TRANSFER", "").strip() in ("1", "true", "True", "ON"):
        say("notice: HF_HUB_ENABLE_HF_TRANSFER is ignored by huggingface_hub >= 1.0; using the parallel "
            "resumable HTTP engine (use --engine xet for hf_xet on Xet-backed repos)")
    if is_offline(options.offline):
        result = verify_offline(repo_id, root, options, say)
        return replace(result, elapsed_s=time.monotonic() - started)
    endpoint = options.endpoint or resolve_endpoint(None)
    client = HubClient(endpoint, resolve_token(options.token) if endpoint.send_token else None, options.http)
    local = _local_ids(root, repo_id)
    if not options.dry_run and local is not None and local[1] == options.revision:
        # A commit never changes: when every selected file of it is here and verified, skip the network.
        done = _try_local(repo_id, root, options, say, started)
        if done is not None:
            return done
    _emit(hooks.progress, DownloadProgress(repo_id, "resolving", 0, 0, 0, 0, 0.0, None))
    try:
        plan = resolve_plan(client, repo_id, root, options, say)
    except DownloadError as err:
        # Hub unreachable but a verified copy of this revision is here: use it rather than fail the workflow.
        if err.exit_code != EXIT_NETWORK or options.dry_run or local is None or options.revision not in local:
            raise
        done = _try_local(repo_id, root, options, say, started)
        if done is None:
            raise
        say(f"notice: the hub could not be reached ({err}); using the verified local copy of {done.commit[:12]}")
        return done
    if options.dry_run:
        return _result(plan, root, [], 0, time.monotonic() - started, options.engine.value, dry_run=True)
    _prepare_target(root, plan)
    save_plan(root, plan)
    job = Job(root=root, client=client, repo_id=repo_id, commit=plan.commit, log=say)
    return _fetch_all(plan, job, options, hooks, started)


def _fetch_all(plan: DownloadPlan, job: Job, options: DownloadOptions, hooks: DownloadHooks,
               started: float) -> DownloadResult:
    chosen = _choose_engine(options.engine, plan, job)
    fetch_one: FetchOne
    if chosen is Engine.XET:
        from qwen_core.download.xet import fetch_file_xet as fetch_one
    else:
        fetch_one = fetch_file
    outcomes, error = run_workers(plan, job, fetch_one, options.workers, hooks)
    if error is not None:
        raise _explain(error, plan, job)
    result = _result(plan, job.root, outcomes, job.fetched_bytes, time.monotonic() - started, chosen.value)
    job.log(f"done: {len(plan.files)} files, {fmt_bytes(plan.total_bytes)} in {job.root} "
            f"({fmt_bytes(job.fetched_bytes)} fetched, {result.files_present} already present, "
            f"{result.files_resumed} resumed, {result.elapsed_s:.1f} s)")
    return result


def _local_ids(root: Path, repo_id: str) -> tuple[str, str] | None:
    """(revision, commit) of the last listing saved in ``root`` for this repo, if any."""
    plan = load_plan(root) if (root / STAGING_DIR).is_dir() else None
    return (plan.revision, plan.commit) if plan is not None and plan.repo_id == repo_id else None


def _try_local(repo_id: str, root: Path, options: DownloadOptions, say: Callable[[str], None],
               started: float) -> DownloadResult | None:
    try:
        result = verify_offline(repo_id, root, options, say)
    except DownloadError:
        return None
    return replace(result, elapsed_s=time.monotonic() - started, engine="local")


def _messenger(on_message: Callable[[str], None] | None) -> Callable[[str], None]:
    log = get_session_log()

    def say(message: str) -> None:
        message = redact(message)
        log.info(f"download: {message}")
        logger.info(message)
        if on_message is not None:
            on_message(message)

    return say


def _emit(progress: Callable[[DownloadProgress], None] | None, p: DownloadProgress) -> None:
    if progress is not None:
        progress(p)


def _prepare_target(root: Path, plan: DownloadPlan) -> None:
    """Create the folder, prove it is writable, and check the free space against what is still missing."""
    try:
        (root / STAGING_DIR).mkdir(parents=True, exist_ok=True)
        # Unique per call: two downloads in one process (two ComfyUI nodes) must not delete each other's probe.
        probe = root / STAGING_DIR / f".probe.{os.getpid()}.{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise DownloadError(f"The target folder {root} cannot be written ({err.strerror or err}).",
                            fix="Choose a writable --out-dir, or fix the folder's permissions.",
                            exit_code=EXIT_DISK) from err
    need = plan.missing_bytes(root)
    free = shutil.disk_usage(root).free
    if need > free:
        raise DownloadError(
            f"Not enough disk space in {root}: {fmt_bytes(need)} still to download, {fmt_bytes(free)} free.",
            fix=f"Free at least {fmt_bytes(need - free)} or choose another --out-dir; what is already "
            f"downloaded is kept.", exit_code=EXIT_DISK)


def _choose_engine(engine: Engine, plan: DownloadPlan, job: Job) -> Engine:
    # auto = http: only our engine resumes across runs, which matters more for 40 GB than raw speed.
    if engine is not Engine.XET:
        return Engine.HTTP
    if job.client.endpoint.redirect_guard is not None:
        job.log("engine xet: not used for an endpoint from a workflow (huggingface_hub's client follows redirects "
                "unchecked); using the http engine")
        return Engine.HTTP
    from qwen_core.download.xet import server_offers_xet

    if server_offers_xet(plan, job):
        job.log("engine xet: huggingface_hub/hf_xet with HF_XET_HIGH_PERFORMANCE=1 (note: no resume across runs)")
        return Engine.XET
    job.log("engine xet requested but the server does not offer Xet for this repo; using the http engine")
    return Engine.HTTP


def _explain(err: BaseException, plan: DownloadPlan, job: Job) -> BaseException:
    if isinstance(err, DiskFullError):
        need = plan.total_bytes - job.done_bytes
        free = shutil.disk_usage(job.root).free
        return DownloadError(
            f"Disk full while downloading {plan.repo_id} into {job.root}: {fmt_bytes(need)} still needed, "
            f"{fmt_bytes(free)} free. Partial files are kept.",
            fix=f"Free at least {fmt_bytes(max(need - free, 0))} (or move --out-dir) and run the same command "
            f"again: it resumes.", exit_code=EXIT_DISK)
    if isinstance(err, DownloadCancelled):
        return DownloadCancelled(f"Download of {plan.repo_id} cancelled at {fmt_bytes(job.done_bytes)} of "
                                 f"{fmt_bytes(plan.total_bytes)}; partial files are kept for resume.")
    if isinstance(err, InvalidInputError):
        return DownloadError(str(err), exit_code=EXIT_USAGE)
    return err


def _result(plan: DownloadPlan, root: Path, outcomes: list[FileOutcome], fetched: int, elapsed: float,
            engine: str, dry_run: bool = False) -> DownloadResult:
    return DownloadResult(
        repo_id=plan.repo_id, revision=plan.revision, commit=plan.commit, local_dir=root,
        files=tuple(f.path for f in plan.files), bytes_total=plan.total_bytes, bytes_fetched=fetched,
        files_present=sum(o.status == "present" for o in outcomes),
        files_resumed=sum(o.status == "resumed" for o in outcomes), elapsed_s=elapsed, engine=engine,
        dry_run=dry_run, notes=plan.notes)
