"""PipelineLoader: eager processor, lazy weights, retries, the OOM fallback ladder, safety, attention."""

from __future__ import annotations

import dataclasses
import errno
import random
import sys
import types
from pathlib import Path

import diffusers
import pytest
import torch

from qwen_core import devices, governor, loading, memory_model
from qwen_core.errors import ModelFolderError, ModelLoadError, QwenError
from qwen_core.loading import (
    LoadPlan,
    PipelineLoader,
    RetryPolicy,
    apply_attention,
    apply_memory_mode,
    auto_memory_mode,
    classify_error,
    next_plan,
)
from qwen_core.memory import get_residency_manager
from qwen_core.options import MemoryMode
from qwen_core.session_log import get_session_log

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _nothing_resident(tmp_path, monkeypatch):
    """Each test starts with no resident pipeline (handles with the same settings share one) and its own
    session log (a subprocess of another test may rotate the shared one under this process)."""
    monkeypatch.setenv("QWEN_REPORTS_DIR", str(tmp_path / "reports"))
    get_residency_manager().release_all()
    loading._reset_sdpa_flag()
    yield
    loading._reset_sdpa_flag()


class Sleeps(list):
    """A RetryPolicy.sleep that records instead of sleeping (tests never wait)."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def _loader(path: Path, **kwargs) -> tuple[PipelineLoader, Sleeps]:
    sleeps = Sleeps()
    return PipelineLoader(path, device="cpu", retry=RetryPolicy(sleep=sleeps), **kwargs), sleeps


def _fail_first_calls(monkeypatch, owner: object, name: str, errors: list[BaseException]) -> list[int]:
    """Patch ``owner.name`` so its first len(errors) calls raise those errors; returns a call counter."""
    original = getattr(owner, name)
    calls = [0]

    def patched(*args, **kwargs):
        calls[0] += 1
        if calls[0] <= len(errors):
            raise errors[calls[0] - 1]
        return original(*args, **kwargs)

    if isinstance(owner, type) and isinstance(owner.__dict__.get(name), classmethod):
        monkeypatch.setattr(owner, name, classmethod(lambda cls, *a, **k: patched(*a, **k)))
    else:
        monkeypatch.setattr(owner, name, patched)
    return calls


class TestEagerAndLazy:
    def test_construction_builds_light_parts_only(self, tiny_model_dir):
        loader, _ = _loader(tiny_model_dir)
        assert not loader.is_loaded and loader.attempts == []
        assert type(loader.tokenizer).__name__.startswith("Qwen2Tokenizer")
        assert type(loader.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
        assert loader.configs["transformer"]["num_layers"] == 2
        pipe = loader.load()
        assert loader.is_loaded and loader.load() is pipe  # loaded once
        assert pipe.tokenizer is loader.tokenizer  # the eager tokenizer is reused, not rebuilt
        assert [a.outcome for a in loader.attempts] == ["ok"]

    def test_unload_keeps_light_parts_and_reloads(self, tiny_model_dir):
        loader, _ = _loader(tiny_model_dir)
        loader.load()
        tokenizer = loader.tokenizer
        loader.unload()
        assert not loader.is_loaded and loader.tokenizer is tokenizer
        assert loader.load() is not None and len(loader.attempts) == 2

    def test_safe_loading_arguments(self, tiny_model_dir, monkeypatch):
        seen = {}
        original = diffusers.QwenImagePipeline.from_pretrained.__func__

        def spy(cls, *args, **kwargs):
            seen.update(kwargs)
            return original(cls, *args, **kwargs)

        monkeypatch.setattr(diffusers.QwenImagePipeline, "from_pretrained", classmethod(spy))
        _loader(tiny_model_dir)[0].load()
        assert seen["use_safetensors"] is True and seen["local_files_only"] is True
        assert seen["trust_remote_code"] is False

    def test_pickle_folder_refused_before_anything_loads(self, tiny_model_copy):
        (tiny_model_copy / "transformer" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04")
        with pytest.raises(ModelFolderError, match="arbitrary code"):
            _loader(tiny_model_copy)

    def test_missing_component_refused(self, tiny_model_copy):
        for p in (tiny_model_copy / "vae").iterdir():
            p.unlink()
        (tiny_model_copy / "vae").rmdir()
        with pytest.raises(ModelFolderError, match="'vae'.*missing"):
            _loader(tiny_model_copy)

    def test_folder_damaged_after_construction_is_caught_at_load(self, tiny_model_copy):
        loader, _ = _loader(tiny_model_copy)
        shard = tiny_model_copy / "transformer" / "diffusion_pytorch_model.safetensors"
        shard.write_bytes(shard.read_bytes()[:-1000])
        with pytest.raises(ModelFolderError, match="truncated"):
            loader.load()
        assert not loader.is_loaded and loader.tokenizer is not None


class TestRetries:
    def test_oom_at_first_weight_load_falls_back_to_lighter_mode(self, tiny_model_dir, monkeypatch):
        loader, sleeps = _loader(tiny_model_dir)
        assert loader.plan.memory_mode is MemoryMode.GPU
        _fail_first_calls(monkeypatch, diffusers.QwenImagePipeline, "from_pretrained",
                          [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")])  # fmt: skip
        assert loader.load() is not None
        first, second = loader.attempts
        assert first.outcome == "oom" and "out of memory" in first.reason
        assert second.outcome == "ok" and second.plan.memory_mode is MemoryMode.MODEL_OFFLOAD
        assert loader.plan.pixel_scale == pytest.approx(0.75)  # the governor gets a smaller window
        assert len(sleeps) == 1 and sleeps[0] > 0
        log = get_session_log().read_text()
        assert "attempt 1 (gpu/fp32" in log and ": oom" in log and "retrying in" in log and "model_offload" in log

    def test_oom_at_device_move_falls_back(self, tiny_model_dir, monkeypatch):
        # Fault injected where the weights meet the device: DiffusionPipeline.to.
        loader, _ = _loader(tiny_model_dir)
        _fail_first_calls(monkeypatch, diffusers.DiffusionPipeline, "to", [torch.OutOfMemoryError("out of memory")])
        loader.load()
        assert [a.outcome for a in loader.attempts] == ["oom", "ok"]
        inputs = loader.governor_inputs()
        full = governor.max_pixels(None, "fp32", "model_offload")
        assert inputs["situation"].memory_mode == "model_offload" and inputs["max_pixels"] == int(full * 0.75)

    def test_transient_errors_retry_same_plan_with_growing_backoff(self, tiny_model_dir, monkeypatch):
        loader, sleeps = _loader(tiny_model_dir)
        errors = [OSError(errno.EIO, "Input/output error"), TimeoutError("read timed out")]
        _fail_first_calls(monkeypatch, diffusers.QwenImagePipeline, "from_pretrained", errors)
        loader.load()
        assert [a.outcome for a in loader.attempts] == ["transient", "transient", "ok"]
        assert {a.plan for a in loader.attempts} == {loader.plan}
        assert 0.25 <= sleeps[0] <= 0.5 and 0.5 <= sleeps[1] <= 1.0

    def test_permanent_error_keeps_processor_and_next_call_retries(self, tiny_model_dir, monkeypatch):
        loader, sleeps = _loader(tiny_model_dir)
        calls = _fail_first_calls(monkeypatch, diffusers.QwenImagePipeline, "from_pretrained",
                                  [ValueError("weights do not match the config")])  # fmt: skip
        with pytest.raises(ModelLoadError) as err:
            loader.load()
        assert "weights do not match" in str(err.value) and sleeps == []
        assert not loader.is_loaded and loader.tokenizer is not None
        assert "ERROR" in get_session_log().read_text()
        assert loader.load() is not None and calls[0] == 2  # the next call tried again and succeeded

    def test_bf16_failure_falls_back_to_fp16(self, tiny_model_dir, monkeypatch):
        loader, _ = _loader(tiny_model_dir, dtype="bf16")
        assert loader.plan.dtype == torch.bfloat16
        _fail_first_calls(monkeypatch, diffusers.QwenImagePipeline, "from_pretrained",
                          [RuntimeError('"addmm_impl_cpu_" not implemented for \'BFloat16\'')])  # fmt: skip
        pipe = loader.load()
        assert [a.outcome for a in loader.attempts] == ["dtype", "ok"]
        assert loader.plan.dtype == torch.float16 and pipe.transformer.dtype == torch.float16

    def test_ladder_exhausted_raises_with_every_attempt_and_fix(self, tiny_model_dir, monkeypatch):
        loader, sleeps = _loader(tiny_model_dir)
        oom = torch.OutOfMemoryError("out of memory")
        _fail_first_calls(monkeypatch, diffusers.QwenImagePipeline, "from_pretrained", [oom] * 10)
        with pytest.raises(ModelLoadError) as err:
            loader.load()
        assert len(loader.attempts) == loader.retry.max_attempts == 6
        assert "sequential" in str(err.value) and err.value.fix and "memory" in err.value.fix
        assert len(sleeps) == 5


class TestPlans:
    def test_oom_ladder_order(self):
        plan, seen = LoadPlan(MemoryMode.GPU, torch.bfloat16), []
        while plan is not None:
            seen.append((plan.memory_mode.value, plan.max_memory_fraction))
            plan = next_plan(plan, "oom")
        assert seen == [("gpu", 0.9), ("model_offload", 0.9), ("group_offload", 0.9), ("sequential", 0.9),
                        ("sequential", 0.7), ("sequential", 0.5)]  # fmt: skip

    def test_streamed_lowers_to_group_offload(self):
        assert next_plan(LoadPlan(MemoryMode.STREAMED, torch.bfloat16), "oom").memory_mode is MemoryMode.GROUP_OFFLOAD

    def test_dtype_and_unknown_errors(self):
        assert next_plan(LoadPlan(MemoryMode.GPU, torch.bfloat16), "dtype").dtype == torch.float16
        assert next_plan(LoadPlan(MemoryMode.GPU, torch.float16), "dtype") is None
        assert next_plan(LoadPlan(MemoryMode.GPU, torch.float16), "error") is None

    @pytest.mark.parametrize(
        ("err", "kind"),
        [
            (torch.OutOfMemoryError("CUDA out of memory"), "oom"),
            (RuntimeError("DefaultCPUAllocator: can't allocate memory"), "oom"),
            (MemoryError(), "oom"),
            (OSError(errno.EIO, "I/O error"), "transient"),
            (TimeoutError(), "transient"),
            (FileNotFoundError("x"), "error"),
            (PermissionError("x"), "error"),
            (RuntimeError("not implemented for 'BFloat16'"), "dtype"),
            (ValueError("bad"), "error"),
        ],
    )
    def test_classify(self, err, kind):
        assert classify_error(err) == kind

    def test_backoff_is_bounded_and_jittered(self):
        policy, rng = RetryPolicy(base_delay_s=0.5, max_delay_s=8.0), random.Random(0)
        delays = [policy.delay(n, rng) for n in range(1, 9)]
        caps = [min(8.0, 0.5 * 2 ** (n - 1)) for n in range(1, 9)]
        assert all(cap / 2 <= d <= cap for d, cap in zip(delays, caps, strict=True))
        assert len({round(d / cap, 6) for d, cap in zip(delays, caps, strict=True)}) > 1  # jitter


def _cfg(tiny_model_dir, **changes):
    return dataclasses.replace(_loader(tiny_model_dir)[0].device_config, **changes)


class TestMemoryModes:
    def test_auto_on_cpu_is_resident(self, tiny_model_dir):
        loader, _ = _loader(tiny_model_dir)
        assert loader.plan.memory_mode is MemoryMode.GPU and "cpu" in loader.memory_mode_reason

    # 48 GiB, not 45: the memory model's model_offload entry (derived, conservative: the transformer resident
    # beside an untiled VAE decode) needs ~46.2 GiB for 1328x1328; the old loader formula (largest + 3 GiB) said 41.
    @pytest.mark.parametrize(("free_gb", "streaming", "mode"), [
        (80.0, False, MemoryMode.GPU),
        (48.0, False, MemoryMode.MODEL_OFFLOAD),
        (16.0, True, MemoryMode.STREAMED),
        (16.0, False, MemoryMode.GROUP_OFFLOAD),
    ])  # fmt: skip
    def test_auto_on_cuda_from_free_vram_and_model_size(self, tiny_model_dir, monkeypatch, free_gb, streaming, mode):
        # The full-size model in bf16: 20.4 B transformer, 8.3 B text encoder, 0.13 B VAE params.
        sizes = {"transformer": int(20.43e9 * 2), "text_encoder": int(8.29e9 * 2), "vae": int(0.127e9 * 2)}
        monkeypatch.setattr(memory_model, "streaming_available", lambda: streaming)
        cfg = _cfg(tiny_model_dir, device="cuda", vram_free_gb=free_gb, vram_total_gb=80.0)
        choice = auto_memory_mode(sizes, cfg, torch.bfloat16, free_gb)
        assert choice.mode == mode.value and choice.vram_gib == free_gb

    @pytest.mark.parametrize(("free_now", "mode"), [(80.0, MemoryMode.GPU), (48.0, MemoryMode.MODEL_OFFLOAD),
                                                    (20.0, MemoryMode.STREAMED)])
    def test_auto_is_decided_again_at_first_load_from_fresh_free_vram(self, tiny_model_dir, monkeypatch, free_now, mode):
        loader, _ = _loader(tiny_model_dir)
        sizes = {"transformer": 20.43e9, "text_encoder": 8.29e9, "vae": 0.127e9}
        monkeypatch.setattr(type(loader.source.folder), "num_params", lambda self, name: int(sizes.get(name, 0)))
        loader.device_config = dataclasses.replace(loader.device_config, device="cuda", vram_free_gb=10.0, vram_total_gb=80.0)
        probe = devices.HardwareProbe(cuda_available=True, vram_total_gb=80.0, vram_free_gb=free_now)
        monkeypatch.setattr(devices, "probe_hardware", lambda device="cuda": probe)
        plan = loader.refresh_plan(LoadPlan(MemoryMode.GROUP_OFFLOAD, torch.bfloat16, pixel_scale=0.5), rechoose=True)
        assert plan.memory_mode is mode and plan.pixel_scale == 0.5
        assert plan.vram_gib == free_now  # the fresh reading, carried for the streamed budget and the governor
        kept = loader.refresh_plan(LoadPlan(MemoryMode.GROUP_OFFLOAD, torch.bfloat16), rechoose=False)
        assert kept.memory_mode is MemoryMode.GROUP_OFFLOAD and kept.vram_gib == free_now

    def test_offload_modes_on_cpu_stay_resident(self, tiny_model_dir):
        loader, _ = _loader(tiny_model_dir, memory_mode="sequential")
        loader.load()
        assert "ignored" in loader.placement and loader.pipeline.transformer.device.type == "cpu"

    def test_streamed_without_engine_is_a_clear_error(self, tiny_model_dir, monkeypatch):
        monkeypatch.setitem(sys.modules, "qwen_core.streaming", None)  # import fails as if the file were absent
        cfg = _cfg(tiny_model_dir, device="cuda", vram_free_gb=16.0, vram_total_gb=16.0)
        with pytest.raises(QwenError, match="streaming.py"):
            apply_memory_mode(object(), LoadPlan(MemoryMode.STREAMED, torch.bfloat16), cfg)


def test_streamed_mode_hands_budget_and_window_to_the_engine(tiny_model_dir, monkeypatch):
    calls = []
    engine = types.SimpleNamespace(enable_streamed_offload=lambda pipe, **kw: calls.append(kw))
    monkeypatch.setitem(sys.modules, "qwen_core.streaming", engine)
    cfg = _cfg(tiny_model_dir, device="cuda", vram_free_gb=15.9, vram_total_gb=16.0)  # older reading: unused
    plan = LoadPlan(MemoryMode.STREAMED, torch.bfloat16, max_memory_fraction=0.7, pixel_scale=0.75, vram_gib=15.0)
    placement = apply_memory_mode(object(), plan, cfg)
    (kw,) = calls
    assert kw["device"] == torch.device("cuda") and kw["budget_gib"] == pytest.approx(15.0 * 0.7)
    # The reserve is for the native size (the memory window x 0.75 is larger): a larger image re-plans once.
    assert kw["max_pixels"] == memory_model.streamed_budget(15.0, memory_fraction=0.7, pixel_scale=0.75)[1]
    assert kw["max_pixels"] == 1328 * 1328
    assert "streamed on cuda within 10.5 GiB (activations for 1.76 MP)" in placement


class TestFullVramFastPath:
    """GPU mode turns on batched CFG (bench/RESULTS.md) and, on request, regional compilation."""

    def _gpu_place(self, tiny_model_dir, monkeypatch):
        loader, _ = _loader(tiny_model_dir)
        loader.load()
        pipe = loader.pipeline
        monkeypatch.setattr(pipe, "to", lambda *a, **k: pipe)  # no CUDA here: keep it on the CPU
        cfg = _cfg(tiny_model_dir, device="cuda", vram_free_gb=80.0, vram_total_gb=80.0)
        return pipe, cfg

    def test_gpu_mode_batches_cfg(self, tiny_model_dir, monkeypatch):
        from qwen_core.cfg_batch import cfg_batching_stats, disable_cfg_batching

        monkeypatch.delenv("QWEN_COMPILE", raising=False)
        pipe, cfg = self._gpu_place(tiny_model_dir, monkeypatch)
        try:
            placement = apply_memory_mode(pipe, LoadPlan(MemoryMode.GPU, torch.float32), cfg)
            assert placement == "gpu on cuda (batched CFG)"
            pipe(prompt="a cat", negative_prompt="blurry", true_cfg_scale=4.0, num_inference_steps=2,
                 width=64, height=64, output_type="pt")
            assert cfg_batching_stats(pipe)["batched"] == 2  # one batched forward per step
        finally:
            disable_cfg_batching(pipe)

    def test_compile_follows_the_plans_speed_options(self, tiny_model_dir, monkeypatch):
        from qwen_core.cfg_batch import disable_cfg_batching
        from qwen_core.speed import apply as speed_apply
        from qwen_core.speed.options import SpeedOptions

        pipe, cfg = self._gpu_place(tiny_model_dir, monkeypatch)
        compiled = []
        monkeypatch.setattr(speed_apply, "compile_blocks", lambda t, **kw: compiled.append(kw))
        try:
            plan = LoadPlan(MemoryMode.GPU, torch.float32, speed=SpeedOptions(compile=True))
            placement = apply_memory_mode(pipe, plan, cfg)
        finally:
            disable_cfg_batching(pipe)
        assert compiled == [{"dynamic": "seq", "notify": None}] and "compiled blocks" in placement


class _FakeTransformer:
    def __init__(self, fail: set[str] = frozenset()):
        self.fail, self.calls = fail, []

    def set_attention_backend(self, name):
        self.calls.append(name)
        if name in self.fail:
            raise RuntimeError(f"{name} is not available")


class TestAttention:
    def test_backend_from_device_policy_is_applied(self, tiny_model_dir):
        loader, _ = _loader(tiny_model_dir)
        loader.load()
        assert loader.attention_backend == loader.device_config.attention_backend == "native"

    def test_hub_backends_never_used(self):
        pipe = type("P", (), {"transformer": _FakeTransformer()})()
        assert apply_attention(pipe, "flash_hub") == "native" and pipe.transformer.calls == ["native"]

    def test_unavailable_backend_falls_back_to_sdpa(self):
        pipe = type("P", (), {"transformer": _FakeTransformer({"flash"})})()
        assert apply_attention(pipe, "flash") == "native" and pipe.transformer.calls == ["flash", "native"]


class TestHooks:
    def test_before_load_hook_gets_bytes_and_cannot_break_loading(self, tiny_model_dir):
        seen = []

        def hook(nbytes):
            seen.append(nbytes)
            raise RuntimeError("ComfyUI said no")

        loading.add_before_load_hook(hook)
        try:
            _loader(tiny_model_dir)[0].load()
        finally:
            loading.remove_before_load_hook(hook)
        assert len(seen) == 1 and seen[0] > 1_000_000  # fp32 tiny weights are ~36 MB
        assert "before-load hook" in get_session_log().read_text()


class TestInMemory:
    """Benchmarks wrap a pipeline built in memory (full-size random weights are never saved)."""

