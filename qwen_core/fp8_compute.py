"""Optional fp8 compute for the transformer's big matrix products (H100 / Ada and newer).

Each ``nn.Linear`` inside the transformer blocks that sees the token dimension becomes ``Fp8Linear``:
weights stored as float8 e4m3 with one scale per output row, activations quantised per token on the fly,
product by ``torch._scaled_mm`` (fp8 tensor cores, twice the bf16 rate) with a bf16 result. This is NOT
the bf16 math: the bench reports its deviation from bf16 next to its speed. The AdaLN modulation layers
(batch-sized inputs, memory bound) stay in bf16.

API: ``enable_fp8_compute(transformer, keep_original=False) -> Fp8Handle`` (``.disable()`` swaps the
original layers back when they were kept), ``fp8_supported(device)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qwen_core.errors import InvalidInputError

_E4M3 = getattr(torch, "float8_e4m3fn", None)
_MAX = 448.0
_SKIP = ("img_mod", "txt_mod")


def fp8_supported(device: torch.device | str) -> bool:
    dev = torch.device(device)
    if _E4M3 is None or not hasattr(torch, "_scaled_mm"):
        return False
    if dev.type == "cuda":
        return torch.cuda.get_device_capability(dev) >= (8, 9)
    return dev.type == "cpu"  # torch's CPU _scaled_mm: for tests, not speed


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2-D ``w`` as e4m3 values ``q`` and one fp32 scale per row: ``w ~= q.float() * scale[:, None]``.

    Also the storage format of the streamed engine's fp8 option (``qwen_core.streaming``).
    """
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / _MAX
    return (w / scale[:, None]).to(_E4M3), scale


def _dequantize_rows_fused(q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_((q.float() * scale[:, None]).to(out.dtype))


def _dequantize_rows_two_passes(q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
    # In place, no full-size temporaries: a copy (e4m3 -> out's dtype is exact) and a scale.
    out.copy_(q)
    out.mul_(scale.to(out.dtype)[:, None])


@dataclass
class _Dequantizer:
    """``quantize_rows`` undone into a given tensor. On CUDA one fused kernel (``torch.compile`` of
    ``_dequantize_rows_fused`` with dynamic shapes: one kernel for every matrix shape and buffer offset), read once
    and written once: the eager pair of kernels moved 2.3x the bytes and, beside the GEMMs of the streamed
    engine's compute stream, took 114 ms of a 579 ms step (bench/RESULTS.md, the streamed profile). Anything
    else, or a compile that fails (no Triton), uses the two in-place passes, with the same values."""

    fused_on: tuple[str, ...] = ("cuda",)  # device types that get the compiled kernel
    kernel: Any = None
    failed: str | None = None

    def __call__(self, q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
        if q.device.type in self.fused_on and self.failed is None:
            try:
                if self.kernel is None:
                    self.kernel = torch.compile(_dequantize_rows_fused, dynamic=True, fullgraph=True)
                self.kernel(q, scale, out)
                return
            except Exception as err:  # noqa: BLE001 - any compile failure: the eager passes give the same values
                self.failed = f"{type(err).__name__}: {str(err)[:300]}"
                from qwen_core.session_log import get_session_log

                get_session_log().warning(f"fp8 storage: the fused dequantisation kernel could not be built "
                                          f"({self.failed}); using two eager passes (slower streaming).")
        _dequantize_rows_two_passes(q, scale, out)


dequantize_rows_into = _Dequantizer()
"""``dequantize_rows_into(q, scale, out)``: ``out[:] = q * scale[:, None]`` for ``quantize_rows``' output, in
place (the streamed engine's fp8 storage dequantises each block into its device slot with it)."""


class Fp8Linear(nn.Module):
    """y = x W^T + b with W in e4m3 (row scales) and x quantised per row at run time."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach()
        q, scale = quantize_rows(w)
        self.register_buffer("weight_fp8", q)
        self.register_buffer("weight_scale", scale.reshape(1, -1).contiguous())
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.out_dtype = w.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        xs = x2.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / _MAX
        xq = (x2 / xs.to(x2.dtype)).to(_E4M3)
        out = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=xs, scale_b=self.weight_scale,
                               out_dtype=self.out_dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


@dataclass
class Fp8Handle:
    swapped: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list)  # (parent, name, original)
    converted: int = 0

    def disable(self) -> None:
        """Put the original bf16 layers back (only possible when they were kept)."""
        for parent, name, original in self.swapped:
            setattr(parent, name, original)
        self.swapped = []


def _eligible(name: str, module: nn.Module) -> bool:
    return (isinstance(module, nn.Linear) and not any(s in name for s in _SKIP)
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


@torch.no_grad()
def enable_fp8_compute(transformer: nn.Module, *, keep_original: bool = False) -> Fp8Handle:
    """Swap the eligible Linear layers of ``transformer.transformer_blocks`` for ``Fp8Linear``."""
    blocks = getattr(transformer, "transformer_blocks", None)
    if blocks is None:
        raise InvalidInputError("transformer", "has no transformer_blocks to convert.")
    device = next(transformer.parameters()).device
    if not fp8_supported(device):
        raise InvalidInputError("fp8", f"fp8 matrix products need an sm_89+ GPU; {device} has none.",
                                fix="Use bf16 compute on this device.")
    handle = Fp8Handle()
    for block in blocks:
        for name, module in list(block.named_modules()):
            if not _eligible(name, module):
                continue
            parent_name, _, attr = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            setattr(parent, attr, Fp8Linear(module))
            handle.converted += 1
            if keep_original:
                handle.swapped.append((parent, attr, module))
    return handle
