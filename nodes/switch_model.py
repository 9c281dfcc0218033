"""SwitchModel node: release the current model completely, then load another; memory before/after."""

from __future__ import annotations

from typing import Any

from qwen_core.memory import switch_model

from .common import (
    QWEN_PIPE,
    PipeHandle,
    generator_for,
    install_comfy_hooks,
    model_choices,
    release_resident,
    resolve_model,
    validate_model_name,
)


class QwenImageSwitchModel:
    DESCRIPTION = ("Switches to another Qwen-Image model without leaking memory: the current model's offload hooks "
                   "and weights are released (gc, empty_cache) before the next one loads. Reports process RSS and "
                   "CUDA memory before, after the release, and after loading.")
    CATEGORY = "Qwen-Image/loaders"
    FUNCTION = "switch"
    RETURN_TYPES = (QWEN_PIPE, "STRING")
    RETURN_NAMES = ("pipe", "memory_report")
    OUTPUT_TOOLTIPS = ("The new model, with the same dtype/memory mode/attention as the input.",
                       "Memory before the switch, after releasing the old model, and after loading the new one.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        models = model_choices()
        return {
            "required": {
                "pipe": (QWEN_PIPE, {"tooltip": "The model to release."}),
                "model": (models, {"default": models[-1], "tooltip": "The Qwen-Image folder to switch to."}),
            },
            "optional": {
                "model_path": ("STRING", {"forceInput": True, "tooltip": "Overrides model: a folder inside the model folders."}),
                "after": ("IMAGE", {"tooltip": "Connect the images of the old model here so the switch runs after them."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, model: str) -> bool | str:
        return validate_model_name(model)

    def switch(self, pipe: PipeHandle, model: str, model_path: str | None = None, after: Any = None) -> tuple[PipeHandle, str]:
        install_comfy_hooks()
        new = PipeHandle(str(resolve_model(model, model_path)), pipe.dtype, pipe.memory_mode, pipe.attention,
                         compile=pipe.compile, compute=pipe.compute, devices=pipe.devices)
        old_key, new_loader = generator_for(pipe).loader.residency_key, generator_for(new).loader  # B is checked before A goes
        try:  # weights now, so the report shows the new model's real footprint
            report = switch_model(old_key if old_key != new_loader.residency_key else None, new_loader.load)
        except BaseException:
            release_resident()
            raise
        text = f"{pipe.path} -> {new.path}\n" + report.summary().replace("; ", "\n")
        return (new, text)
