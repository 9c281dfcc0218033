"""LoRA node: a new QWEN_PIPE carrying one more LoRA (stack several by chaining); the input pipe is untouched."""

from __future__ import annotations

from typing import Any

from qwen_core.errors import InvalidInputError

from . import comfy_bridge as bridge
from .common import HIDDEN, QWEN_PIPE, generator_for, install_comfy_hooks, validate_float

NO_LORA = "(no .safetensors LoRA in models/loras)"


class QwenImageLoRA:
    DESCRIPTION = ("Adds a LoRA (style, character, or a Qwen-Image-Lightning 4/8-step LoRA) to a Qwen-Image pipe. Chain "
                   "several to stack them. The file is checked now against the model's layers (safetensors only; a "
                   "LoRA for another model is refused naming the first bad key); Generate fuses the stack into the "
                   "resident model without reloading it, and taking a LoRA away restores the exact base weights.")
    CATEGORY = "Qwen-Image/loaders"
    FUNCTION = "apply"
    RETURN_TYPES = (QWEN_PIPE,)
    RETURN_NAMES = ("pipe",)
    OUTPUT_TOOLTIPS = ("The same model with this LoRA on top of the input's LoRAs (the input pipe is unchanged).",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        from qwen_core.lora.spec import STRENGTH_RANGE

        names = bridge.list_loras() or [NO_LORA]
        return {
            "required": {
                "pipe": (QWEN_PIPE, {"tooltip": "The model from the Loader (or another LoRA node)."}),
                "lora_name": (names, {"default": names[0], "tooltip": "A .safetensors LoRA from models/loras (and extra_model_paths). Lightning LoRAs unlock the lightning-8/4 presets."}),
                "strength": ("FLOAT", {"default": 1.0, "min": STRENGTH_RANGE[0], "max": STRENGTH_RANGE[1], "step": 0.01, "tooltip": "How strongly the LoRA changes the model: 0 = off, 1 = as trained; negative inverts it."}),
            },
            "hidden": HIDDEN,
        }

    @classmethod
    def VALIDATE_INPUTS(cls, lora_name: str, strength: float | None = None) -> bool | str:
        from qwen_core.lora.spec import STRENGTH_RANGE
        from qwen_core.paths import safe_join

        # A workflow may name a LoRA this machine does not have yet: accepted here if it is a plain relative
        # .safetensors name (ComfyUI's own list check would refuse it), reported by name when the node runs.
        try:
            safe_join("/loras", str(lora_name))
        except InvalidInputError as err:
            return f"lora_name: {err}"
        if not str(lora_name).lower().endswith(".safetensors"):
            return f"lora_name: {lora_name!r} is not a .safetensors file (pickled LoRAs are not loaded)"
        return validate_float("strength", strength, *STRENGTH_RANGE)

    def apply(self, pipe: Any, lora_name: str, strength: float, unique_id: str | None = None) -> dict[str, Any]:
        from qwen_core.lora.files import describe_file

        install_comfy_hooks()
        if lora_name == NO_LORA:
            raise InvalidInputError("lora_name", "no LoRA is selected.", fix="Put a .safetensors LoRA in ComfyUI's models/loras.")
        path = bridge.resolve_lora(lora_name)
        if not path.is_file():
            raise InvalidInputError("lora_name", f"{lora_name!r} is not in the LoRA folders "
                                                 f"({', '.join(str(d) for d in bridge.lora_dirs())}).",
                                    fix="Download the LoRA into ComfyUI's models/loras folder.")
        new = pipe.with_lora(str(path), strength)
        generator = generator_for(new)  # checks the whole stack against the model's layers (headers only)
        text = f"{describe_file(path, generator.loader.family).summary()} @ {strength:g}"
        bridge.send_text(unique_id, text)
        return {"ui": {"text": [text]}, "result": (new,)}
