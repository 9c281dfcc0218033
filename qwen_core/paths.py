"""Where models and reports live, and repo-id -> folder mapping that can never escape the store.

Model store (``models_root()``), first match wins:
1. ``QWEN_HOME`` when set;
2. the folders the ComfyUI bridge registered with ``register_models_dirs()`` (its ``models/diffusers`` folder
   and extra_model_paths entries) — qwen_core itself never imports ComfyUI;
3. the Hugging Face hub cache: ``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``.

A repo ``org/name`` lives in ``<root>/org/name`` (a plain diffusers folder, not the hub's blob layout).
Paths are checked lexically; a symlink the user placed inside the store is trusted.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

from qwen_core.errors import InvalidInputError

REPO_ROOT = Path(__file__).resolve().parent.parent
_REPO_PART = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
_SHA = re.compile(r"^[0-9a-f]{40}$")
_REVISION = re.compile(r"^[A-Za-z0-9._/+-]{1,255}$")
_DRIVE = re.compile(r"^[A-Za-z]:")

_lock = threading.Lock()
_registered: list[Path] = []
_registered_reports: list[Path] = []  # at most one: the host's folder for the session log (ComfyUI's user folder)


def register_models_dirs(dirs: list[Path] | list[str]) -> None:
    """Called by the ComfyUI bridge with ComfyUI's model folders for Qwen-Image (first = where to download)."""
    cleaned = []
    for d in dirs:
        p = Path(d).expanduser()
        if p not in cleaned:
            cleaned.append(p)
    with _lock:
        _registered[:] = cleaned


def registered_models_dirs() -> list[Path]:
    with _lock:
        return list(_registered)


def hf_hub_cache() -> Path:
    """The hub cache huggingface_hub would use, read from the environment now (not at import time)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def models_root() -> Path:
    """Where downloads go and local models are looked up first (see the module docstring for the order)."""
    home = os.environ.get("QWEN_HOME", "").strip()
    if home:
        return Path(home).expanduser()
    registered = registered_models_dirs()
    if registered:
        return registered[0]
    return hf_hub_cache()


def models_parent() -> Path | None:
    """The folder that holds the model store: ComfyUI's ``models/`` when the store is its ``models/diffusers``
    (QWEN_HOME, or the folder the bridge registered). None when the store is the Hugging Face cache, whose parent
    is no models folder."""
    home = os.environ.get("QWEN_HOME", "").strip()
    if home:
        return Path(home).expanduser().parent
    registered = registered_models_dirs()
    return registered[0].parent if registered else None


def model_search_dirs() -> list[Path]:
    """Every store to look in for local models, most specific first, without duplicates."""
    dirs: list[Path] = []
    home = os.environ.get("QWEN_HOME", "").strip()
    for d in ([Path(home).expanduser()] if home else []) + registered_models_dirs() + [hf_hub_cache()]:
        if d not in dirs:
            dirs.append(d)
    return dirs


def validate_repo_id(repo_id: object) -> str:
    """``org/name`` (or a bare ``name``) in the Hub's alphabet; anything path-like is refused."""
    allowed = "expected 'org/name' with letters, digits, '.', '_' and '-' (e.g. 'Qwen/Qwen-Image')"
    if not isinstance(repo_id, str):
        raise InvalidInputError("repo_id", f"{repo_id!r} is not a string; {allowed}.")
    text = repo_id.strip()
    parts = text.split("/")
    if not text or len(parts) > 2 or any(not _REPO_PART.match(p) for p in parts):
        raise InvalidInputError("repo_id", f"{repo_id!r} is not a valid repo id; {allowed}.")
    if any(".." in p or "--" in p for p in parts):
        raise InvalidInputError("repo_id", f"{repo_id!r} must not contain '..' or '--'; {allowed}.")
    return text


def validate_revision(revision: object) -> str:
    """A branch, tag or 40-hex commit; no '..', no leading/trailing '/', no empty parts or odd characters."""
    allowed = "expected a branch, tag or 40-character commit hash (e.g. 'main', 'v1.0', 'refs/pr/1')"
    if not isinstance(revision, str):
        raise InvalidInputError("revision", f"{revision!r} is not a string; {allowed}.")
    text = revision.strip()
    if _SHA.match(text):
        return text
    if (
        not _REVISION.match(text)
        or ".." in text
        or text.startswith("/")
        or text.endswith("/")
        or "//" in text
        or text.endswith(".lock")
    ):
        raise InvalidInputError("revision", f"{revision!r} is not a valid revision; {allowed}.")
    return text


def safe_join(root: str | os.PathLike, relpath: str) -> Path:
    """``root / relpath`` for a relative path that provably stays inside ``root``; raises otherwise."""
    field = "path"
    if not isinstance(relpath, str) or not relpath:
        raise InvalidInputError(field, f"{relpath!r}: a non-empty relative path is required.")
    problems = [
        ("\x00" in relpath, "contains a NUL byte"),
        ("\\" in relpath, "contains a backslash (use '/')"),
        (relpath.startswith("/"), "is absolute"),
        (bool(_DRIVE.match(relpath)), "starts with a drive letter"),
        (any(ord(c) < 32 for c in relpath), "contains control characters"),
    ]
    for bad, why in problems:
        if bad:
            raise InvalidInputError(field, f"{relpath!r} {why}; only relative paths inside the store are allowed.")
    parts = relpath.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise InvalidInputError(
                field, f"{relpath!r} has an empty, '.' or '..' part; only plain relative paths are allowed."
            )
    root_path = Path(root)
    joined = root_path.joinpath(*parts)
    # Belt and braces: the lexical result must still be under root.
    if os.path.commonpath([os.path.abspath(root_path), os.path.abspath(joined)]) != os.path.abspath(root_path):
        raise InvalidInputError(field, f"{relpath!r} escapes {root_path}.")
    return joined


def repo_folder(repo_id: str, root: str | os.PathLike | None = None) -> Path:
    """The local folder of a repo: ``<root>/org/name`` (root defaults to ``models_root()``)."""
    repo = validate_repo_id(repo_id)
    return safe_join(Path(root) if root is not None else models_root(), repo)


def register_reports_dir(folder: Path | str | None) -> None:
    """Called by the ComfyUI bridge: inside ComfyUI the session log goes to its user folder (None: forget)."""
    with _lock:
        _registered_reports[:] = [] if folder is None else [Path(folder).expanduser()]


def reports_dir() -> Path:
    """QWEN_REPORTS_DIR, else the folder a host registered (ComfyUI's user folder), else <repo>/reports.
    Not created here."""
    env = os.environ.get("QWEN_REPORTS_DIR", "").strip()
    if env:
        return Path(env).expanduser()
    with _lock:
        if _registered_reports:
            return _registered_reports[0]
    return REPO_ROOT / "reports"
