"""Bench tools the GPU runs rely on, checked on the CPU: bench/in_memory.py (our PipelineLoader and generator over
a pipeline that exists only in memory), bench/common.py's regional compile that keeps hooks outside, and
bench/attention_kernels.py's dry run."""

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
import common as C  # noqa: E402
from in_memory import in_memory_loader  # noqa: E402

from qwen_core.streaming import disable_streamed_offload, enable_streamed_offload  # noqa: E402


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


@pytest.mark.slow
class TestCompiledBlocks:
    def test_compiled_blocks_keep_hooks_outside_and_match(self, tiny_model_dir: Path) -> None:
        from diffusers import QwenImagePipeline

        pipe = QwenImagePipeline.from_pretrained(tiny_model_dir, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        kw = dict(prompt="a dog", negative_prompt="blurry", true_cfg_scale=4.0, height=64, width=64,
                  num_inference_steps=2, output_type="pt")
        ref = pipe(**kw, generator=torch.Generator().manual_seed(4)).images
        handle = enable_streamed_offload(pipe, "cpu", budget_gib=1e-4, max_pixels=64 * 64, num_slots=1)
        C.compile_blocks(pipe.transformer, backend="eager")  # dynamo tracing without a C++ toolchain
        try:
            out = pipe(**kw, generator=torch.Generator().manual_seed(4)).images
            loads = handle.transformer.stats["loads"]
        finally:
            C.uncompile_blocks(pipe.transformer)
            torch._dynamo.reset()
            disable_streamed_offload(pipe)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        assert loads == 1 + 2 * 2  # the engine's hooks still ran around every compiled block
        assert all("forward" not in b.__dict__ for b in pipe.transformer.transformer_blocks)


class TestAttentionKernels:
    def test_the_cpu_dry_run_writes_a_row_per_kernel_and_shape(self, tmp_path):
        import json

        import attention_kernels

        out = tmp_path / "attention.json"
        assert attention_kernels.main(["--tiny", "--reps", "2", "--out", str(out)]) == 0
        data = json.loads(out.read_text())
        row = data["rows"]["tiny/sdpa_default"]
        assert row["finite"] and row["median_ms"] > 0 and row["rel_err_vs_fp32"] < 1e-5
        assert "errors" not in data and data["flash4"]["status"]["problem"]  # not installed here: said why


class TestSpeedBenchParts:
    def test_profile_step_names_where_the_time_goes(self):
        import speed_sections as SS

        weight = torch.randn(256, 256)
        result = SS.profile_step(lambda: torch.nn.functional.gelu(weight @ weight))
        assert result["wall_ms"] > 0 and result["compute_kernels_ms"] > 0
        assert sum(result["by_kind_ms"].values()) == pytest.approx(result["compute_kernels_ms"], abs=0.2)
        assert result["top"] and all(row["calls"] >= 1 for row in result["top"])

    @pytest.mark.parametrize(("kernel", "kind"), [
        ("Memcpy HtoD (Pinned -> Device)", "copy"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", "attention"),
        ("nvjet_tst_256x128_64x4_2x1_v_bz_coopA_TNT", "matmul"),
        ("triton_per_fused_add_mul_native_layer_norm_0", "triton (fused elementwise, norms)"),
        ("norm_rope_rows", "triton (fused elementwise, norms)"),
        ("void at::native::elementwise_kernel<128, 2>", "other"),
    ])  # fmt: skip
    def test_kernels_are_sorted_by_kind(self, kernel, kind):
        import speed_sections as SS

        assert SS._kernel_kind(kernel) == kind

    def test_an_unknown_part_is_refused_with_the_list(self, capsys):
        import speed

        with pytest.raises(SystemExit):
            speed.parse_args(["--out", "/tmp/x", "--parts", "ours_compiled,warp_drive"])
        err = capsys.readouterr().err
        assert "warp_drive" in err and "compile_variants" in err

    def test_only_children_and_skip_children_exclude_each_other(self, capsys):
        import speed

        with pytest.raises(SystemExit):
            speed.parse_args(["--out", "/tmp/x", "--only-children", "--skip-children"])
        assert "exclude each other" in capsys.readouterr().err
