"""Which single files in a set of folders are Qwen-Image components, and which configs folder fits a file.

Used by the Loader's dropdowns: every .safetensors / .gguf under the folders is identified from its header
(milliseconds per file; cached by path, size and mtime, so ComfyUI's /object_info stays fast), files of other
models (Flux, Wan...) and unreadable ones are left out.

API: ``list_files(folders, component) -> list[str]`` (names relative to their folder), ``find_file(folders,
name) -> Path | None``, ``pick_configs(file_name, folders) -> str | None``.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

from qwen_core.errors import ModelFolderError, QwenError
from qwen_core.paths import safe_join
from qwen_core.sources.detect import GGUF_SUFFIX, SAFETENSORS_SUFFIXES, inspect_file
from qwen_core.sources.types import Component, FileInfo

_SUFFIXES = (*SAFETENSORS_SUFFIXES, GGUF_SUFFIX)
_cache: dict[tuple[str, int, int], FileInfo | None] = {}
_lock = threading.Lock()
_MAX_CACHE = 512


def _info(path: Path) -> FileInfo | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    with _lock:
        if key in _cache:
            return _cache[key]
    try:
        info: FileInfo | None = inspect_file(path)
    except (QwenError, OSError, ValueError):  # another model, a damaged file, no gguf package: not listed
        info = None
    with _lock:
        if len(_cache) >= _MAX_CACHE:
            _cache.clear()
        _cache[key] = info
    return info


def _walk(folder: Path) -> Iterable[Path]:
    for root, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.lower().endswith(_SUFFIXES) and not name.startswith("."):
                yield Path(root) / name


def list_files(folders: Sequence[Path], component: Component) -> list[str]:
    """Names (relative to their folder, '/'-separated) of the Qwen-Image ``component`` files in ``folders``."""
    found: list[str] = []
    for folder in folders:
        if not Path(folder).is_dir():
            continue
        for path in _walk(Path(folder)):
            info = _info(path)
            name = path.relative_to(folder).as_posix()
            if info is not None and info.component is component and name not in found:
                found.append(name)
    return found


def find_file(folders: Sequence[Path], name: str) -> Path | None:
    """The file ``name`` (relative, as listed) in the first folder that has it; never outside the folders."""
    for folder in folders:
        candidate = safe_join(folder, name)
        if candidate.is_file():
            return candidate
    return None


def _edit_generation(name: str) -> str:
    """'2511' / '2509' / 'edit' / '' from a file or folder name (Qwen's naming: qwen_image_edit_2509_fp8...)."""
    text = name.lower()
    if "edit" not in text:
        return "layered" if "layered" in text else ""
    found = re.search(r"edit[-_ ]?(\d{4})", text)
    return found.group(1) if found else "edit"


def pick_configs(file_name: str, candidates: Sequence[str]) -> str | None:
    """The configs folder (one of ``candidates``, diffusers folder names) that fits a diffusion-model file:
    the same Edit generation by name (Qwen-Image, Edit, Edit-2509, ...), configs-only folders first."""
    wanted = _edit_generation(file_name)
    matching = [c for c in candidates if _edit_generation(c) == wanted]
    return matching[0] if matching else None


def require_file(folders: Sequence[Path], name: str, what: str) -> Path:
    path = find_file(folders, name)
    if path is None:
        shown = ", ".join(str(f) for f in folders) or "(none)"
        raise ModelFolderError(f"{what} {name!r} is not in {shown}.", fix="Pick a file from the list, or put it there.")
    return path
