"""Resolve a repo + revision to a commit and a validated file list (sizes, sha256) from the Hub's API.

The same two calls huggingface_hub's HfApi makes (``/api/models/{repo}/revision/{rev}``, then the recursive
tree of that commit, paginated by ``Link: rel="next"``), made through our ``HubClient`` so the endpoint's token
decision and redirect guard apply to the listing as they do to the files. Everything the server lists is
untrusted: a name that would land outside the target, a size or hash that cannot be, or two names that cannot
both exist on disk (a file and a folder of one name) refuse the whole listing, so nothing is written.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urljoin

import requests

from qwen_core.download.plan import DownloadPlan, ListingProblem, check_layout, remote_file
from qwen_core.download.retry import backoff_delay, parse_retry_after
from qwen_core.download.selection import choose_files, comfy_repo
from qwen_core.download.transport import MAX_REDIRECTS, HubClient
from qwen_core.download.types import (
    EXIT_AUTH,
    EXIT_NETWORK,
    EXIT_NOT_FOUND,
    EXIT_UNSAFE,
    DownloadOptions,
    Layout,
)
from qwen_core.errors import DownloadError, InvalidInputError
from qwen_core.paths import validate_revision

MAX_PAGES = 10_000  # a tree of 10 M files; a server whose "next" link never ends is refused, not followed forever
MAX_JSON_BYTES = 256 << 20  # a listing bigger than this is not a listing


class _Transient(Exception):
    def __init__(self, reason: str, retry_after: float | None = None, fix: str | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after
        self.fix = fix


def resolve_plan(client: HubClient, repo_id: str, root: Path, options: DownloadOptions,
                 log: Callable[[str], None]) -> DownloadPlan:
    revision = options.revision
    host = client.endpoint.host
    info = _get_json(client, _info_url(client, repo_id, revision), "repo info", repo_id, options, log)
    commit = info.get("sha") if isinstance(info, dict) else None
    commit = commit or revision
    try:
        commit = validate_revision(commit)  # from the server: it ends up in URLs and bookkeeping files
    except InvalidInputError as err:
        raise DownloadError(f"{host} answered an invalid commit id {commit!r} for {repo_id}.",
                            fix="Use a trusted endpoint.", exit_code=EXIT_UNSAFE) from err
    notes: list[str] = []
    try:
        raw = [_tree_entry(e) for e in _tree(client, repo_id, commit, options, log) if _is_file(e)]
    except DownloadError as err:
        if err.exit_code != EXIT_NOT_FOUND:
            raise
        # Some mirrors have no tree endpoint: fall back to the info listing with blob metadata.
        notes.append("the server has no tree listing; used the repo info file list")
        info = _get_json(client, _info_url(client, repo_id, commit) + "?blobs=true", "repo info", repo_id,
                         options, log)
        siblings = info.get("siblings") if isinstance(info, dict) else None
        raw = [_sibling_entry(s) for s in (siblings if isinstance(siblings, list) else [])]
    try:
        files = check_layout(remote_file(root, *entry) for entry in raw)
    except ListingProblem as err:
        raise DownloadError(
            f"The listing of {repo_id} from {host} names {err}; refusing the whole download so nothing is written "
            f"outside {root} or half-way.", fix="Use a trusted endpoint; report this repo/mirror.",
            exit_code=EXIT_UNSAFE) from err
    selected = choose_files(files, repo_id, options)
    if not selected:
        notes.append("no file matches the allow/ignore patterns")
    known = comfy_repo(repo_id)
    if options.layout is Layout.COMFYUI and not options.allow_patterns and known is not None and known.note:
        notes.append(f"{known.repo_id}: {known.note}")
    return DownloadPlan(repo_id, revision, commit, selected, tuple(notes), files)


def _info_url(client: HubClient, repo_id: str, revision: str) -> str:
    return f"{client.endpoint.url.rstrip('/')}/api/models/{repo_id}/revision/{quote(revision, safe='')}"


def _tree(client: HubClient, repo_id: str, commit: str, options: DownloadOptions,
          log: Callable[[str], None]) -> list[Any]:
    url: str | None = (f"{client.endpoint.url.rstrip('/')}/api/models/{repo_id}/tree/{quote(commit, safe='')}"
                       f"?recursive=true")
    entries: list[Any] = []
    seen: set[str] = set()
    while url is not None:
        if url in seen or len(seen) >= MAX_PAGES:
            raise DownloadError(f"The file listing of {repo_id} from {client.endpoint.host} never ends (its next "
                                f"page is {url} again).", fix="Use another endpoint/mirror.", exit_code=EXIT_UNSAFE)
        seen.add(url)
        page, following = _get_page(client, url, "file listing", repo_id, options, log)
        if not isinstance(page, list):
            raise DownloadError(f"The file listing of {repo_id} from {client.endpoint.host} is not a list of files "
                                f"(a proxy, portal or non-Hub server answered).",
                                fix=f"Check {options.words.endpoint}.", exit_code=EXIT_UNSAFE)
        entries.extend(page)
        if following is not None:  # a next-page link leads elsewhere like a redirect: same guard
            following = urljoin(url, following)
            client.check_url(following, url)
        url = following
    return entries


def _is_file(entry: Any) -> bool:
    return isinstance(entry, dict) and entry.get("type") == "file"


def _lfs(entry: dict, key: str) -> Any:
    lfs = entry.get("lfs")
    return lfs.get(key) if isinstance(lfs, dict) else None


def _tree_entry(e: dict) -> tuple[Any, Any, Any, Any]:
    return e.get("path"), e.get("size"), _lfs(e, "oid"), e.get("oid")


def _sibling_entry(s: Any) -> tuple[Any, Any, Any, Any]:
    if not isinstance(s, dict):
        return s, None, None, None  # refused by remote_file with the entry named
    return s.get("rfilename"), s.get("size"), _lfs(s, "sha256"), s.get("blobId")


def _get_json(client: HubClient, url: str, what: str, repo_id: str, options: DownloadOptions,
              log: Callable[[str], None]) -> Any:
    return _get_page(client, url, what, repo_id, options, log)[0]


def _get_page(client: HubClient, url: str, what: str, repo_id: str, options: DownloadOptions,
              log: Callable[[str], None]) -> tuple[Any, str | None]:
    """GET one JSON page, retrying transient failures; map permanent ones to clear DownloadErrors."""
    cfg = client.config
    failures = 0
    while True:
        try:
            return _get_once(client, url, what, repo_id, options)
        except _Transient as err:
            failures += 1
            if failures > cfg.retries:
                raise DownloadError(
                    f"{what} of {repo_id} from {client.endpoint.host} failed after {failures} attempts ({err}).",
                    fix=err.fix or f"Check the network or {options.words.endpoint} and try again.",
                    exit_code=EXIT_NETWORK) from err
            delay = err.retry_after if err.retry_after is not None else backoff_delay(failures, cfg)
            log(f"{what}: {err}; retrying in {delay:.1f} s")
            time.sleep(delay)


def _get_once(client: HubClient, url: str, what: str, repo_id: str,
              options: DownloadOptions) -> tuple[Any, str | None]:
    host = client.endpoint.host
    try:
        with client.session().get(url, headers=client.headers(), timeout=client.timeout(), stream=True) as resp:
            _raise_for_status(resp, what, repo_id, options, client)
            body = resp.raw.read(MAX_JSON_BYTES + 1, decode_content=True)
            if len(body) > MAX_JSON_BYTES:
                raise DownloadError(f"The {what} of {repo_id} from {host} is larger than {MAX_JSON_BYTES >> 20} MB: "
                                    f"not a Hub answer.", fix=f"Check {options.words.endpoint}.", exit_code=EXIT_UNSAFE)
            return _json(body, what, host), resp.links.get("next", {}).get("url")
    except requests.TooManyRedirects as err:
        raise _Transient(f"{host} keeps redirecting (more than {MAX_REDIRECTS} hops: a redirect loop)",
                         fix="Use another endpoint/mirror: this one's redirects go round in a circle.") from err
    except (requests.ConnectionError, requests.Timeout) as err:
        raise _Transient(f"{type(err).__name__} at {host}") from err
    except requests.RequestException as err:  # anything else requests raises: a message, never a traceback
        raise _Transient(f"{type(err).__name__} at {host}: {err}") from err
    except OSError as err:  # urllib3's raw read: a connection reset mid-body
        raise _Transient(f"{type(err).__name__} at {host}") from err


def _json(body: bytes, what: str, host: str) -> Any:
    import json

    try:
        return json.loads(body)
    except ValueError as err:  # a portal page, a proxy's error page
        head = body[:60].decode("utf-8", "replace").strip()
        raise _Transient(f"the {what} from {host} is not JSON (it starts {head!r}): a proxy, mirror or login "
                         f"portal answered instead of the Hub",
                         fix="Check the network (a captive portal or proxy?) or the endpoint.") from err


def _raise_for_status(resp: requests.Response, what: str, repo_id: str, options: DownloadOptions,
                      client: HubClient) -> None:
    status = resp.status_code
    if status < 300:
        return
    host, words = client.endpoint.host, options.words
    code = resp.headers.get("X-Error-Code")
    message = resp.headers.get("X-Error-Message")
    if code == "GatedRepo":
        raise DownloadError(f"{repo_id} is a gated repo and this token has no access to it ({host}).",
                            fix="Accept its terms on the model page, then set HF_TOKEN or run `hf auth login`.",
                            exit_code=EXIT_AUTH)
    if code == "RevisionNotFound":
        raise DownloadError(f"Revision {options.revision!r} does not exist in {repo_id} ({host}).",
                            fix=f"Check {words.revision} (a branch, tag or commit hash).", exit_code=EXIT_NOT_FOUND)
    if code == "RepoNotFound" or (status == 401 and message != "Invalid credentials in Authorization header"):
        raise DownloadError(f"Repository {repo_id} was not found at {host} (or is private and no valid token was "
                            f"sent).", fix="Check the repo id (e.g. Qwen/Qwen-Image); for a private repo set HF_TOKEN.",
                            exit_code=EXIT_NOT_FOUND)
    if status in (401, 403):
        raise DownloadError(f"Access to {repo_id} was refused by {host} ({status}).",
                            fix="Set HF_TOKEN (or `hf auth login`) with a token that can read this repo.",
                            exit_code=EXIT_AUTH)
    if status == 404:
        raise DownloadError(f"{what} of {repo_id}@{options.revision} not found at {host} (404).",
                            fix=f"Check the repo id and {words.revision}.", exit_code=EXIT_NOT_FOUND)
    if status == 429 or status >= 500:
        raise _Transient(f"HTTP {status} from {host}", parse_retry_after(resp.headers.get("Retry-After"),
                                                                         client.config.retry_after_max))
    if status < 400:  # a 3xx requests did not follow: no Location
        raise DownloadError(f"{host} answered {status} without a usable Location for the {what} of {repo_id}.",
                            fix="Use another endpoint/mirror.", exit_code=EXIT_UNSAFE)
    raise DownloadError(f"{what} of {repo_id} from {host} failed: HTTP {status}.",
                        fix=f"Check {words.endpoint}.", exit_code=EXIT_NETWORK)
