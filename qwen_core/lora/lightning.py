"""Quality presets that need something of the model: the Lightning presets, in one place.

``resolve_quality_preset(name, loras, model_path)`` is the one decision the PixelGovernor node, the Generate
node, ``QwenImageGenerator.generate(preset=...)`` and the CLI's ``--preset`` all call: it returns the preset
or refuses a ``requires: lightning`` preset when neither a Lightning LoRA (with a positive strength) is in
the stack nor the model folder is a pre-fused Lightning model. Recognition is by name, as lightx2v names its
releases ("Qwen-Image-Lightning-8steps-V2.0.safetensors"); a renamed file needs "lightning" in its name.

``scheduler_for(preset, scheduler)`` builds the preset's scheduler (the model's config with the preset's
settings over it) for one run; the model's own scheduler is left as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qwen_core.errors import InvalidInputError
from qwen_core.lora.spec import LoraSpec, is_lightning_name
from qwen_core.presets import QualityPreset, load_presets


def has_lightning(loras: Sequence[LoraSpec], model_path: str | Path | None) -> bool:
    """A Lightning LoRA switched on in ``loras``, or a model folder whose name says it is a Lightning model."""
    if any(spec.is_lightning for spec in loras):
        return True
    return model_path is not None and is_lightning_name(Path(model_path))


def resolve_quality_preset(name: str, loras: Sequence[LoraSpec] = (), model_path: str | Path | None = None,
                           *, field: str = "quality_preset") -> QualityPreset:
    """The quality preset ``name``, checked against what the pipe carries (see the module docstring)."""
    presets = load_presets()
    if name not in presets.quality_presets:
        raise InvalidInputError(field, f"{name!r} is not a quality preset; choose one of "
                                       f"{', '.join(presets.quality_presets)}.")
    preset = presets.quality_presets[name]
    if preset.requires == "lightning" and not has_lightning(loras, model_path):
        stack = ", ".join(s.describe() for s in loras) or "no LoRA"
        raise InvalidInputError(
            field, f"{name!r} samples in {preset.steps} steps without true CFG, which only a Lightning-distilled "
                   f"model can do (the pipe has {stack}); the base model would give a blurred image.",
            fix="Add a Qwen-Image LoRA node with a Qwen-Image-Lightning LoRA (e.g. "
                f"Qwen-Image-Lightning-{preset.steps}steps-V2.0.safetensors from lightx2v/Qwen-Image-Lightning), "
                "or choose the fast/balanced/high preset.")
    return preset


def scheduler_for(preset: QualityPreset | None, scheduler: Any) -> Any:
    """A new scheduler of ``scheduler``'s class with the preset's settings over its config; None when the
    preset sets none (the model's scheduler is used as it is)."""
    if preset is None or not preset.scheduler or scheduler is None:
        return None
    return type(scheduler).from_config({**dict(scheduler.config), **preset.scheduler_overrides})
