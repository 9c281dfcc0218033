"""QwenImageGenerator on the tiny pipeline: determinism, layout, progress, cancel, NaN -> SDPA, OOM, inputs."""

from __future__ import annotations

import dataclasses
import math

import diffusers
import pytest
import torch

from qwen_core import governor, loading
from qwen_core.errors import (
    GenerationCancelled,
    InvalidInputError,
    ModelFolderError,
    ModelLoadError,
    OutOfMemoryError,
    QwenError,
)
from qwen_core.generator import PROMPT_CHAR_LIMIT, QwenImageGenerator, validate_request
from qwen_core.loading import PipelineLoader
from qwen_core.memory import get_residency_manager
from qwen_core.session_log import get_session_log

pytestmark = pytest.mark.slow
FAST = {"width": 64, "height": 64, "steps": 2}


@pytest.fixture(scope="module")
def shared(tiny_model_dir) -> QwenImageGenerator:
    """One loaded generator for the tests that do not patch anything."""
    return QwenImageGenerator(tiny_model_dir, device="cpu")


@pytest.fixture
def fresh(tiny_model_dir) -> QwenImageGenerator:
    """A private generator for tests that patch its pipeline (released before and after: handles with the
    same settings share the resident pipeline, and a patched one must not leak into the next test)."""
    get_residency_manager().release_all()
    yield QwenImageGenerator(tiny_model_dir, device="cpu")
    get_residency_manager().release_all()


@pytest.fixture(autouse=True)
def _no_sticky_sdpa(tmp_path, monkeypatch):
    """No SDPA flag from an earlier test, and a private session log (a subprocess of another test may
    rotate the shared one under this process)."""
    monkeypatch.setenv("QWEN_REPORTS_DIR", str(tmp_path / "reports"))
    loading._reset_sdpa_flag()
    yield
    loading._reset_sdpa_flag()


def _patch_transformer_once(gen: QwenImageGenerator, make_output) -> list[int]:
    """Replace the transformer's next forward call's result (or raise); later calls run normally."""
    transformer = gen.load().transformer
    original, calls = transformer.forward, [0]

    def forward(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 1:
            return make_output(original(*args, **kwargs))
        return original(*args, **kwargs)

    transformer.forward = forward
    return calls


def _tensors_held_by(err: BaseException) -> list[str]:
    """Names of tensor locals still alive in the frames of an exception's traceback."""
    held, tb = [], err.__traceback__
    while tb is not None:
        held += [f"{tb.tb_frame.f_code.co_name}.{k}" for k, v in tb.tb_frame.f_locals.items() if isinstance(v, torch.Tensor)]
        tb = tb.tb_next
    return held


class TestOutput:
    def test_same_seed_same_image_other_seed_other_image(self, shared):
        a = shared.generate("a red fox in snow", seed=7, **FAST)
        b = shared.generate("a red fox in snow", seed=7, **FAST)
        c = shared.generate("a red fox in snow", seed=8, **FAST)
        assert torch.equal(a.images, b.images)
        assert (a.images - c.images).abs().max() > 1e-3

    def test_comfy_image_layout(self, shared):
        result = shared.generate("a lighthouse", width=96, height=64, steps=2, batch_size=2, seed=3)
        assert result.images.shape == (2, 64, 96, 3) and result.images.dtype == torch.float32
        assert result.images.device.type == "cpu" and 0.0 <= result.images.min() <= result.images.max() <= 1.0
        assert (result.images[0] - result.images[1]).abs().max() > 1e-3  # a batch is not one image repeated
        assert (result.width, result.height, result.seed, result.steps) == (96, 64, 3, 2)
        assert {"load_s", "denoise_s", "decode_s", "per_step_s", "total_s"} <= result.timings.keys()

    def test_governor_decides_the_size(self, shared):
        result = shared.generate("a boat", width=100, height=70, steps=2)  # not multiples of 16
        assert (result.decision.width, result.decision.height) == (96, 64)
        assert result.images.shape[1:3] == (64, 96)

    def test_true_cfg_with_negative_prompt_changes_the_image(self, shared):
        plain = shared.generate("a cat", true_cfg_scale=1.0, **FAST)
        guided = shared.generate("a cat", negative_prompt="a dog", true_cfg_scale=4.0, **FAST)
        assert (plain.images - guided.images).abs().max() > 1e-4

    def test_largest_seed_and_long_prompt(self, shared):
        result = shared.generate("word " * 5000, seed=2**64 - 1, **FAST)
        assert result.seed == 2**64 - 1 and any("kept the first" in w for w in result.warnings)


class TestProgressAndCancel:
    def test_on_step_reports_every_step(self, shared):
        seen = []
        shared.generate("a tree", on_step=lambda step, total, eta: seen.append((step, total, eta)), seed=1,
                        width=64, height=64, steps=3)  # fmt: skip
        assert [(s, t) for s, t, _ in seen] == [(1, 3), (2, 3), (3, 3)]
        assert all(eta >= 0 for _, _, eta in seen) and seen[-1][2] == 0

    def test_cancel_mid_run_skips_decode_and_generator_stays_usable(self, fresh, monkeypatch):
        pipe = fresh.load()
        decodes = []
        original_decode = pipe.vae.decode
        monkeypatch.setattr(pipe.vae, "decode", lambda *a, **k: decodes.append(1) or original_decode(*a, **k))
        steps_seen = []
        with pytest.raises(GenerationCancelled, match="after step 1 of 4") as err:
            fresh.generate("a bridge", width=64, height=64, steps=4, seed=5,
                           on_step=lambda s, t, e: steps_seen.append(s), should_cancel=lambda: len(steps_seen) >= 1)  # fmt: skip
        assert steps_seen == [1] and decodes == []  # stopped within one step, nothing decoded
        assert _tensors_held_by(err.value) == []  # a stored exception pins no latents/embeddings
        after = fresh.generate("a bridge", width=64, height=64, steps=4, seed=5)
        again = fresh.generate("a bridge", width=64, height=64, steps=4, seed=5)
        assert decodes == [1, 1] and torch.equal(after.images, again.images)

    def test_exception_from_on_step_propagates_unchanged(self, fresh):
        """ComfyUI's ProgressBar.update raises its own InterruptProcessingException on Cancel."""

        class InterruptProcessingException(Exception):
            pass

        def on_step(step, total, eta):
            if step == 2:
                raise InterruptProcessingException()

        with pytest.raises(InterruptProcessingException):
            fresh.generate("a bridge", width=64, height=64, steps=4, on_step=on_step)
        assert fresh.generate("a bridge", **FAST).images.shape == (1, 64, 64, 3)

    def test_cancel_before_start_does_not_load(self, tiny_model_dir):
        get_residency_manager().release_all()
        gen = QwenImageGenerator(tiny_model_dir, device="cpu")
        with pytest.raises(GenerationCancelled):
            gen.generate("x", should_cancel=lambda: True, **FAST)
        assert not gen.loader.is_loaded


class TestNonFinite:
    def test_nan_latents_retry_once_with_sdpa_and_stick(self, tiny_model_dir):
        get_residency_manager().release_all()
        loader = PipelineLoader(tiny_model_dir, device="cpu")
        # Pretend the device policy chose another kernel ("_native_math" runs on CPU) that yields NaN once.
        loader.device_config = dataclasses.replace(loader.device_config, attention_backend="_native_math")
        gen = QwenImageGenerator(loader)
        calls = _patch_transformer_once(gen, lambda out: (torch.full_like(out[0], math.nan),))
        assert gen.loader.attention_backend == "_native_math"
        result = gen.generate("a castle", seed=4, **FAST)
        assert result.retried_with_sdpa and result.attention_backend == "native"
        assert torch.isfinite(result.images).all() and calls[0] > 1
        assert loading.sdpa_forced() and "NaN" in loading.sdpa_forced()
        assert "retrying once with SDPA" in get_session_log().read_text()
        # Sticky for the process: a new loader asks for SDPA whatever the device policy says.
        other = PipelineLoader(tiny_model_dir, device="cpu")
        other.device_config = dataclasses.replace(other.device_config, attention_backend="_native_math")
        assert other.wanted_attention() == "native"

    def test_nan_with_sdpa_is_an_error_with_fix(self, fresh):
        transformer = fresh.load().transformer
        original = transformer.forward
        transformer.forward = lambda *a, **k: (torch.full_like(original(*a, **k)[0], math.inf),)
        with pytest.raises(QwenError, match="NaN/Inf") as err:
            fresh.generate("a castle", **FAST)
        assert err.value.fix

    def test_nan_from_the_vae_is_decoded_again_in_fp32(self, tiny_model_dir, monkeypatch):
        get_residency_manager().release_all()
        fresh = QwenImageGenerator(tiny_model_dir, device="cpu", dtype="bf16")
        vae = fresh.load().vae
        original, dtypes = vae.decode, []

        def decode(z, *args, **kwargs):
            dtypes.append(z.dtype)
            out = original(z, *args, **kwargs)
            return (torch.full_like(out[0], math.nan),) if len(dtypes) == 1 else out

        monkeypatch.setattr(vae, "decode", decode)
        result = fresh.generate("a castle", seed=4, **FAST)
        assert dtypes == [torch.bfloat16, torch.float32] and not result.retried_with_sdpa
        assert torch.isfinite(result.images).all() and vae.dtype == torch.bfloat16  # VAE dtype restored
        assert any("decoded again in float32" in w for w in result.warnings)
        get_residency_manager().release_all()


class TestOutOfMemory:
    def test_oom_during_generation_frees_and_next_run_works(self, fresh):
        def boom(_out):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

        _patch_transformer_once(fresh, boom)
        with pytest.raises(OutOfMemoryError) as err:
            fresh.generate("a storm", width=128, height=128, steps=2)
        assert "smaller size (e.g. 96x96)" in err.value.fix and "model_offload" in err.value.fix
        assert "out of memory at 128x128" in get_session_log().read_text()
        assert fresh.generate("a storm", width=128, height=128, steps=2).images.shape == (1, 128, 128, 3)

    def test_oom_in_vae_decode_decodes_again_in_tiles(self, fresh, monkeypatch):
        reference = fresh.generate("a harbour", seed=11, width=64, height=48, steps=2)
        vae = fresh.load().vae
        original, tiling_at_call = vae.decode, []

        def decode(*args, **kwargs):
            tiling_at_call.append(vae.use_tiling)
            if len(tiling_at_call) == 1:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 GiB")
            return original(*args, **kwargs)

        monkeypatch.setattr(vae, "decode", decode)
        result = fresh.generate("a harbour", seed=11, width=64, height=48, steps=2)
        assert tiling_at_call == [False, True] and vae.use_tiling is False  # tiled once, then back to normal
        # Same latents, same decode math (the tiny image is smaller than one tile): the same picture.
        assert torch.allclose(result.images, reference.images, atol=1e-5)
        assert any("decoded in tiles" in w for w in result.warnings)
        assert "decoding in tiles" in get_session_log().read_text()


def test_load_fallback_shrinks_the_window_of_the_same_run(tiny_model_dir, monkeypatch):
    get_residency_manager().release_all()
    gen = QwenImageGenerator(tiny_model_dir, device="cpu")
    full = gen.loader.governor_inputs()
    original = diffusers.QwenImagePipeline.from_pretrained.__func__
    calls = []

    def oom_once(cls, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(diffusers.QwenImagePipeline, "from_pretrained", classmethod(oom_once))
    monkeypatch.setattr(gen.loader, "retry", loading.RetryPolicy(sleep=lambda s: None))
    result = gen.generate("a mill", **FAST)
    assert full["max_pixels"] is None and gen.loader.plan.pixel_scale == 0.75
    expected = int(governor.max_pixels(None, "fp32", "model_offload") * 0.75)
    assert result.decision.max_pixels == expected


class TestValidation:
    @pytest.mark.parametrize(("field", "overrides"), [
        ("prompt", {"prompt": ""}),
        ("prompt", {"prompt": "   "}),
        ("prompt", {"prompt": None}),
        ("negative_prompt", {"negative_prompt": 5}),
        ("steps", {"steps": 0}),
        ("steps", {"steps": 201}),
        ("steps", {"steps": math.nan}),
        ("steps", {"steps": 2.5}),
        ("steps", {"steps": True}),
        ("true_cfg_scale", {"true_cfg_scale": math.nan}),
        ("true_cfg_scale", {"true_cfg_scale": math.inf}),
        ("true_cfg_scale", {"true_cfg_scale": -1.0}),
        ("true_cfg_scale", {"true_cfg_scale": 21.0}),
        ("seed", {"seed": -1}),
        ("seed", {"seed": 2**64}),
        ("batch_size", {"batch_size": 0}),
        ("batch_size", {"batch_size": 17}),
        ("width", {"width": math.nan}),
        ("width", {"width": 0}),
        ("height", {"height": 100000}),
        ("on_step", {"on_step": "print"}),
        ("should_cancel", {"should_cancel": True}),
    ])  # fmt: skip
    def test_bad_input_names_the_field_before_any_compute(self, tiny_model_dir, field, overrides):
        get_residency_manager().release_all()
        gen = QwenImageGenerator(tiny_model_dir, device="cpu")
        kwargs = {"prompt": "a cat", **FAST} | overrides
        with pytest.raises(InvalidInputError) as err:
            gen.generate(**kwargs)
        assert err.value.field == field and f"`{field}`" in str(err.value)
        assert not gen.loader.is_loaded  # nothing was loaded or computed

    def test_huge_prompt_truncated_with_warning(self):
        request = validate_request("x" * 1_000_000, "", width=64, height=64, steps=2, true_cfg_scale=4.0, seed=0,
                                   batch_size=1)  # fmt: skip
        assert len(request.prompt) == PROMPT_CHAR_LIMIT
        assert any("1,000,000 characters" in w for w in request.warnings)


class TestLifecycle:
    def test_unload_then_generate_reloads(self, fresh):
        first = fresh.generate("a hill", seed=9, **FAST)
        fresh.unload()
        assert not fresh.loader.is_loaded
        second = fresh.generate("a hill", seed=9, **FAST)
        assert torch.equal(first.images, second.images) and second.timings["load_s"] > 0


class TestSwitchModel:
    def test_switch_releases_old_and_generates_with_new(self, tiny_model_dir, tiny_model_dir_b):
        get_residency_manager().release_all()
        gen = QwenImageGenerator(tiny_model_dir, device="cpu")
        a = gen.generate("a tower", seed=1, **FAST)
        old_key = gen.loader.residency_key
        report = gen.switch_to_model(tiny_model_dir_b)
        assert report.released_keys == [old_key] and report.error is None
        assert report.before and report.released and report.after
        assert get_residency_manager().resident_keys() == [gen.loader.residency_key]
        b = gen.generate("a tower", seed=1, **FAST)
        assert (a.images - b.images).abs().max() > 1e-3  # other weights, other image
        assert "switch: -> " in get_session_log().read_text()

    def test_bad_target_leaves_current_model_loaded(self, tiny_model_dir, tmp_path):
        get_residency_manager().release_all()
        gen = QwenImageGenerator(tiny_model_dir, device="cpu")
        gen.load()
        with pytest.raises(ModelFolderError):
            gen.switch_to_model(tmp_path)  # no model_index.json
        assert gen.loader.is_loaded and gen.loader.path == tiny_model_dir

    def test_failed_load_leaves_nothing_half_loaded(self, tiny_model_dir, tiny_model_dir_b, monkeypatch):
        get_residency_manager().release_all()
        gen = QwenImageGenerator(tiny_model_dir, device="cpu")
        gen.load()

        def broken(cls, *args, **kwargs):
            raise ValueError("shape mismatch in transformer_blocks.0")

        monkeypatch.setattr(diffusers.QwenImagePipeline, "from_pretrained", classmethod(broken))
        with pytest.raises(ModelLoadError, match="shape mismatch"):
            gen.switch_to_model(tiny_model_dir_b)
        assert get_residency_manager().resident_keys() == []
        monkeypatch.undo()
        assert gen.loader.path == tiny_model_dir  # still usable with the old model, reloaded on demand
        assert gen.generate("a tower", **FAST).images.shape == (1, 64, 64, 3)


def test_a_pipeline_class_of_no_known_family_is_refused_before_any_weight(tiny_model_copy):
    """An img2img folder is no family this pack runs: the loader refuses it naming the class it found."""
    import json

    index_path = tiny_model_copy / "model_index.json"
    index = json.loads(index_path.read_text())
    index["_class_name"] = "QwenImageImg2ImgPipeline"
    index_path.write_text(json.dumps(index))
    with pytest.raises(ModelFolderError, match="'QwenImageImg2ImgPipeline' is not a Qwen-Image pipeline"):
        QwenImageGenerator(tiny_model_copy, device="cpu")


def test_generate_asks_the_family_how_many_images_it_takes(tiny_model_dir, monkeypatch):
    """Text-to-image generate() passes no input image: a family that needs one is refused before loading."""
    import dataclasses

    from qwen_core.families import ImageInputs

    get_residency_manager().release_all()
    gen = QwenImageGenerator(tiny_model_dir, device="cpu")
    needs_image = dataclasses.replace(gen.loader.family, display_name="An edit model", image_inputs=ImageInputs(1, 3))
    monkeypatch.setattr(gen.loader.source, "family", needs_image)
    with pytest.raises(QwenError, match="An edit model takes 1 to 3 input images; got 0"):
        gen.generate("a cat", **FAST)
    assert not gen.loader.is_loaded


class TestOneStepShiftTerminal:
    """Regression: Qwen-Image's scheduler (shift_terminal=0.02) with 1 step gives NaN sigmas -> a black image."""

    @pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
    def test_diffusers_one_step_sigmas_are_nan(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler(shift_terminal=0.02)
        scheduler.set_timesteps(1)
        assert torch.isnan(scheduler.sigmas).any()  # the bug the check below guards against
        scheduler.set_timesteps(2)
        assert torch.isfinite(scheduler.sigmas).all()

    def test_one_step_is_refused_before_compute_for_such_a_scheduler(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        from qwen_core.generator import min_steps_for, validate_request

        assert min_steps_for(FlowMatchEulerDiscreteScheduler(shift_terminal=0.02)) == 2
        assert min_steps_for(FlowMatchEulerDiscreteScheduler()) == 1
        kwargs = dict(width=64, height=64, true_cfg_scale=1.0, seed=0, batch_size=1)
        with pytest.raises(InvalidInputError, match="`steps`.*at least 2"):
            validate_request("a cat", "", steps=1, min_steps=2, **kwargs)
        assert validate_request("a cat", "", steps=2, min_steps=2, **kwargs).steps == 2
