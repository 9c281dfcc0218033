"""Tiny random components of every family, from configs, on the CPU (used by ``qwen_core.tiny``).

Sizes follow diffusers' own fast tests (``tests/pipelines/qwenimage/test_qwenimage*.py``,
``tests/pipelines/qwenimage21/test_qwenimage21.py``); the real classes are used throughout, so a tiny folder
loads and runs through exactly the code a real checkpoint does. Where a family differs from plain Qwen-Image
only by a config flag, the tiny model sets that flag as the real checkpoint does:

- Edit-2511: ``zero_cond_t=True`` in the transformer (2509: False);
- Layered: ``use_additional_t_cond`` and ``use_layer3d_rope`` in the transformer, an RGBA VAE
  (``input_channels=4``);
- 2.1 Turbo: a short ``sample_sigmas`` grid in model_index.json (the pipeline then runs that many steps) and a
  scheduler without dynamic shifting.

The processors are transformers' own (``Qwen2VLProcessor``, ``Qwen3VLProcessor``: both need torchvision in
transformers 5) around the offline BPE tokenizer of ``qwen_core.tiny``. Qwen2.5-VL's image processor keeps the
real checkpoint's pixel limits; 2.1's vision tower must give one vision token per 2x2 latent group of a
condition image (patch 16, merge 2), so its limits cover the 1024x1024 condition images the pipeline makes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from qwen_core.families import FAMILIES, ModelFamily

# Sampling grid of the tiny Turbo (illustrative: 8 decreasing sigmas, the length of the real Turbo's grid).
TURBO_SAMPLE_SIGMAS = [1.0, 0.94, 0.87, 0.78, 0.66, 0.52, 0.36, 0.19]
# A Qwen-style chat template: Qwen-Image 2.1 counts the tokens of a rendered system message to know how many
# leading tokens to drop from the text encoder's output.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% else %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch for one component's init without disturbing the caller's RNG stream."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _token_ids(tokenizer: Any) -> dict[str, int]:
    names = ("vision_start", "vision_end", "image_pad", "video_pad", "vision_pad")
    return {name: tokenizer.convert_tokens_to_ids(f"<|{name}|>") for name in names}


def qwen25_text_encoder(seed: int, tokenizer: Any) -> Any:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = _token_ids(tokenizer)
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "rope_theta": 1000000.0,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None,
        },
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16,
        # diffusers' test size; the rows past our ~600 tokens stay unused but keep the encoder ~19 MB, which
        # makes a leaked copy visible in the memory tests.
        vocab_size=152064,
        # Our tokenizer's ids, not Qwen's (151652...), so the edit pipelines find the image tokens.
        vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
        image_token_id=ids["image_pad"], video_token_id=ids["video_pad"], vision_token_id=ids["vision_pad"],
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    with seeded(seed):
        return Qwen2_5_VLForConditionalGeneration(config).eval()


def qwen_image_transformer(seed: int, z_dim: int = 4, **flags: Any) -> Any:
    from diffusers import QwenImageTransformer2DModel

    with seeded(seed):
        return QwenImageTransformer2DModel(
            patch_size=2, in_channels=4 * z_dim, out_channels=z_dim, num_layers=2, attention_head_dim=16,
            num_attention_heads=3, joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4), **flags,
        )  # fmt: skip


def qwen_image_vae(seed: int, input_channels: int = 3, *, compact: bool = False, z_dim: int = 4) -> Any:
    """diffusers' test VAE (2 downsamples), or with ``compact`` a 4-downsample, 8-channel one.

    The edit and layered pipelines resize every reference to ~1 MP whatever the output size, and the test VAE
    encodes 1 MP in ~45 s on one CPU thread (its mid-block attention runs over (1024/4)^2 positions); the compact
    one takes ~2 s. Its 16x latents make those tiny pipelines round sizes to multiples of 32.
    """
    from diffusers import AutoencoderKLQwenImage

    shape = (dict(base_dim=8, dim_mult=[1, 1, 1, 1, 1], temperal_downsample=[False, True, True, True]) if compact
             else dict(base_dim=24, dim_mult=[1, 2, 4], temperal_downsample=[False, True]))  # fmt: skip
    with seeded(seed):
        return AutoencoderKLQwenImage(
            z_dim=z_dim, num_res_blocks=1, latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim,
            input_channels=input_channels,
            **shape,
        )  # fmt: skip


def qwen2vl_processor(tokenizer: Any) -> Any:
    """Qwen2VLProcessor with Qwen-Image-Edit's image limits (min 56x56, max 12.8 MP; patch 14, merge 2)."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12845056)
    return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                            video_processor=Qwen2VLVideoProcessor())  # fmt: skip


def _qwen_image(seed: int, tokenizer: Any, family: ModelFamily) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler

    flags: dict[str, Any] = {}
    z_dim = 4
    if family.key == "qwen-image-edit-2511":
        flags["zero_cond_t"] = True
    if family.resolution_buckets:  # Layered
        flags.update(use_additional_t_cond=True, use_layer3d_rope=True)
        # Not 4: the pipeline takes a 4-channel (RGBA) input with as many channels as latents for ready latents.
        z_dim = 8
    components = {
        "transformer": qwen_image_transformer(seed, z_dim, **flags),
        "vae": qwen_image_vae(seed, family.output_channels, compact=family.takes_images, z_dim=z_dim),
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "text_encoder": qwen25_text_encoder(seed, tokenizer),
        "tokenizer": tokenizer,
    }
    if "processor" in family.components:
        components["processor"] = qwen2vl_processor(tokenizer)
    return components


def _qwen_image_21(seed: int, tokenizer: Any, family: ModelFamily) -> dict[str, Any]:
    from diffusers import (
        AutoencoderKLQwenImage21,
        FlowMatchEulerDiscreteScheduler,
        QwenImage21Transformer2DModel,
    )

    z_dim = 8  # not 4: 2.1's pipeline would take a 4-channel (RGBA) condition image for ready latents
    with seeded(seed):
        transformer = QwenImage21Transformer2DModel(
            patch_size=1, in_channels=z_dim, out_channels=z_dim, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, context_in_dim=16, mlp_ratio=2, axes_dims_rope=(4, 6, 6),
        )  # fmt: skip
    with seeded(seed + 1):
        # Five dim_mult stages: four downsamples, the 16x compression the pipeline assumes.
        vae = AutoencoderKLQwenImage21(
            base_dim=4, decoder_base_dim=4, z_dim=z_dim, dim_mult=[1, 1, 1, 1, 1], num_res_blocks=1, attn_scales=[],
            temperal_downsample=[False, True, True, True], latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim,
        )  # fmt: skip
    turbo = family.guidance_distilled
    scheduler = (FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=False, shift_terminal=None) if turbo
                 else FlowMatchEulerDiscreteScheduler())  # fmt: skip
    components = {
        "transformer": transformer, "vae": vae, "scheduler": scheduler,
        "text_encoder": qwen3vl_text_encoder(seed, tokenizer), "processor": qwen3vl_processor(tokenizer),
    }  # fmt: skip
    if turbo:
        components["sample_sigmas"] = list(TURBO_SAMPLE_SIGMAS)
    return components


def qwen3vl_text_encoder(seed: int, tokenizer: Any) -> Any:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    ids = _token_ids(tokenizer)
    config = Qwen3VLConfig(
        text_config={
            "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 1024,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [1, 1, 2]},
        },
        vision_config={
            "depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16,
            # One merged vision token per 32x32 px: the 2x2 group of 16x latents each vision slot stands for.
            "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0],
        },
        image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
        vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
    )  # fmt: skip
    with seeded(seed + 2):
        return Qwen3VLForConditionalGeneration(config).eval()


def qwen3vl_processor(tokenizer: Any) -> Any:
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2,
                                            min_pixels=32 * 32, max_pixels=2048 * 2048)  # fmt: skip
    video_processor = Qwen3VLVideoProcessor(patch_size=16, merge_size=2, temporal_patch_size=2)
    return Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                            chat_template=CHAT_TEMPLATE)  # fmt: skip


_BUILDERS: dict[str, Callable[[int, Any, ModelFamily], dict[str, Any]]] = {
    key: (_qwen_image_21 if family.pipeline_class == "QwenImage21Pipeline" else _qwen_image)
    for key, family in FAMILIES.items()
}


def family_components(family: ModelFamily, seed: int, tokenizer: Any) -> dict[str, Any]:
    """The pipeline's constructor arguments for a tiny ``family`` model (components + pipeline config)."""
    return _BUILDERS[family.key](seed, tokenizer, family)
