"""Batched true CFG: one transformer forward for cond + uncond, inside the real diffusers QwenImagePipeline.

The pipeline's loop calls the transformer twice per step (cond, then uncond) with the same latents. Two
forwards at batch 1 leave the H100 under-filled in the small text part and pay every launch twice; one
forward at batch 2 does the same math with bigger GEMMs. We keep the pipeline's own loop, scheduler,
encode_prompt and VAE: ``enable_cfg_batching`` wraps two bound methods of the pipeline instance:

- ``pipe.encode_prompt`` records the last two (embeds, mask) results, so that on the cond call we know the
  negative prompt's embeddings (the pipeline encodes prompt, then negative, before the loop);
- ``pipe.transformer.forward``: on a cond call whose embeddings are the recorded prompt's, it runs
  ``[cond, uncond]`` as one batch, returns cond and keeps uncond; the following uncond call with the same
  latents object gets the kept result without computing anything.

Different prompt lengths: the shorter embedding is zero-padded to the longer and both get a boolean mask.
This is exact: QwenImageTransformer2DModel builds the joint [text, image] key mask from
``encoder_hidden_states_mask`` (padding never attends as a key), and text RoPE positions are
``max_vid_index + token index`` for every token (``compute_text_seq_len_from_mask`` only sizes the table to
the padded length), so a real token gets the same position padded or not. Padded queries produce junk rows
that are never read. But a mask takes the flash kernel away (H100, bench/results/h100_run1_exploratory: masked
batch 790 ms vs two unmasked forwards 639 ms per step), so ``SplitTextAttnProcessor`` wraps each block's own
attention processor and, for a padded batch, runs the attention once per distinct text length on the unpadded
tokens (no mask); the projections inside it run per group, everything else in the block stays batched. With
equal lengths no mask is passed at all.

Anything unexpected (a callback replacing ``prompt_embeds``, positional args, ControlNet residuals) falls
back to the plain unbatched call, so correctness never depends on the fast path.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qwen_core.pipeline_state import peek_state, state_of


@dataclass
class _Kept:
    hidden_states: torch.Tensor
    neg_embeds: torch.Tensor
    output: torch.Tensor


@dataclass
class CfgBatcher:
    """State of the batched-CFG wrapper installed on one pipeline.

    It lives in the pipeline's ``PipelineState`` (a table keyed weakly by the pipeline), so it must never
    reference the pipeline itself: ``orig_encode`` is the pipeline's bound ``encode_prompt`` held as a weak method, and
    the transformer is held directly (the transformer does not reference its pipeline).
    """

    transformer: nn.Module
    orig_forward: Any
    orig_encode: Any  # a weakref.WeakMethod, or a plain callable that does not hold the pipeline
    active: bool = True
    recent: list[tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=list)
    kept: _Kept | None = None
    stats: dict[str, int] = field(default_factory=lambda: {"batched": 0, "masked": 0, "split": 0, "reused": 0, "plain": 0})
    restore: dict[str, Any] = field(default_factory=dict)
    length_cache: dict[str, Any] = field(default_factory=dict)

    # -- wrappers ----------------------------------------------------------------------------------
    def encode_prompt(self, *args: Any, **kwargs: Any) -> Any:
        encode = self.orig_encode() if isinstance(self.orig_encode, weakref.WeakMethod) else self.orig_encode
        if encode is None:
            raise ReferenceError("the pipeline of this batched-CFG wrapper was released")
        result = encode(*args, **kwargs)
        if self.active:
            self.recent = [*self.recent[-1:], (result[0], result[1])]
        return result

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.active or args:
            return self.orig_forward(*args, **kwargs)
        hs, ehs = kwargs.get("hidden_states"), kwargs.get("encoder_hidden_states")
        kept, self.kept = self.kept, None
        if kept is not None and hs is kept.hidden_states and ehs is kept.neg_embeds:
            self.stats["reused"] += 1
            return _as_output(kept.output, kwargs.get("return_dict", True))
        neg = self._negative_for(ehs)
        if neg is None or kwargs.get("controlnet_block_samples") is not None:
            self.stats["plain"] += 1
            return self.orig_forward(**kwargs)
        cond, uncond = self._batched(kwargs, neg)
        self.kept = _Kept(hs, neg[0], uncond)
        self.stats["batched"] += 1
        return _as_output(cond, kwargs.get("return_dict", True))

    def would_batch(self, kwargs: dict[str, Any]) -> bool:
        """True when a call with these kwargs will run as a doubled (cond+uncond) batch."""
        return self.active and self._negative_for(kwargs.get("encoder_hidden_states")) is not None

    # -- helpers -----------------------------------------------------------------------------------
    def _lengths(self, items: list[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[int, ...] | None:
        key = tuple(id(m) if m is not None else (id(e), e.shape[1]) for e, m in items)
        if self.length_cache.get("key") != key:
            # Keep the tensors referenced so their ids cannot be reused while cached.
            self.length_cache = {"key": key, "items": items, "lengths": text_lengths(items)}
        return self.length_cache["lengths"]

    def _negative_for(self, ehs: Any) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        if ehs is None or len(self.recent) < 2 or self.recent[0][0] is not ehs:
            return None
        neg = self.recent[1]
        if neg[0].shape[0] != ehs.shape[0] or neg[0].shape[2:] != ehs.shape[2:]:
            return None
        return neg

    def _batched(self, kwargs: dict[str, Any], neg: tuple[torch.Tensor, torch.Tensor | None]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        items = [(kwargs["encoder_hidden_states"], kwargs.get("encoder_hidden_states_mask")), neg]
        embeds, mask = pad_and_stack(items)
        call = dict(kwargs)
        call.update(
            hidden_states=torch.cat([kwargs["hidden_states"]] * 2),
            encoder_hidden_states=embeds,
            encoder_hidden_states_mask=mask,
            return_dict=False,
        )
        # Per-sample conditioning tensors double with the batch (Layered's `additional_t_cond` marks RGB vs RGBA
        # samples). Edit-2511's `zero_cond_t` needs nothing here: the transformer appends zero timesteps to the
        # (doubled) batch itself and builds its per-token index from the (doubled) img_shapes.
        for key in ("timestep", "guidance", "additional_t_cond"):
            if isinstance(kwargs.get(key), torch.Tensor) and kwargs[key].ndim > 0:
                call[key] = torch.cat([kwargs[key]] * 2)
        if isinstance(kwargs.get("img_shapes"), list):
            call["img_shapes"] = kwargs["img_shapes"] * 2
        self.stats["masked"] += mask is not None
        lengths = self._lengths(items)
        state = split_state_of(self.transformer)
        if state is not None and mask is not None and lengths is not None:
            self.stats["split"] += 1
            # Also passed as an argument: a compiled block then sees the lengths as (symbolic) inputs instead
            # of constants read off an object, and does not recompile for every new prompt length.
            call["attention_kwargs"] = {**(call.get("attention_kwargs") or {}), "text_lengths": lengths}
            with state.active(lengths):
                out = self.orig_forward(**call)[0]
        else:
            out = self.orig_forward(**call)[0]
        cond, uncond = out.chunk(2)
        return cond, uncond


class _SplitState:
    """Text lengths of the current padded batch, shared by the split processors of one transformer."""

    def __init__(self) -> None:
        self.lengths: tuple[int, ...] | None = None

    @contextmanager
    def active(self, lengths: tuple[int, ...] | None) -> Iterator[None]:
        old, self.lengths = self.lengths, lengths
        try:
            yield
        finally:
            self.lengths = old


class SplitTextAttnProcessor:
    """Wraps a Qwen double-stream attention processor: a padded batch runs per text length, unmasked.

    Exact: each group sees only its own real text tokens (and their own RoPE rows), as in an unbatched call.
    Padded rows of the text stream get zeros; they are never used as keys and never reach the output.
    """

    def __init__(self, inner: Any, state: _SplitState) -> None:
        self.inner = inner
        self.state = state

    # diffusers' set_attention_backend sets this attribute on each processor: pass it through.
    @property
    def _attention_backend(self) -> Any:
        return getattr(self.inner, "_attention_backend", None)

    @_attention_backend.setter
    def _attention_backend(self, value: Any) -> None:
        self.inner._attention_backend = value

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor = None,
                 encoder_hidden_states_mask: torch.Tensor = None, attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: Any = None, text_lengths: tuple[int, ...] | None = None) -> Any:
        lengths = text_lengths if text_lengths is not None else self.state.lengths
        if (lengths is None or encoder_hidden_states_mask is None or image_rotary_emb is None
                or len(lengths) != hidden_states.shape[0]):
            return self.inner(attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask,
                              attention_mask, image_rotary_emb)
        img_freqs, txt_freqs = image_rotary_emb
        total = encoder_hidden_states.shape[1]
        imgs, txts = [], []
        for start, stop, n in _groups(lengths):
            img_o, txt_o = self.inner(attn, hidden_states[start:stop], encoder_hidden_states[start:stop, :n],
                                      None, None, (img_freqs, txt_freqs[:n]))
            # Unconditional (a zero-width pad for the longest group): a branch on n < total would make a
            # compiled block specialise on which prompt is the longer one.
            txt_o = torch.nn.functional.pad(txt_o, (0, 0, 0, total - n))
            imgs.append(img_o)
            txts.append(txt_o)
        return torch.cat(imgs), torch.cat(txts)


def _groups(lengths: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """Runs of equal length: (start, stop, length)."""
    out: list[tuple[int, int, int]] = []
    for i, n in enumerate(lengths):
        if out and out[-1][2] == n:
            out[-1] = (out[-1][0], i + 1, n)
        else:
            out.append((i, i + 1, n))
    return out


def split_state_of(transformer: nn.Module) -> _SplitState | None:
    """The shared length state of the split processors installed on ``transformer``, or None. Read from the
    processors themselves, so the transformer carries no extra attribute."""
    for block in getattr(transformer, "transformer_blocks", []):
        processor = block.attn.processor
        return processor.state if isinstance(processor, SplitTextAttnProcessor) else None
    return None


def install_split_attention(transformer: nn.Module) -> _SplitState:
    """Wrap every block's attention processor (idempotent); returns the shared length state."""
    state = split_state_of(transformer)
    if state is not None:
        return state
    state = _SplitState()
    for block in getattr(transformer, "transformer_blocks", []):
        block.attn.set_processor(SplitTextAttnProcessor(block.attn.processor, state))
    return state


def remove_split_attention(transformer: nn.Module) -> None:
    for block in getattr(transformer, "transformer_blocks", []):
        if isinstance(block.attn.processor, SplitTextAttnProcessor):
            block.attn.set_processor(block.attn.processor.inner)


def text_lengths(items: list[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[int, ...] | None:
    """Per-row real text length when every mask is a prefix mask (as the Qwen pipelines make), else None.

    One host sync per distinct mask; the batcher caches the answer per prompt.
    """
    out: list[int] = []
    for e, m in items:
        if m is None:
            out += [e.shape[1]] * e.shape[0]
            continue
        mb = m.to(torch.bool)
        n = mb.sum(dim=1)
        prefix = mb.long().cumprod(dim=1).sum(dim=1)
        if not bool(torch.equal(n, prefix)):
            return None
        out += [int(v) for v in n.tolist()]
    return tuple(out)


def pad_and_stack(items: list[tuple[torch.Tensor, torch.Tensor | None]]
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate [B, L_i, D] embeddings along the batch, zero-padding to the longest L with a bool mask.

    Returns mask None when every length is equal and no input had a mask (the unmasked fast kernels apply).
    """
    length = max(e.shape[1] for e, _ in items)
    if all(e.shape[1] == length and m is None for e, m in items):
        return torch.cat([e for e, _ in items]), None
    embeds, masks = [], []
    for e, m in items:
        b, n = e.shape[:2]
        valid = torch.ones(b, n, dtype=torch.bool, device=e.device) if m is None else m.to(torch.bool)
        pad = length - n
        if pad:
            e = torch.cat([e, e.new_zeros(b, pad, *e.shape[2:])], dim=1)
            valid = torch.cat([valid, valid.new_zeros(b, pad)], dim=1)
        embeds.append(e)
        masks.append(valid)
    return torch.cat(embeds), torch.cat(masks)


def _as_output(sample: torch.Tensor, return_dict: bool) -> Any:
    if not return_dict:
        return (sample,)
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput(sample=sample)


def supports_cfg_batching(pipe: Any) -> bool:
    """True for the pipelines of families whose transformer this wrapper understands (``ModelFamily.cfg_batching``:
    the Qwen-Image MMDiT families; not 2.1, whose per-branch KV caches a doubled batch would mix)."""
    from qwen_core.families import FAMILIES

    families = [f for f in FAMILIES.values() if f.pipeline_class == type(pipe).__name__]
    return bool(families) and all(f.cfg_batching for f in families)


def enable_cfg_batching(pipe: Any, *, split_attention: bool = True) -> CfgBatcher | None:
    """Install the batched-CFG wrapper on ``pipe`` (idempotent); returns its state object, or None (nothing
    installed) for a pipeline whose family does not support it (``supports_cfg_batching``).

    ``split_attention``: prompts of different lengths run their attention unmasked per length (fast
    kernels) instead of through a padding mask.
    """
    if not supports_cfg_batching(pipe):
        return None
    existing = state_of(pipe).cfg_batcher
    if existing is not None:
        existing.active = True
        return existing
    transformer: nn.Module = pipe.transformer
    encode = pipe.encode_prompt
    weak_encode = weakref.WeakMethod(encode) if getattr(encode, "__self__", None) is pipe else encode
    batcher = CfgBatcher(transformer, transformer.forward, weak_encode)
    # Instance attributes shadow the class methods; nn.Module.__call__ looks up self.forward, as accelerate's
    # hooks rely on too.
    batcher.restore = {"forward": transformer.__dict__.get("forward"),
                       "encode_prompt": pipe.__dict__.get("encode_prompt")}
    transformer.forward = batcher.forward
    pipe.encode_prompt = batcher.encode_prompt
    if split_attention:
        install_split_attention(transformer)
    state_of(pipe).cfg_batcher = batcher
    return batcher


def disable_cfg_batching(pipe: Any) -> None:
    """Remove the wrapper; if something wrapped on top of ours meanwhile, only switch ours off."""
    state = peek_state(pipe)
    batcher: CfgBatcher | None = state.cfg_batcher if state is not None else None
    if batcher is None:
        return
    batcher.active = False
    batcher.kept, batcher.recent, batcher.length_cache = None, [], {}
    remove_split_attention(pipe.transformer)
    # Put back exactly what was there before (an accelerate hook's instance forward, or nothing).
    for owner, name, ours in ((pipe.transformer, "forward", batcher.forward),
                              (pipe, "encode_prompt", batcher.encode_prompt)):
        if owner.__dict__.get(name) == ours:
            before = batcher.restore.get(name)
            if before is None:
                del owner.__dict__[name]
            else:
                owner.__dict__[name] = before
    state.cfg_batcher = None


def cfg_batching_stats(pipe: Any) -> dict[str, int]:
    state = peek_state(pipe)
    batcher = state.cfg_batcher if state is not None else None
    return dict(batcher.stats) if batcher is not None else {}
