"""flash-attn 4 (the ``flash-attn-4`` package, CuTe DSL; Hopper and Blackwell) as our attention kernel.

diffusers 0.42.1's dispatcher knows flash-attn 4 only as ``flash_4_hub``, which downloads the kernel from the
Hub through the ``kernels`` package at run time: never done here. With the package installed
(``pip install "flash-attn-4[cu13]"``: it needs ``nvidia-cutlass-dsl``, ``quack-kernels``, ``apache-tvm-ffi``
and ``torch-c-dlpack-ext``), our ``RealRopeAttnProcessor`` calls it directly for unmasked attention (masked
calls still go through diffusers' dispatcher). The call is wrapped as a torch custom op
(``qwen_core::flash4_attention``) so ``torch.compile`` treats it as one opaque kernel.

Measured on an H200 (bench/RESULTS.md, "flash-attn 4 on the H200"): flash-attn-4 4.0.0b8 with
nvidia-cutlass-dsl 4.4.2 runs its Hopper kernel (sm_90), 1.10x cuDNN's SDPA kernel at Qwen-Image's 1328x1328
attention shape with the same error, 2-3% per compiled step. Its CUTLASS DSL is under NVIDIA's proprietary
licence, so the pack never installs it: the user opts in. Where it is pip-installed it needs no network at run
time.

Policy (``qwen_core.devices.get_attention_implementation``): chosen for "auto"/"flash4" only when it imports, the
card is sm_90+ and a probe call matches SDPA; a NaN/Inf image later switches the process to SDPA (the
generator's fallback), exactly as for flash-attn 2.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

BACKEND = "flash4"  # our name (AttentionChoice.FLASH4); not a diffusers backend
_PROBE_TOLERANCE = 2e-2  # relative L2 vs SDPA; bf16 kernels differ by ~4e-3 on random data
_kernel: Callable[..., Any] | None = None  # flash_attn.cute.flash_attn_func once imported (tests inject one)
_probe_cache: dict[tuple[str, torch.dtype], str | None] = {}


def status() -> tuple[str | None, str]:
    """(version or None, why not usable or "") without running anything on a GPU."""
    try:
        from flash_attn.cute import flash_attn_func  # noqa: F401  (optional dependency)
    except ImportError as err:
        if err.name in ("flash_attn", "flash_attn.cute"):
            return None, 'flash-attn 4 is not installed (optional: pip install "flash-attn-4[cu13]")'
        return None, f"flash-attn 4 is installed but its import failed ({err}); reinstall it and its CUTLASS DSL"
    except Exception as err:  # noqa: BLE001 - a broken native dependency raises OSError/RuntimeError
        return None, f"flash-attn 4 failed to import: {type(err).__name__}: {err}"
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flash-attn-4"), ""
    except PackageNotFoundError:
        return "unknown", ""


def set_kernel(fn: Callable[..., Any] | None) -> None:
    """Use ``fn(q, k, v, softmax_scale=None, causal=False)`` as the kernel (tests; None: import the package)."""
    global _kernel
    _kernel = fn
    _probe_cache.clear()


def _resolve_kernel() -> Callable[..., Any]:
    global _kernel
    if _kernel is None:
        from flash_attn.cute import flash_attn_func

        _kernel = flash_attn_func
    return _kernel


@torch.library.custom_op("qwen_core::flash4_attention", mutates_args=())
def flash4_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal attention of [B, S, H, D] q/k/v, default scale, through flash-attn 4."""
    out = _resolve_kernel()(q.contiguous(), k.contiguous(), v.contiguous(), softmax_scale=None, causal=False)
    return (out[0] if isinstance(out, tuple) else out).contiguous()


@flash4_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(q)


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2).float(), k.transpose(1, 2).float(),
                                                           v.transpose(1, 2).float())
    return out.transpose(1, 2)


def _run_probe(device: str, dtype: torch.dtype) -> str | None:
    try:
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(2, 300, 4, 128, generator=g, device=device, dtype=dtype) for _ in range(3))
        out = flash4_attention(q, k, v)
        if not bool(torch.isfinite(out).all()):
            return "probe call returned NaN/Inf"
        ref = _reference(q, k, v)
        err = float((out.float() - ref).norm() / ref.norm())
        if err > _PROBE_TOLERANCE:
            return f"probe call differs from SDPA by {err:.3g} (relative L2)"
        return None
    except Exception as err:  # noqa: BLE001 - any failure (no sm_90, DSL compile error...) means: don't use it
        return f"probe call failed: {type(err).__name__}: {str(err)[:300]}"


def probe(device: str, dtype: torch.dtype) -> str | None:
    """None when a small flash-attn 4 call on ``device`` works and matches SDPA, else what went wrong
    (cached per process)."""
    key = (device, dtype)
    if key not in _probe_cache:
        _probe_cache[key] = _run_probe(device, dtype)
    return _probe_cache[key]

