"""Resolve a repo + revision to a commit and a validated file list (sizes, sha256) from the Hub's API.

The same two calls huggingface_hub's HfApi makes (``/api/models/{repo}/revision/{rev}``, then the recursive
tree of that commit, paginated by ``Link: rel="next"``), made through our ``HubClient`` so the endpoint's token
decision and redirect guard apply to the listing as they do to the files. Every filename the server lists is
untrusted: it goes through ``paths.safe_join`` against the target folder and a single bad name refuses the
whole listing (a server that sends ``../../.bashrc`` is not one to take weights from).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urljoin

import requests

from qwen_core.download.plan import DownloadPlan, check_name, select
from qwen_core.download.retry import backoff_delay, parse_retry_after
from qwen_core.download.transport import HubClient
from qwen_core.download.types import (
    EXIT_AUTH,
    EXIT_NETWORK,
    EXIT_NOT_FOUND,
    EXIT_UNSAFE,
    DownloadOptions,
    RemoteFile,
)
from qwen_core.errors import DownloadError, InvalidInputError
from qwen_core.paths import validate_revision

MAX_PAGES = 10_000  # a tree of 10 M files; a server whose "next" link never ends is refused, not followed forever


class _Transient(Exception):
    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


def resolve_plan(client: HubClient, repo_id: str, root: Path, options: DownloadOptions,
                 log: Callable[[str], None]) -> DownloadPlan:
    revision = options.revision
    info = _get_json(client, _info_url(client, repo_id, revision), "repo info", repo_id, revision, log)
    commit = info.get("sha") if isinstance(info, dict) else None
    commit = commit or revision
    try:
        commit = validate_revision(commit)  # from the server: it ends up in URLs and bookkeeping files
    except InvalidInputError as err:
        raise DownloadError(f"The server answered an invalid commit id {commit!r} for {repo_id}.",
                            fix="Use a trusted endpoint.", exit_code=EXIT_UNSAFE) from err
    notes: list[str] = []
    try:
        raw = [_tree_entry(e) for e in _tree(client, repo_id, commit, revision, log) if _is_file(e)]
    except DownloadError as err:
        if err.exit_code != EXIT_NOT_FOUND:
            raise
        # Some mirrors have no tree endpoint: fall back to the info listing with blob metadata.
        notes.append("the server has no tree listing; used the repo info file list")
        info = _get_json(client, _info_url(client, repo_id, commit) + "?blobs=true", "repo info", repo_id,
                         revision, log)
        raw = [_sibling_entry(s) for s in (info.get("siblings") or [] if isinstance(info, dict) else [])]
    files = []
    for path, size, sha256, blob in raw:
        check_name(root, path)
        if size is None:
            raise DownloadError(f"The server listed {path!r} without a size; cannot verify it.", exit_code=EXIT_NETWORK)
        files.append(RemoteFile(path=path, size=int(size), sha256=sha256, etag=None if sha256 else blob))
    selected = select(files, options.allow_patterns, options.ignore_patterns)
    if not selected:
        notes.append("no file matches the allow/ignore patterns")
    return DownloadPlan(repo_id, revision, commit, selected, tuple(notes), tuple(files))


def _info_url(client: HubClient, repo_id: str, revision: str) -> str:
    return f"{client.endpoint.url.rstrip('/')}/api/models/{repo_id}/revision/{quote(revision, safe='')}"


def _tree(client: HubClient, repo_id: str, commit: str, revision: str, log: Callable[[str], None]) -> list[Any]:
    url: str | None = (f"{client.endpoint.url.rstrip('/')}/api/models/{repo_id}/tree/{quote(commit, safe='')}"
                       f"?recursive=true")
    entries: list[Any] = []
    seen: set[str] = set()
    while url is not None:
        if url in seen or len(seen) >= MAX_PAGES:
            raise DownloadError(f"The file listing of {repo_id} never ends (page {url} again).",
                                fix="Use another endpoint/mirror.", exit_code=EXIT_NETWORK)
        seen.add(url)
        page, following = _get_page(client, url, "file listing", repo_id, revision, log)
        entries.extend(page if isinstance(page, list) else [])
        if following is not None:  # a next-page link leads elsewhere like a redirect: same guard
            following = urljoin(url, following)
            client.check_url(following, url)
        url = following
    return entries


def _is_file(entry: Any) -> bool:
    return isinstance(entry, dict) and entry.get("type") == "file"


def _tree_entry(e: dict) -> tuple[str, int | None, str | None, str | None]:
    lfs = e.get("lfs") or None
    return e.get("path"), e.get("size"), lfs.get("oid") if lfs else None, e.get("oid")


def _sibling_entry(s: dict) -> tuple[str, int | None, str | None, str | None]:
    lfs = s.get("lfs") or None
    return s.get("rfilename"), s.get("size"), lfs.get("sha256") if lfs else None, s.get("blobId")


def _get_json(client: HubClient, url: str, what: str, repo_id: str, revision: str, log: Callable[[str], None]) -> Any:
    return _get_page(client, url, what, repo_id, revision, log)[0]


def _get_page(client: HubClient, url: str, what: str, repo_id: str, revision: str,
              log: Callable[[str], None]) -> tuple[Any, str | None]:
    """GET one JSON page, retrying transient failures; map permanent ones to clear DownloadErrors."""
    cfg = client.config
    failures = 0
    while True:
        try:
            return _get_once(client, url, what, repo_id, revision)
        except _Transient as err:
            failures += 1
            if failures > cfg.retries:
                raise DownloadError(f"{what} of {repo_id} failed after {failures} attempts ({err}).",
                                    fix="Check the network or --endpoint / HF_ENDPOINT and try again.",
                                    exit_code=EXIT_NETWORK) from err
            delay = err.retry_after if err.retry_after is not None else backoff_delay(failures, cfg)
            log(f"{what}: {err}; retrying in {delay:.1f} s")
            time.sleep(delay)


def _get_once(client: HubClient, url: str, what: str, repo_id: str, revision: str) -> tuple[Any, str | None]:
    try:
        with client.session().get(url, headers=client.headers(), timeout=client.timeout()) as resp:
            _raise_for_status(resp, what, repo_id, revision, client)
            data = resp.json()
            return data, resp.links.get("next", {}).get("url")
    except (requests.ConnectionError, requests.Timeout) as err:
        raise _Transient(type(err).__name__) from err
    except ValueError as err:  # not JSON
        raise _Transient(f"the answer is not JSON ({type(err).__name__})") from err


def _raise_for_status(resp: requests.Response, what: str, repo_id: str, revision: str, client: HubClient) -> None:
    status = resp.status_code
    if status < 400:
        return
    code = resp.headers.get("X-Error-Code")
    message = resp.headers.get("X-Error-Message")
    if code == "GatedRepo":
        raise DownloadError(f"{repo_id} is a gated repo and this token has no access to it.",
                            fix="Accept its terms on the model page, then set HF_TOKEN or run `hf auth login`.",
                            exit_code=EXIT_AUTH)
    if code == "RevisionNotFound":
        raise DownloadError(f"Revision {revision!r} does not exist in {repo_id}.",
                            fix="Check --revision (a branch, tag or commit hash).", exit_code=EXIT_NOT_FOUND)
    if code == "RepoNotFound" or (status == 401 and message != "Invalid credentials in Authorization header"):
        raise DownloadError(f"Repository {repo_id} was not found (or is private and no valid token was sent).",
                            fix="Check the repo id (e.g. Qwen/Qwen-Image); for a private repo set HF_TOKEN.",
                            exit_code=EXIT_NOT_FOUND)
    if status in (401, 403):
        raise DownloadError(f"Access to {repo_id} was refused ({status}).",
                            fix="Set HF_TOKEN (or `hf auth login`) with a token that can read this repo.",
                            exit_code=EXIT_AUTH)
    if status == 404:
        raise DownloadError(f"{what} of {repo_id}@{revision} not found (404).",
                            fix="Check the repo id and --revision.", exit_code=EXIT_NOT_FOUND)
    if status == 429 or status >= 500:
        raise _Transient(f"HTTP {status}", parse_retry_after(resp.headers.get("Retry-After"),
                                                             client.config.retry_after_max))
    raise DownloadError(f"{what} of {repo_id} failed: HTTP {status}.", exit_code=EXIT_NETWORK)
