"""Preflight node: GPU/VRAM/RAM/disk/versions checks and a recommended profile, shown as a table."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from qwen_core.errors import InvalidInputError
from qwen_core.paths import validate_repo_id
from qwen_core.preflight import MODEL_SIZES_GB, check_disk, perform_preflight_checks

from . import comfy_bridge as bridge
from .cache_keys import folder_fingerprint
from .common import QWEN_SYSTEM


class QwenImagePreflight:
    DESCRIPTION = ("Checks this machine for Qwen-Image before anything heavy runs: GPU and VRAM, RAM, free disk "
                   "in the model folder, CUDA/driver, package versions, flash-attn. Gives a verdict and the "
                   "recommended dtype, memory mode and pixel window. Runs again when the model folder's files or the "
                   "disk verdict change; an unchanged graph comes from ComfyUI's cache.")
    CATEGORY = "Qwen-Image/setup"
    FUNCTION = "check"
    OUTPUT_NODE = True
    RETURN_TYPES = (QWEN_SYSTEM, "STRING")
    RETURN_NAMES = ("system", "report")
    OUTPUT_TOOLTIPS = ("The structured report (feeds the Downloader and PixelGovernor).",
                       "The report as a text table.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"model": ("STRING", {
            "default": "Qwen/Qwen-Image",
            "tooltip": "Repo id (org/name) or the name of a folder in models/diffusers; sets the disk and memory needs.",
        })}}

    @classmethod
    def IS_CHANGED(cls, model: str = "", **_: Any) -> str:
        """What the report reads from disk: a local model's files, or the disk verdict for a download.

        Not the free VRAM/RAM readings: they wobble on every run, and a NaN here made ComfyUI re-run the
        whole graph (and the Downloader ask the Hub) on every queue.
        """
        roots = bridge.register_models_dirs()
        name = (model or "").strip() or None
        local = _local_folder(name)
        if local is not None:
            return f"local {local} {folder_fingerprint(local)}"
        return f"repo {name} disk {_disk_verdict(name or '', roots[0])}"

    def check(self, model: str) -> dict[str, Any]:
        roots = bridge.register_models_dirs()
        name = (model or "").strip() or None
        local = _local_folder(name)
        if local is None and name is not None:
            _refuse_outside_paths(name, roots)
        report = perform_preflight_checks(str(local) if local else name, roots[0],
                                          comfyui_version=bridge.comfyui_version())
        text = report.to_text()
        as_json = json.loads(report.to_json())  # plain JSON types for the websocket
        return {"ui": {"text": [text], "qwen_report": [as_json]}, "result": (report, text)}


def _local_folder(name: str | None) -> Path | None:
    """A folder name in models/diffusers with a model_index.json counts as local; anything else is a repo id."""
    try:
        local = bridge.resolve_model_folder(name) if name else None
    except InvalidInputError:
        return None
    return local if local is not None and (local / "model_index.json").is_file() else None


def _disk_verdict(repo_id: str, target: Path) -> str:
    """The core's disk check for a download of ``repo_id`` into ``target`` (ok / warn / fail)."""

    def free(path: Path) -> int:
        while not path.exists() and path.parent != path:
            path = path.parent  # the target may not exist yet: the disk it will be created on
        return shutil.disk_usage(path).free

    return check_disk(target, repo_id, MODEL_SIZES_GB.get(repo_id), False, True, free).status


def _refuse_outside_paths(name: str, roots: list[Path]) -> None:
    """The core treats any existing folder as the model (and walks it): from a workflow, only repo ids pass."""
    if not Path(name).expanduser().is_dir():
        return  # a repo id, or a name the report marks as invalid
    try:
        validate_repo_id(name)
    except InvalidInputError as err:
        shown = ", ".join(str(r) for r in roots)
        raise InvalidInputError("model", f"{name!r} is a folder outside the model folders ({shown}).",
                                fix="Name a folder inside the model folders, or a repo id like Qwen/Qwen-Image.") from err
