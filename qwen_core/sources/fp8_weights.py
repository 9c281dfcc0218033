"""fp8 weights kept as fp8 in memory: ``Fp8WeightLinear`` and the scale formats of ComfyUI's files.

A ComfyUI fp8 file stores each large matrix as float8 (1 byte per weight). Upcasting the whole model to bf16
at load would double its memory (Qwen-Image: 20 GB -> 38 GiB), so each ``nn.Linear`` whose weight is fp8 in
the file becomes an ``Fp8WeightLinear``: the weight stays fp8 (plus its fp32 scale), and each forward casts it
to the activation dtype right before the matrix product (``weight.to(bf16) * scale``: exactly the file's
values, in bf16 math). With ``fp8_matmul`` on (sm_89+ GPUs, or the CPU for tests) the product runs on fp8
tensor cores instead (activations quantised per token, as ``qwen_core.fp8_compute``); that is not the bf16
math, and the README states its measured error.

Scale formats (ComfyUI ``comfy/ops.py`` and ``comfy/utils.py``; both dequantise as ``weight * scale``):
- legacy "scaled fp8": a ``scaled_fp8`` marker tensor, ``<layer>.scale_weight`` (fp32 scalar) and, for fp8
  matmul checkpoints, ``<layer>.scale_input`` (an activation scale; we compute in bf16 and ignore it);
- "mixed precision" (ComfyUI >= 0.4): ``<layer>.comfy_quant`` (uint8 bytes of a JSON ``{"format": ...}``),
  ``<layer>.weight_scale`` and optional ``<layer>.input_scale``; a weight may be stored as U8 bytes. Formats
  other than ``float8_e4m3fn`` / ``float8_e5m2`` (nvfp4, mxfp8, int8...) are refused by name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from torch import nn

from qwen_core.errors import ModelLoadError

FP8_DTYPES = tuple(d for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if d)
_E4M3 = getattr(torch, "float8_e4m3fn", None)
_FORMATS = {"float8_e4m3fn": _E4M3, "float8_e5m2": getattr(torch, "float8_e5m2", None)}
_E4M3_MAX = 448.0
SCALE_KEYS = ("scale_weight", "weight_scale")
IGNORED_KEYS = ("scale_input", "input_scale", "comfy_quant")


@dataclass(frozen=True)
class LayerQuant:
    """How one layer's weight is stored: its fp8 dtype and the key of its scale (None: unscaled)."""

    dtype: torch.dtype
    scale_key: str | None


def comfy_quant_format(raw: torch.Tensor, where: str) -> torch.dtype:
    """The fp8 dtype a ``.comfy_quant`` tensor (JSON bytes) names; ModelLoadError for other formats."""
    try:
        conf = json.loads(bytes(raw.to(torch.uint8).tolist()).decode("utf-8"))
        fmt = str(conf.get("format"))
    except (ValueError, AttributeError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{where}: unreadable quantisation entry ({err}).", fix="Re-download the file.") from err
    dtype = _FORMATS.get(fmt)
    if dtype is None:
        raise ModelLoadError(f"{where}: quantisation format {fmt!r} is not supported (fp8 e4m3fn/e5m2 only).",
                             fix="Use the bf16, fp8 or GGUF version of this model.")
    return dtype


def dequantize(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """fp8 (or any) ``weight`` times its scale, in ``dtype`` (the scale broadcast per row when it is 1-D)."""
    out = weight.to(torch.float32)
    if scale is not None:
        scale = scale.to(torch.float32)
        out = out * (scale.reshape(-1, *([1] * (out.ndim - 1))) if scale.numel() > 1 else scale)
    return out.to(dtype)


class Fp8WeightLinear(nn.Module):
    """``y = x (W * s)^T + b`` with ``W`` kept in fp8 and ``s`` an fp32 scale (scalar or one per row).

    Not an ``nn.Linear`` on purpose: code that rewrites Linear layers (fp8 compute, LoRA fusing) must not treat
    the fp8 payload as a plain weight. ``weight`` and ``weight_scale`` are Parameters (no buffers), so every
    memory mode, including the streamed engine, moves them like any other weight."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None) -> None:
        super().__init__()
        if weight.dtype not in FP8_DTYPES or weight.ndim != 2:
            raise ValueError(f"Fp8WeightLinear needs a 2-D fp8 weight, got {weight.dtype} {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        scale = torch.ones((), dtype=torch.float32) if scale is None else scale.to(torch.float32).reshape(-1)
        if scale.numel() not in (1, self.out_features):
            raise ValueError(f"scale of {scale.numel()} values for {self.out_features} rows")
        self.weight_scale = nn.Parameter(scale.reshape(()) if scale.numel() == 1 else scale, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.fp8_matmul = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, weight={self.weight.dtype}, "
                f"fp8_matmul={self.fp8_matmul}")

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        # Scaled in place on a copy: one weight-sized tensor is alive during the product, not two (the streamed
        # engine reserves one: qwen_core.layer_memory). Same values as ``w * s``.
        w = self.weight.to(dtype, copy=True)
        s = self.weight_scale.to(dtype)
        return w.mul_(s[:, None] if s.ndim == 1 else s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8_matmul and self.weight.dtype == _E4M3 and x.shape[-1] % 16 == 0 and self.out_features % 16 == 0:
            return self._scaled_mm(x)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return nn.functional.linear(x, self.dequantized_weight(x.dtype), bias)

    def _scaled_mm(self, x: torch.Tensor) -> torch.Tensor:
        # The file's fp8 values are the matrix as is; activations are quantised per row (token) on the fly.
        x2 = x.reshape(-1, self.in_features)
        xs = x2.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / _E4M3_MAX
        xq = (x2 / xs.to(x2.dtype)).to(_E4M3)
        ws = self.weight_scale.float().expand(self.out_features).reshape(1, -1).contiguous()
        out = torch._scaled_mm(xq, self.weight.t(), scale_a=xs, scale_b=ws, out_dtype=x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)


def set_fp8_matmul(module: nn.Module, enabled: bool, *, skip: tuple[str, ...] = ("img_mod", "txt_mod")) -> int:
    """Switch fp8 tensor-core products on/off for the ``Fp8WeightLinear`` layers of ``module``; returns how
    many changed. The AdaLN modulation layers (batch-sized inputs, memory bound) keep the upcast path."""
    count = 0
    for name, layer in module.named_modules():
        if isinstance(layer, Fp8WeightLinear) and not any(s in name for s in skip) and layer.fp8_matmul != enabled:
            layer.fp8_matmul = enabled
            count += 1
    return count


def fp8_layers(module: nn.Module) -> int:
    return sum(isinstance(m, Fp8WeightLinear) for m in module.modules())
