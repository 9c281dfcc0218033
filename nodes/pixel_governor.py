"""PixelGovernor node: the largest size that fits this card's memory, an estimated time per step for it, plus
steps/CFG (and optionally a time budget) from a quality preset."""

from __future__ import annotations

from typing import Any

from qwen_core import governor
from qwen_core.presets import MAX_SIDE, load_presets

from .common import HIDDEN, QWEN_PIPE, QWEN_SYSTEM

CUSTOM = "custom"


def _limits(pipe: Any, system: Any) -> dict[str, Any]:
    """Governor inputs from the loader's plan, else the preflight report, else one reading of this machine."""
    if pipe is not None:
        from .common import generator_for

        return generator_for(pipe).loader.governor_inputs()
    if system is not None:
        profile = system.profile  # a qwen_core.preflight.PreflightReport: its window, for its VRAM reading
        device = getattr(system, "device", None) or {}
        situation = governor.Situation(device.get("vram_free_gb"), profile.memory_mode, profile.dtype)
        return {"situation": situation, "max_pixels": profile.max_pixels}
    from qwen_core.devices import get_device_config

    cfg = get_device_config()
    return {"situation": governor.Situation(cfg.vram_free_gb, "auto", cfg.dtype_name)}


class QwenImagePixelGovernor:
    DESCRIPTION = ("Keeps the requested size when it fits your GPU's memory (16-aligned, aspect kept, never "
                   "upscaled) and reduces it only when it does not (a SAFE MODE badge). Shows the estimated time "
                   "per step for the size, and gives the steps/CFG of a quality preset; a preset with a time "
                   "budget also caps the size so the estimated step fits the budget.")
    CATEGORY = "Qwen-Image/sizing"
    FUNCTION = "decide"
    RETURN_TYPES = ("INT", "INT", "INT", "FLOAT", "STRING", "FLOAT")
    RETURN_NAMES = ("width", "height", "steps", "true_cfg_scale", "message", "seconds_per_step")
    OUTPUT_TOOLTIPS = ("Safe width (multiple of 16).", "Safe height (multiple of 16).",
                       "Steps of the quality preset.", "True CFG scale of the quality preset.",
                       "What the governor decided and why (the Safe Mode line when it reduced the size for "
                       "memory), then the estimated time per step.",
                       "Estimated seconds per denoising step at the chosen size (from figures measured on an "
                       "H100; slower GPUs take longer); 0 when there is no basis for an estimate (CPU, fp32).")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        presets = load_presets()
        size = {"min": 16, "max": MAX_SIDE, "step": 16}
        return {
            "required": {
                "width": ("INT", {"default": 1328, **size, "tooltip": "Requested width in pixels (ignored unless aspect_preset is 'custom')."}),
                "height": ("INT", {"default": 1328, **size, "tooltip": "Requested height in pixels (ignored unless aspect_preset is 'custom')."}),
                "aspect_preset": ([CUSTOM, *presets.aspect_presets], {"default": CUSTOM, "tooltip": "A native Qwen-Image size, or 'custom' to use width/height."}),
                "quality_preset": (list(presets.quality_presets), {"default": "balanced", "tooltip": "Sets steps and true_cfg_scale. Presets named 'max N s/step' also cap the size so the estimated step takes at most N seconds; the others keep every size that fits in memory."}),
            },
            "optional": {
                "pipe": (QWEN_PIPE, {"tooltip": "The loaded model: its memory mode, dtype and VRAM reading set the limit (best)."}),
                "system": (QWEN_SYSTEM, {"tooltip": "A Preflight report: its recommended profile sets the limit."}),
            },
            "hidden": HIDDEN,
        }

    def decide(self, width: int, height: int, aspect_preset: str, quality_preset: str, pipe: Any = None,
               system: Any = None, unique_id: str | None = None) -> dict[str, Any]:
        presets = load_presets()
        if aspect_preset != CUSTOM:
            preset = presets.aspect(aspect_preset)
            width, height = preset.width, preset.height
        quality = presets.quality(quality_preset)
        decision = governor.clamp_image_size(width, height, time_budget_s=quality.max_seconds_per_step,
                                             two_pass=quality.true_cfg_scale > 1, **_limits(pipe, system))
        headline = decision.message or f"{decision.width}x{decision.height} fits ({decision.reason})"
        message = f"{headline}\n{decision.estimate_text}"
        seconds = round(decision.seconds_per_step, 3) if decision.seconds_per_step is not None else 0.0
        info = {"scaled": decision.scaled, "message": message, "width": decision.width,
                "height": decision.height, "max_pixels": decision.max_pixels, "seconds_per_step": seconds,
                "limited_by": decision.limited_by}
        return {"ui": {"text": [message], "qwen_governor": [info]},
                "result": (decision.width, decision.height, quality.steps, quality.true_cfg_scale, message, seconds)}
