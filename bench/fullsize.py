"""Full-size Qwen-Image components with random weights, for speed and memory measurements.

No weights are downloaded: each model is built on the meta device (``accelerate.init_empty_weights``),
materialised with ``to_empty`` on the target device and filled in place with small random values (never
zeros: zeros hide unwritten memory and can run faster than real data). Weights do not change FLOPs, bytes
or memory, so timings and peaks measured on these models are those of the real checkpoint.

Configs are those of the ``Qwen/Qwen-Image`` repo: the 60-layer MMDiT transformer (20.43 B params, 38 GiB
in bf16), the Qwen2.5-VL-7B text encoder and the Wan-2.1-style VAE. ``overrides`` shrink any of them for
CPU dry runs and tests (same code path, fewer layers).

API: ``build_transformer``, ``build_text_encoder``, ``build_vae``, ``build_pipeline`` and
``count_params`` (exact parameter count on the meta device, no memory).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

# Qwen/Qwen-Image transformer/config.json.
TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "guidance_embeds": False,
    "axes_dims_rope": (16, 56, 56),
}

# Qwen/Qwen2.5-VL-7B-Instruct config.json (the Qwen-Image text_encoder), split into text and vision parts.
TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "rope_type": "default", "mrope_section": [16, 24, 24]},
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "tie_word_embeddings": False,
}
VISION_CONFIG: dict[str, Any] = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "in_channels": 3,
    "out_hidden_size": 3584,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "hidden_act": "silu",
    "tokens_per_second": 2,
}

# Qwen/Qwen-Image vae/config.json (equal to AutoencoderKLQwenImage's defaults in diffusers 0.42).
VAE_CONFIG: dict[str, Any] = {
    "base_dim": 96,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "dropout": 0.0,
}

# Qwen/Qwen-Image scheduler/scheduler_config.json.
SCHEDULER_CONFIG: dict[str, Any] = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
    "use_dynamic_shifting": True,
}

# Scaled-down overrides for CPU dry runs (`--tiny`) and tests: same builders, a few MB.
TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    "transformer": {"num_layers": 3, "attention_head_dim": 16, "num_attention_heads": 2,
                    "joint_attention_dim": 32, "axes_dims_rope": (4, 6, 6)},
    "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "num_key_value_heads": 1, "vocab_size": 1024, "bos_token_id": None, "eos_token_id": None,
             "rope_scaling": {"type": "mrope", "rope_type": "default", "mrope_section": [2, 3, 3]}},
    "vision": {"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 32,
               "fullatt_block_indexes": [0]},
    "vae": {"base_dim": 16, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1},
}


def _merged(base: Mapping[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    out.update(overrides or {})
    return out


@torch.no_grad()
def fill_random_(module: nn.Module, *, seed: int = 0, std: float = 0.02) -> nn.Module:
    """Fill every parameter in place: matrices ~N(0, std), norm scales ~1, biases small but non-zero.

    Generated on the parameter's own device, so a 38 GiB model fills in seconds on a GPU. Norm scales near
    one and small matrices keep activations finite through 60 layers in bf16, which the equivalence checks
    need (NaN would compare unequal to everything).
    """
    gen_by_device: dict[torch.device, torch.Generator] = {}
    for name, param in module.named_parameters():
        dev = param.device
        if dev not in gen_by_device:
            gen_by_device[dev] = torch.Generator(device=dev).manual_seed(seed)
        gen = gen_by_device[dev]
        if param.ndim >= 2:
            param.normal_(0.0, std, generator=gen)
        elif "norm" in name and name.endswith("weight"):
            param.normal_(1.0, 0.01, generator=gen)
        else:
            param.normal_(0.0, 0.01, generator=gen)
    return module


def _materialise(build: Any, device: str | torch.device, dtype: torch.dtype, seed: int, *,
                 keep_buffer_dtype: bool = False) -> nn.Module:
    """Build on meta, allocate on ``device`` in ``dtype`` (uninitialised), restore real buffers, fill random.

    The cast happens on meta (free), so a 20 B-param model never exists in fp32 on the device (76 GiB).
    ``keep_buffer_dtype``: transformers models keep fp32 rotary buffers when loaded in bf16; diffusers casts.
    """
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = build()
    # Buffers (e.g. rotary inv_freq) were built for real on the CPU; to_empty would leave them garbage.
    saved = {name: buf.clone() for name, buf in model.named_buffers() if buf.device.type != "meta"}
    # nn.Module.to, not ModelMixin.to: the latter warns about fp32-kept modules these models do not have.
    model = nn.Module.to(model, dtype=dtype)
    model = model.to_empty(device=device)
    for name, buf in saved.items():
        module_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(module_name) if module_name else model
        cast = buf.is_floating_point() and not keep_buffer_dtype
        owner._buffers[attr] = buf.to(device=device, dtype=dtype if cast else buf.dtype)
    fill_random_(model, seed=seed)
    return model.eval().requires_grad_(False)


def transformer_config(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return _merged(TRANSFORMER_CONFIG, overrides)


def build_transformer(device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16, *,
                      overrides: Mapping[str, Any] | None = None, seed: int = 0) -> nn.Module:
    """The Qwen-Image ``QwenImageTransformer2DModel`` with random weights on ``device``."""
    from diffusers import QwenImageTransformer2DModel

    config = transformer_config(overrides)
    return _materialise(lambda: QwenImageTransformer2DModel(**config), device, dtype, seed)


def text_encoder_config(text_overrides: Mapping[str, Any] | None = None,
                        vision_overrides: Mapping[str, Any] | None = None) -> Any:
    """A ``Qwen2_5_VLConfig`` of Qwen2.5-VL-7B (the Qwen-Image text encoder)."""
    from transformers import Qwen2_5_VLConfig

    text = _merged(TEXT_CONFIG, text_overrides)
    vision = _merged(VISION_CONFIG, vision_overrides)
    vision["out_hidden_size"] = text["hidden_size"]
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        hidden_size=text["hidden_size"],
        vocab_size=text["vocab_size"],
        bos_token_id=text["bos_token_id"],
        eos_token_id=text["eos_token_id"],
        tie_word_embeddings=False,
    )


def build_text_encoder(device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16, *,
                       text_overrides: Mapping[str, Any] | None = None,
                       vision_overrides: Mapping[str, Any] | None = None, seed: int = 0) -> nn.Module:
    """``Qwen2_5_VLForConditionalGeneration`` of the 7B config with random weights on ``device``."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = text_encoder_config(text_overrides, vision_overrides)
    return _materialise(lambda: Qwen2_5_VLForConditionalGeneration(config), device, dtype, seed + 1,
                        keep_buffer_dtype=True)


def build_vae(device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16, *,
              overrides: Mapping[str, Any] | None = None, seed: int = 0) -> nn.Module:
    """``AutoencoderKLQwenImage`` of the real config with random weights on ``device``."""
    from diffusers import AutoencoderKLQwenImage

    config = _merged(VAE_CONFIG, overrides)
    return _materialise(lambda: AutoencoderKLQwenImage(**config), device, dtype, seed + 2)


def build_scheduler() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)


def build_pipeline(device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16, *,
                   tiny: bool = False, text_encoder_device: str | torch.device | None = None,
                   tokenizer: Any = None, seed: int = 0) -> Any:
    """A real ``QwenImagePipeline`` from random full-size components (``tiny=True``: scaled down).

    ``tokenizer`` defaults to the offline BPE tokenizer of ``qwen_core.tiny`` (ids < 1000 are valid for any
    vocab here); the number of prompt tokens, not their identity, sets the cost.
    """
    from diffusers import QwenImagePipeline

    from qwen_core.tiny import build_tokenizer

    o = TINY_OVERRIDES if tiny else {}
    te_device = device if text_encoder_device is None else text_encoder_device
    return QwenImagePipeline(
        transformer=build_transformer(device, dtype, overrides=o.get("transformer"), seed=seed),
        vae=build_vae(device, dtype, overrides=o.get("vae"), seed=seed),
        text_encoder=build_text_encoder(te_device, dtype, text_overrides=o.get("text"),
                                        vision_overrides=o.get("vision"), seed=seed),
        tokenizer=tokenizer if tokenizer is not None else build_tokenizer(),
        scheduler=build_scheduler(),
    )


def count_params(kind: str, overrides: Mapping[str, Any] | None = None) -> int:
    """Exact parameter count of a component, built on the meta device (no memory, ~1 s)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        if kind == "transformer":
            from diffusers import QwenImageTransformer2DModel

            model = QwenImageTransformer2DModel(**transformer_config(overrides))
        elif kind == "text_encoder":
            from transformers import Qwen2_5_VLForConditionalGeneration

            model = Qwen2_5_VLForConditionalGeneration(text_encoder_config(overrides))
        elif kind == "vae":
            from diffusers import AutoencoderKLQwenImage

            model = AutoencoderKLQwenImage(**_merged(VAE_CONFIG, overrides))
        else:
            raise ValueError(f"`kind` must be transformer, text_encoder or vae, got {kind!r}")
    return sum(p.numel() for p in model.parameters())
