"""Tiny ComfyUI-style single files written at test time from the tiny diffusers model.

Each writer reads one component of the tiny folder and saves it the way ComfyUI's files store it: the
transformer with diffusers' names (optionally under ``model.diffusion_model.``), the text encoder in the
original Qwen2.5-VL layout without ``lm_head``, the VAE in the Wan 2.1 layout; weights dense, straight-cast
fp8, legacy scaled fp8 (``scale_weight`` + ``scaled_fp8``), mixed-precision fp8 (``weight_scale`` +
``comfy_quant``), or GGUF (Q8_0 / Q4_0 through the ``gguf`` package).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qwen_core.sources import comfy_keys

E4M3 = torch.float8_e4m3fn
FORMATS = ("fp32", "bf16", "fp8", "fp8-scaled", "comfy-quant")


def read_component(folder: Path, name: str) -> dict[str, torch.Tensor]:
    files = sorted((folder / name).glob("*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})  # noqa: SIM118 - not a dict
    return out


def _quantizable(key: str, tensor: torch.Tensor) -> bool:
    return key.endswith(".weight") and tensor.ndim == 2 and tensor.is_floating_point()


def encode(state: dict[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """``state`` stored as ``fmt`` (see FORMATS); 2-D weights are the quantised ones, as in ComfyUI's files."""
    if fmt in ("fp32", "bf16"):
        return {k: v.to(torch.float32 if fmt == "fp32" else torch.bfloat16) for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not _quantizable(key, value):
            out[key] = value.to(torch.bfloat16)
            continue
        layer = key[: -len(".weight")]
        if fmt == "fp8":
            out[key] = value.to(E4M3)
            continue
        scale = value.float().abs().amax().clamp(min=1e-12) / 448.0
        q = (value.float() / scale).to(E4M3)
        if fmt == "fp8-scaled":
            out[key], out[f"{layer}.scale_weight"] = q, scale.reshape(())
        else:  # comfy-quant: newer files store the payload as uint8 bytes beside a JSON format tag
            out[key], out[f"{layer}.weight_scale"] = q.view(torch.uint8), scale.reshape(())
            out[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()),
                                                       dtype=torch.uint8)
    if fmt == "fp8-scaled":
        out["scaled_fp8"] = torch.empty(0, dtype=E4M3)
    return out


def write_transformer(folder: Path, out: Path, fmt: str = "bf16", *, prefix: str = "") -> Path:
    state = encode(read_component(folder, "transformer"), fmt)
    save_file({prefix + k: v.contiguous() for k, v in state.items()}, str(out))
    return out


def write_text_encoder(folder: Path, out: Path, fmt: str = "fp8-scaled", *, lm_head: bool = False) -> Path:
    state = read_component(folder, "text_encoder")  # transformers 5 saves the original (ComfyUI) layout
    state = {comfy_keys.text_encoder_file_key(comfy_keys.text_encoder_key(k)): v for k, v in state.items()}
    if not lm_head:
        state.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in encode(state, fmt).items()}, str(out))
    return out


def write_vae(folder: Path, out: Path, fmt: str = "bf16", *, comfy_layout: bool = True) -> Path:
    blocks = json.loads((folder / "vae" / "config.json").read_text())["num_res_blocks"]
    state = read_component(folder, "vae")
    if comfy_layout:
        state = {comfy_keys.vae_file_key(k, blocks): v for k, v in state.items()}
    save_file({k: v.contiguous() for k, v in encode(state, fmt).items()}, str(out))
    return out


def write_gguf_transformer(folder: Path, out: Path, qtype: str = "Q8_0") -> Path:
    """As ComfyUI-GGUF's convert.py: 1-D and small tensors F32, 2-D weights quantised where the block fits."""
    import gguf
    import numpy as np

    wanted = gguf.GGMLQuantizationType[qtype]
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    writer = gguf.GGUFWriter(str(out), arch="qwen_image")
    for key, value in read_component(folder, "transformer").items():
        data = value.float().numpy()
        kind = wanted if data.ndim == 2 and data.shape[-1] % block == 0 else gguf.GGMLQuantizationType.F32
        writer.add_tensor(key, gguf.quants.quantize(data, kind) if kind is wanted else data.astype(np.float32),
                          raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def comfy_models_dir(root: Path, folder: Path, *, transformer_fmt: str = "fp8", te_fmt: str = "fp8-scaled",
                     vae_fmt: str = "bf16", gguf: str | None = None) -> Path:
    """``root`` laid out like ComfyUI's models/: diffusion_models, text_encoders, vae with tiny files."""
    for sub in ("diffusion_models", "text_encoders", "vae"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    write_transformer(folder, root / "diffusion_models" / f"qwen_image_tiny_{transformer_fmt}.safetensors", transformer_fmt)
    if gguf:
        write_gguf_transformer(folder, root / "diffusion_models" / f"qwen-image-tiny-{gguf}.gguf", gguf)
    write_text_encoder(folder, root / "text_encoders" / f"qwen_2.5_vl_tiny_{te_fmt}.safetensors", te_fmt)
    write_vae(folder, root / "vae" / "qwen_image_vae.safetensors", vae_fmt)
    return root
