"""Full-size pipelines of every Qwen-Image family with random weights (``fullsize`` builds the Qwen-Image parts).

Group "qwen-image": one 20.4 B MMDiT transformer, Qwen2.5-VL-7B (vision tower included) and the RGB VAE, shared
by the Qwen-Image, Edit, Edit-2509 and Edit-2511 pipelines (2511 = the same transformer with ``zero_cond_t``
switched on). Group "layered": the Layered transformer (``use_additional_t_cond``, ``use_layer3d_rope``) and the
RGBA VAE with the same text encoder. Group "2.1": the 7.1 B single-stream transformer, Qwen3-VL-8B and the RGBA
VAE of Qwen-Image 2.1, shared by 2.1 and 2.1 Turbo (the Turbo pipeline carries an 8-value ``sample_sigmas``).

The prompt is tokenised by the offline BPE tokenizer of ``qwen_core.tiny`` (the number of tokens, not their
identity, sets the cost): the text encoders get its vision-token ids. Where torchvision is missing (the GPU
machine's Python may lack it), the processors are built around transformers' PIL image processor
(``pil_processor``): same resizing and token counts, slower on the host.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import fullsize
import torch

from qwen_core.families import FAMILIES, ModelFamily
from qwen_core.tiny_families import CHAT_TEMPLATE, TURBO_SAMPLE_SIGMAS

GROUPS = {
    "qwen-image": ("qwen-image", "qwen-image-edit", "qwen-image-edit-2509", "qwen-image-edit-2511"),
    "layered": ("qwen-image-layered",),
    "2.1": ("qwen-image-2.1", "qwen-image-2.1-turbo"),
}
# Qwen/Qwen3-VL-8B-Instruct (the Qwen-Image 2.1 text encoder): 8.77 B params, 17.5 GB bf16.
QWEN3_TEXT: dict[str, Any] = {"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                              "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
                              "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0,
                                                  "mrope_section": [24, 20, 20], "mrope_interleaved": True}}  # fmt: skip
QWEN3_VISION: dict[str, Any] = {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16,
                                "out_hidden_size": 4096, "patch_size": 16, "spatial_merge_size": 2,
                                "temporal_patch_size": 2, "num_position_embeddings": 2304,
                                "deepstack_visual_indexes": [8, 16, 24]}  # fmt: skip
TINY_21 = {
    "transformer": {"num_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2, "context_in_dim": 32,
                    "mlp_ratio": 2, "axes_dims_rope": (4, 6, 6), "in_channels": 8, "out_channels": 8},
    "vae": {"base_dim": 4, "decoder_base_dim": 4, "z_dim": 8, "dim_mult": [1, 1, 1, 1, 1], "num_res_blocks": 1,
            "latents_mean": [0.0] * 8, "latents_std": [1.0] * 8},
    "text": {"hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 1024,
             "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]}},
    "vision": {"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 32,
               "num_position_embeddings": 64, "deepstack_visual_indexes": [0]},
}  # fmt: skip


def has_torchvision() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def _token_ids(tokenizer: Any) -> dict[str, int]:
    ids = {n: tokenizer.convert_tokens_to_ids(f"<|{n}|>") for n in ("vision_start", "vision_end", "image_pad", "video_pad")}
    return {"vision_start_token_id": ids["vision_start"], "vision_end_token_id": ids["vision_end"],
            "image_token_id": ids["image_pad"], "video_token_id": ids["video_pad"]}  # fmt: skip


def pil_processor(cls_name: str, tokenizer: Any, **image_kwargs: Any) -> Any:
    """``cls_name`` (Qwen2VLProcessor / Qwen3VLProcessor) around the PIL image processor, for a Python without
    torchvision: transformers' constructor would refuse it (it checks for a video processor class that needs
    torchvision), so the check is skipped. Bench only; the pack itself requires torchvision."""
    import transformers

    base = getattr(transformers, cls_name)
    lenient = type(f"Bench{cls_name}", (base,), {"check_argument_for_proper_class": lambda self, name, arg: type(arg)})
    image_processor = transformers.Qwen2VLImageProcessorPil(**image_kwargs)
    extra = {"chat_template": CHAT_TEMPLATE} if cls_name == "Qwen3VLProcessor" else {}
    return lenient(image_processor=image_processor, tokenizer=tokenizer, video_processor=None, **extra)


def qwen2vl_processor(tokenizer: Any) -> Any:
    limits = {"min_pixels": 3136, "max_pixels": 12845056}  # Qwen-Image-Edit's processor config
    if not has_torchvision():
        return pil_processor("Qwen2VLProcessor", tokenizer, **limits)
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**limits), tokenizer=tokenizer,
                            video_processor=Qwen2VLVideoProcessor())  # fmt: skip


def qwen3vl_processor(tokenizer: Any) -> Any:
    limits = {"patch_size": 16, "merge_size": 2, "temporal_patch_size": 2, "min_pixels": 32 * 32,
              "max_pixels": 4096 * 4096}  # fmt: skip
    if not has_torchvision():
        return pil_processor("Qwen3VLProcessor", tokenizer, **limits)
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    return Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(**limits), tokenizer=tokenizer,
                            video_processor=Qwen3VLVideoProcessor(patch_size=16, merge_size=2, temporal_patch_size=2),
                            chat_template=CHAT_TEMPLATE)  # fmt: skip


def qwen25_text_encoder(dev: Any, dtype: torch.dtype, tokenizer: Any, tiny: bool, seed: int = 0) -> Any:
    from transformers import Qwen2_5_VLForConditionalGeneration

    o = fullsize.TINY_OVERRIDES if tiny else {}
    config = fullsize.text_encoder_config(o.get("text"), o.get("vision"))
    for key, value in _token_ids(tokenizer).items():  # the edit pipelines find the image by these ids
        setattr(config, key, value)
    return fullsize._materialise(lambda: Qwen2_5_VLForConditionalGeneration(config), dev, dtype, seed + 1,
                                 keep_buffer_dtype=True)  # fmt: skip


def set_zero_cond_t(transformer: Any, on: bool) -> None:
    """Edit-2511's transformer is 2509's with ``zero_cond_t``: references modulated at timestep 0."""
    transformer.zero_cond_t = on
    for block in transformer.transformer_blocks:
        block.zero_cond_t = on
    transformer.register_to_config(zero_cond_t=on)


def match_variant(pipe: Any, family: ModelFamily) -> None:
    """The group shares one transformer: switch on what this family's variant changes (Edit-2511's
    ``zero_cond_t``), and off again for the others."""
    if hasattr(pipe.transformer, "zero_cond_t"):
        set_zero_cond_t(pipe.transformer, family.variant == "zero_cond_t=true")


def qwen_image_group(dev: Any, dtype: torch.dtype, tiny: bool, *, layered: bool = False) -> dict[str, Any]:
    """The pipelines of group "qwen-image" (or "layered"), sharing their components."""
    import diffusers

    from qwen_core.tiny import build_tokenizer

    o = fullsize.TINY_OVERRIDES if tiny else {}
    tokenizer = build_tokenizer()
    flags = {"use_additional_t_cond": True, "use_layer3d_rope": True} if layered else {}
    parts = {
        "transformer": fullsize.build_transformer(dev, dtype, overrides={**o.get("transformer", {}), **flags}),
        "vae": fullsize.build_vae(dev, dtype, overrides={**o.get("vae", {}), **({"input_channels": 4} if layered else {})}),
        "text_encoder": qwen25_text_encoder(dev, dtype, tokenizer, tiny),
        "tokenizer": tokenizer, "scheduler": fullsize.build_scheduler(),
    }  # fmt: skip
    keys = GROUPS["layered" if layered else "qwen-image"]
    pipes = {}
    for key in keys:
        family = FAMILIES[key]
        extra = {"processor": qwen2vl_processor(tokenizer)} if "processor" in family.components else {}
        pipes[key] = getattr(diffusers, family.pipeline_class)(**parts, **extra)
    return pipes


def qwen_image_21_group(dev: Any, dtype: torch.dtype, tiny: bool) -> dict[str, Any]:
    """2.1 and 2.1 Turbo pipelines over one set of full-size (or ``tiny``) 2.1 components."""
    from diffusers import (
        AutoencoderKLQwenImage21,
        FlowMatchEulerDiscreteScheduler,
        QwenImage21Pipeline,
        QwenImage21Transformer2DModel,
    )
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from qwen_core.tiny import build_tokenizer

    o = TINY_21 if tiny else {}
    tokenizer = build_tokenizer()
    text = {**QWEN3_TEXT, **o.get("text", {})}
    vision = {**QWEN3_VISION, **o.get("vision", {}), "out_hidden_size": text["hidden_size"]}
    config = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **_token_ids(tokenizer))
    t_cfg = {**o.get("transformer", {}), "context_in_dim": text["hidden_size"]}
    parts = {
        "transformer": fullsize._materialise(lambda: QwenImage21Transformer2DModel(**t_cfg), dev, dtype, 0),
        "vae": fullsize._materialise(lambda: AutoencoderKLQwenImage21(**o.get("vae", {})), dev, dtype, 2),
        "text_encoder": fullsize._materialise(lambda: Qwen3VLForConditionalGeneration(config), dev, dtype, 1,
                                              keep_buffer_dtype=True),
        "processor": qwen3vl_processor(tokenizer), "scheduler": FlowMatchEulerDiscreteScheduler(),
    }  # fmt: skip
    turbo = dict(parts, scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=False, shift_terminal=None))
    return {"qwen-image-2.1": QwenImage21Pipeline(**parts),
            "qwen-image-2.1-turbo": QwenImage21Pipeline(**turbo, sample_sigmas=list(TURBO_SAMPLE_SIGMAS))}


def build_group(group: str, dev: Any, dtype: torch.dtype, tiny: bool) -> dict[str, Any]:
    if group == "2.1":
        pipes = qwen_image_21_group(dev, dtype, tiny)
    else:
        pipes = qwen_image_group(dev, dtype, tiny, layered=group == "layered")
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


def family_of(key: str) -> ModelFamily:
    return FAMILIES[key]
