"""The feed-forward's up projection and its tanh GELU as one cuBLASLt call (a GELU epilogue) on CUDA.

Why: in the compiled block inductor runs the GELU as its own kernel after the projection's GEMM: it reads and
writes the 4x-wide activation again (~0.68 GB per block at 1328x1328 with batched CFG; 14.0 ms of a 471 ms step on
an H200, bench/RESULTS.md, "Where a step goes"). ``torch._addmm_activation(..., use_gelu=True)`` asks cuBLASLt for
a bias + GELU epilogue, which applies the tanh approximation that diffusers' ``GELU(approximate="tanh")`` uses (the
fallback in torch is ``gelu(approximate="tanh")``), to the float32 accumulator before rounding: one write.

``install_linear_gelu`` swaps each block feed-forward's diffusers ``GELU`` for ``LinearGeluTanh``, a subclass
that keeps the same ``proj`` Linear (so weight names, LoRA fusing and fp8 compute's Linear swaps see the same
layer) and ``remove_linear_gelu`` puts the original modules back. The fused call is taken only where it is the same
computation: an ``nn.Linear`` with weights of the activations' dtype, a bias and no hooks (a LoRA's side path on
fp8 storage is a forward hook on the Linear, which the fused call would skip; fp8 compute's ``Fp8Linear`` is no
``nn.Linear``), a tanh GELU, and a CUDA tensor; otherwise diffusers' forward runs.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qwen_core.speed.lazy_class import LazyClass


@torch.library.custom_op("qwen_core::linear_gelu_tanh", mutates_args=())
def linear_gelu_tanh(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``gelu(x @ weight.T + bias, approximate="tanh")``; one cuBLASLt call with a GELU epilogue on CUDA."""
    if x.is_cuda:
        flat = x.reshape(-1, x.shape[-1])
        return torch._addmm_activation(bias, flat, weight.t(), use_gelu=True).view(*x.shape[:-1], weight.shape[0])
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


@linear_gelu_tanh.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _gelu_class() -> type:
    from diffusers.models.activations import GELU

    return GELU


def _make_class() -> type:
    base = _gelu_class()

    class LinearGeluTanh(base):  # type: ignore[misc, valid-type]
        """diffusers' ``GELU`` whose projection + tanh GELU is one call where that is exact (module docstring)."""

        def __init__(self, original: nn.Module) -> None:
            nn.Module.__init__(self)
            self.proj = original.proj
            self.approximate = original.approximate

        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            proj = self.proj
            # isinstance, not a class identity check: inside a compiled block that becomes a guard dynamo's saved
            # traces cannot store. The weight dtype check keeps quantised Linear subclasses on their own path;
            # the device is checked last so CPU tests trace (and save) the same guards as a GPU.
            if (isinstance(proj, nn.Linear) and proj.bias is not None and self.approximate == "tanh"
                    and proj.weight.dtype == hidden_states.dtype and proj.bias.dtype == hidden_states.dtype
                    and not proj._forward_hooks and not proj._forward_pre_hooks and hidden_states.is_cuda):
                return torch.ops.qwen_core.linear_gelu_tanh(hidden_states, proj.weight, proj.bias)
            return super().forward(hidden_states)

    return LinearGeluTanh


_CLASS = LazyClass(_make_class, __name__)


def fused_class() -> type:
    """The ``LinearGeluTanh`` class (built on first use: diffusers is imported lazily)."""
    return _CLASS.get()


def __getattr__(name: str) -> Any:
    return _CLASS.module_getattr(name)


# The original modules, keyed weakly by the swapped-in one, so remove_linear_gelu restores exactly what was there.
_ORIGINALS: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


def _gelu_slots(transformer: nn.Module) -> list[tuple[nn.ModuleList, int, nn.Module]]:
    slots = []
    for block in getattr(transformer, "transformer_blocks", []):
        for mlp_name in ("img_mlp", "txt_mlp"):
            net = getattr(getattr(block, mlp_name, None), "net", None)
            if isinstance(net, nn.ModuleList) and len(net) > 0:
                slots.append((net, 0, net[0]))
    return slots


def install_linear_gelu(transformer: nn.Module) -> int:
    """Swap every block feed-forward's tanh ``GELU`` for ``LinearGeluTanh`` (idempotent); returns how many."""
    base, cls = _gelu_class(), fused_class()
    count = 0
    for net, index, module in _gelu_slots(transformer):
        if type(module) is base and module.approximate == "tanh":
            fused = cls(module)
            _ORIGINALS[fused] = module
            net[index] = fused
            count += 1
    return count


def remove_linear_gelu(transformer: nn.Module) -> int:
    """Put diffusers' ``GELU`` modules back (sharing the same ``proj``); returns how many."""
    cls = fused_class()
    count = 0
    for net, index, module in _gelu_slots(transformer):
        if isinstance(module, cls):
            original = _ORIGINALS.pop(module, None)
            if original is None:  # not ours to restore from the table (e.g. a deep copy): rebuild one like it
                original = _gelu_class()(1, 1, approximate=module.approximate)
            original.proj = module.proj
            net[index] = original
            count += 1
    return count


def linear_gelu_installed(transformer: nn.Module) -> bool:
    slots = _gelu_slots(transformer)
    return bool(slots) and all(isinstance(m, fused_class()) for _, _, m in slots)
