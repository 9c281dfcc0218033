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
that are never read. A mask does change which SDPA kernel runs (flash SDPA cannot take one), which the bench
measures; with equal lengths no mask is passed.

Anything unexpected (a callback replacing ``prompt_embeds``, positional args, ControlNet residuals) falls
back to the plain unbatched call, so correctness never depends on the fast path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

_ATTR = "_qwen_cfg_batcher"


@dataclass
class _Kept:
    hidden_states: torch.Tensor
    neg_embeds: torch.Tensor
    output: torch.Tensor


@dataclass
class CfgBatcher:
    """State of the batched-CFG wrapper installed on one pipeline."""

    pipe: Any
    orig_forward: Any
    orig_encode: Any
    active: bool = True
    recent: list[tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=list)
    kept: _Kept | None = None
    stats: dict[str, int] = field(default_factory=lambda: {"batched": 0, "masked": 0, "reused": 0, "plain": 0})
    restore: dict[str, Any] = field(default_factory=dict)

    # -- wrappers ----------------------------------------------------------------------------------
    def encode_prompt(self, *args: Any, **kwargs: Any) -> Any:
        result = self.orig_encode(*args, **kwargs)
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

    # -- helpers -----------------------------------------------------------------------------------
    def _negative_for(self, ehs: Any) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        if ehs is None or len(self.recent) < 2 or self.recent[0][0] is not ehs:
            return None
        neg = self.recent[1]
        if neg[0].shape[0] != ehs.shape[0] or neg[0].shape[2:] != ehs.shape[2:]:
            return None
        return neg

    def _batched(self, kwargs: dict[str, Any], neg: tuple[torch.Tensor, torch.Tensor | None]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, mask = pad_and_stack(
            [(kwargs["encoder_hidden_states"], kwargs.get("encoder_hidden_states_mask")), neg])
        call = dict(kwargs)
        call.update(
            hidden_states=torch.cat([kwargs["hidden_states"]] * 2),
            encoder_hidden_states=embeds,
            encoder_hidden_states_mask=mask,
            return_dict=False,
        )
        for key in ("timestep", "guidance"):
            if isinstance(kwargs.get(key), torch.Tensor) and kwargs[key].ndim > 0:
                call[key] = torch.cat([kwargs[key]] * 2)
        if isinstance(kwargs.get("img_shapes"), list):
            call["img_shapes"] = kwargs["img_shapes"] * 2
        self.stats["masked"] += mask is not None
        out = self.orig_forward(**call)[0]
        cond, uncond = out.chunk(2)
        return cond, uncond


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


def enable_cfg_batching(pipe: Any) -> CfgBatcher:
    """Install the batched-CFG wrapper on ``pipe`` (idempotent); returns its state object."""
    existing = getattr(pipe, _ATTR, None)
    if existing is not None:
        existing.active = True
        return existing
    transformer: nn.Module = pipe.transformer
    batcher = CfgBatcher(pipe, transformer.forward, pipe.encode_prompt)
    # Instance attributes shadow the class methods; nn.Module.__call__ looks up self.forward, as accelerate's
    # hooks rely on too.
    batcher.restore = {"forward": transformer.__dict__.get("forward"),
                       "encode_prompt": pipe.__dict__.get("encode_prompt")}
    transformer.forward = batcher.forward
    pipe.encode_prompt = batcher.encode_prompt
    setattr(pipe, _ATTR, batcher)
    return batcher


def disable_cfg_batching(pipe: Any) -> None:
    """Remove the wrapper; if something wrapped on top of ours meanwhile, only switch ours off."""
    batcher: CfgBatcher | None = getattr(pipe, _ATTR, None)
    if batcher is None:
        return
    batcher.active = False
    batcher.kept, batcher.recent = None, []
    # Put back exactly what was there before (an accelerate hook's instance forward, or nothing).
    for owner, name, ours in ((pipe.transformer, "forward", batcher.forward),
                              (pipe, "encode_prompt", batcher.encode_prompt)):
        if owner.__dict__.get(name) == ours:
            before = batcher.restore.get(name)
            if before is None:
                del owner.__dict__[name]
            else:
                owner.__dict__[name] = before
    setattr(pipe, _ATTR, None)


def cfg_batching_stats(pipe: Any) -> dict[str, int]:
    batcher = getattr(pipe, _ATTR, None)
    return dict(batcher.stats) if batcher is not None else {}
