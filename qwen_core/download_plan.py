"""Resolve a repo + revision to a commit and a validated file list (sizes, sha256), through huggingface_hub.

Every filename the server lists is untrusted: it goes through ``paths.safe_join`` against the target folder
and a single bad name refuses the whole listing (a server that sends ``../../.bashrc`` is not one to take
weights from). The plan is saved as ``<target>/.qwen_download/plan.json`` so HF_HUB_OFFLINE runs can verify
the folder without a network.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from qwen_core.download_http import (
    EXIT_AUTH,
    EXIT_NETWORK,
    EXIT_NOT_FOUND,
    EXIT_OFFLINE_MISSING,
    EXIT_UNSAFE,
    STAGING_DIR,
    HttpConfig,
    RemoteFile,
    Staging,
    _atomic_write_json,
    _backoff,
    record_matches,
    verify_existing,
    write_record,
)
from qwen_core.errors import DownloadError, InvalidInputError
from qwen_core.paths import safe_join, validate_revision

if TYPE_CHECKING:
    from qwen_core.download import DownloadResult

PLAN_FILE = "plan.json"


@dataclass(frozen=True)
class DownloadPlan:
    repo_id: str
    revision: str
    commit: str
    files: tuple[RemoteFile, ...]  # selected by the allow/ignore patterns
    notes: tuple[str, ...] = field(default_factory=tuple)
    listing: tuple[RemoteFile, ...] = ()  # every file of the commit (saved, so other patterns can be checked offline)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def missing_bytes(self, root: Path) -> int:
        """Bytes still to fetch: files without a valid verified record, minus what their .part holds."""
        need = 0
        for f in self.files:
            stage = Staging.for_file(root, f.path)
            if record_matches(f, safe_join(root, f.path), stage):
                continue
            try:
                need += max(f.size - stage.part.stat().st_size, 0)
            except OSError:
                need += f.size
        return need


def _api_errors() -> tuple:
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    return GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError, HfHubHTTPError


def _call_api(fn: Callable, what: str, repo_id: str, revision: str, cfg: HttpConfig, log: Callable[[str], None]):
    """Call an HfApi method, retrying transient failures; map permanent ones to clear DownloadErrors."""
    gated, repo_missing, rev_missing, http_error = _api_errors()
    failures = 0
    while True:
        try:
            return fn()
        except gated as err:
            raise DownloadError(f"{repo_id} is a gated repo and this token has no access to it.",
                                fix="Accept its terms on the model page, then set HF_TOKEN or run `hf auth login`.",
                                exit_code=EXIT_AUTH) from err
        except rev_missing as err:
            raise DownloadError(f"Revision {revision!r} does not exist in {repo_id}.",
                                fix="Check --revision (a branch, tag or commit hash).",
                                exit_code=EXIT_NOT_FOUND) from err
        except repo_missing as err:
            raise DownloadError(f"Repository {repo_id} was not found (or is private and no valid token was sent).",
                                fix="Check the repo id (e.g. Qwen/Qwen-Image); for a private repo set HF_TOKEN.",
                                exit_code=EXIT_NOT_FOUND) from err
        except http_error as err:
            status = getattr(getattr(err, "response", None), "status_code", None)
            if status in (401, 403):
                raise DownloadError(f"Access to {repo_id} was refused ({status}).",
                                    fix="Set HF_TOKEN (or `hf auth login`) with a token that can read this repo.",
                                    exit_code=EXIT_AUTH) from err
            if status == 404:
                raise DownloadError(f"{what} of {repo_id}@{revision} not found (404).",
                                    fix="Check the repo id and --revision.", exit_code=EXIT_NOT_FOUND) from err
            if status is not None and status != 429 and status < 500:
                raise DownloadError(f"{what} of {repo_id} failed: HTTP {status}.", exit_code=EXIT_NETWORK) from err
            failures += 1
            reason = f"HTTP {status}"
        except (OSError, ConnectionError) as err:  # httpx2 transport errors derive from neither: see below
            failures += 1
            reason = type(err).__name__
        except Exception as err:  # httpx2.TransportError (connect refused, timeouts) when listing
            if type(err).__module__.split(".")[0] not in ("httpx2", "httpx", "httpcore", "httpcore2"):
                raise
            failures += 1
            reason = type(err).__name__
        if failures > cfg.retries:
            raise DownloadError(f"{what} of {repo_id} failed after {failures} attempts ({reason}).",
                                fix="Check the network or --endpoint / HF_ENDPOINT and try again.",
                                exit_code=EXIT_NETWORK)
        delay = _backoff(failures, cfg)
        log(f"{what}: {reason}; retrying in {delay:.1f} s")
        time.sleep(delay)


def resolve_plan(
    repo_id: str,
    revision: str,
    root: Path,
    *,
    endpoint: str,
    token: str | None,
    allow_patterns: Sequence[str] | str | None,
    ignore_patterns: Sequence[str] | str | None,
    config: HttpConfig,
    log: Callable[[str], None],
) -> DownloadPlan:
    from huggingface_hub import HfApi
    from huggingface_hub.utils import filter_repo_objects

    api = HfApi(endpoint=endpoint, token=token or False)
    info = _call_api(lambda: api.model_info(repo_id, revision=revision), "repo info", repo_id, revision, config, log)
    commit = info.sha or revision
    try:
        commit = validate_revision(commit)  # from the server: it ends up in URLs and bookkeeping files
    except InvalidInputError as err:
        raise DownloadError(f"The server answered an invalid commit id {commit!r} for {repo_id}.",
                            fix="Use a trusted endpoint.", exit_code=EXIT_UNSAFE) from err
    notes: list[str] = []
    try:
        entries = _call_api(lambda: list(api.list_repo_tree(repo_id, revision=commit, recursive=True)),
                            "file listing", repo_id, revision, config, log)
        raw = [(e.path, e.size, e.lfs.sha256 if e.lfs else None, e.blob_id) for e in entries if hasattr(e, "size")]
    except DownloadError as err:
        if err.exit_code != EXIT_NOT_FOUND:
            raise
        # Some mirrors have no tree endpoint: fall back to the info listing with blob metadata.
        notes.append("the server has no tree listing; used the repo info file list")
        info = _call_api(lambda: api.model_info(repo_id, revision=commit, files_metadata=True), "repo info",
                         repo_id, revision, config, log)
        raw = [(s.rfilename, s.size, s.lfs.sha256 if s.lfs else None, s.blob_id) for s in info.siblings or []]
    files = []
    for path, size, sha256, blob in raw:
        _check_name(root, path)
        if size is None:
            raise DownloadError(f"The server listed {path!r} without a size; cannot verify it.", exit_code=EXIT_NETWORK)
        files.append(RemoteFile(path=path, size=int(size), sha256=sha256, etag=None if sha256 else blob))
    selected = tuple(filter_repo_objects(files, allow_patterns=_patterns(allow_patterns),
                                         ignore_patterns=_patterns(ignore_patterns), key=lambda f: f.path))
    if not selected:
        notes.append("no file matches the allow/ignore patterns")
    return DownloadPlan(repo_id, revision, commit, selected, tuple(notes), tuple(files))


def _patterns(value: Sequence[str] | str | None) -> list[str] | None:
    """Globs from a string or list, each item comma- or newline-separated (CLI flags, the node's text box)."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else list(value)
    return [p.strip() for item in items for p in re.split(r"[,\n]", item) if p.strip()] or None


def _check_name(root: Path, path: str) -> None:
    try:
        safe_join(root, path)
        if path.split("/")[0] == STAGING_DIR:
            raise InvalidInputError("path", f"{path!r} would overwrite the download bookkeeping folder.")
    except InvalidInputError as err:
        raise DownloadError(
            f"The server listed an unsafe filename {path!r} ({err}); refusing the whole download so nothing is "
            f"written outside {root}.", fix="Use a trusted endpoint; report this repo/mirror.",
            exit_code=EXIT_UNSAFE) from err


def save_plan(root: Path, plan: DownloadPlan) -> None:
    _atomic_write_json(root / STAGING_DIR / PLAN_FILE, {
        "repo_id": plan.repo_id, "revision": plan.revision, "commit": plan.commit,
        "files": [f.identity() for f in plan.listing or plan.files], "saved": time.time()})


def load_plan(root: Path) -> DownloadPlan | None:
    try:
        data = json.loads((root / STAGING_DIR / PLAN_FILE).read_text())
        files = tuple(RemoteFile(**f) for f in data["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for f in files:
        _check_name(root, f.path)  # the plan file is on disk: still untrusted input
    return DownloadPlan(data["repo_id"], data["revision"], data["commit"], files, listing=files)


def verify_offline(repo_id: str, revision: str, root: Path, allow_patterns: Sequence[str] | str | None,
                   ignore_patterns: Sequence[str] | str | None, log: Callable[[str], None]) -> DownloadResult:
    """HF_HUB_OFFLINE: check what is on disk against the last saved plan; fetch nothing."""
    from huggingface_hub.utils import filter_repo_objects

    from qwen_core.download import DownloadResult

    plan = load_plan(root)
    fix = "Unset HF_HUB_OFFLINE (or drop --offline) and run the download once with a network."
    if plan is None or plan.repo_id != repo_id:
        raise DownloadError(f"Offline mode: no record of a download of {repo_id} in {root}, so nothing can be "
                            f"verified.", fix=fix, exit_code=EXIT_OFFLINE_MISSING)
    files = tuple(filter_repo_objects(plan.files, allow_patterns=_patterns(allow_patterns),
                                      ignore_patterns=_patterns(ignore_patterns), key=lambda f: f.path))
    bad = []
    for f in files:
        final, stage = safe_join(root, f.path), Staging.for_file(root, f.path)
        if record_matches(f, final, stage):
            continue
        if final.exists() and verify_existing(f, final):
            write_record(f, final, stage, plan.commit)
            continue
        bad.append(f.path)
    if bad:
        raise DownloadError(f"Offline mode: {len(bad)} of {len(files)} files of {repo_id} are missing or do not "
                            f"verify: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}.", fix=fix,
                            exit_code=EXIT_OFFLINE_MISSING)
    if revision not in (plan.revision, plan.commit):
        log(f"offline: the local copy is {plan.revision}@{plan.commit[:12]}, not {revision}")
    log(f"{len(files)} files of {repo_id}@{plan.commit[:12]} verified in {root}; nothing fetched")
    return DownloadResult(repo_id=repo_id, revision=plan.revision, commit=plan.commit, local_dir=root,
                          files=tuple(f.path for f in files), bytes_total=sum(f.size for f in files),
                          bytes_fetched=0, files_present=len(files), files_resumed=0, elapsed_s=0.0,
                          engine="offline")
