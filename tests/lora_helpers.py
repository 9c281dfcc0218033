"""Tiny LoRAs for tests, written at test time in every format the pack reads.

``peft_factors`` makes the low-rank factors with PEFT itself (a ``LoraConfig`` adapter on a copy of the tiny
transformer, non-zero init); ``random_factors`` makes them without PEFT (the live ComfyUI test's Python may
not have it). ``write_lora`` stores the same factors as diffusers/PEFT (with PEFT's lora_alpha/r metadata),
Kohya, lightx2v's Lightning layout, ComfyUI-style ``diffusion_model.`` keys or DiffSynth's ``default`` keys,
so that every format must give the same delta W = alpha / rank * B @ A.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

# Layers of each block a test LoRA touches: attention projections of both streams, an MLP and a modulation.
TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.to_out.0", "img_mlp.net.2", "txt_mod.1")
FORMATS = ("diffusers", "kohya", "lightning", "comfyui", "diffsynth")
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer -> (A [r, in], B [out, r])


def peft_factors(transformer: Any, *, rank: int = 4, alpha: float = 8.0, seed: int = 0,
                 targets: tuple[str, ...] = TARGETS) -> Factors:
    """Factors of a PEFT LoRA adapter (``init_lora_weights=False``: random A and B, so it changes the output)."""
    from peft import LoraConfig, get_peft_model_state_dict

    model = copy.deepcopy(transformer)
    torch.manual_seed(seed)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False))
    state = get_peft_model_state_dict(model)
    factors: Factors = {}
    for key, down in state.items():
        if key.endswith(".lora_A.weight"):
            layer = key.removesuffix(".lora_A.weight")
            factors[layer] = (down.detach().clone(), state[f"{layer}.lora_B.weight"].detach().clone())
    return factors


def random_factors(shapes: dict[str, tuple[int, int]], *, rank: int = 4, seed: int = 0, std: float = 0.05,
                   targets: tuple[str, ...] = TARGETS) -> Factors:
    """Random factors for every layer in ``shapes`` (``{name: (out, in)}``) ending in one of ``targets``."""
    gen = torch.Generator().manual_seed(seed)
    factors: Factors = {}
    for layer, (out_f, in_f) in sorted(shapes.items()):
        if layer.endswith(targets):
            factors[layer] = (torch.randn(rank, in_f, generator=gen) * std, torch.randn(out_f, rank, generator=gen) * std)
    return factors


def _kohya_name(layer: str) -> str:
    return "lora_unet_" + layer.replace(".", "_")


def write_lora(path: Path, factors: Factors, fmt: str = "diffusers", *, alpha: float = 8.0,
               dtype: torch.dtype = torch.float32) -> Path:
    """``factors`` saved at ``path`` in ``fmt``; every format means delta W = alpha / rank * B @ A."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {"format": "pt"}
    for layer, (down, up) in factors.items():
        down, up = down.to(dtype).contiguous(), up.to(dtype).contiguous()
        alpha_t = torch.tensor(float(alpha))
        if fmt == "diffusers":
            tensors[f"transformer.{layer}.lora_A.weight"], tensors[f"transformer.{layer}.lora_B.weight"] = down, up
        elif fmt == "kohya":
            name = _kohya_name(layer)
            tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": alpha_t})
        elif fmt == "lightning":
            tensors.update({f"{layer}.lora_down.weight": down, f"{layer}.lora_up.weight": up, f"{layer}.alpha": alpha_t})
        elif fmt == "comfyui":
            name = f"diffusion_model.{layer}"
            tensors.update({f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up, f"{name}.alpha": alpha_t})
        elif fmt == "diffsynth":  # no alpha: scale 1, so the factor goes into B
            rank = down.shape[0]
            tensors[f"{layer}.lora_A.default.weight"] = down
            tensors[f"{layer}.lora_B.default.weight"] = (up.float() * (alpha / rank)).to(dtype)
        else:
            raise ValueError(f"unknown format {fmt!r}")
    if fmt == "diffusers":
        rank = next(iter(factors.values()))[0].shape[0]
        config = {"transformer.r": rank, "transformer.lora_alpha": alpha,
                  "transformer.target_modules": sorted({layer.split(".", 2)[-1] for layer in factors})}
        metadata["lora_adapter_metadata"] = json.dumps(config)
    save_file(tensors, str(path), metadata=metadata)
    return path


def expected_delta(factors: Factors, layer: str, *, alpha: float = 8.0, strength: float = 1.0) -> torch.Tensor:
    down, up = factors[layer]
    return strength * alpha / down.shape[0] * (up.double() @ down.double())
