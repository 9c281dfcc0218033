"""Resumable, verified, parallel download of a Hub model repo into a plain folder: ``download_repo()``.

Why not ``snapshot_download``: huggingface_hub >= 1.18 forgets a half-downloaded file when the process dies
(a 40 GB repo interrupted at 90 % starts over), checks sizes but never sha256, and names files through
symlinks into its blob cache. Here the listing comes from the Hub's API (listing.py: same endpoints as
HfApi, through our guarded client) and the bytes from our ranged HTTP engine (engine.py): each file is
written to a ``.part`` with a sidecar, resumed with HTTP Range after any interruption, verified (sha256 for
LFS files, git blob id otherwise) and only then renamed into place.

Every failure leaves ``download_repo`` as a QwenError with a message and a fix (DownloadError carries the CLI's
exit code), and is written with its fix to the session log; an unexpected exception becomes DownloadError
(exit 1) with its traceback in the session log only. Exceptions raised by the caller's own hooks (ComfyUI's
interrupt from a progress callback) pass through unchanged.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from qwen_core.download.endpoint import resolve_endpoint
from qwen_core.download.engine import fetch_file
from qwen_core.download.job import Job
from qwen_core.download.layout import Placement, fs_error
from qwen_core.download.listing import resolve_plan
from qwen_core.download.plan import (
    DamagedPlan,
    DownloadPlan,
    load_plan,
    plan_record,
    save_plan,
    saved_record,
    verify_offline,
)
from qwen_core.download.target import check_destinations, explain_disk_full, prepare_target
from qwen_core.download.transport import HubClient
from qwen_core.download.types import (
    EXIT_ERROR,
    EXIT_NETWORK,
    EXIT_USAGE,
    DiskFullError,
    DownloadHooks,
    DownloadOptions,
    DownloadProgress,
    DownloadResult,
    Engine,
    FileOutcome,
    Layout,
    fmt_bytes,
)
from qwen_core.download.workers import FetchOne, run_workers
from qwen_core.errors import DownloadCancelled, DownloadError, InvalidInputError, QwenError
from qwen_core.paths import models_parent, repo_folder, validate_repo_id
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
    (partials are kept), InvalidInputError for bad arguments, and whatever a hook raised. Complete verified
    files are never fetched again.
    """
    log = get_session_log()
    guard = _HookGuard(hooks or DownloadHooks())
    try:
        return _download(repo_id, options or DownloadOptions(), guard.hooks)
    except DownloadCancelled as err:
        log.info(f"download {repo_id}: {err}")
        raise
    except QwenError as err:
        log.log_exception(err, context=f"download {repo_id}")
        raise
    except Exception as err:
        if err is guard.raised:  # the caller's hook (ComfyUI's interrupt): theirs to handle
            log.info(f"download {repo_id}: stopped by the caller ({type(err).__name__})")
            raise
        log.error(f"download {repo_id}: unexpected {type(err).__name__}: {err}\n{traceback.format_exc()}")
        raise DownloadError(f"Unexpected error while downloading {repo_id}: {type(err).__name__}: {err}.",
                            fix="Run it again (it resumes); if it repeats, report it with the session log "
                            "(reports/last_session.log), which has the details.", exit_code=EXIT_ERROR) from err


class _HookGuard:
    """The caller's hooks, noting an exception one of them raised (to tell it from our own failures)."""

    def __init__(self, hooks: DownloadHooks) -> None:
        self.raised: BaseException | None = None
        self.hooks = DownloadHooks(**{name: self._wrap(fn) for name, fn in vars(hooks).items()})

    def _wrap(self, fn: Callable[..., Any] | None) -> Callable[..., Any] | None:
        if fn is None:
            return None

        def call(*args: Any) -> Any:
            try:
                return fn(*args)
            except BaseException as err:
                self.raised = err
                raise

        return call


def placement_for(repo_id: str, options: DownloadOptions) -> Placement:
    """Where the files of this download go (``layout.Placement``): ``options.local_dir`` or the store's
    ``<org>/<name>`` for the diffusers and configs layouts; for the comfyui layout ``options.local_dir`` is
    ComfyUI's models folder (default: the folder that holds the store, when QWEN_HOME or ComfyUI set it)."""
    repo_id = validate_repo_id(repo_id)
    if options.layout is not Layout.COMFYUI:
        return Placement.tree(options.local_dir if options.local_dir is not None else repo_folder(repo_id))
    models = options.local_dir if options.local_dir is not None else models_parent()
    if models is None:
        raise InvalidInputError("out_dir", f"the comfyui layout needs ComfyUI's models folder: set "
                                f"{options.words.target} (e.g. ComfyUI/models), or QWEN_HOME to its "
                                f"models/diffusers folder.")
    return Placement.comfy(models, repo_id, options.comfy_dirs)


def _download(repo_id: str, options: DownloadOptions, hooks: DownloadHooks) -> DownloadResult:
    started = time.monotonic()
    repo_id = validate_repo_id(repo_id)
    where = placement_for(repo_id, options)
    root = where.root
    say = _messenger(hooks.on_message)
    if os.environ.get("HF_HUB_ENABLE_HF_TRANSFER", "").strip() in ("1", "true", "True", "ON"):
        say("notice: HF_HUB_ENABLE_HF_TRANSFER is ignored by huggingface_hub >= 1.0; using the parallel "
            "resumable HTTP engine (use --engine xet for hf_xet on Xet-backed repos)")
    if is_offline(options.offline):
        result = verify_offline(repo_id, where, options, say)
        return replace(result, elapsed_s=time.monotonic() - started)
    endpoint = options.endpoint or resolve_endpoint(None)
    client = HubClient(endpoint, resolve_token(options.token) if endpoint.send_token else None, options.http)
    local = _local_ids(where, repo_id, say)
    if not options.dry_run and local is not None and local[1] == options.revision:
        # A commit never changes: when every selected file of it is here and verified, skip the network.
        done = _try_local(repo_id, where, options, say, started)
        if done is not None:
            return done
    _emit(hooks.progress, DownloadProgress(repo_id, "resolving", 0, 0, 0, 0, 0.0, None))
    try:
        plan = resolve_plan(client, repo_id, root, options, say)
    except DownloadError as err:
        # Hub unreachable but a verified copy of this revision is here: use it rather than fail the workflow.
        if err.exit_code != EXIT_NETWORK or options.dry_run or local is None or options.revision not in local:
            raise
        done = _try_local(repo_id, where, options, say, started)
        if done is None:
            raise
        say(f"notice: the hub could not be reached ({err}); using the verified local copy of {done.commit[:12]}")
        return done
    if plan.commit != options.revision:
        say(f"{repo_id}@{options.revision} is commit {plan.commit} (at {endpoint.host})")
    check_destinations(where, plan, options.words)
    if options.dry_run:
        return _result(plan, where, [], 0, time.monotonic() - started, options.engine.value, options.layout,
                       dry_run=True)
    if not options.verify and plan.complete_in(where):
        return _already_complete(plan, where, hooks, say, started, options.layout)
    prepare_target(where, plan, options.words)
    try:
        save_plan(where, plan)
    except OSError as err:
        raise fs_error(err, where.staging, options.words) from err
    job = Job(root=root, client=client, repo_id=repo_id, commit=plan.commit, log=say, verify=options.verify,
              words=options.words, placement=where)
    return _fetch_all(plan, job, options, hooks, started)


def _already_complete(plan: DownloadPlan, where: Placement, hooks: DownloadHooks, say: Callable[[str], None],
                      started: float, layout: Layout) -> DownloadResult:
    """Every selected file is here and verified: report it without a lock, a probe or any other write."""
    if saved_record(where) != plan_record(plan):
        try:  # keep the listing for offline checks; best effort, a full disk must not fail a complete model
            save_plan(where, plan)
        except OSError as err:
            say(f"warning: could not save the listing in {where.staging} ({err.strerror or err}); "
                f"the model is complete")
    n = len(plan.files)
    _emit(hooks.progress, DownloadProgress(plan.repo_id, "done", plan.total_bytes, plan.total_bytes, n, n, 0.0, None))
    outcomes = [FileOutcome(f.path, "present", 0) for f in plan.files]
    result = _result(plan, where, outcomes, 0, time.monotonic() - started, Engine.HTTP.value, layout)
    say(f"done: {n} files, {fmt_bytes(plan.total_bytes)} in {_shown(where)} already present and verified; "
        f"nothing fetched")
    return result


def _shown(where: Placement) -> str:
    """The target in a message: the model folder, or ComfyUI's models folder with the kinds' folders."""
    return f"{where.root} (ComfyUI folders)" if where.is_comfy else str(where.root)


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
    result = _result(plan, job.where, outcomes, job.fetched_bytes, time.monotonic() - started, chosen.value,
                     options.layout)
    checked = " (every present file re-hashed)" if options.verify else ""
    job.log(f"done: {len(plan.files)} files, {fmt_bytes(plan.total_bytes)} in {_shown(job.where)} "
            f"({fmt_bytes(job.fetched_bytes)} fetched, {result.files_present} already present{checked}, "
            f"{result.files_resumed} resumed, {result.elapsed_s:.1f} s)")
    return result


def _local_ids(where: Placement, repo_id: str, say: Callable[[str], None]) -> tuple[str, str] | None:
    """(revision, commit) of the last listing saved for this repo's download, if any."""
    if not where.staging.is_dir():
        return None
    try:
        plan = load_plan(where)
    except DamagedPlan as err:
        say(f"the saved listing is damaged ({err}); ignoring it: it is rebuilt from the server")
        return None
    return (plan.revision, plan.commit) if plan is not None and plan.repo_id == repo_id else None


def _try_local(repo_id: str, where: Placement, options: DownloadOptions, say: Callable[[str], None],
               started: float) -> DownloadResult | None:
    try:
        result = verify_offline(repo_id, where, options, say)
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


def _choose_engine(engine: Engine, plan: DownloadPlan, job: Job) -> Engine:
    # auto = http: only our engine resumes across runs, which matters more for 40 GB than raw speed.
    if engine is not Engine.XET:
        return Engine.HTTP
    if job.where.is_comfy:
        job.log("engine xet: not used for the comfyui layout (huggingface_hub writes repo paths under one folder); "
                "using the http engine")
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
        return explain_disk_full(err, plan, job.root, job.done_bytes, job.words)
    if isinstance(err, DownloadCancelled):
        return DownloadCancelled(f"Download of {plan.repo_id} cancelled at {fmt_bytes(job.done_bytes)} of "
                                 f"{fmt_bytes(plan.total_bytes)}; partial files are kept for resume.")
    if isinstance(err, InvalidInputError):
        return DownloadError(str(err), exit_code=EXIT_USAGE)
    return err


def _result(plan: DownloadPlan, where: Placement, outcomes: list[FileOutcome], fetched: int, elapsed: float,
            engine: str, layout: Layout, dry_run: bool = False) -> DownloadResult:
    return DownloadResult(
        repo_id=plan.repo_id, revision=plan.revision, commit=plan.commit, local_dir=where.root,
        files=tuple(f.path for f in plan.files), bytes_total=plan.total_bytes, bytes_fetched=fetched,
        files_present=sum(o.status == "present" for o in outcomes),
        files_resumed=sum(o.status == "resumed" for o in outcomes), elapsed_s=elapsed, engine=engine,
        dry_run=dry_run, notes=plan.notes, destinations=tuple(where.final(f.path) for f in plan.files),
        layout=layout)

