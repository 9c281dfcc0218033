"""bench/in_memory.py: our PipelineLoader and generator over a pipeline that exists only in memory (the
benchmarks' full-size random-weight models go through it)."""

from __future__ import annotations

import sys
from pathlib import Path

import diffusers
import pytest
import torch
from test_loading import Sleeps, _fail_first_calls

from qwen_core.errors import ModelLoadError
from qwen_core.loading import RetryPolicy
from qwen_core.options import MemoryMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from in_memory import in_memory_loader  # noqa: E402


@pytest.mark.slow
class TestInMemorySource:
    def test_in_memory_pipeline_generates_like_the_saved_one(self, tiny_model_dir):
        from diffusers import QwenImagePipeline

        from qwen_core.generator import QwenImageGenerator
        from qwen_core.tiny import make_tiny_components

        pipe = QwenImagePipeline(**make_tiny_components(seed=0))
        loader = in_memory_loader(pipe, name="tiny-random", device="cpu")
        assert loader.plan.memory_mode is MemoryMode.GPU and loader.configs["transformer"]["num_layers"] == 2
        in_memory = QwenImageGenerator(loader).generate("a kite", seed=2, width=64, height=64, steps=2)
        assert [a.outcome for a in loader.attempts] == ["ok"]
        from_folder = QwenImageGenerator(tiny_model_dir, device="cpu").generate("a kite", seed=2, width=64, height=64, steps=2)
        assert torch.allclose(in_memory.images, from_folder.images, atol=1e-5)  # same seed-0 weights

    def test_released_in_memory_pipeline_cannot_reload(self):
        from diffusers import QwenImagePipeline

        from qwen_core.tiny import make_tiny_components

        loader = in_memory_loader(QwenImagePipeline(**make_tiny_components(seed=0)), device="cpu")
        loader.load()
        loader.unload()
        with pytest.raises(ModelLoadError, match="released"):
            loader.load()

    def test_placement_oom_keeps_the_pipeline_for_the_next_rung(self, monkeypatch):
        from diffusers import QwenImagePipeline

        from qwen_core.tiny import make_tiny_components

        sleeps = Sleeps()
        loader = in_memory_loader(QwenImagePipeline(**make_tiny_components(seed=0)), device="cpu",
                                  retry=RetryPolicy(sleep=sleeps))
        _fail_first_calls(monkeypatch, diffusers.DiffusionPipeline, "to", [torch.OutOfMemoryError("out of memory")])
        assert loader.load().transformer is not None
        assert [a.outcome for a in loader.attempts] == ["oom", "ok"]
