"""Loader node: a light QWEN_PIPE handle; the folder is checked now, weights load on the first Generate."""

from __future__ import annotations

from typing import Any

from .common import (
    ATTENTIONS,
    COMPILES,
    COMPUTES,
    DTYPES,
    MEMORY_MODES,
    QWEN_PIPE,
    PipeHandle,
    generator_for,
    install_comfy_hooks,
    model_choices,
    resolve_model,
    validate_model_name,
)


class QwenImageLoader:
    DESCRIPTION = ("Selects a Qwen-Image diffusers folder from ComfyUI's models/diffusers (and extra_model_paths) "
                   "and how to run it. The folder is checked and the tokenizer built now; the weights load on the "
                   "first Generate, after ComfyUI has been asked to free memory for them.")
    CATEGORY = "Qwen-Image/loaders"
    FUNCTION = "load"
    RETURN_TYPES = (QWEN_PIPE,)
    RETURN_NAMES = ("pipe",)
    OUTPUT_TOOLTIPS = ("A light handle on the model; the weights stay in qwen_core's residency registry.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        models = model_choices()
        return {
            "required": {
                "model": (models, {"default": models[0], "tooltip": "A Qwen-Image folder in models/diffusers (org/name or name)."}),
                "dtype": (DTYPES, {"default": "auto", "tooltip": "auto: bf16 where the GPU supports it, else fp16; fp32 on the CPU."}),
                "memory_mode": (MEMORY_MODES, {"default": "auto", "tooltip": "Where weights live: gpu (fastest) ... sequential (least VRAM). auto picks from free VRAM."}),
                "attention": (ATTENTIONS, {"default": "auto", "tooltip": "auto: PyTorch SDPA unless flash-attn passes a probe. A black image retries with SDPA."}),
            },
            "optional": {
                "model_path": ("STRING", {"forceInput": True, "tooltip": "Overrides model: a folder inside the model folders (e.g. from the Downloader)."}),
                "compile": (COMPILES, {"default": "auto", "tooltip": "torch.compile of the transformer blocks. auto: on for NVIDIA GPUs (QWEN_COMPILE=0 turns it off). The first image on a machine waits for the compile (~15-60 s); later runs load it from the compile cache."}),
                "compute": (COMPUTES, {"default": "auto", "tooltip": "auto/exact: the model dtype (bf16). fp8: fp8 matrix products on sm_89+ GPUs (RTX 40xx, H100): faster, ~9% relative deviation from bf16 (README 'fp8 compute'). Not with memory_mode streamed."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, model: str) -> bool | str:
        return validate_model_name(model)

    def load(self, model: str, dtype: str, memory_mode: str, attention: str, model_path: str | None = None,
             compile: str = "auto", compute: str = "auto") -> tuple[PipeHandle]:
        install_comfy_hooks()
        handle = PipeHandle(str(resolve_model(model, model_path)), dtype, memory_mode, attention, compile, compute)
        generator_for(handle)  # validates the folder and builds the tokenizer now; no weights yet
        return (handle,)
