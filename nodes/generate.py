"""Generate node: text-to-image or, with up to three IMAGE inputs, editing; per-step progress; ComfyUI's Cancel
stops within one step."""

from __future__ import annotations

from typing import Any

from qwen_core.errors import GenerationCancelled, InvalidInputError
from qwen_core.presets import MAX_SIDE

from . import comfy_bridge as bridge
from .common import HIDDEN, QWEN_PIPE, generator_for, install_comfy_hooks, release_resident, validate_float

MIN_STEPS = 2  # Qwen-Image's scheduler (shift_terminal) turns a 1-step schedule into NaN


def _after_cancel() -> None:
    """Cancel keeps the model resident, so the next run skips a 40 GB reload; it goes only when memory is
    short now (ComfyUI's /free, its loads and its RAM-pressure cache can still release it later)."""
    if bridge.memory_is_short():
        release_resident()


IMAGE_TOOLTIPS = {
    "image1": ("Reference image (e.g. from LoadImage). Needed by edit models: Qwen-Image-Edit takes exactly one, "
               "Edit-2509/2511 one to three (image1..image3, in order: 'the person in image 1...'), Layered one (the "
               "image to split into layers); Qwen-Image 2.1 takes none or some. Text-to-image models (Qwen-Image, "
               "2512) refuse it. Each image is resized by the pipeline (to ~1 MP for the edit models)."),
    "image2": "Second reference image (Edit-2509/2511, 2.1). Connect image1 first.",
    "image3": "Third reference image (Edit-2509/2511, 2.1).",
}


class QwenImageGenerate:
    DESCRIPTION = ("Generates images with the loaded model's real diffusers pipeline: text-to-image (Qwen-Image, "
                   "2512, 2.1), editing with 1 image (Qwen-Image-Edit) or 1-3 images (Edit-2509/2511, 2.1 takes "
                   "0-3 here), or layer decomposition (Layered: one image in, RGBA layers out). A wrong number of "
                   "images is refused before any compute. The size passes the pixel governor again, counting what "
                   "the images add (never above what fits), progress shows per step, Cancel stops within one step "
                   "without decoding. After Cancel the model stays loaded for the next run unless memory is short; an "
                   "error releases it.")
    CATEGORY = "Qwen-Image/sampling"
    FUNCTION = "generate"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("The images, [batch, height, width, channels] floats in 0..1: 3 channels (RGB), or 4 (RGBA, "
                       "with alpha) for Qwen-Image-Layered, whose batch holds the layers of the input image in order, "
                       "and for Qwen-Image 2.1. SaveImage writes RGBA PNGs.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        # qwen_core.generator imports torch: here, not at module top, so the pack's root import stays light.
        from qwen_core.family_call import MAX_LAYERS
        from qwen_core.generator import CFG_RANGE, MAX_BATCH, MAX_STEPS, SEED_MAX

        size = {"min": 16, "max": MAX_SIDE, "step": 16}
        return {
            "required": {
                "pipe": (QWEN_PIPE, {"tooltip": "The model from the Loader or SwitchModel."}),
                "prompt": ("STRING", {"multiline": True, "default": "A coffee shop entrance with a chalkboard sign reading \"Qwen Coffee\", warm morning light", "tooltip": "What to draw. Qwen-Image renders text in quotes well."}),
                "negative_prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "What to avoid; used when true_cfg_scale > 1."}),
                "width": ("INT", {"default": 1328, **size, "tooltip": "Image width (multiple of 16; 2.1 rounds to 32); connect the PixelGovernor. Edit models: ~1 MP at the input's aspect is the model card's choice. Layered ignores it: its layers keep the input's aspect at 640x640 pixels (1024x1024 when width x height reaches that)."}),
                "height": ("INT", {"default": 1328, **size, "tooltip": "Image height (multiple of 16; 2.1 rounds to 32); connect the PixelGovernor. Layered: see width."}),
                "steps": ("INT", {"default": 30, "min": MIN_STEPS, "max": MAX_STEPS, "tooltip": "Denoising steps (50 = model card quality; at least 2: Qwen-Image's scheduler turns 1 step into NaN)."}),
                "true_cfg_scale": ("FLOAT", {"default": 4.0, "min": CFG_RANGE[0], "max": CFG_RANGE[1], "step": 0.1, "round": 0.01, "tooltip": "Prompt strength; <= 1 turns true CFG off (half the compute)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "control_after_generate": True, "tooltip": "Same seed + settings + device = same image."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": MAX_BATCH, "tooltip": "Images per run (costs VRAM). Layered: 1 (its output is the layers of one image)."}),
            },
            "optional": {
                "quality_preset": ("STRING", {"forceInput": True, "tooltip": "From the PixelGovernor: its preset's steps, CFG and scheduler replace the widgets (lightning-8/4 need a Lightning LoRA)."}),
                **{name: ("IMAGE", {"tooltip": tip}) for name, tip in IMAGE_TOOLTIPS.items()},
                "layers": ("INT", {"default": 0, "min": 0, "max": MAX_LAYERS, "tooltip": "Qwen-Image-Layered only: how many RGBA layers to split the image into (0 = the model's default, 4; each layer adds to the VRAM need, which the governor counts). Other models refuse a value above 0."}),
            },
            "hidden": HIDDEN,
        }

    @classmethod
    def VALIDATE_INPUTS(cls, true_cfg_scale: float | None = None) -> bool | str:
        from qwen_core.generator import CFG_RANGE

        return validate_float("true_cfg_scale", true_cfg_scale, *CFG_RANGE)

    def generate(self, pipe: Any, prompt: str, negative_prompt: str, width: int, height: int, steps: int,
                 true_cfg_scale: float, seed: int, batch_size: int, quality_preset: str | None = None,
                 image1: Any = None, image2: Any = None, image3: Any = None, layers: int = 0,
                 unique_id: str | None = None) -> dict[str, Any]:
        install_comfy_hooks()
        bar = bridge.Progress(steps, unique_id)

        def on_step(step: int, total: int, eta_s: float) -> None:
            bar.update(step, total)  # inside ComfyUI its hook raises on Cancel, before the next step
            bridge.send_text(unique_id, f"step {step}/{total} · ETA {eta_s:.0f}s")

        try:
            result = generator_for(pipe).generate(
                prompt, negative_prompt, images=[image1, image2, image3], width=width, height=height, steps=steps,
                true_cfg_scale=true_cfg_scale, seed=seed, batch_size=batch_size, on_step=on_step,
                should_cancel=bridge.interrupted, preset=quality_preset or None, layers=layers or None)
        except InvalidInputError:
            raise  # raised before any compute: nothing to release
        except GenerationCancelled as err:
            _after_cancel()
            bridge.raise_as_interrupt(err)
        except BaseException as err:
            if bridge.is_interrupt(err):  # Cancel raised by ComfyUI's progress hook (a BaseException in 0.33)
                _after_cancel()
            else:
                release_resident()  # an error: nothing half-used may stay pinned
            raise
        lines = [f"{result.width}x{result.height} x{result.images.shape[0]}, {result.steps} steps, seed {result.seed}, "
                 f"{result.timings.get('total_s', 0.0):.1f} s"
                 + (f" ({result.preset})" if result.preset else ""),
                 *(f"LoRA {name}" for name in result.loras), *result.warnings]
        bridge.send_text(unique_id, lines[0])
        return {"ui": {"text": ["\n".join(lines)]}, "result": (result.images,)}
