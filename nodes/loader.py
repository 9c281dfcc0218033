"""Loader node: a light QWEN_PIPE handle; the folder is checked now, weights load on the first Generate."""

from __future__ import annotations

from typing import Any

from qwen_core.placement.spec import PRESETS, SINGLE

from .common import (
    ATTENTIONS,
    AUTO,
    COMFY_PREFIX,
    COMPILES,
    COMPUTES,
    CUSTOM,
    DTYPES,
    MEMORY_MODES,
    QWEN_PIPE,
    PipeHandle,
    check_devices,
    configs_choices,
    file_choices,
    generator_for,
    install_comfy_hooks,
    model_choices,
    resolve_model,
    resolve_single_files,
    validate_devices,
    validate_model_name,
)

DEVICES_TOOLTIP = (
    "Which card runs which part, inside this one ComfyUI process. single: everything on ComfyUI's GPU. auto: "
    "decided from each card's free VRAM (one card when the model fits; else the text encoder on another card; "
    "else the transformer's blocks split across the cards). text_encoder=cuda:1 frees ~15 GB on the main card; "
    "text_encoder=cpu runs the prompt encoding on the CPU (slow, ~1 min per prompt); transformer=cuda:0,cuda:1 "
    "splits the blocks (fits a model, not faster). custom: the custom_devices text. Several GPUs making ONE image "
    "faster needs one process per GPU, which ComfyUI is not: use `python -m qwen_core generate --context-parallel "
    "N` (README 'Several GPUs')."
)

class QwenImageLoader:
    DESCRIPTION = ("Selects a Qwen-Image diffusers folder from ComfyUI's models/diffusers, or a model assembled from "
                   "ComfyUI's own files ('comfy: ' entries: models/diffusion_models + text_encoders + vae, fp8 and "
                   "GGUF included), and how to run it. The files are checked and the tokenizer built now; the "
                   "weights load on the first Generate, after ComfyUI has been asked to free memory for them.")
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
                "text_encoder": (file_choices("text_encoders"), {"default": AUTO, "tooltip": "For 'comfy: ' models: the text encoder file in models/text_encoders. auto: Qwen2.5-VL, fp8 beside an fp8 model."}),
                "vae": (file_choices("vae"), {"default": AUTO, "tooltip": "For 'comfy: ' models: the VAE file in models/vae. auto: qwen_image_vae."}),
                "configs": (configs_choices(), {"default": AUTO, "tooltip": "For 'comfy: ' models: the folder in models/diffusers with the family's configs and tokenizer (a configs-only download of a few MB is enough). auto: the matching one."}),
                "model_path": ("STRING", {"forceInput": True, "tooltip": "Overrides model: a folder inside the model folders (e.g. from the Downloader). With a 'comfy: ' model it names the configs folder instead."}),
                "compile": (COMPILES, {"default": "auto", "tooltip": "torch.compile of the transformer blocks. auto: on for NVIDIA GPUs (QWEN_COMPILE=0 turns it off). The first image on a machine waits for the compile (~15-60 s); later runs load it from the compile cache."}),
                "compute": (COMPUTES, {"default": "auto", "tooltip": "auto/exact: the model dtype (bf16). fp8: fp8 matrix products on sm_89+ GPUs (RTX 40xx, H100): faster, ~9% relative deviation from bf16 (README 'fp8 compute'). Not with memory_mode streamed."}),
                "devices": ([*PRESETS, CUSTOM], {"default": SINGLE, "tooltip": DEVICES_TOOLTIP}),
                "custom_devices": ("STRING", {"default": "", "tooltip": "With devices = custom: pairs like 'te=cuda:1' or 'transformer=cuda:0,cuda:2 text_encoder=cuda:1' (text_encoder/te: one device, cuda:N or cpu; transformer/dit: one or several CUDA devices, the first is the main card with the VAE). Memory modes with several devices: gpu or streamed (auto picks)."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, model: str = AUTO, text_encoder: str = AUTO, vae: str = AUTO, configs: str = AUTO,
                        devices: str = SINGLE, custom_devices: str = "") -> bool | str:
        # Names not in the lists are accepted (a Downloader may fetch them in the same run); they must still be
        # plain relative names, and loading reports a missing file naming the input.
        for value in (model.removeprefix(COMFY_PREFIX), text_encoder, vae, configs):
            verdict = validate_model_name(value)
            if verdict is not True:
                return verdict
        return validate_devices(devices, custom_devices)

    def load(self, model: str, dtype: str, memory_mode: str, attention: str, text_encoder: str = AUTO,
             vae: str = AUTO, configs: str = AUTO, model_path: str | None = None, compile: str = "auto",
             compute: str = "auto", devices: str = SINGLE, custom_devices: str = "") -> tuple[PipeHandle]:
        install_comfy_hooks()
        speed = {"compile": compile, "compute": compute, "devices": check_devices(devices, custom_devices)}
        if model.startswith(COMFY_PREFIX):
            path, te, vae_file, configs_dir = resolve_single_files(model, text_encoder, vae, configs, model_path)
            handle = PipeHandle(str(path), dtype, memory_mode, attention, text_encoder=te, vae=vae_file,
                                configs=configs_dir, **speed)
        else:
            handle = PipeHandle(str(resolve_model(model, model_path)), dtype, memory_mode, attention, **speed)
        generator_for(handle)  # validates the folder or files and builds the tokenizer now; no weights yet
        return (handle,)
