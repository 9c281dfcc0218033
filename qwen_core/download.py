"""Resumable, verified, parallel download of a Hub model repo into a plain folder: ``download_repo()``.

Why not ``snapshot_download``: huggingface_hub >= 1.18 forgets a half-downloaded file when the process dies
(a 40 GB repo interrupted at 90 % starts over), checks sizes but never sha256, and names files through
symlinks into its blob cache. Here the listing comes from huggingface_hub's ``HfApi`` (same endpoints, same
token handling), and the bytes come from our ranged HTTP engine (``download_http.py``): each file is written
to a ``.part`` with a sidecar, resumed with HTTP Range after any interruption, verified (sha256 for LFS files,
git blob id otherwise) and only then renamed into place.

The node calls ``download_repo(..., progress=cb, should_cancel=fn)``; both callbacks run on the caller's
thread (the workers only set/read a threading.Event), so a ComfyUI progress hook may raise to cancel.
Exit codes of the CLI (``python -m qwen_core download`` / ``tools/robust_download.py``) are the EXIT_*
constants of download_http.py, listed in the README "Downloads" section.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path

from qwen_core.download_http import (
    EXIT_DISK,
    EXIT_NETWORK,
    EXIT_USAGE,
    STAGING_DIR,
    DiskFullError,
    FileOutcome,
    HttpConfig,
    Job,
    RemoteFile,
    fetch_file,
)
from qwen_core.download_plan import DownloadPlan, load_plan, resolve_plan, save_plan, verify_offline
from qwen_core.endpoint_policy import DEFAULT_ENDPOINT
from qwen_core.errors import DownloadCancelled, DownloadError, InvalidInputError
from qwen_core.paths import repo_folder, validate_repo_id, validate_revision
from qwen_core.session_log import get_session_log, redact
from qwen_core.validation import whole_number

logger = logging.getLogger("qwen_core.download")

ENGINES = ("auto", "http", "xet")

__all__ = [
    "DownloadPlan",
    "DownloadProgress",
    "DownloadResult",
    "HttpConfig",
    "RemoteFile",
    "configure_download",
    "download_repo",
    "load_plan",
    "run_download",
]


@dataclass(frozen=True)
class DownloadProgress:
    """What the progress callback receives (about 4 times a second and once at the end)."""

    repo_id: str
    phase: str  # "resolving" (listing the repo) | "downloading" | "done"
    bytes_done: int  # includes bytes already present or resumed, so the bar never jumps backwards on resume
    bytes_total: int
    files_done: int
    files_total: int
    bytes_per_s: float  # network speed over the last ~5 s
    eta_s: float | None

    @property
    def fraction(self) -> float:
        return self.bytes_done / self.bytes_total if self.bytes_total else 1.0

    def text(self) -> str:
        eta = "" if self.eta_s is None else f"  ETA {_fmt_duration(self.eta_s)}"
        return (f"{self.repo_id}: {_fmt_bytes(self.bytes_done)} / {_fmt_bytes(self.bytes_total)} "
                f"({100 * self.fraction:.0f}%)  files {self.files_done}/{self.files_total}  "
                f"{self.bytes_per_s / 1e6:.1f} MB/s{eta}")


@dataclass(frozen=True)
class DownloadResult:
    repo_id: str
    revision: str
    commit: str
    local_dir: Path
    files: tuple[str, ...]
    bytes_total: int
    bytes_fetched: int  # over the network in this run
    files_present: int  # verified earlier (or now) and not fetched again
    files_resumed: int
    elapsed_s: float
    engine: str
    dry_run: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)


def resolve_token(token: str | bool | None) -> str | None:
    """False = anonymous; a string = that token; None = HF_TOKEN or the `hf auth login` token. Never logged."""
    if token is False:
        return None
    if isinstance(token, str) and token:
        return token
    from huggingface_hub import get_token

    return get_token()


def resolve_endpoint(endpoint: str | None) -> str:
    url = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise InvalidInputError("endpoint", f"{url!r} must start with http:// or https://.")
    return url


def is_offline(offline: bool | None) -> bool:
    if offline is not None:
        return offline
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def download_repo(
    repo_id: str,
    *,
    revision: str = "main",
    local_dir: str | os.PathLike | None = None,
    allow_patterns: Sequence[str] | str | None = None,
    ignore_patterns: Sequence[str] | str | None = None,
    endpoint: str | None = None,
    token: str | bool | None = None,
    workers: int = 8,
    retries: int = 3,
    engine: str = "auto",
    offline: bool | None = None,
    dry_run: bool = False,
    progress: Callable[[DownloadProgress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    on_message: Callable[[str], None] | None = None,
    config: HttpConfig | None = None,
    redirect_guard: Callable[[str], None] | None = None,
) -> DownloadResult:
    """Download (or resume, or just verify) ``repo_id@revision`` into ``local_dir`` as real files.

    ``local_dir`` defaults to ``paths.repo_folder(repo_id)``. Returns when every selected file is present
    and verified. Raises DownloadError (``.exit_code``) for auth/not-found/network/disk/verify problems,
    DownloadCancelled when ``should_cancel()`` turned true or ``progress`` raised (partials are kept), and
    InvalidInputError for bad arguments. Complete verified files are never fetched again.
    ``redirect_guard(url)`` is called with every redirect target of a file download and raises to refuse it
    (the ComfyUI node passes the endpoint policy's check for an endpoint typed into a workflow).
    """
    started = time.monotonic()
    repo_id = validate_repo_id(repo_id)
    revision = validate_revision(revision)
    if engine not in ENGINES:
        raise InvalidInputError("engine", f"{engine!r} is not one of {', '.join(ENGINES)}.")
    workers = whole_number("workers", workers, 1, 64)
    cfg = replace(config or HttpConfig(), retries=max(int(retries), 0))
    root = Path(local_dir) if local_dir is not None else repo_folder(repo_id)
    say = _messenger(on_message)
    if os.environ.get("HF_HUB_ENABLE_HF_TRANSFER", "").strip() in ("1", "true", "True", "ON"):
        say("notice: HF_HUB_ENABLE_HF_TRANSFER is ignored by huggingface_hub >= 1.0; using the parallel "
            "resumable HTTP engine (use --engine xet for hf_xet on Xet-backed repos)")
    if is_offline(offline):
        result = verify_offline(repo_id, revision, root, allow_patterns, ignore_patterns, say)
        return replace(result, elapsed_s=time.monotonic() - started)
    tok = resolve_token(token)
    url = resolve_endpoint(endpoint)
    local = _local_ids(root, repo_id)
    if not dry_run and local is not None and local[1] == revision:
        # A commit never changes: when every selected file of it is here and verified, skip the network.
        done = _try_local(repo_id, revision, root, allow_patterns, ignore_patterns, say, started)
        if done is not None:
            return done
    _emit(progress, DownloadProgress(repo_id, "resolving", 0, 0, 0, 0, 0.0, None))
    try:
        plan = resolve_plan(repo_id, revision, root, endpoint=url, token=tok, allow_patterns=allow_patterns,
                            ignore_patterns=ignore_patterns, config=cfg, log=say)
    except DownloadError as err:
        # Hub unreachable but a verified copy of this revision is here: use it rather than fail the workflow.
        if err.exit_code != EXIT_NETWORK or dry_run or local is None or revision not in local:
            raise
        done = _try_local(repo_id, revision, root, allow_patterns, ignore_patterns, say, started)
        if done is None:
            raise
        say(f"notice: the hub could not be reached ({err}); using the verified local copy of {done.commit[:12]}")
        return done
    if dry_run:
        return _result(plan, root, [], 0, time.monotonic() - started, engine, dry_run=True)
    _prepare_target(root, plan)
    save_plan(root, plan)
    job = Job(root=root, endpoint=url, repo_id=repo_id, commit=plan.commit, token=tok, config=cfg, log=say,
              redirect_guard=redirect_guard)
    return _fetch_all(plan, job, engine, workers, progress, should_cancel, started)


def _fetch_all(plan: DownloadPlan, job: Job, engine: str, workers: int,
               progress: Callable[[DownloadProgress], None] | None, should_cancel: Callable[[], bool] | None,
               started: float) -> DownloadResult:
    chosen = _choose_engine(engine, plan, job, job.log)
    if chosen == "xet":
        from qwen_core.download_xet import fetch_file_xet as fetch_one
    else:
        fetch_one = fetch_file
    outcomes = _run_workers(plan, job, fetch_one, workers, progress, should_cancel)
    result = _result(plan, job.root, outcomes, job.fetched_bytes, time.monotonic() - started, chosen)
    job.log(f"done: {len(plan.files)} files, {_fmt_bytes(plan.total_bytes)} in {job.root} "
            f"({_fmt_bytes(job.fetched_bytes)} fetched, {result.files_present} already present, "
            f"{result.files_resumed} resumed, {result.elapsed_s:.1f} s)")
    return result


def _local_ids(root: Path, repo_id: str) -> tuple[str, str] | None:
    """(revision, commit) of the last listing saved in ``root`` for this repo, if any."""
    plan = load_plan(root) if (root / STAGING_DIR).is_dir() else None
    return (plan.revision, plan.commit) if plan is not None and plan.repo_id == repo_id else None


def _try_local(repo_id: str, revision: str, root: Path, allow_patterns: Sequence[str] | str | None,
               ignore_patterns: Sequence[str] | str | None, say: Callable[[str], None],
               started: float) -> DownloadResult | None:
    try:
        result = verify_offline(repo_id, revision, root, allow_patterns, ignore_patterns, say)
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
            f"Not enough disk space in {root}: {_fmt_bytes(need)} still to download, {_fmt_bytes(free)} free.",
            fix=f"Free at least {_fmt_bytes(need - free)} or choose another --out-dir; what is already "
            f"downloaded is kept.", exit_code=EXIT_DISK)


def _choose_engine(engine: str, plan: DownloadPlan, job: Job, say: Callable[[str], None]) -> str:
    # auto = http: only our engine resumes across runs, which matters more for 40 GB than raw speed.
    if engine != "xet":
        return "http"
    from qwen_core.download_xet import server_offers_xet

    if server_offers_xet(plan, job):
        say("engine xet: huggingface_hub/hf_xet with HF_XET_HIGH_PERFORMANCE=1 (note: no resume across runs)")
        return "xet"
    say("engine xet requested but the server does not offer Xet for this repo; using the http engine")
    return "http"


def _run_workers(
    plan: DownloadPlan,
    job: Job,
    fetch_one: Callable[[RemoteFile, Job], FileOutcome],
    workers: int,
    progress: Callable[[DownloadProgress], None] | None,
    should_cancel: Callable[[], bool] | None,
) -> list[FileOutcome]:
    """Run the file jobs on a pool; this (caller's) thread polls cancel and reports progress."""
    # Largest first: the long poles start at once, small files fill the gaps.
    files = sorted(plan.files, key=lambda f: -f.size)
    meter = _Meter(plan, job)
    outcomes: list[FileOutcome] = []
    first_error: BaseException | None = None
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qwen-download") as pool:
        pending: set[Future] = {pool.submit(fetch_one, f, job) for f in files}
        try:
            while pending:
                done, pending = wait(pending, timeout=0.1, return_when=FIRST_COMPLETED)
                for fut in done:
                    err = fut.exception()
                    if err is None:
                        outcomes.append(fut.result())
                        continue
                    if first_error is None or isinstance(first_error, DownloadCancelled):
                        first_error = err
                    job.cancel.set()  # one fatal error stops the others; their partials stay for resume
                if first_error is None:
                    if should_cancel is not None and should_cancel():
                        job.cancel.set()
                    meter.tick(progress, len(outcomes), final=not pending)
        except BaseException as err:  # Ctrl-C, or a progress hook raising (ComfyUI's interrupt)
            job.cancel.set()
            first_error = first_error or err
            wait(pending)  # workers see the cancel flag within one chunk and keep their partials
    if first_error is not None:
        raise _explain(first_error, plan, job)
    return outcomes


def _explain(err: BaseException, plan: DownloadPlan, job: Job) -> BaseException:
    if isinstance(err, DiskFullError):
        need = plan.total_bytes - job.done_bytes
        free = shutil.disk_usage(job.root).free
        return DownloadError(
            f"Disk full while downloading {plan.repo_id} into {job.root}: {_fmt_bytes(need)} still needed, "
            f"{_fmt_bytes(free)} free. Partial files are kept.",
            fix=f"Free at least {_fmt_bytes(max(need - free, 0))} (or move --out-dir) and run the same command "
            f"again: it resumes.", exit_code=EXIT_DISK)
    if isinstance(err, DownloadCancelled):
        return DownloadCancelled(f"Download of {plan.repo_id} cancelled at {_fmt_bytes(job.done_bytes)} of "
                                 f"{_fmt_bytes(plan.total_bytes)}; partial files are kept for resume.")
    if isinstance(err, InvalidInputError):
        return DownloadError(str(err), exit_code=EXIT_USAGE)
    return err


class _Meter:
    """Progress snapshots with a ~5 s moving-window speed."""

    def __init__(self, plan: DownloadPlan, job: Job) -> None:
        self.plan, self.job = plan, job
        self.samples: deque[tuple[float, int]] = deque()
        self.last_emit = 0.0

    def tick(self, progress: Callable[[DownloadProgress], None] | None, files_done: int, final: bool) -> None:
        now = time.monotonic()
        self.samples.append((now, self.job.fetched_bytes))
        while len(self.samples) > 2 and now - self.samples[0][0] > 5.0:
            self.samples.popleft()
        if progress is None or (not final and now - self.last_emit < 0.25):
            return
        self.last_emit = now
        (t0, b0), (t1, b1) = self.samples[0], self.samples[-1]
        speed = (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0
        done = min(self.job.done_bytes, self.plan.total_bytes)
        eta = (self.plan.total_bytes - done) / speed if speed > 0 else None
        phase = "done" if final else "downloading"
        progress(DownloadProgress(self.plan.repo_id, phase, done, self.plan.total_bytes, files_done,
                                  len(self.plan.files), speed, eta))


def _result(plan: DownloadPlan, root: Path, outcomes: list[FileOutcome], fetched: int, elapsed: float,
            engine: str, dry_run: bool = False) -> DownloadResult:
    return DownloadResult(
        repo_id=plan.repo_id, revision=plan.revision, commit=plan.commit, local_dir=root,
        files=tuple(f.path for f in plan.files), bytes_total=plan.total_bytes, bytes_fetched=fetched,
        files_present=sum(o.status == "present" for o in outcomes),
        files_resumed=sum(o.status == "resumed" for o in outcomes), elapsed_s=elapsed, engine=engine,
        dry_run=dry_run, notes=plan.notes)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _fmt_duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# -- CLI (python -m qwen_core download / tools/robust_download.py) -------------------------------------------
def configure_download(parser: argparse.ArgumentParser) -> None:
    from qwen_core.download_cli import configure

    configure(parser)


def run_download(args: argparse.Namespace) -> int:
    from qwen_core.download_cli import run

    return run(args)
