"""Which component, architecture and storage format a single file holds, from its header alone.

A .safetensors header (a few hundred KB at most) or a GGUF tensor table names every tensor with its shape and
dtype, so a 20 GB file is identified in milliseconds and a file of another model (Flux, SD3, Wan...) is
refused by name before a single weight is read. Pickle files (.ckpt/.pt/.bin/.pth) are never opened: they can
run code when loaded.

API: ``inspect_file(path) -> FileInfo`` (raises ``ModelFolderError`` naming the file for anything this pack
cannot load), ``foreign_model(keys) -> str | None``.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from pathlib import Path

from qwen_core.errors import ModelFolderError
from qwen_core.integrity import PICKLE_SUFFIXES, read_safetensors_header
from qwen_core.sources.types import FP8_KEPT_IN, Component, FileInfo, WeightFormat

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
GGUF_SUFFIX = ".gguf"
# Key prefixes of whole-checkpoint layouts, stripped before anything else (ComfyUI saves its model under
# model.diffusion_model., its text encoders under <name>.transformer.).
PREFIXES = ("model.diffusion_model.", "text_encoders.qwen25_7b.transformer.", "qwen25_7b.transformer.",
            "first_stage_model.", "vae.")  # fmt: skip

# architecture -> keys that must all be present (after the prefix), per component.
TRANSFORMER_MARKERS = {
    "QwenImage21Transformer2DModel": ("txt_in.text_norm.weight",),
    "QwenImageTransformer2DModel": ("txt_norm.weight", "img_in.weight", "transformer_blocks.0.img_mod.1.weight"),
}
TEXT_ENCODER_MARKERS = {
    "Qwen2_5_VLForConditionalGeneration": ("model.embed_tokens.weight", "model.layers.0.self_attn.k_proj.bias"),
}
# Qwen-Image's VAE in ComfyUI's (Wan 2.1) layout and in diffusers' layout.
VAE_MARKERS = {
    "AutoencoderKLQwenImage:comfy": ("decoder.middle.0.residual.0.gamma", "encoder.conv1.weight", "conv2.weight"),
    "AutoencoderKLQwenImage": ("decoder.mid_block.resnets.0.norm1.gamma", "post_quant_conv.weight"),
}
# Other models people keep in the same folders: refused by name. The Qwen markers are checked first and are
# specific (txt_norm + img_mod): Flux's diffusers layout, say, shares transformer_blocks.0.attn.norm_added_k.
FOREIGN_MARKERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Flux", ("double_blocks.0.img_attn.proj.weight",)),
    ("Flux (diffusers layout)", ("single_transformer_blocks.0.attn.to_q.weight",)),
    ("Stable Diffusion 3", ("joint_blocks.0.x_block.attn.qkv.weight",)),
    ("Stable Diffusion 3 (diffusers layout)", ("transformer_blocks.0.attn.add_q_proj.weight", "pos_embed.proj.weight")),
    ("Wan", ("head.modulation",)),
    ("Wan (diffusers layout)", ("condition_embedder.text_embedder.linear_1.weight",)),
    ("HunyuanVideo", ("txt_in.individual_token_refiner.blocks.0.norm1.weight",)),
    ("AuraFlow", ("double_layers.0.attn.w1q.weight",)),
    ("Lumina 2", ("cap_embedder.1.weight",)),
    ("HiDream", ("caption_projection.0.linear.weight",)),
    ("LTX-Video", ("adaln_single.emb.timestep_embedder.linear_1.weight",)),
    ("Cosmos", ("blocks.0.mlp.layer1.weight",)),
    ("Chroma", ("distilled_guidance_layer.in_proj.weight",)),
    ("Stable Diffusion 1.x/2.x/XL (UNet)", ("input_blocks.0.0.weight",)),
    ("Stable Diffusion (diffusers UNet)", ("conv_in.weight", "down_blocks.0.resnets.0.conv1.weight")),
    ("T5 text encoder", ("encoder.block.0.layer.0.SelfAttention.k.weight",)),
    ("CLIP text encoder", ("text_model.encoder.layers.0.mlp.fc1.weight",)),
    ("Gemma text encoder", ("model.layers.0.post_feedforward_layernorm.weight",)),
    ("Qwen3-family text encoder (Qwen-Image 2.1's is one: its single files are not supported yet)",
     ("model.layers.0.self_attn.q_norm.weight",)),
    ("Flux/SD VAE", ("decoder.mid.block_1.norm1.weight",)),
    ("diffusers AutoencoderKL (SD/Flux VAE)", ("decoder.mid_block.resnets.0.norm1.weight",)),
)
_FP8_DTYPES = {"F8_E4M3", "F8_E5M2"}
_SCALE_SUFFIXES = (".scale_weight", ".weight_scale", ".scale_input", ".input_scale", ".comfy_quant")
_NOT_A_MODEL_FIX = ("Put Qwen-Image files there: the diffusion model from Comfy-Org/Qwen-Image_ComfyUI "
                    "(split_files/diffusion_models) or a Qwen-Image GGUF, its text encoder and VAE.")  # fmt: skip


def strip_prefix(keys: Iterable[str]) -> tuple[str, list[str]]:
    """The whole-checkpoint prefix these keys share (or "") and the keys without it. Keys outside the prefix
    (another component bundled in the same file) are dropped."""
    keys = list(keys)
    for prefix in PREFIXES:
        inside = [k[len(prefix):] for k in keys if k.startswith(prefix)]
        if inside and len(inside) * 2 >= len(keys):
            return prefix, inside
    return "", keys


def foreign_model(keys: Iterable[str]) -> str | None:
    """The name of the non-Qwen model these tensor names belong to, or None."""
    present = set(keys)
    for name, markers in FOREIGN_MARKERS:
        if all(m in present for m in markers):
            return name
    return None


def _match(keys: set[str], table: dict[str, tuple[str, ...]]) -> str | None:
    return next((arch for arch, markers in table.items() if all(m in keys for m in markers)), None)


def classify(path: Path, keys: Iterable[str]) -> tuple[Component, str]:
    """(component, architecture) of a file from its (prefix-stripped) tensor names; refuses other models."""
    present = set(keys)
    for component, table in ((Component.TRANSFORMER, TRANSFORMER_MARKERS),
                             (Component.TEXT_ENCODER, TEXT_ENCODER_MARKERS), (Component.VAE, VAE_MARKERS)):
        arch = _match(present, table)
        if arch is not None:
            return component, arch
    foreign = foreign_model(present)
    if foreign is not None:
        raise ModelFolderError(f"{path}: is a {foreign} file, not a Qwen-Image one (recognised by its tensor "
                               "names; no weight was read).", fix=_NOT_A_MODEL_FIX)
    sample = ", ".join(sorted(present)[:3])
    raise ModelFolderError(f"{path}: is not a Qwen-Image diffusion model, text encoder or VAE that this pack "
                           f"knows (its tensors start {sample}...).", fix=_NOT_A_MODEL_FIX)


def inspect_file(path: str | Path) -> FileInfo:
    """Identify a single file from its header; ``ModelFolderError`` naming the file for anything unloadable."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise ModelFolderError(f"{path}: is a pickle file; unpickling can run arbitrary code, so this pack only "
                               "loads .safetensors and .gguf.", fix="Use the .safetensors (or .gguf) version of the file.")
    if not path.is_file():
        raise ModelFolderError(f"{path}: no such file.", fix="Pick a file that exists in the model folders.")
    if suffix == GGUF_SUFFIX:
        from qwen_core.sources.gguf_files import gguf_file_info, gguf_tensor_table

        tensors = gguf_tensor_table(path)
        prefix, keys = strip_prefix(tensors)
        component, arch = classify(path, keys)
        return gguf_file_info(path, tensors, component, arch.split(":")[0], prefix)
    if suffix not in SAFETENSORS_SUFFIXES:
        raise ModelFolderError(f"{path}: is neither a .safetensors nor a .gguf file.",
                               fix="Use the .safetensors or .gguf version of the model.")
    return _inspect_safetensors(path)


def read_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` entry of a safetensors header ({} when absent); the header was checked already."""
    with path.open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def _inspect_safetensors(path: Path) -> FileInfo:
    header = read_safetensors_header(path)  # size, offsets and truncation checked here
    prefix, keys = strip_prefix(header.tensors)
    component, arch = classify(path, keys)
    metas = {k[len(prefix):]: v for k, v in header.tensors.items() if k.startswith(prefix)}
    scaled = any(k.endswith(_SCALE_SUFFIXES) or k == "scaled_fp8" for k in metas)
    scaled = scaled or "_quantization_metadata" in read_metadata(path)
    fp8_dtypes = sorted({str(m["dtype"]) for m in metas.values() if m.get("dtype") in _FP8_DTYPES})
    if scaled:
        fmt = WeightFormat.FP8_SCALED
    elif fp8_dtypes:
        fmt = WeightFormat.FP8
    else:
        fmt = WeightFormat.DENSE
    weights = {k: m for k, m in metas.items() if not k.endswith(_SCALE_SUFFIXES) and k != "scaled_fp8"}
    quantized = sum(math.prod(m["shape"]) for k, m in weights.items()
                    if m.get("dtype") in _FP8_DTYPES | {"U8"} and len(m["shape"]) == 2 and FP8_KEPT_IN.search(k))
    return FileInfo(
        path=path, component=component, architecture=arch.split(":")[0], weight_format=fmt, prefix=prefix,
        num_params=sum(math.prod(m["shape"]) for m in weights.values()), stored_bytes=header.data_bytes,
        quantized_params=quantized, quant_types=tuple(fp8_dtypes),
        notes=("comfy layout",) if arch.endswith(":comfy") else (),
    )
