"""Key names of ComfyUI's single files mapped to the diffusers / transformers modules (and back, for tests).

- Transformer: ComfyUI's ``comfy/ldm/qwen_image/model.py`` uses diffusers' own names
  (``transformer_blocks.N.attn.to_q``...), so only a whole-checkpoint prefix is stripped (``detect``).
- Text encoder: ComfyUI's Qwen2.5-VL (``comfy/text_encoders/llama.py`` ``Qwen25_7BVLI``) keeps the layout of
  the original Qwen2.5-VL checkpoint: ``model.layers.N...`` for the language model, ``visual.blocks.N...`` for
  the vision tower, no ``lm_head`` (ComfyUI never computes logits). transformers 5 nests both under
  ``model.``: ``model.language_model.layers.N...`` and ``model.visual.blocks.N...``.
- VAE: ComfyUI loads ``qwen_image_vae.safetensors`` as its Wan 2.1 VAE (``comfy/ldm/wan/vae.py``): flat
  ``downsamples.N`` / ``upsamples.N`` lists of residual blocks (``residual.0`` norm, ``.2`` conv, ``.3`` norm,
  ``.6`` conv) and resamples, ``middle.0-2``, ``head.0/2``, ``conv1``/``conv2`` around the latent. diffusers'
  ``AutoencoderKLQwenImage`` groups the decoder list into ``up_blocks[i].resnets[j]`` + ``upsamplers.0``.
  diffusers' own ``convert_wan_vae_to_diffusers`` hard-codes the 2.1 VAE's block counts; this mapping derives
  the grouping from ``num_res_blocks``, so the tiny test VAE maps too (tests check both agree on the real one).
"""

from __future__ import annotations

import re

# ---- text encoder ---------------------------------------------------------------------------------------


def text_encoder_key(key: str) -> str:
    """A ComfyUI / original-checkpoint Qwen2.5-VL key -> the transformers 5 module key."""
    if key.startswith("model.") and not key.startswith(("model.language_model.", "model.visual.")):
        return "model.language_model." + key[len("model."):]
    if key.startswith("visual."):
        return "model." + key
    return key  # lm_head.weight and keys already in the new layout


def text_encoder_file_key(module_key: str) -> str:
    """The inverse of ``text_encoder_key`` (the layout ComfyUI's files use)."""
    if module_key.startswith("model.language_model."):
        return "model." + module_key[len("model.language_model."):]
    if module_key.startswith("model.visual."):
        return module_key[len("model."):]
    return module_key


# ---- VAE ------------------------------------------------------------------------------------------------
_RESIDUAL_TO_DIFFUSERS = {"residual.0.gamma": "norm1.gamma", "residual.2.weight": "conv1.weight",
                          "residual.2.bias": "conv1.bias", "residual.3.gamma": "norm2.gamma",
                          "residual.6.weight": "conv2.weight", "residual.6.bias": "conv2.bias",
                          "shortcut.weight": "conv_shortcut.weight", "shortcut.bias": "conv_shortcut.bias"}  # fmt: skip
_RESIDUAL_TO_COMFY = {v: k for k, v in _RESIDUAL_TO_DIFFUSERS.items()}
_TOP_TO_DIFFUSERS = {"conv1.weight": "quant_conv.weight", "conv1.bias": "quant_conv.bias",
                     "conv2.weight": "post_quant_conv.weight", "conv2.bias": "post_quant_conv.bias"}  # fmt: skip
_TOP_TO_COMFY = {v: k for k, v in _TOP_TO_DIFFUSERS.items()}
_HEAD_TO_DIFFUSERS = {"head.0.gamma": "norm_out.gamma", "head.2.weight": "conv_out.weight",
                      "head.2.bias": "conv_out.bias", "conv1.weight": "conv_in.weight", "conv1.bias": "conv_in.bias"}  # fmt: skip
_HEAD_TO_COMFY = {v: k for k, v in _HEAD_TO_DIFFUSERS.items()}
_MIDDLE = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}
_MIDDLE_BACK = {v: k for k, v in _MIDDLE.items()}


def _residual(rest: str, table: dict[str, str]) -> str:
    return table.get(rest, rest)  # resample.1.* and time_conv.* keep their names


def vae_key(key: str, num_res_blocks: int) -> str:
    """A ComfyUI (Wan 2.1 layout) VAE key -> the ``AutoencoderKLQwenImage`` key."""
    if key in _TOP_TO_DIFFUSERS:
        return _TOP_TO_DIFFUSERS[key]
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        return key
    if rest in _HEAD_TO_DIFFUSERS:
        return f"{side}.{_HEAD_TO_DIFFUSERS[rest]}"
    m = re.match(r"middle\.(\d)\.(.+)$", rest)
    if m:
        inner = _MIDDLE[m.group(1)]
        tail = _residual(m.group(2), _RESIDUAL_TO_DIFFUSERS) if inner.startswith("resnets") else m.group(2)
        return f"{side}.mid_block.{inner}.{tail}"
    m = re.match(r"downsamples\.(\d+)\.(.+)$", rest)
    if m and side == "encoder":
        return f"encoder.down_blocks.{m.group(1)}.{_residual(m.group(2), _RESIDUAL_TO_DIFFUSERS)}"
    m = re.match(r"upsamples\.(\d+)\.(.+)$", rest)
    if m and side == "decoder":
        # Per level: num_res_blocks + 1 residual blocks, then one resample (none after the last level).
        level, pos = divmod(int(m.group(1)), num_res_blocks + 2)
        if pos <= num_res_blocks:
            return f"decoder.up_blocks.{level}.resnets.{pos}.{_residual(m.group(2), _RESIDUAL_TO_DIFFUSERS)}"
        return f"decoder.up_blocks.{level}.upsamplers.0.{m.group(2)}"
    return key


def vae_file_key(module_key: str, num_res_blocks: int) -> str:
    """The inverse of ``vae_key``: an ``AutoencoderKLQwenImage`` key -> ComfyUI's layout."""
    if module_key in _TOP_TO_COMFY:
        return _TOP_TO_COMFY[module_key]
    side, _, rest = module_key.partition(".")
    if rest in _HEAD_TO_COMFY:
        return f"{side}.{_HEAD_TO_COMFY[rest]}"
    m = re.match(r"mid_block\.(resnets\.\d|attentions\.0)\.(.+)$", rest)
    if m:
        tail = _residual(m.group(2), _RESIDUAL_TO_COMFY) if m.group(1).startswith("resnets") else m.group(2)
        return f"{side}.middle.{_MIDDLE_BACK[m.group(1)]}.{tail}"
    m = re.match(r"down_blocks\.(\d+)\.(.+)$", rest)
    if m:
        return f"encoder.downsamples.{m.group(1)}.{_residual(m.group(2), _RESIDUAL_TO_COMFY)}"
    m = re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", rest)
    if m:
        index = int(m.group(1)) * (num_res_blocks + 2) + int(m.group(2))
        return f"decoder.upsamples.{index}.{_residual(m.group(3), _RESIDUAL_TO_COMFY)}"
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)$", rest)
    if m:
        return f"decoder.upsamples.{int(m.group(1)) * (num_res_blocks + 2) + num_res_blocks + 1}.{m.group(2)}"
    return module_key
