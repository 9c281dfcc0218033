"""Preflight node: GPU/VRAM/RAM/disk/versions checks and a recommended profile, shown as a table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qwen_core.errors import InvalidInputError
from qwen_core.paths import validate_repo_id
from qwen_core.preflight import perform_preflight_checks

from . import comfy_bridge as bridge
from .common import QWEN_SYSTEM


class QwenImagePreflight:
    DESCRIPTION = ("Checks this machine for Qwen-Image before anything heavy runs: GPU and VRAM, RAM, free disk "
                   "in the model folder, CUDA/driver, package versions, flash-attn. Gives a verdict and the "
                   "recommended dtype, memory mode and pixel window. Runs again on every queue.")
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
    def IS_CHANGED(cls, **_: Any) -> float:
        return float("nan")  # NaN never equals itself: free VRAM/disk change, so re-check on every queue

    def check(self, model: str) -> dict[str, Any]:
        roots = bridge.register_models_dirs()
        name = (model or "").strip() or None
        try:  # a folder name in models/diffusers counts as local; anything else is treated as a repo id
            local = bridge.resolve_model_folder(name) if name else None
        except InvalidInputError:
            local = None
        if local is not None and not (local / "model_index.json").is_file():
            local = None
        if local is None and name is not None:
            _refuse_outside_paths(name, roots)
        report = perform_preflight_checks(str(local) if local else name, roots[0],
                                          comfyui_version=bridge.comfyui_version())
        text = report.to_text()
        as_json = json.loads(report.to_json())  # plain JSON types for the websocket
        return {"ui": {"text": [text], "qwen_report": [as_json]}, "result": (report, text)}


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
