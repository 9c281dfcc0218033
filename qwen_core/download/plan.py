"""The download plan (repo, revision, commit, files), its checks, and its copy on disk, ``.qwen_download/plan.json``.

The saved plan lets HF_HUB_OFFLINE runs verify a folder without a network, and lets a rerun of a commit that
is complete return without one. It is on disk, so it is untrusted input like a server's answer: every field is
checked again when it is read, and a damaged plan (``DamagedPlan``) is ignored and rebuilt from the server,
never trusted and never blamed on the server. The same checks (``remote_file``, ``check_layout``) refuse a
server's listing whose names or sizes cannot be a repo.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qwen_core.download.layout import STAGING_DIR, Placement, read_json_object, write_json_atomic
from qwen_core.download.selection import choose_files
from qwen_core.download.types import EXIT_OFFLINE_MISSING, DownloadOptions, DownloadResult, RemoteFile
from qwen_core.download.verify import record_matches, verify_existing, write_record
from qwen_core.errors import DownloadError, InvalidInputError
from qwen_core.paths import safe_join, validate_repo_id, validate_revision

_SHA256 = re.compile(r"[0-9a-f]{64}")
_CASE_INSENSITIVE = sys.platform in ("win32", "darwin")  # their usual file systems fold case


class ListingProblem(ValueError):
    """A listed entry that cannot be a file of a repo (unsafe name, bad size or hash, a name clash)."""


class DamagedPlan(ValueError):
    """plan.json exists but is not a plan we wrote (a torn write, an edit, another tool): rebuild it."""


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

    def missing_bytes(self, where: Placement, files: Sequence[RemoteFile] | None = None) -> int:
        """Bytes still to fetch of ``files`` (default: all selected): files without a valid verified record,
        minus what their .part holds."""
        need = 0
        for f in self.files if files is None else files:
            stage = where.stage(f.path)
            if record_matches(f, where.final(f.path), stage):
                continue
            try:
                need += max(f.size - stage.part.stat().st_size, 0)
            except OSError:
                need += f.size
        return need

    def complete_in(self, where: Placement) -> bool:
        """Every selected file has a matching verified record (reads only: no lock, no write)."""
        return all(record_matches(f, where.final(f.path), where.stage(f.path)) for f in self.files)


def remote_file(root: Path, path: object, size: object, sha256: object, etag: object) -> RemoteFile:
    """One listed file, checked: a safe relative name, a whole size >= 0, a sha256 of 64 hex digits or none."""
    if not isinstance(path, str):
        raise ListingProblem(f"a file name that is not text ({path!r})")
    try:
        safe_join(root, path)
    except InvalidInputError as err:
        raise ListingProblem(f"an unsafe filename {path!r} ({err})") from err
    if path.split("/")[0] == STAGING_DIR:
        raise ListingProblem(f"{path!r}, which would overwrite the download bookkeeping folder")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ListingProblem(f"{path!r} with the size {size!r} (not a whole number of bytes)")
    if sha256 is not None and (not isinstance(sha256, str) or not _SHA256.fullmatch(sha256.lower())):
        raise ListingProblem(f"{path!r} with the sha256 {sha256!r} (not 64 hex digits)")
    if etag is not None and (not isinstance(etag, str) or len(etag) > 200):
        raise ListingProblem(f"{path!r} with the blob id {etag!r}")
    return RemoteFile(path=path, size=size, sha256=sha256.lower() if sha256 else None, etag=None if sha256 else etag)


def check_layout(files: Iterable[RemoteFile]) -> tuple[RemoteFile, ...]:
    """The files without exact duplicates; ListingProblem when two entries cannot both exist on disk."""
    unique: dict[str, RemoteFile] = {}
    for f in files:
        if f.path in unique and unique[f.path] != f:
            raise ListingProblem(f"{f.path!r} twice, with different sizes or hashes")
        unique[f.path] = f
    folders = {"/".join(p.split("/")[:i]) for p in unique for i in range(1, p.count("/") + 1)}
    clash = sorted(folders & unique.keys())
    if clash:
        raise ListingProblem(f"{clash[0]!r} both as a file and as a folder")
    if _CASE_INSENSITIVE:
        seen: dict[str, str] = {}
        for p in sorted(unique.keys() | folders):
            if seen.setdefault(p.casefold(), p) != p:
                raise ListingProblem(f"{seen[p.casefold()]!r} and {p!r}, which are one name on this file system")
    return tuple(unique.values())


def save_plan(where: Placement, plan: DownloadPlan) -> None:
    write_json_atomic(where.plan_file, plan_record(plan))


def plan_record(plan: DownloadPlan) -> dict:
    """What plan.json holds for ``plan`` (without the time it was saved)."""
    return {"repo_id": plan.repo_id, "revision": plan.revision, "commit": plan.commit,
            "files": [f.identity() for f in plan.listing or plan.files]}


def saved_record(where: Placement) -> dict | None:
    """plan.json as saved, without its time stamp (to tell whether saving again would change anything)."""
    data = read_json_object(where.plan_file)
    if data is not None:
        data.pop("saved", None)
    return data


def load_plan(where: Placement) -> DownloadPlan | None:
    """The saved plan; None when there is none; DamagedPlan when any field of it is not what we write."""
    path = where.plan_file
    if not path.exists():
        return None
    data = read_json_object(path)
    if data is None:
        raise DamagedPlan(f"{path} is not a JSON object")
    try:
        repo_id = validate_repo_id(data.get("repo_id"))
        revision = validate_revision(data.get("revision"))
        commit = validate_revision(data.get("commit"))
        entries = data.get("files")
        if not isinstance(entries, list):
            raise ListingProblem("no file list")
        files = []
        for entry in entries:
            if not isinstance(entry, dict) or set(entry) != {"path", "size", "sha256", "etag"}:
                raise ListingProblem(f"a file entry of the wrong shape ({str(entry)[:80]})")
            files.append(remote_file(where.root, entry["path"], entry["size"], entry["sha256"], entry["etag"]))
        files = check_layout(files)
    except (InvalidInputError, ListingProblem) as err:
        raise DamagedPlan(f"{path}: {err}") from err
    return DownloadPlan(repo_id, revision, commit, files, listing=files)


def verify_offline(repo_id: str, where: Placement, options: DownloadOptions,
                   log: Callable[[str], None]) -> DownloadResult:
    """HF_HUB_OFFLINE: check what is on disk against the last saved plan; fetch nothing.

    With ``options.verify`` every file is re-hashed; otherwise a file whose record matches is taken as verified."""
    fix = f"{options.words.offline[:1].upper()}{options.words.offline[1:]} and run the download once with a network."
    try:
        plan = load_plan(where)
    except DamagedPlan as err:
        raise DownloadError(f"Offline mode: the saved listing of {repo_id} is damaged ({err}), so nothing can be "
                            f"verified.", fix=fix, exit_code=EXIT_OFFLINE_MISSING) from err
    if plan is None or plan.repo_id != repo_id:
        raise DownloadError(f"Offline mode: no record of a download of {repo_id} in {where.root}, so nothing can be "
                            f"verified.", fix=fix, exit_code=EXIT_OFFLINE_MISSING)
    files = choose_files(plan.files, repo_id, options)
    bad = [f.path for f in files if not _present(where, f, plan.commit, options.verify)]
    if bad:
        raise DownloadError(f"Offline mode: {len(bad)} of {len(files)} files of {repo_id} are missing or do not "
                            f"verify: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}.", fix=fix,
                            exit_code=EXIT_OFFLINE_MISSING)
    if options.revision not in (plan.revision, plan.commit):
        log(f"offline: the local copy is {plan.revision}@{plan.commit[:12]}, not {options.revision}")
    how = "re-hashed and verified" if options.verify else "verified"
    log(f"{len(files)} files of {repo_id}@{plan.commit[:12]} {how} in {where.root}; nothing fetched")
    return DownloadResult(repo_id=repo_id, revision=plan.revision, commit=plan.commit, local_dir=where.root,
                          files=tuple(f.path for f in files), bytes_total=sum(f.size for f in files),
                          bytes_fetched=0, files_present=len(files), files_resumed=0, elapsed_s=0.0,
                          engine="offline", destinations=tuple(where.final(f.path) for f in files),
                          layout=options.layout)


def _present(where: Placement, f: RemoteFile, commit: str, rehash: bool) -> bool:
    final, stage = where.final(f.path), where.stage(f.path)
    if not rehash and record_matches(f, final, stage):
        return True
    try:
        if not verify_existing(f, final):
            return False
    except OSError:  # unreadable: not verified
        return False
    with contextlib.suppress(OSError):  # the record only saves a re-hash next time: a full disk is fine
        write_record(f, final, stage, commit)
    return True
