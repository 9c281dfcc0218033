"""qwen_core.cfg_batch: cond+uncond in one forward gives the same images as diffusers' two forwards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from qwen_core.cfg_batch import (
    cfg_batching_stats,
    disable_cfg_batching,
    enable_cfg_batching,
    install_split_attention,
    pad_and_stack,
    remove_split_attention,
    text_lengths,
)

pytestmark = pytest.mark.slow
SHORT_NEG = "blurry"
LONG_NEG = "a long negative prompt with many more words than the positive prompt has in it, ugly, blurry"


@pytest.fixture(scope="module")
def pipe(tiny_model_dir: Path) -> Any:
    from diffusers import QwenImagePipeline

    p = QwenImagePipeline.from_pretrained(tiny_model_dir, dtype=torch.float32)
    p.set_progress_bar_config(disable=True)
    return p


def _run(pipe: Any, negative: str | None = SHORT_NEG, **extra: Any) -> torch.Tensor:
    kw: dict[str, Any] = dict(prompt="a cat on a mat", height=64, width=64, num_inference_steps=3,
                              output_type="pt", generator=torch.Generator().manual_seed(3))
    if negative is not None:
        kw.update(negative_prompt=negative, true_cfg_scale=4.0)
    kw.update(extra)
    return pipe(**kw).images


class TestEquivalence:
    @pytest.mark.parametrize("split", [True, False])
    @pytest.mark.parametrize("negative", [SHORT_NEG, LONG_NEG, "a cat on a mat"])
    def test_batched_equals_two_forwards(self, pipe: Any, negative: str, split: bool) -> None:
        ref = _run(pipe, negative)
        enable_cfg_batching(pipe, split_attention=split)
        try:
            out = _run(pipe, negative)
            stats = cfg_batching_stats(pipe)
        finally:
            disable_cfg_batching(pipe)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        # 3 steps: each step one batched forward, and the uncond call served from it.
        assert stats["batched"] == 3 and stats["reused"] == 3 and stats["plain"] == 0
        # Prompts of different lengths are padded; with split attention the mask never reaches SDPA.
        differ = negative != "a cat on a mat"
        assert (stats["masked"] == 3) == differ
        assert stats["split"] == (3 if differ and split else 0)

    def test_padding_with_mask_does_not_change_the_transformer_output(self, pipe: Any) -> None:
        t = pipe.transformer
        g = torch.Generator().manual_seed(0)
        hs = torch.randn(1, 16, t.config.in_channels, generator=g)
        short = torch.randn(1, 5, t.config.joint_attention_dim, generator=g)
        long = torch.randn(1, 9, t.config.joint_attention_dim, generator=g)
        common = dict(timestep=torch.tensor([0.5]), img_shapes=[[(1, 4, 4)]], return_dict=False)
        with torch.no_grad():
            ref = t(hidden_states=hs, encoder_hidden_states=short, **common)[0]
            embeds, mask = pad_and_stack([(short, None), (long, None)])
            both = t(hidden_states=torch.cat([hs, hs]), encoder_hidden_states=embeds,
                     encoder_hidden_states_mask=mask, timestep=torch.tensor([0.5, 0.5]),
                     img_shapes=[[(1, 4, 4)]] * 2, return_dict=False)[0]
        torch.testing.assert_close(both[:1], ref, atol=1e-5, rtol=1e-5)


    def test_split_attention_equals_unbatched_per_prompt(self, pipe: Any) -> None:
        t = pipe.transformer
        g = torch.Generator().manual_seed(1)
        hs = torch.randn(1, 16, t.config.in_channels, generator=g)
        short = torch.randn(1, 4, t.config.joint_attention_dim, generator=g)
        long = torch.randn(1, 7, t.config.joint_attention_dim, generator=g)
        common = dict(timestep=torch.tensor([0.3]), img_shapes=[[(1, 4, 4)]], return_dict=False)
        state = install_split_attention(t)
        try:
            with torch.no_grad():
                refs = [t(hidden_states=hs, encoder_hidden_states=e, **common)[0] for e in (long, short)]
                embeds, mask = pad_and_stack([(long, None), (short, None)])
                with state.active(text_lengths([(long, None), (short, None)])):
                    both = t(hidden_states=torch.cat([hs, hs]), encoder_hidden_states=embeds,
                             encoder_hidden_states_mask=mask, timestep=torch.tensor([0.3, 0.3]),
                             img_shapes=[[(1, 4, 4)]] * 2, return_dict=False)[0]
        finally:
            remove_split_attention(t)
        torch.testing.assert_close(both[:1], refs[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(both[1:], refs[1], atol=1e-6, rtol=1e-5)
        assert not any(type(b.attn.processor).__name__ == "SplitTextAttnProcessor" for b in t.transformer_blocks)

    def test_text_lengths(self) -> None:
        e = torch.zeros(2, 5, 3)
        assert text_lengths([(e, None)]) == (5, 5)
        assert text_lengths([(e, torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))]) == (3, 5)
        assert text_lengths([(e, torch.tensor([[1, 0, 1, 0, 0], [1, 1, 1, 1, 1]]))]) is None  # not a prefix


class TestFallbacks:
    def test_no_negative_prompt_runs_plain(self, pipe: Any) -> None:
        ref = _run(pipe, None)
        enable_cfg_batching(pipe)
        try:
            out = _run(pipe, None)
            stats = cfg_batching_stats(pipe)
        finally:
            disable_cfg_batching(pipe)
        torch.testing.assert_close(out, ref)
        assert stats["batched"] == 0 and stats["plain"] == 3

    def test_callback_replacing_embeds_falls_back_and_stays_correct(self, pipe: Any) -> None:
        def cb(p: Any, i: int, t: Any, kw: dict[str, Any]) -> dict[str, Any]:
            return {"prompt_embeds": kw["prompt_embeds"].clone()}

        extra = dict(callback_on_step_end=cb, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
        ref = _run(pipe, SHORT_NEG, **extra)
        enable_cfg_batching(pipe)
        try:
            out = _run(pipe, SHORT_NEG, **extra)
            stats = cfg_batching_stats(pipe)
        finally:
            disable_cfg_batching(pipe)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        assert stats["batched"] == 1 and stats["plain"] == 4  # step 0 batched, then the embeds are new objects


class TestInstallation:
    def test_enable_is_idempotent_and_disable_restores(self, pipe: Any) -> None:
        a = enable_cfg_batching(pipe)
        assert enable_cfg_batching(pipe) is a
        disable_cfg_batching(pipe)
        assert "forward" not in pipe.transformer.__dict__
        assert "encode_prompt" not in pipe.__dict__
        assert cfg_batching_stats(pipe) == {}
        disable_cfg_batching(pipe)  # second disable is a no-op

    def test_pad_and_stack(self) -> None:
        a, b = torch.ones(1, 3, 4), torch.ones(1, 5, 4)
        embeds, mask = pad_and_stack([(a, None), (b, torch.tensor([[1, 1, 1, 1, 0]]))])
        assert embeds.shape == (2, 5, 4)
        assert mask.tolist() == [[True, True, True, False, False], [True, True, True, True, False]]
        assert torch.all(embeds[0, 3:] == 0)
        same, none = pad_and_stack([(a, None), (a.clone(), None)])
        assert same.shape == (2, 3, 4) and none is None
