"""A real-valued rotary embedding for Qwen-Image's joint attention, installed as an attention processor.

diffusers' ``QwenDoubleStreamAttnProcessor2_0`` applies RoPE by viewing each (even, odd) channel pair as a
complex number and multiplying by ``exp(i * theta)`` (``apply_rotary_emb_qwen(..., use_real=False)``).
Inductor cannot fuse complex arithmetic, so under ``torch.compile`` those products run as separate eager
kernels between the fused QK-norm and the attention (bench/RESULTS.md: elementwise work was 53 ms of a 493
ms compiled step on an H100). The same rotation written with cos/sin is plain float math that inductor
fuses with the RMS norm before it:

    out_even = x_even * cos - x_odd * sin,   out_odd = x_even * sin + x_odd * cos     (in float32)

which is exactly the complex product ``(x_even + i x_odd)(cos + i sin)`` the original computes, in the same
precision (float32) and cast back to the activation dtype, so the result matches to float32 rounding.

``RealRopeAttnProcessor`` subclasses diffusers' processor (so ``set_attention_backend`` and diffusers'
isinstance checks keep working) and overrides only ``__call__``; the attention itself still goes through
``dispatch_attention_fn`` with the processor's backend, or through flash-attn 4 (``qwen_core.speed.attention``)
when ``set_attention_kernel`` names it. It accepts the rotary tables either as diffusers makes
them (complex [S, D/2]) or as real [S, D/2, 2] (cos, sin); ``install_real_rope`` also converts the transformer's table
once per forward (a forward hook on ``pos_embed``) so no complex tensor reaches a compiled block.

Composes with ``qwen_core.cfg_batch.SplitTextAttnProcessor``: that wrapper keeps working on the processor it
wraps (installing here replaces the wrapped processor, not the wrapper), and it slices the text table by
rows (``txt_freqs[:n]``), which works the same on the real table.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from qwen_core.speed import (
    attention,  # importing it registers torch.ops.qwen_core.flash4_attention
    qk_rope,  # likewise torch.ops.qwen_core.qk_norm_rope
)
from qwen_core.speed.lazy_class import LazyClass
from qwen_core.speed.linear_gelu import install_linear_gelu, remove_linear_gelu
from qwen_core.speed.qk_rope import apply_rope_real, to_real


def _base_processor_class() -> type:
    from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

    return QwenDoubleStreamAttnProcessor2_0


def _flash4(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # By name through torch.ops, and chosen by a string on the processor: a compiled graph then guards on that
    # string, which torch keeps in a saved compile cache. With the kernel object itself on the processor, the
    # precompile cache dropped the guard (a later switch back to SDPA ran the flash graph) or failed to pickle
    # the op (CPU, torch 2.11 and 2.14; tests/test_speed.py::TestColdStartWithWarmCache).
    return torch.ops.qwen_core.flash4_attention(q, k, v)


def _make_processor_class() -> type:
    base = _base_processor_class()
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    class RealRopeAttnProcessor(base):  # type: ignore[misc, valid-type]
        """``QwenDoubleStreamAttnProcessor2_0`` with a real-valued RoPE (module docstring).

        ``attention_kernel`` = ``attention.BACKEND`` replaces the dispatcher with flash-attn 4 for unmasked calls
        (a masked call always goes through the dispatcher, which knows how to apply the mask).
        The body follows diffusers 0.42.1's processor line by line except for the rotation.
        """

        attention_kernel: str | None = None
        fuse_qk: bool = False  # the q/k norm + RoPE + concatenation as one kernel (set_fused_kernels)

        def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor = None,
                     encoder_hidden_states_mask: torch.Tensor = None, attention_mask: torch.Tensor | None = None,
                     image_rotary_emb: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
            if encoder_hidden_states is None:
                raise ValueError("RealRopeAttnProcessor requires encoder_hidden_states (text stream)")
            if attention_mask is not None:
                raise ValueError("RealRopeAttnProcessor does not accept an external attention_mask; pass "
                                 "encoder_hidden_states_mask.")
            if encoder_hidden_states_mask is not None:
                image_mask = hidden_states.new_ones(hidden_states.shape[:2], dtype=torch.bool)
                attention_mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)[:, None, None, :]
            seq_txt = encoder_hidden_states.shape[1]
            head_dim = attn.inner_dim // attn.heads

            def heads(x: torch.Tensor) -> torch.Tensor:
                return x.unflatten(-1, (-1, head_dim))

            img_q, img_k, img_v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), \
                heads(attn.to_v(hidden_states))
            txt_q, txt_k = heads(attn.add_q_proj(encoder_hidden_states)), heads(attn.add_k_proj(encoder_hidden_states))
            txt_v = heads(attn.add_v_proj(encoder_hidden_states))
            if self.fuse_qk and image_rotary_emb is not None and qk_rope.dtypes_match(img_q, attn):
                # One kernel per q and k: norm, rotation and the text+image concatenation (qk_rope docstring).
                img_freqs, txt_freqs = (to_real(f) for f in image_rotary_emb)
                q = qk_rope.norm_rope_cat(txt_q, img_q, attn.norm_added_q, attn.norm_q, txt_freqs, img_freqs)
                k = qk_rope.norm_rope_cat(txt_k, img_k, attn.norm_added_k, attn.norm_k, txt_freqs, img_freqs)
            else:
                if attn.norm_q is not None:
                    img_q = attn.norm_q(img_q)
                if attn.norm_k is not None:
                    img_k = attn.norm_k(img_k)
                if attn.norm_added_q is not None:
                    txt_q = attn.norm_added_q(txt_q)
                if attn.norm_added_k is not None:
                    txt_k = attn.norm_added_k(txt_k)
                if image_rotary_emb is not None:
                    img_freqs, txt_freqs = (to_real(f) for f in image_rotary_emb)
                    img_q, img_k = apply_rope_real(img_q, img_freqs), apply_rope_real(img_k, img_freqs)
                    txt_q, txt_k = apply_rope_real(txt_q, txt_freqs), apply_rope_real(txt_k, txt_freqs)
                q = torch.cat([txt_q, img_q], dim=1)
                k = torch.cat([txt_k, img_k], dim=1)
            v = torch.cat([txt_v, img_v], dim=1)
            if self.attention_kernel == attention.BACKEND and attention_mask is None:
                out = _flash4(q, k, v)
            else:
                out = dispatch_attention_fn(q, k, v, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                            backend=self._attention_backend, parallel_config=self._parallel_config)
            out = out.flatten(2, 3).to(q.dtype)
            img_out = attn.to_out[0](out[:, seq_txt:, :].contiguous())
            if len(attn.to_out) > 1:
                img_out = attn.to_out[1](img_out)
            txt_out = attn.to_add_out(out[:, :seq_txt, :].contiguous())
            return img_out, txt_out

    return RealRopeAttnProcessor


_PROCESSOR = LazyClass(_make_processor_class, __name__)


def processor_class() -> type:
    """The ``RealRopeAttnProcessor`` class (built on first use: diffusers is imported lazily)."""
    return _PROCESSOR.get()


def __getattr__(name: str) -> Any:
    return _PROCESSOR.module_getattr(name)


# ---- installing ------------------------------------------------------------------------------------------
def _slot(block: nn.Module) -> tuple[Any, Callable[[Any], None]]:
    """(the processor that does the work, a setter for it): looks through one wrapper with ``.inner``
    (``SplitTextAttnProcessor``), so the wrapper stays in place."""
    attn = block.attn
    outer = attn.processor
    if hasattr(outer, "inner") and hasattr(outer, "state"):
        return outer.inner, lambda p: setattr(outer, "inner", p)
    return outer, attn.set_processor


def install_real_rope(transformer: nn.Module) -> int:
    """Replace each block's Qwen processor by ``RealRopeAttnProcessor`` (idempotent); returns how many were
    replaced. The attention backend of each processor is kept. Also converts the rotary tables to real
    [S, D/2, 2] views once per forward, so compiled blocks see no complex tensor."""
    cls, base = processor_class(), _base_processor_class()
    count = 0
    for block in getattr(transformer, "transformer_blocks", []):
        inner, set_inner = _slot(block)
        if isinstance(inner, cls) or type(inner) is not base:
            continue  # already ours, or someone else's processor: leave it
        new = cls()
        new._attention_backend = inner._attention_backend
        new._parallel_config = inner._parallel_config
        set_inner(new)
        count += 1
    if real_rope_installed(transformer):
        _install_table_hook(transformer)
    return count


def remove_real_rope(transformer: nn.Module) -> None:
    """Put diffusers' processor back (keeping the backend) and remove the table hook."""
    cls, base = processor_class(), _base_processor_class()
    for block in getattr(transformer, "transformer_blocks", []):
        inner, set_inner = _slot(block)
        if isinstance(inner, cls):
            old = base()
            old._attention_backend = inner._attention_backend
            old._parallel_config = inner._parallel_config
            set_inner(old)
    hook = _TABLE_HOOKS.pop(transformer, None)
    if hook is not None:
        hook.remove()


def real_rope_installed(transformer: nn.Module) -> bool:
    """True when every block runs ``RealRopeAttnProcessor`` (directly or inside the split wrapper)."""
    blocks = list(getattr(transformer, "transformer_blocks", []))
    cls = processor_class()
    return bool(blocks) and all(isinstance(_slot(b)[0], cls) for b in blocks)


def set_attention_kernel(transformer: nn.Module, kernel: str | None) -> None:
    """Route unmasked attention of every real-RoPE processor through ``kernel`` (flash-attn 4's name,
    ``attention.BACKEND``; None: the dispatcher)."""
    if kernel not in (None, attention.BACKEND):
        raise ValueError(f"attention kernel {kernel!r} is not ours; ours: {attention.BACKEND!r} (or None)")
    cls = processor_class()
    for block in getattr(transformer, "transformer_blocks", []):
        inner, _ = _slot(block)
        if isinstance(inner, cls):
            inner.attention_kernel = kernel


def set_fused_kernels(transformer: nn.Module, on: bool) -> None:
    """Our fused kernels on or off for every real-RoPE processor (the q/k norm + RoPE kernel) and every block
    feed-forward (``linear_gelu``: the projection + GELU call)."""
    cls = processor_class()
    for block in getattr(transformer, "transformer_blocks", []):
        inner, _ = _slot(block)
        if isinstance(inner, cls):
            inner.fuse_qk = on and qk_rope.fusable(block.attn)
    (install_linear_gelu if on else remove_linear_gelu)(transformer)


# Hooks live here, keyed weakly by the transformer, so no attribute is stuck on diffusers' module.
_TABLE_HOOKS: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()


def _install_table_hook(transformer: nn.Module) -> None:
    pos_embed = getattr(transformer, "pos_embed", None)
    if pos_embed is None or transformer in _TABLE_HOOKS:
        return

    # Weakly: the hook lives inside the transformer (on pos_embed), so a strong reference would make a cycle that
    # keeps a released model's weights until the next garbage collection instead of freeing them at once.
    transformer_ref = weakref.ref(transformer)

    def to_real_tables(_module: nn.Module, _args: Any, output: Any) -> Any:
        # Only when every processor can take real tables (someone may have swapped processors since).
        owner = transformer_ref()
        if owner is None or not real_rope_installed(owner):
            return output
        return tuple(_cached_real(f) for f in output)

    _TABLE_HOOKS[transformer] = pos_embed.register_forward_hook(to_real_tables)


def _cached_real(freqs: Any) -> Any:
    # A fresh contiguous copy (a few MB at 1328x1328, once per forward): diffusers' text table is a row slice
    # of a larger table, and a compiled block would otherwise guard on (and recompile for) its storage offset.
    if isinstance(freqs, torch.Tensor) and torch.is_complex(freqs):
        return to_real(freqs).clone(memory_format=torch.contiguous_format)
    return freqs
