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
