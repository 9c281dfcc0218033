"""The download plan (repo, revision, commit, files) and its copy on disk, ``.qwen_download/plan.json``.

The saved plan lets HF_HUB_OFFLINE runs verify a folder without a network, and lets a rerun of a commit that
is complete return without one. It is on disk, so it is untrusted input like a server's answer: every name
goes through ``paths.safe_join`` again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qwen_core.download.layout import STAGING_DIR, Staging, plan_path, write_json_atomic
from qwen_core.download.types import (
    EXIT_OFFLINE_MISSING,
    EXIT_UNSAFE,
    DownloadOptions,
    DownloadResult,
    RemoteFile,
)
from qwen_core.download.verify import record_matches, verify_existing, write_record
from qwen_core.errors import DownloadError, InvalidInputError
from qwen_core.paths import safe_join


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


def select(files: Sequence[RemoteFile], allow: Sequence[str] | None, ignore: Sequence[str] | None) -> tuple[RemoteFile, ...]:
    from huggingface_hub.utils import filter_repo_objects

    return tuple(filter_repo_objects(list(files), allow_patterns=list(allow) if allow else None,
                                     ignore_patterns=list(ignore) if ignore else None, key=lambda f: f.path))


def check_name(root: Path, path: str) -> None:
    """Refuse a listed name that would land outside ``root`` or in our bookkeeping folder."""
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
    write_json_atomic(plan_path(root), {
        "repo_id": plan.repo_id, "revision": plan.revision, "commit": plan.commit,
        "files": [f.identity() for f in plan.listing or plan.files], "saved": time.time()})


def load_plan(root: Path) -> DownloadPlan | None:
    try:
        data = json.loads(plan_path(root).read_text())
        files = tuple(RemoteFile(**f) for f in data["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for f in files:
        check_name(root, f.path)  # the plan file is on disk: still untrusted input
    return DownloadPlan(data["repo_id"], data["revision"], data["commit"], files, listing=files)


def verify_offline(repo_id: str, root: Path, options: DownloadOptions, log: Callable[[str], None]) -> DownloadResult:
    """HF_HUB_OFFLINE: check what is on disk against the last saved plan; fetch nothing."""
    plan = load_plan(root)
    fix = "Unset HF_HUB_OFFLINE (or drop --offline) and run the download once with a network."
    if plan is None or plan.repo_id != repo_id:
        raise DownloadError(f"Offline mode: no record of a download of {repo_id} in {root}, so nothing can be "
                            f"verified.", fix=fix, exit_code=EXIT_OFFLINE_MISSING)
    files = select(plan.files, options.allow_patterns, options.ignore_patterns)
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
    if options.revision not in (plan.revision, plan.commit):
        log(f"offline: the local copy is {plan.revision}@{plan.commit[:12]}, not {options.revision}")
    log(f"{len(files)} files of {repo_id}@{plan.commit[:12]} verified in {root}; nothing fetched")
    return DownloadResult(repo_id=repo_id, revision=plan.revision, commit=plan.commit, local_dir=root,
                          files=tuple(f.path for f in files), bytes_total=sum(f.size for f in files),
                          bytes_fetched=0, files_present=len(files), files_resumed=0, elapsed_s=0.0,
                          engine="offline")
