"""The config source of a model assembled from single files: a diffusers folder without (or with) weights.

Single files carry weights only. What a pipeline also needs (model_index.json naming the pipeline class, each
component's config.json, the tokenizer, the scheduler config) is a few MB in the family's diffusers repo, and a
full diffusers folder serves as well. Inside ComfyUI the tokenizer may come from ComfyUI's own
``comfy/text_encoders/qwen25_tokenizer`` instead (``tokenizer_dir``).

API: ``check_configs_folder(path) -> ConfigsFolder``, ``write_configs_folder(diffusers_folder, out)`` (a
configs-only copy, e.g. for tests). What a configs-only download fetches is ``qwen_core.download.CONFIG_PATTERNS``
(the Downloader's layout 'configs only').
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen_core.errors import ModelFolderError
from qwen_core.families import ModelFamily
from qwen_core.integrity import find_pickle_files, read_model_index, resolve_model_dir
from qwen_core.model_source import build_light_component

_WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt")
_GET_CONFIGS = ("Download the family's configs (a few MB, no weights): the Downloader with layout 'configs only', "
                "or `python -m qwen_core download Qwen/Qwen-Image --layout configs`; or use a full diffusers folder "
                "of the same family.")  # fmt: skip


@dataclass(frozen=True)
class ConfigsFolder:
    """A validated config source: its family, components and the folder each light component comes from."""

    path: Path
    family: ModelFamily
    components: dict[str, tuple[str, str]]
    tokenizer_dir: Path | None = None

    def config(self, name: str) -> dict[str, Any]:
        path = self.path / name / "config.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ModelFolderError(f"{path}: cannot be read ({err}).", fix=_GET_CONFIGS) from err

    def light_components(self) -> dict[str, Any]:
        """Tokenizer / processor / scheduler built now from local files (no remote code)."""
        built = {}
        for name, (library, cls_name) in self.components.items():
            if name in self.family.weighted_components:
                continue
            if name == "tokenizer" and self.tokenizer_dir is not None:
                built[name] = build_light_component(self.tokenizer_dir.parent, self.tokenizer_dir.name, library, cls_name)
            else:
                built[name] = build_light_component(self.path, name, library, cls_name)
        return built


def check_configs_folder(path: str | Path, tokenizer_dir: str | Path | None = None) -> ConfigsFolder:
    """Validate a config source (model_index.json with an allowlisted family, every weighted component's
    config.json, the light components' folders); weights are not needed and not read."""
    folder = resolve_model_dir(path)
    if not folder.is_dir():
        raise ModelFolderError(f"{folder}: no such configs folder.", fix=_GET_CONFIGS)
    pickles = find_pickle_files(folder)
    if pickles:
        raise ModelFolderError(f"{folder}: holds pickled files ({pickles[0].name}); they are never loaded.",
                               fix="Delete them or use a clean configs folder.")
    family, components = read_model_index(folder)  # family allowlisted, component classes checked
    for name in family.weighted_components:
        if not (folder / name / "config.json").is_file():
            raise ModelFolderError(f"{folder}: lacks {name}/config.json.", fix=_GET_CONFIGS)
    tokenizer = Path(tokenizer_dir).expanduser() if tokenizer_dir else None
    for name in components:
        if name in family.weighted_components or (name == "tokenizer" and tokenizer is not None):
            continue
        if not (folder / name).is_dir():
            raise ModelFolderError(f"{folder}: lacks the {name}/ folder.", fix=_GET_CONFIGS)
    if tokenizer is not None and not tokenizer.is_dir():
        raise ModelFolderError(f"{tokenizer}: no such tokenizer folder.", fix=_GET_CONFIGS)
    return ConfigsFolder(folder, family, components, tokenizer)


def is_configs_only(folder: Path) -> bool:
    """True for a diffusers folder whose components carry no weight files (a configs-only download)."""
    return (folder / "model_index.json").is_file() and not any(
        p.suffix in _WEIGHT_SUFFIXES for p in folder.glob("*/*") if p.is_file())


def write_configs_folder(diffusers_folder: str | Path, out: str | Path) -> Path:
    """Copy a diffusers folder without its weights (what a configs-only download holds)."""
    src, out = resolve_model_dir(diffusers_folder), Path(out)
    for path in sorted(src.rglob("*")):
        if path.is_file() and path.suffix not in _WEIGHT_SUFFIXES and not path.name.endswith(".index.json"):
            target = out / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    return out
