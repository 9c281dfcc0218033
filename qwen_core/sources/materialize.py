"""Fill an empty (meta-device) module from one .safetensors file, tensor by tensor, through a key map.

The module is built from its config without memory (``empty_module``), then every parameter is read from the
memory-mapped file, converted once and assigned, so peak RAM is the finished module plus one tensor. fp8
Linear weights either stay fp8 (``Fp8WeightLinear``) or are dequantised with their scales; every other tensor
is cast to the compute dtype. Strict: a parameter the file lacks or a tensor the module has no place for is
an error naming both, never a silently random or dropped weight (diffusers' ``from_single_file`` drops
unknown keys, scales included).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qwen_core.errors import ModelLoadError
from qwen_core.sources.fp8_weights import (
    FP8_DTYPES,
    IGNORED_KEYS,
    SCALE_KEYS,
    Fp8WeightLinear,
    comfy_quant_format,
    dequantize,
)
from qwen_core.sources.types import FileInfo

_FIX = "Use the file made for this model (check the configs folder's family), or re-download it."


@dataclass
class LoadReport:
    """What one file contributed: counts for the log and the tests."""

    tensors: int = 0
    fp8_kept: int = 0
    fp8_dequantized: int = 0
    scaled: int = 0
    ignored: list[str] = field(default_factory=list)
    filled: list[str] = field(default_factory=list)  # parameters the file lacks that a `fill` rule supplied


def empty_module(factory: Callable[[], nn.Module]) -> nn.Module:
    """``factory()`` with its parameters on the meta device (no memory, no random init)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return factory()


def _split_keys(info: FileInfo, keys: list[str]) -> tuple[dict[str, str], dict[str, str], dict[str, str], list[str]]:
    """(weights file-key -> stripped key, scale keys by layer, comfy_quant keys by layer, ignored keys)."""
    weights, scales, formats, ignored = {}, {}, {}, []
    for full in keys:
        if info.prefix and not full.startswith(info.prefix):
            ignored.append(full)  # another component bundled in the same checkpoint
            continue
        key = full[len(info.prefix):]
        layer, _, leaf = key.rpartition(".")
        if key == "scaled_fp8" or leaf in IGNORED_KEYS[:2]:
            ignored.append(full)
        elif leaf in SCALE_KEYS:
            scales[layer] = full
        elif leaf == "comfy_quant":
            formats[layer] = full
        else:
            weights[full] = key
    return weights, scales, formats, ignored


def _linear_weights(module: nn.Module, pattern: re.Pattern[str] | None) -> set[str]:
    return {f"{name}.weight" for name, m in module.named_modules()
            if type(m) is nn.Linear and (pattern is None or pattern.search(f"{name}.weight"))}


def load_safetensors_into(module: nn.Module, info: FileInfo, key_map: Callable[[str], str], dtype: torch.dtype, *,
                          keep_fp8: bool, keep_fp8_for: re.Pattern[str] | None = None,
                          fill: dict[str, Callable[[nn.Module], Any]] | None = None) -> LoadReport:
    """Load ``info.path`` into the meta-device ``module`` (see the module docstring). With ``keep_fp8``, fp8
    weights of ``nn.Linear`` layers (whose name ``keep_fp8_for`` matches, when given) stay fp8. ``fill`` maps a
    parameter name the file may lack to a function that supplies it (it receives the module)."""
    from safetensors import safe_open

    report, fill = LoadReport(), fill or {}
    expected, buffers = dict(module.named_parameters()), dict(module.named_buffers())
    linears = _linear_weights(module, keep_fp8_for) if keep_fp8 else set()
    state: dict[str, torch.Tensor] = {}
    fp8: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    with safe_open(str(info.path), framework="pt") as fh:
        weights, scales, formats, report.ignored = _split_keys(info, list(fh.keys()))
        targets = {full: key_map(key) for full, key in weights.items()}
        unexpected = sorted(f for f, t in targets.items() if t not in expected and t not in buffers)
        if unexpected:
            raise ModelLoadError(f"{info.path}: {len(unexpected)} tensor(s) have no place in {type(module).__name__}, "
                                 f"e.g. {unexpected[0]!r}: the file is not a {info.architecture} of this config.", fix=_FIX)
        for full, target in targets.items():
            layer = weights[full].rpartition(".")[0]
            raw = fh.get_tensor(full)
            if layer in formats:
                fp8_dtype = comfy_quant_format(fh.get_tensor(formats[layer]), f"{info.path} [{full}]")
                raw = raw.view(fp8_dtype) if raw.dtype == torch.uint8 else raw
            scale = fh.get_tensor(scales[layer]) if layer in scales and full.endswith(".weight") else None
            report.tensors += 1
            report.scaled += scale is not None
            if raw.dtype in FP8_DTYPES and target in linears:
                fp8[target] = (raw, scale)
                report.fp8_kept += 1
                continue
            report.fp8_dequantized += raw.dtype in FP8_DTYPES
            state[target] = dequantize(raw, scale, dtype) if scale is not None or raw.dtype in FP8_DTYPES else raw.to(dtype)
    missing = sorted(set(expected) - state.keys() - fp8.keys() - {f"{t.rpartition('.')[0]}.bias" for t in fp8})
    for name in [m for m in missing if m in fill]:
        fill[name](module)
        report.filled.append(name)
        missing.remove(name)
    if missing:
        raise ModelLoadError(f"{info.path}: lacks {len(missing)} tensor(s) {type(module).__name__} needs, e.g. "
                             f"{missing[0]!r}: it is not a complete {info.architecture} for this config.", fix=_FIX)
    _swap_fp8_linears(module, fp8, state, dtype)
    result = module.load_state_dict(state, strict=False, assign=True)
    swapped = tuple(f"{t.rpartition('.')[0]}." for t in fp8)
    left = [k for k in result.missing_keys if k in expected and not k.startswith(swapped) and k not in report.filled]
    if left:  # an fp8 layer's bias, say, that neither the file nor the swap supplied
        raise ModelLoadError(f"{info.path}: {left[0]!r} was not loaded.", fix=_FIX)
    return report


def _swap_fp8_linears(module: nn.Module, fp8: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
                      state: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    for weight_name, (weight, scale) in fp8.items():
        layer_name = weight_name.rpartition(".")[0]
        parent_name, _, attr = layer_name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        old = getattr(parent, attr)
        bias = state.pop(f"{layer_name}.bias", None) if old.bias is not None else None
        if old.bias is not None and bias is None:
            raise ModelLoadError(f"layer {layer_name!r}: its bias is missing from the file.", fix=_FIX)
        setattr(parent, attr, Fp8WeightLinear(weight, scale, bias.to(dtype) if bias is not None else None))
