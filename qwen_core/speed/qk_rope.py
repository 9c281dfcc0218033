"""q/k RMS norm, rotary embedding and the text+image concatenation of Qwen's joint attention in one kernel.

Why: in the compiled block, inductor's kernel for the q/k RMS norm and our real RoPE ran at ~1.1 TB/s on an H200
(18.7 ms of a 471 ms step for ~21 GB moved; the GPU reads and writes ~4 TB/s), and the concatenation of the text
and image rows was a further copy (bench/RESULTS.md, "Where a step goes"). This Triton kernel reads each
projection once and writes the normed, rotated rows straight into their place in the joint q (or k): one read,
one write.

The math is the unfused path's, rounding included (``reference``):

    n   = (x * rsqrt(mean(x^2) + eps)).to(dtype)              # diffusers' RMSNorm, statistics in float32
    h   = (n * weight).to(dtype)
    out = rotate(h in float32, cos, sin).to(dtype)            # apply_rope_real

so the result differs from it only where float32 sums and rsqrt round differently (checked: ``probe`` on the GPU,
the Triton interpreter on the CPU in tests/test_fused_kernels.py).

``norm_rope_cat`` is a torch custom op (``qwen_core::qk_norm_rope``), opaque to ``torch.compile``. It runs the
kernel on CUDA tensors of one dtype (bf16/fp16/fp32) once a small probe call on that device matched
``reference``; everywhere else (CPU, a failed probe, Triton missing) it runs ``reference``, the unfused ops.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

HEAD_DIMS = (8, 16, 32, 64, 128, 256)  # powers of two: the kernel holds a row in one block (tiny models: 16)
_PROBE_TOLERANCE = 1e-2  # relative L2 against ``reference``; a 1-ulp bf16 flip here and there is ~1e-3
_probe_cache: dict[tuple[str, torch.dtype], str | None] = {}


def to_real(freqs: torch.Tensor) -> torch.Tensor:
    """A rotary table as float32 [S, D/2, 2] (cos, sin in the last dim).

    diffusers' complex [S, D/2] table (``QwenEmbedRope``) is viewed as real pairs, which are exactly (cos, sin);
    a table that is already real passes through. A plain tensor, so slicing rows (``txt_freqs[:n]`` in the
    split wrapper) and ``torch.compile`` treat it like the original.
    """
    if torch.is_complex(freqs):
        return torch.view_as_real(freqs).float()
    if freqs.ndim < 1 or freqs.shape[-1] != 2:
        raise TypeError(f"rotary table must be complex or real [..., 2], got {freqs.dtype} {tuple(freqs.shape)}")
    return freqs


def apply_rope_real(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, S, H, D] (interleaved channel pairs) by ``freqs`` (real [S, D/2, 2]), in float32."""
    cos = freqs[None, :, None, :, 0]
    sin = freqs[None, :, None, :, 1]
    even, odd = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


def reference(x: torch.Tensor, weight: torch.Tensor, eps: float, table: torch.Tensor) -> torch.Tensor:
    """diffusers' RMSNorm (with a weight of x's dtype) then the real RoPE, as separate ops: [B, S, H, D]."""
    variance = x.float().pow(2).mean(-1, keepdim=True)
    normed = (x * torch.rsqrt(variance + eps)).to(weight.dtype) * weight
    return apply_rope_real(normed, table)


def fusable(attn: Any) -> bool:
    """True when all four q/k norms of diffusers' ``Attention`` ``attn`` are diffusers' RMSNorm with a weight and
    no bias, over a head dim the kernel takes: the case ``norm_rope_cat`` reproduces. Decided once, outside
    compiled code (a class check there becomes a guard that dynamo's saved traces cannot store)."""
    from diffusers.models.normalization import RMSNorm

    norms = (attn.norm_q, attn.norm_k, attn.norm_added_q, attn.norm_added_k)
    head_dim = attn.inner_dim // attn.heads
    return head_dim in HEAD_DIMS and all(
        type(n) is RMSNorm and n.weight is not None and n.bias is None and tuple(n.weight.shape) == (head_dim,)
        for n in norms)


def dtypes_match(x: torch.Tensor, attn: Any) -> bool:
    """The kernel's output dtype is its input's: true when every q/k norm weight has ``x``'s dtype (per call)."""
    return all(n.weight.dtype == x.dtype for n in (attn.norm_q, attn.norm_k, attn.norm_added_q, attn.norm_added_k))


def norm_rope_cat(txt: torch.Tensor, img: torch.Tensor, txt_norm: Any, img_norm: Any, txt_table: torch.Tensor,
                  img_table: torch.Tensor) -> torch.Tensor:
    """``cat([rope(norm(txt)), rope(norm(img))], dim=1)`` for [B, S, H, D] projections (callers check
    ``fusable`` and ``dtypes_match``)."""
    return torch.ops.qwen_core.qk_norm_rope(txt, img, txt_norm.weight, img_norm.weight, float(txt_norm.eps),
                                           float(img_norm.eps), txt_table, img_table)


@torch.library.custom_op("qwen_core::qk_norm_rope", mutates_args=())
def _qk_norm_rope(txt: torch.Tensor, img: torch.Tensor, txt_weight: torch.Tensor, img_weight: torch.Tensor,
                  txt_eps: float, img_eps: float, txt_table: torch.Tensor, img_table: torch.Tensor) -> torch.Tensor:
    if txt.is_cuda and kernel_usable(txt.device, txt.dtype):
        out = txt.new_empty(txt.shape[0], txt.shape[1] + img.shape[1], *txt.shape[2:])
        launch(txt, txt_weight, txt_eps, txt_table, out, 0)
        launch(img, img_weight, img_eps, img_table, out, txt.shape[1])
        return out
    return torch.cat([reference(txt, txt_weight, txt_eps, txt_table),
                      reference(img, img_weight, img_eps, img_table)], dim=1)


@_qk_norm_rope.register_fake
def _(txt: torch.Tensor, img: torch.Tensor, txt_weight: torch.Tensor, img_weight: torch.Tensor, txt_eps: float,
      img_eps: float, txt_table: torch.Tensor, img_table: torch.Tensor) -> torch.Tensor:
    return txt.new_empty(txt.shape[0], txt.shape[1] + img.shape[1], *txt.shape[2:])


# ---- the kernel ------------------------------------------------------------------------------------------------
def _build_kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def norm_rope_positions(x_ptr, w_ptr, tab_ptr, out_ptr, heads, seq, out_seq, seq_offset,
                            stride_b, stride_s, stride_h, eps, D: tl.constexpr, HEADS: tl.constexpr):
        # One program = one (batch, position): every head's D channels (interleaved (even, odd) rotary pairs), so
        # the position's rotary row is read once for all heads. HEADS is heads rounded up to a power of two.
        # (Reading each channel's partner with a second load instead of the reshape/split was slower on an H200:
        # 0.24 against 0.15 ms at 1328x1328, bench/RESULTS.md.)
        pid = tl.program_id(0)
        pos = pid % seq
        batch = pid // seq
        head = tl.arange(0, HEADS)
        live = head < heads
        col = tl.arange(0, D)
        src = batch.to(tl.int64) * stride_b + pos.to(tl.int64) * stride_s
        x = tl.load(x_ptr + src + head[:, None] * stride_h + col[None, :], mask=live[:, None], other=0.0)
        x = x.to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
        normed = (x * inv[:, None]).to(out_ptr.dtype.element_ty).to(tl.float32)
        weight = tl.load(w_ptr + col).to(tl.float32)
        h = (normed * weight[None, :]).to(out_ptr.dtype.element_ty).to(tl.float32)
        even, odd = tl.split(tl.reshape(h, (HEADS, D // 2, 2)))
        cos, sin = tl.split(tl.reshape(tl.load(tab_ptr + pos.to(tl.int64) * D + col), (D // 2, 2)))
        cos, sin = cos[None, :], sin[None, :]
        rotated = tl.reshape(tl.join(even * cos - odd * sin, even * sin + odd * cos), (HEADS, D))
        dst = (batch.to(tl.int64) * out_seq + seq_offset + pos) * heads * D
        tl.store(out_ptr + dst + head[:, None] * D + col[None, :], rotated.to(out_ptr.dtype.element_ty),
                 mask=live[:, None])

    return norm_rope_positions


@functools.cache
def _kernel() -> Any:
    # Built on first use: Triton is imported only then (it reads TRITON_INTERPRET, which tests set, at import).
    return _build_kernel()


def launch(x: torch.Tensor, weight: torch.Tensor, eps: float, table: torch.Tensor, out: torch.Tensor,
           seq_offset: int) -> None:
    """Write ``reference(x, weight, eps, table)`` into ``out[:, seq_offset:seq_offset + S]``.

    ``x`` [B, S, H, D] with its last dim contiguous (a view of a projection is fine); ``table`` real
    [S, D/2, 2] float32 (to_real); ``out`` [B, S_out, H, D] contiguous, of ``x``'s dtype."""
    batch, seq, heads, dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    table = table.contiguous()
    if table.dtype != torch.float32 or tuple(table.shape) != (seq, dim // 2, 2):
        raise ValueError(f"rotary table must be float32 [{seq}, {dim // 2}, 2], got {table.dtype} {tuple(table.shape)}")
    if batch * seq * heads == 0:
        return
    _kernel()[(batch * seq,)](x, weight, table, out, heads, seq, out.shape[1], seq_offset, x.stride(0), x.stride(1),
                              x.stride(2), eps, D=dim, HEADS=max(1, 1 << (heads - 1).bit_length()), num_warps=4)


# ---- when to use it --------------------------------------------------------------------------------------------
def kernel_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Triton present and a probe call on ``device`` matched ``reference`` (cached per process)."""
    return probe(device, dtype) is None


def probe(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when a small kernel call on ``device`` matches ``reference``, else what went wrong."""
    key = (str(device), dtype)
    if key not in _probe_cache:
        _probe_cache[key] = _run_probe(device, dtype)
        if _probe_cache[key] is not None:
            from qwen_core.session_log import get_session_log

            get_session_log().warning(f"fused q/k norm + RoPE kernel not used on {device} ({_probe_cache[key]}); "
                                      "running the unfused ops")
    return _probe_cache[key]


def _run_probe(device: torch.device, dtype: torch.dtype) -> str | None:
    try:
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(2, 37, 3, 128, generator=g, device=device, dtype=torch.float32).to(dtype)
        weight = (torch.rand(128, generator=g, device=device) + 0.5).to(dtype)
        angles = torch.rand(37, 64, generator=g, device=device) * 6.0
        table = torch.stack((angles.cos(), angles.sin()), dim=-1)
        out = torch.zeros(2, 40, 3, 128, device=device, dtype=dtype)
        launch(x, weight, 1e-6, table, out, 3)
        ref = reference(x, weight, 1e-6, table).float()
        got = out[:, 3:].float()
        if not bool(torch.isfinite(got).all()) or bool(out[:, :3].any()):
            return "probe call wrote NaN/Inf or outside its rows"
        err = float((got - ref).norm() / ref.norm())
        return None if err <= _PROBE_TOLERANCE else f"probe call differs from the unfused ops by {err:.3g}"
    except Exception as err:  # noqa: BLE001 - Triton missing, no compiler for this card...: use the unfused ops
        return f"{type(err).__name__}: {str(err)[:300]}"


def reset_probe() -> None:
    """Forget probe results (tests)."""
    _probe_cache.clear()
