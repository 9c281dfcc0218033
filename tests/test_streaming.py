"""qwen_core.streaming on the CPU: the streamed model computes exactly what the resident one does."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from qwen_core.errors import InvalidInputError
from qwen_core.streaming import (
    ModuleStreamer,
    disable_streamed_offload,
    enable_streamed_offload,
    plan_resident,
    spread_streamed,
    streaming_handle,
)


def _stack(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)) for _ in range(5)])


class TestPlanning:
    def test_spread_is_even_and_unique(self) -> None:
        s = spread_streamed(60, 20)
        assert len(s) == 20 and len(set(s)) == 20 and all(0 <= i < 60 for i in s)
        assert max(b - a for a, b in zip(s, s[1:], strict=False)) <= 3
        assert spread_streamed(5, 0) == [] and spread_streamed(5, 9) == [0, 1, 2, 3, 4]

    def test_more_budget_keeps_more_resident(self) -> None:
        gib = 1024**3
        counts = [len(plan_resident(60, int(0.634 * gib), int(0.1 * gib), b, act_gib_per_mpix=0.8).resident)
                  for b in (3, 8, 12, 16, 24, 48, 80)]
        assert counts == sorted(counts) and counts[0] == 0 and counts[-1] == 60

    def test_plan_fits_the_budget(self) -> None:
        gib = 1024**3
        p = plan_resident(60, int(0.634 * gib), int(0.1 * gib), 16.0, act_gib_per_mpix=0.8)
        used = len(p.resident) * p.block_gib + p.nonblock_gib + 2 * p.slot_gib + p.reserve_gib
        assert used <= 16.0 and 0 < len(p.resident) < 60 and "resident" in p.summary()

    def test_budget_must_be_positive(self) -> None:
        with pytest.raises(InvalidInputError, match="budget_gib"):
            plan_resident(60, 1, 1, 0.0)


class TestModuleStreamer:
    @pytest.mark.parametrize("resident,slots", [([], 2), ([1, 3], 2), ([0], 3), ([], 1)])
    def test_streamed_equals_resident(self, resident: list[int], slots: int) -> None:
        ref_model, model = _stack(), _stack()
        x = torch.randn(4, 8)
        with torch.no_grad():
            ref = ref_model(x)
            s = ModuleStreamer(list(model), "cpu", resident, num_slots=slots)
            for _ in range(3):  # several passes: the cyclic prefetch wraps around
                torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
        assert s.stats["sync_loads"] == 0

    def test_out_of_order_call_is_still_correct(self) -> None:
        ref_model, model = _stack(), _stack()
        x = torch.randn(4, 8)
        with torch.no_grad():
            ModuleStreamer(list(model), "cpu", [], num_slots=2)
            part = model[3](model[2](x))  # an aborted pass: blocks 2, 3 only
            torch.testing.assert_close(part, ref_model[3](ref_model[2](x)), rtol=0, atol=0)
            torch.testing.assert_close(model(x), ref_model(x), rtol=0, atol=0)

    def test_remove_gives_back_real_parameters(self) -> None:
        ref_model, model = _stack(), _stack()
        s = ModuleStreamer(list(model), "cpu", [2], num_slots=2)
        s.remove()
        for (n, a), (_, b) in zip(ref_model.named_parameters(), model.named_parameters(), strict=True):
            assert torch.equal(a, b), n
        assert not any(m._forward_pre_hooks for m in model)

    def test_fp8_needs_cuda(self) -> None:
        with pytest.raises(InvalidInputError, match="fp8"):
            ModuleStreamer(list(_stack()), "cpu", [], fp8=True)


@pytest.mark.slow
class TestPipeline:
    @pytest.fixture(scope="class")
    @classmethod
    def pipe(cls, tiny_model_dir: Path) -> Any:
        from diffusers import QwenImagePipeline

        p = QwenImagePipeline.from_pretrained(tiny_model_dir, dtype=torch.float32)
        p.set_progress_bar_config(disable=True)
        return p

    @staticmethod
    def _run(pipe: Any) -> torch.Tensor:
        return pipe(prompt="a cat on a mat", negative_prompt="blurry", true_cfg_scale=4.0, height=64, width=64,
                    num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(5)).images

    def test_streamed_pipeline_equals_resident(self, pipe: Any) -> None:
        ref = self._run(pipe)
        # One slot for the tiny model's two blocks, so they really take turns.
        handle = enable_streamed_offload(pipe, "cpu", budget_gib=1e-4, max_pixels=64 * 64, num_slots=1,
                                         cfg_batching=False)
        try:
            assert handle.plan.resident == () and len(handle.plan.streamed) == 2
            out1, out2 = self._run(pipe), self._run(pipe)
            # The text encoder keeps nothing between prompts: its streamed weights are placeholders.
            assert all(p.numel() == 0 for p in pipe.text_encoder.get_input_embeddings().parameters())
            assert handle.transformer.stats["sync_loads"] == 0
        finally:
            disable_streamed_offload(pipe)
        torch.testing.assert_close(out1, ref, rtol=0, atol=0)
        torch.testing.assert_close(out2, ref, rtol=0, atol=0)
        torch.testing.assert_close(self._run(pipe), ref, rtol=0, atol=0)  # disable restored the weights

    def test_streamed_with_batched_cfg(self, pipe: Any) -> None:
        ref = self._run(pipe)
        handle = enable_streamed_offload(pipe, "cpu", budget_gib=1e-4, max_pixels=64 * 64, num_slots=1)
        try:
            assert handle.cfg_batcher is not None  # on by default: streaming pays per forward
            out = self._run(pipe)
            loads = handle.transformer.stats["loads"]
        finally:
            disable_streamed_offload(pipe)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        # Priming loads 1 block, then each of the 2 steps moves both blocks once (not once per CFG branch).
        assert loads == 1 + 2 * 2
        assert "forward" not in pipe.transformer.__dict__  # disable removed the batching wrapper too

    def test_disable_gives_the_vae_its_own_tiling_back(self, pipe: Any) -> None:
        # Regression: the engine's tiling outlived it, so a later resident run decoded in tiles (bench/RESULTS.md).
        assert not pipe.vae.use_tiling
        enable_streamed_offload(pipe, "cpu", budget_gib=64.0, max_pixels=64 * 64, vae_tiling=True)
        assert pipe.vae.use_tiling
        disable_streamed_offload(pipe)
        assert not pipe.vae.use_tiling

    def test_large_budget_keeps_everything_resident(self, pipe: Any) -> None:
        handle = enable_streamed_offload(pipe, "cpu", budget_gib=64.0, max_pixels=64 * 64)
        try:
            assert handle.plan.streamed == () and handle.plan.resident == (0, 1)
        finally:
            disable_streamed_offload(pipe)


@pytest.mark.slow
class TestReplan:
    """Regression: a size above the planned reserve used to run with the 1328x1328 plan (OOM on a real card)."""

    def test_larger_image_replans_and_stays_exact(self, tiny_model_dir: Path) -> None:
        from diffusers import QwenImagePipeline

        pipe = QwenImagePipeline.from_pretrained(tiny_model_dir, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        kw = dict(prompt="a cat", negative_prompt="blurry", true_cfg_scale=4.0, height=64, width=64,
                  num_inference_steps=2, output_type="pt")
        ref = pipe(**kw, generator=torch.Generator().manual_seed(2)).images
        # Big budget: both blocks resident for a 32x32 plan; the 64x64 request exceeds the planned pixels.
        first = enable_streamed_offload(pipe, "cpu", budget_gib=64.0, max_pixels=32 * 32)
        try:
            out = pipe(**kw, generator=torch.Generator().manual_seed(2)).images
            now = streaming_handle(pipe)
            assert now is not first and getattr(now, "replans", 0) == 1 and now.max_pixels >= 64 * 64
            assert now.cfg_batcher is not None and "forward" in pipe.transformer.__dict__
        finally:
            disable_streamed_offload(pipe)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        assert "forward" not in pipe.transformer.__dict__

    def test_a_family_without_batched_cfg_counts_one_row_per_pixel(self, tiny_family_dir) -> None:
        # Regression (H200, 2.1 with a condition image in 16 GiB: OOM): 2.1 runs CFG as two forwards, so its
        # activation slope is per row; counting its tokens as half a batched forward's never re-planned.
        from diffusers import QwenImage21Pipeline

        pipe = QwenImage21Pipeline.from_pretrained(tiny_family_dir("qwen-image-2.1"), dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        first = enable_streamed_offload(pipe, "cpu", budget_gib=64.0, max_pixels=80 * 80)
        try:
            assert first.cfg_batcher is None  # this family's two forwards stay two
            pipe(prompt="a cat", height=96, width=96, num_inference_steps=2, output_type="pt",
                 generator=torch.Generator().manual_seed(0))
            now = streaming_handle(pipe)
            # 96x96 = 36 tokens of one row: 9216 pixels, above the 6400 planned (as half rows: 4608, below).
            assert now is not first and now.replans == 1 and now.max_pixels >= 96 * 96
        finally:
            disable_streamed_offload(pipe)

    def test_a_condition_images_cache_is_reserved_beside_the_activations(self, tiny_family_dir) -> None:
        # 2.1 keeps the condition image's keys/values for every step: the re-plan reserves them (both branches).
        from diffusers import QwenImage21Pipeline
        from PIL import Image

        from qwen_core import memory_model

        pipe = QwenImage21Pipeline.from_pretrained(tiny_family_dir("qwen-image-2.1"), dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        seen: dict[str, Any] = {}

        def record(module: Any, args: tuple, kwargs: dict) -> None:
            seen.setdefault("tokens", kwargs["hidden_states"].shape[1])
            seen.setdefault("target", math.prod(kwargs["img_shapes"][0][-1]))

        hook = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
        first = enable_streamed_offload(pipe, "cpu", budget_gib=64.0, max_pixels=64 * 64, family="qwen-image-2.1")
        try:
            pipe(prompt="a cat", image=[Image.new("RGB", (64, 64), "red")], height=64, width=64,
                 num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0))
            now = streaming_handle(pipe)
        finally:
            hook.remove()
            disable_streamed_offload(pipe)
        fam = memory_model.family_model("qwen-image-2.1")
        cache_ratio = fam.reference_cache_gib_per_mpix("fp32") / fam.activation_gib_per_mpix("fp32")
        references = seen["tokens"] - seen["target"]
        assert references > 0
        expected = seen["tokens"] * 256 + int(references * 256 * 2 * cache_ratio)
        assert now is not first and now.max_pixels >= expected > seen["tokens"] * 256
