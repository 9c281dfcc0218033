"""LoRAs and Lightning presets (qwen_core.lora) on the tiny CPU pipeline, with tiny LoRAs made at test time.

What must hold: strength 0 gives the identical image, strength 1 changes it, two LoRAs stack, taking them
off gives the bit-identical base image, pickled and other-model LoRAs are refused (naming the key), in the
resident (`gpu`) code path and the streamed engine's, and a LoRA change is never a model reload.
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from lora_helpers import FORMATS, TARGETS, expected_delta, peft_factors, random_factors, write_lora
from safetensors.torch import save_file

from qwen_core.errors import InvalidInputError, PresetError
from qwen_core.families import QWEN_IMAGE
from qwen_core.lora.files import describe_file, load_file
from qwen_core.lora.fuse import apply_loras, lora_memory, lora_state
from qwen_core.lora.spec import LoraError, LoraSpec, as_specs, parse_lora_arg
from qwen_core.lora.targets import linear_shapes

pytestmark = pytest.mark.slow
GEN = dict(width=64, height=64, steps=2, true_cfg_scale=1.0, seed=3)


@pytest.fixture(scope="module")
def base_transformer(tiny_model_dir: Path) -> Any:
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel.from_pretrained(tiny_model_dir / "transformer")


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory, base_transformer: Any) -> dict[str, Any]:
    """Two PEFT-made LoRAs (a: rank 4 alpha 8, b: rank 2 alpha 2, other layers) in every format, plus factors."""
    folder = tmp_path_factory.mktemp("loras")
    a = peft_factors(base_transformer, rank=4, alpha=8.0, seed=1)
    b = peft_factors(base_transformer, rank=2, alpha=2.0, seed=2, targets=("attn.to_k", "img_mlp.net.0.proj"))
    files = {fmt: write_lora(folder / f"a_{fmt}.safetensors", a, fmt, alpha=8.0) for fmt in FORMATS}
    files["b"] = write_lora(folder / "b.safetensors", b, "kohya", alpha=2.0)
    files["lightning"] = write_lora(folder / "tiny-Lightning-8steps.safetensors", a, "lightning", alpha=8.0)
    return {"a": a, "b": b, "files": files, "folder": folder}


def _generator(tiny_model_dir: Path, **kw: Any) -> Any:
    from qwen_core.generator import QwenImageGenerator

    return QwenImageGenerator(tiny_model_dir, device="cpu", dtype="fp32", **kw)


@pytest.fixture
def gen(tiny_model_dir: Path) -> Any:
    from qwen_core.memory import get_residency_manager

    get_residency_manager().release_all()
    generator = _generator(tiny_model_dir)
    yield generator
    get_residency_manager().release_all()


class TestSpecs:
    def test_cli_form(self) -> None:
        assert parse_lora_arg("style.safetensors:0.7") == LoraSpec(Path("style.safetensors"), 0.7)
        assert parse_lora_arg("style.safetensors").strength == 1.0
        assert parse_lora_arg(r"C:\loras\x.safetensors").path == Path(r"C:\loras\x.safetensors")  # a drive, not a strength
        assert as_specs([("a.safetensors", 0.5), "b.safetensors:2"])[1].strength == 2.0

    @pytest.mark.parametrize("bad", ["x.safetensors:nan", "x.safetensors:11", "x.safetensors:inf"])
    def test_strength_is_checked(self, bad: str) -> None:
        with pytest.raises(InvalidInputError, match="lora"):
            parse_lora_arg(bad)

    def test_lightning_is_recognised_by_name_and_positive_strength(self) -> None:
        assert LoraSpec(Path("Qwen-Image-Lightning-8steps-V2.0.safetensors")).is_lightning
        assert not LoraSpec(Path("Qwen-Image-Lightning-8steps-V2.0.safetensors"), 0.0).is_lightning
        assert not LoraSpec(Path("style.safetensors")).is_lightning


class TestFormats:
    """Every format is read through diffusers' Qwen-Image conversion and means the same delta W."""

    @pytest.mark.parametrize("fmt", FORMATS)
    def test_every_format_gives_the_same_delta(self, loras: dict, fmt: str) -> None:
        lora = load_file(loras["files"][fmt], QWEN_IMAGE)
        assert set(lora.layers) == set(loras["a"])
        for layer in loras["a"]:
            f = lora.layers[layer]
            got = f.scale * (f.up.double() @ f.down.double())
            torch.testing.assert_close(got, expected_delta(loras["a"], layer), rtol=1e-6, atol=1e-7)

    @pytest.mark.parametrize("fmt", FORMATS)
    def test_header_only_description_reads_no_factor(self, loras: dict, fmt: str, monkeypatch) -> None:
        read: list[str] = []
        import safetensors

        real = safetensors.safe_open

        class Counting:
            def __init__(self, *a: Any, **k: Any) -> None:
                self.inner = real(*a, **k)

            def __enter__(self) -> Any:
                handle = self.inner.__enter__()
                get = handle.get_tensor
                return type("H", (), {"get_tensor": lambda _s, key: (read.append(key), get(key))[1]})()

            def __exit__(self, *exc: Any) -> Any:
                return self.inner.__exit__(*exc)

        monkeypatch.setattr(safetensors, "safe_open", Counting)
        described = describe_file(loras["files"][fmt], QWEN_IMAGE)
        assert set(described.layers) == set(loras["a"])
        assert all(f.down.device.type == "meta" for f in described.layers.values())
        assert all(key.endswith(".alpha") for key in read)  # only the scalar alphas are read

    def test_ours_matches_diffusers_peft_loader(self, tiny_model_dir: Path, loras: dict) -> None:
        """Reference: diffusers' own load_lora_weights (PEFT layers) on the same file gives the same image."""
        from diffusers import QwenImagePipeline

        def run(pipe: Any) -> torch.Tensor:
            pipe.set_progress_bar_config(disable=True)
            return pipe(prompt="a red fox", width=64, height=64, num_inference_steps=2, true_cfg_scale=1.0,
                        output_type="pt", generator=torch.Generator().manual_seed(1)).images

        ours = QwenImagePipeline.from_pretrained(tiny_model_dir, dtype=torch.float32)
        apply_loras(ours, [LoraSpec(loras["files"]["kohya"])], QWEN_IMAGE)
        reference = QwenImagePipeline.from_pretrained(tiny_model_dir, dtype=torch.float32)
        reference.load_lora_weights(str(loras["files"]["kohya"]))
        torch.testing.assert_close(run(ours), run(reference), rtol=1e-4, atol=1e-5)


class TestRefusals:
    def test_pickle_suffix_is_refused_unread(self, tmp_path: Path, monkeypatch) -> None:
        path = tmp_path / "lora.ckpt"
        torch.save({"x": torch.zeros(1)}, path)
        monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("a pickle was read"))
        monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
        with pytest.raises(LoraError, match="pickled"):
            describe_file(path, QWEN_IMAGE)

    def test_pickle_renamed_to_safetensors_is_refused(self, tmp_path: Path, monkeypatch) -> None:
        path = tmp_path / "renamed.safetensors"
        torch.save({"x": torch.zeros(1)}, path)  # a torch zip
        monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
        with pytest.raises(LoraError, match="pickled"):
            load_file(path, QWEN_IMAGE)
        raw = tmp_path / "raw.safetensors"
        raw.write_bytes(pickle.dumps({"x": 1}, protocol=4))
        with pytest.raises(LoraError, match="pickled"):
            describe_file(raw, QWEN_IMAGE)

    def test_other_model_lora_names_the_first_bad_key(self, gen: Any, tmp_path: Path) -> None:
        flux = tmp_path / "flux_style.safetensors"
        save_file({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 3072),
                   "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(3072, 4)}, str(flux))
        with pytest.raises(LoraError, match=r"key `transformer\.single_transformer_blocks\.0\.attn\.to_q\.lora_A\.weight`.*another model"):
            gen.set_loras([LoraSpec(flux)])
        sdxl = tmp_path / "sdxl.safetensors"
        name = "lora_unet_down_blocks_0_attentions_0_proj_in"
        save_file({f"{name}.lora_down.weight": torch.zeros(4, 320), f"{name}.lora_up.weight": torch.zeros(320, 4),
                   f"{name}.alpha": torch.tensor(4.0)}, str(sdxl))
        with pytest.raises(LoraError, match=f"key `{name}.lora_down.weight`"):
            gen.set_loras([LoraSpec(sdxl)])
        assert gen.loader.loras == ()  # a refused stack changes nothing

    def test_shape_mismatch_names_the_key(self, gen: Any, tmp_path: Path) -> None:
        path = tmp_path / "bigger.safetensors"
        layer = "transformer_blocks.0.attn.to_q"
        write_lora(path, {layer: (torch.zeros(4, 3072), torch.zeros(3072, 4))}, "diffusers")
        with pytest.raises(LoraError, match=rf"key `transformer\.{layer}\.lora_A\.weight` changes layer .* 3072x3072"):
            gen.set_loras([LoraSpec(path)])

    @pytest.mark.parametrize("key,kind", [("transformer_blocks.0.attn.to_q.dora_scale", "DoRA"),
                                          ("lora_unet_transformer_blocks_0_attn_to_q.hada_w1_a", "LoHa")])
    def test_other_adapter_kinds_are_refused(self, tmp_path: Path, key: str, kind: str) -> None:
        path = tmp_path / "adapter.safetensors"
        save_file({key: torch.zeros(2, 2)}, str(path))
        with pytest.raises(LoraError, match=kind):
            describe_file(path, QWEN_IMAGE)

    def test_missing_file_and_wrong_suffix(self, tmp_path: Path) -> None:
        with pytest.raises(LoraError, match="no such LoRA"):
            describe_file(tmp_path / "nothing.safetensors", QWEN_IMAGE)
        (tmp_path / "x.gguf").write_bytes(b"GGUF")
        with pytest.raises(LoraError, match="only .safetensors"):
            describe_file(tmp_path / "x.gguf", QWEN_IMAGE)


class TestGpuPath:
    """The resident path (memory mode gpu; on this CPU box the weights stay resident on the CPU)."""

    def test_strength_zero_one_stack_and_removal(self, gen: Any, loras: dict) -> None:
        base = gen.generate("a red fox", **GEN).images
        pipe = gen.loader.pipeline
        gen.set_loras([LoraSpec(loras["files"]["diffusers"], 0.0)])
        assert torch.equal(gen.generate("a red fox", **GEN).images, base)  # strength 0: identical
        gen.set_loras([LoraSpec(loras["files"]["diffusers"], 1.0)])
        one = gen.generate("a red fox", **GEN).images
        assert (one - base).abs().max() > 1e-3  # strength 1 changes it
        gen.set_loras([LoraSpec(loras["files"]["diffusers"]), LoraSpec(loras["files"]["b"], 0.8)])
        both = gen.generate("a red fox", **GEN)
        assert (both.images - one).abs().max() > 1e-4 and len(both.loras) == 2
        gen.set_loras([])
        assert torch.equal(gen.generate("a red fox", **GEN).images, base)  # off again: bit-identical
        assert gen.loader.pipeline is pipe and [a.outcome for a in gen.loader.attempts] == ["ok"]  # no reload
        assert lora_state(pipe).backups == {} and lora_memory(pipe).layers == 0

    def test_stacked_weights_are_base_plus_both_deltas(self, gen: Any, loras: dict) -> None:
        gen.load()
        pipe = gen.loader.pipeline
        layer = "transformer_blocks.1.attn.to_k"  # touched by both LoRAs
        base = pipe.transformer.get_submodule(layer).weight.detach().clone()
        gen.set_loras([LoraSpec(loras["files"]["lightning"], 0.5), LoraSpec(loras["files"]["b"], -1.0)])
        gen.load()
        fused = pipe.transformer.get_submodule(layer).weight.detach()
        want = base.double() + expected_delta(loras["a"], layer, strength=0.5) + \
            expected_delta(loras["b"], layer, alpha=2.0, strength=-1.0)
        torch.testing.assert_close(fused.double(), want, rtol=1e-6, atol=1e-6)
        mem = lora_memory(pipe)
        assert mem.layers == len(set(loras["a"]) | set(loras["b"])) and mem.backup_bytes > 0 and mem.factor_bytes > 0
        assert "LoRA:" in mem.summary() and "base copies" in mem.summary()
        gen.set_loras([])
        gen.load()
        assert torch.equal(pipe.transformer.get_submodule(layer).weight, base)

    def test_a_strength_change_refuses_only_and_keeps_tensors(self, gen: Any, loras: dict) -> None:
        gen.set_loras([LoraSpec(loras["files"]["comfyui"], 1.0)])
        pipe = gen.load()
        weight = pipe.transformer.get_submodule("transformer_blocks.0.attn.to_q").weight
        address = weight.data_ptr()
        gen.set_loras([LoraSpec(loras["files"]["comfyui"], 0.25)])
        gen.load()
        assert weight.data_ptr() == address  # in place: compiled graphs and hooks keep seeing the same tensor
        assert gen.loader.lora_report.changed_layers == len(loras["a"])

    def test_handles_with_and_without_lora_share_one_resident_model(self, tiny_model_dir: Path, loras: dict) -> None:
        from qwen_core.memory import get_residency_manager

        get_residency_manager().release_all()
        plain, styled = _generator(tiny_model_dir), _generator(tiny_model_dir, loras=[LoraSpec(loras["files"]["kohya"])])
        try:
            first = plain.generate("a kite", **GEN).images
            assert (styled.generate("a kite", **GEN).images - first).abs().max() > 1e-3
            assert torch.equal(plain.generate("a kite", **GEN).images, first)
            assert plain.loader.pipeline is styled.loader.pipeline
            assert len(get_residency_manager().resident_keys()) == 1
        finally:
            get_residency_manager().release_all()

    def test_compiled_blocks_are_not_recompiled_by_a_strength_change(self, gen: Any, loras: dict) -> None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
        from common import compile_blocks, uncompile_blocks  # the bench's hook-preserving regional compile

        pipe = gen.load()
        compile_blocks(pipe.transformer, backend="eager")  # dynamo tracing without a C++ toolchain
        try:
            gen.set_loras([LoraSpec(loras["files"]["diffusers"], 1.0)])
            one = gen.generate("a red fox", **GEN).images
            gen.set_loras([LoraSpec(loras["files"]["diffusers"], 0.5)])
            with torch._dynamo.config.patch(error_on_recompile=True):
                half = gen.generate("a red fox", **GEN).images
            assert (half - one).abs().max() > 1e-4
        finally:
            uncompile_blocks(pipe.transformer)
            torch._dynamo.reset()


class TestStreamedPath:
    """The streamed engine keeps streamed blocks in a host buffer: LoRAs are fused into those host copies."""

    @staticmethod
    def _run(pipe: Any) -> torch.Tensor:
        return pipe(prompt="a cat on a mat", negative_prompt="blurry", true_cfg_scale=4.0, height=64, width=64,
                    num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(5)).images

    @pytest.fixture
    def pipes(self, tiny_model_dir: Path) -> tuple[Any, Any]:
        from diffusers import QwenImagePipeline

        pair = []
        for _ in range(2):
            p = QwenImagePipeline.from_pretrained(tiny_model_dir, dtype=torch.float32)
            p.set_progress_bar_config(disable=True)
            pair.append(p)
        return pair[0], pair[1]

    def test_streamed_equals_resident_with_loras_and_restores_exactly(self, pipes: tuple, loras: dict) -> None:
        from qwen_core.streaming import disable_streamed_offload, enable_streamed_offload

        resident, streamed = pipes
        base = self._run(streamed)
        stack = [LoraSpec(loras["files"]["kohya"]), LoraSpec(loras["files"]["b"], 0.7)]
        apply_loras(resident, stack, QWEN_IMAGE)
        want = self._run(resident)
        handle = enable_streamed_offload(streamed, "cpu", budget_gib=1e-4, max_pixels=64 * 64, num_slots=1,
                                         cfg_batching=False)
        try:
            assert handle.plan.resident == () and len(handle.plan.streamed) == 2
            report = apply_loras(streamed, stack, QWEN_IMAGE)
            assert report.changed_layers == len(set(loras["a"]) | set(loras["b"]))
            # The streamed blocks' parameters are placeholders/slot views: the fused values went to the host buffer.
            assert lora_state(streamed).backups and handle.transformer.host is not None
            torch.testing.assert_close(self._run(streamed), want, rtol=0, atol=0)
            apply_loras(streamed, [LoraSpec(loras["files"]["kohya"], 0.3)], QWEN_IMAGE)  # change while streaming
            apply_loras(resident, [LoraSpec(loras["files"]["kohya"], 0.3)], QWEN_IMAGE)
            torch.testing.assert_close(self._run(streamed), self._run(resident), rtol=0, atol=0)
            apply_loras(streamed, [], QWEN_IMAGE)
            torch.testing.assert_close(self._run(streamed), base, rtol=0, atol=0)  # bit-identical base
        finally:
            disable_streamed_offload(streamed)
        torch.testing.assert_close(self._run(streamed), base, rtol=0, atol=0)

    def test_lora_applied_before_streaming_moves_into_the_host_copies(self, pipes: tuple, loras: dict) -> None:
        from qwen_core.streaming import disable_streamed_offload, enable_streamed_offload

        resident, streamed = pipes
        base = self._run(resident)
        apply_loras(streamed, [LoraSpec(loras["files"]["diffsynth"])], QWEN_IMAGE)
        want = self._run(streamed)
        enable_streamed_offload(streamed, "cpu", budget_gib=1e-4, max_pixels=64 * 64, num_slots=1,
                                         cfg_batching=False)
        try:
            torch.testing.assert_close(self._run(streamed), want, rtol=0, atol=0)
            apply_loras(streamed, [], QWEN_IMAGE)
            torch.testing.assert_close(self._run(streamed), base, rtol=0, atol=0)
        finally:
            disable_streamed_offload(streamed)


class TestOtherStorage:
    def test_sequential_offload_weights_map(self, tiny_model_dir: Path, loras: dict) -> None:
        """accelerate's sequential offload keeps weights in a map (parameters on meta): fused there."""
        from accelerate import cpu_offload
        from diffusers import QwenImagePipeline

        plain = QwenImagePipeline.from_pretrained(tiny_model_dir, dtype=torch.float32)
        offloaded = QwenImagePipeline.from_pretrained(tiny_model_dir, dtype=torch.float32)
        cpu_offload(offloaded.transformer, execution_device=torch.device("cpu"))
        x = {k: v for k, v in _transformer_inputs(plain).items()}
        base = offloaded.transformer(**x).sample
        spec = [LoraSpec(loras["files"]["kohya"])]
        apply_loras(plain, spec, QWEN_IMAGE)
        apply_loras(offloaded, spec, QWEN_IMAGE)
        torch.testing.assert_close(offloaded.transformer(**x).sample, plain.transformer(**x).sample, rtol=0, atol=0)
        apply_loras(offloaded, [], QWEN_IMAGE)
        assert torch.equal(offloaded.transformer(**x).sample, base)

    def test_fp8_layers_get_an_exact_side_path(self, tiny_model_dir: Path, loras: dict) -> None:
        from diffusers import QwenImageTransformer2DModel

        from qwen_core.fp8_compute import Fp8Linear, enable_fp8_compute, fp8_supported

        if not fp8_supported("cpu"):
            pytest.skip("this torch has no CPU float8 matmul")
        transformer = QwenImageTransformer2DModel.from_pretrained(tiny_model_dir / "transformer")
        enable_fp8_compute(transformer)
        layer = "transformer_blocks.0.attn.to_q"
        module = transformer.get_submodule(layer)
        assert isinstance(module, Fp8Linear) and layer in linear_shapes(transformer)
        pipe = type("P", (), {"transformer": transformer, "_execution_device": torch.device("cpu")})()
        x = torch.randn(2, 5, module.in_features)
        before = module(x)
        apply_loras(pipe, [LoraSpec(loras["files"]["diffusers"], 0.5)], QWEN_IMAGE)
        assert module.weight_fp8.dtype == torch.float8_e4m3fn and layer in lora_state(pipe).side
        down, up = loras["a"][layer]
        delta = 0.5 * 2.0 * (x @ down.T @ up.T)
        torch.testing.assert_close(module(x) - before, delta, rtol=1e-4, atol=1e-5)
        apply_loras(pipe, [], QWEN_IMAGE)
        assert torch.equal(module(x), before) and not module._forward_hooks


def _transformer_inputs(pipe: Any) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    cfg = pipe.transformer.config
    tokens, text = 16, 7
    return {"hidden_states": torch.randn(1, tokens, cfg.in_channels, generator=gen),
            "encoder_hidden_states": torch.randn(1, text, cfg.joint_attention_dim, generator=gen),
            "encoder_hidden_states_mask": torch.ones(1, text, dtype=torch.long),
            "timestep": torch.tensor([0.5]), "img_shapes": [[(1, 4, 4)]]}


class TestLightningPresets:
    def test_presets_are_shipped_with_the_release_scheduler(self) -> None:
        from qwen_core.presets import load_presets

        presets = load_presets()
        for name, steps in (("lightning-8", 8), ("lightning-4", 4)):
            p = presets.quality(name)
            assert (p.steps, p.true_cfg_scale, p.requires) == (steps, 1.0, "lightning")
            s = p.scheduler_overrides
            assert s["use_dynamic_shifting"] and s["time_shift_type"] == "exponential" and s["shift_terminal"] is None
            assert s["base_shift"] == s["max_shift"] == pytest.approx(1.0986122886681098)  # ln 3: shift 3

    def test_refused_without_a_lightning_lora(self, gen: Any, loras: dict) -> None:
        with pytest.raises(InvalidInputError, match="quality_preset.*Lightning"):
            gen.generate("a fox", preset="lightning-8", width=64, height=64)
        gen.set_loras([LoraSpec(loras["files"]["kohya"])])  # a LoRA, but not a Lightning one
        with pytest.raises(InvalidInputError, match="Lightning"):
            gen.generate("a fox", preset="lightning-4", width=64, height=64)

    def test_runs_with_a_lightning_lora_and_its_scheduler(self, gen: Any, loras: dict, monkeypatch) -> None:
        gen.set_loras([LoraSpec(loras["files"]["lightning"])])
        pipe = gen.load()
        model_scheduler = pipe.scheduler
        seen: list[Any] = []
        real_call = type(pipe).__call__

        def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
            seen.append((dict(self.scheduler.config), kwargs["num_inference_steps"], kwargs["true_cfg_scale"]))
            return real_call(self, *args, **kwargs)

        monkeypatch.setattr(type(pipe), "__call__", spy)
        result = gen.generate("a fox", preset="lightning-8", steps=30, true_cfg_scale=4.0, width=64, height=64)
        config, steps, cfg = seen[0]
        assert (steps, cfg, result.steps, result.preset) == (8, 1.0, 8, "lightning-8")
        assert config["shift_terminal"] is None and config["base_shift"] == pytest.approx(1.0986122886681098)
        assert pipe.scheduler is model_scheduler  # the model's scheduler is back after the run

    def test_a_prefused_lightning_model_folder_is_accepted(self) -> None:
        from qwen_core.lora.lightning import resolve_quality_preset

        assert resolve_quality_preset("lightning-4", (), "/models/Qwen-Image-Lightning-4steps-merged").steps == 4
        assert resolve_quality_preset("balanced", ()).steps == 30

    def test_preset_scheduler_keys_are_validated(self, tmp_path: Path, monkeypatch) -> None:
        from qwen_core.presets import load_presets

        override = tmp_path / "p.yaml"
        override.write_text("quality_presets:\n  mine:\n    steps: 6\n    true_cfg_scale: 1.0\n    scheduler:\n"
                            "      shift_terminl: 0.1\n")
        monkeypatch.setenv("QWEN_PRESETS", str(override))
        with pytest.raises(PresetError, match=r"quality_presets\.mine\.scheduler\.shift_terminl"):
            load_presets()
        override.write_text("quality_presets:\n  mine:\n    steps: 6\n    true_cfg_scale: 1.0\n    requires: turbo\n")
        with pytest.raises(PresetError, match="requires"):
            load_presets()


def test_loader_config_json_is_what_the_header_check_uses(tiny_model_dir: Path) -> None:
    """The node-time check builds the transformer on meta from config.json: same layers as the real model."""
    from diffusers import QwenImageTransformer2DModel

    from qwen_core.lora.targets import meta_shapes

    config = json.loads((tiny_model_dir / "transformer" / "config.json").read_text())
    real = linear_shapes(QwenImageTransformer2DModel.from_pretrained(tiny_model_dir / "transformer"))
    assert meta_shapes(QWEN_IMAGE, config) == real
    assert all(any(name.endswith(t) for name in real) for t in TARGETS)
    assert random_factors(real, rank=2)  # the helper the live ComfyUI test uses without PEFT


class TestLoraNode:
    """The node headless: ComfyUI's models/loras is the headless fallback folder beside models/diffusers."""

    @pytest.fixture
    def comfy_models(self, tmp_path: Path, tiny_model_dir: Path, loras: dict, monkeypatch) -> Path:
        import shutil

        from qwen_core.memory import get_residency_manager

        models = tmp_path / "models"
        (models / "diffusers").mkdir(parents=True)
        (models / "diffusers" / "qwen-image-tiny").symlink_to(tiny_model_dir, target_is_directory=True)
        (models / "loras" / "styles").mkdir(parents=True)
        shutil.copy(loras["files"]["kohya"], models / "loras" / "styles" / "tiny-style.safetensors")
        shutil.copy(loras["files"]["lightning"], models / "loras" / "Qwen-Image-Lightning-8steps-tiny.safetensors")
        torch.save({"x": torch.zeros(1)}, models / "loras" / "old.pt")  # never offered
        monkeypatch.setenv("QWEN_HOME", str(models / "diffusers"))
        get_residency_manager().release_all()
        yield models
        get_residency_manager().release_all()

    def test_dropdown_lists_safetensors_only_and_the_handle_chain_stacks(self, comfy_models: Path) -> None:
        from nodes.generate import QwenImageGenerate
        from nodes.loader import QwenImageLoader
        from nodes.lora import QwenImageLoRA

        names = QwenImageLoRA.INPUT_TYPES()["required"]["lora_name"][0]
        assert names == ["Qwen-Image-Lightning-8steps-tiny.safetensors", "styles/tiny-style.safetensors"]
        (base,) = QwenImageLoader().load("qwen-image-tiny", "fp32", "auto", "sdpa")
        one = QwenImageLoRA().apply(base, "styles/tiny-style.safetensors", 1.0)
        (styled,) = one["result"]
        (stacked,) = QwenImageLoRA().apply(styled, "Qwen-Image-Lightning-8steps-tiny.safetensors", 0.5)["result"]
        assert base.loras == () and len(styled.loras) == 1 and len(stacked.loras) == 2  # inputs never change
        assert "Kohya" in one["ui"]["text"][0] and "@ 1" in one["ui"]["text"][0]
        args = ("a red square", "", 64, 48, 2, 1.0, 7, 1)
        plain = QwenImageGenerate().generate(base, *args)["result"][0]
        with_lora = QwenImageGenerate().generate(stacked, *args)
        assert (with_lora["result"][0] - plain).abs().max() > 1e-3 and "LoRA tiny-style" in with_lora["ui"]["text"][0]
        assert torch.equal(QwenImageGenerate().generate(base, *args)["result"][0], plain)  # removed: bit-identical

    def test_lightning_preset_through_governor_and_generate(self, comfy_models: Path) -> None:
        from nodes.generate import QwenImageGenerate
        from nodes.loader import QwenImageLoader
        from nodes.lora import QwenImageLoRA
        from nodes.pixel_governor import QwenImagePixelGovernor

        (base,) = QwenImageLoader().load("qwen-image-tiny", "fp32", "auto", "sdpa")
        with pytest.raises(InvalidInputError, match="quality_preset"):
            QwenImagePixelGovernor().decide(64, 64, "custom", "lightning-8", pipe=base)
        (fast,) = QwenImageLoRA().apply(base, "Qwen-Image-Lightning-8steps-tiny.safetensors", 1.0)["result"]
        w, h, steps, cfg, _, _, preset = QwenImagePixelGovernor().decide(64, 64, "custom", "lightning-8", pipe=fast)["result"]
        assert (steps, cfg, preset) == (8, 1.0, "lightning-8")
        out = QwenImageGenerate().generate(fast, "a fox", "", w, h, steps, cfg, 1, 1, quality_preset=preset)
        assert "8 steps" in out["ui"]["text"][0] and "(lightning-8)" in out["ui"]["text"][0]
        with pytest.raises(InvalidInputError, match="Lightning"):
            QwenImageGenerate().generate(base, "a fox", "", w, h, steps, cfg, 1, 1, quality_preset=preset)

    def test_refusals_at_node_time(self, comfy_models: Path, tmp_path: Path) -> None:
        from nodes.loader import QwenImageLoader
        from nodes.lora import QwenImageLoRA

        (base,) = QwenImageLoader().load("qwen-image-tiny", "fp32", "auto", "sdpa")
        flux = comfy_models / "loras" / "flux.safetensors"
        save_file({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 48),
                   "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(48, 4)}, str(flux))
        with pytest.raises(LoraError, match="single_transformer_blocks.*another model"):
            QwenImageLoRA().apply(base, "flux.safetensors", 1.0)
        with pytest.raises(InvalidInputError, match="lora_name"):
            QwenImageLoRA().apply(base, "missing.safetensors", 1.0)
        assert "pickled" in QwenImageLoRA.VALIDATE_INPUTS("old.pt", 1.0)
        assert "lora_name" in QwenImageLoRA.VALIDATE_INPUTS("../../etc/x.safetensors", 1.0)
        assert "finite" in QwenImageLoRA.VALIDATE_INPUTS("a.safetensors", float("nan"))
        assert QwenImageLoRA.VALIDATE_INPUTS("any/new.safetensors", 0.5) is True


class TestCli:
    def test_generate_with_repeated_lora_and_lightning_preset(self, tiny_model_dir: Path, loras: dict, tmp_path: Path,
                                                               capsys) -> None:
        from PIL import Image

        from qwen_core.cli import main
        from qwen_core.memory import get_residency_manager

        out = tmp_path / "img.png"
        argv = ["generate", "--model", str(tiny_model_dir), "--prompt", "a red boat", "--out", str(out), "--width", "64",
                "--height", "48", "--device", "cpu", "--lora", f"{loras['files']['lightning']}:0.8",
                "--lora", str(loras["files"]["b"]), "--preset", "lightning-8"]
        try:
            assert main(argv) == 0
        finally:
            get_residency_manager().release_all()
        with Image.open(out) as image:
            assert image.text["steps"] == "8" and image.text["preset"] == "lightning-8"
            assert image.text["loras"] == "tiny-Lightning-8steps.safetensors @ 0.8; b.safetensors @ 1"
        assert "LoRA b.safetensors @ 1" in capsys.readouterr().out

    def test_lightning_preset_without_lora_is_an_error_naming_the_preset(self, tiny_model_dir: Path, tmp_path: Path,
                                                                          capsys) -> None:
        from qwen_core.cli import main

        argv = ["generate", "--model", str(tiny_model_dir), "--prompt", "x", "--out", str(tmp_path / "x.png"),
                "--width", "64", "--height", "48", "--device", "cpu", "--preset", "lightning-4"]
        assert main(argv) == 1
        assert "quality_preset" in capsys.readouterr().err and not (tmp_path / "x.png").exists()

    def test_pickled_lora_is_refused_before_loading(self, tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
        from qwen_core.cli import main

        bad = tmp_path / "style.pt"
        torch.save({"x": torch.zeros(1)}, bad)
        argv = ["generate", "--model", str(tiny_model_dir), "--prompt", "x", "--out", str(tmp_path / "x.png"),
                "--device", "cpu", "--lora", f"{bad}:0.5"]
        assert main(argv) == 1 and "pickled" in capsys.readouterr().err
