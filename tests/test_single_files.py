"""Models assembled from ComfyUI single files (qwen_core.sources), against the tiny diffusers folder.

Every file is written at test time from the tiny model (tests/single_files.py) in the layouts and storage
formats ComfyUI uses. Tolerances are the measured errors (tiny model, CPU, fp32 compute, 64x64, 2 steps, image
values in 0..1) with a margin; a scaled fp8 file read without its scales is 100x past them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from single_files import (
    comfy_models_dir,
    encode,
    read_component,
    write_gguf_transformer,
    write_text_encoder,
    write_transformer,
    write_vae,
)

from qwen_core.errors import InvalidInputError, ModelFolderError, ModelLoadError, QwenError
from qwen_core.sources import comfy_keys
from qwen_core.sources.comfy_files import SingleFilesSource, find_companion
from qwen_core.sources.configs import check_configs_folder, is_configs_only, write_configs_folder
from qwen_core.sources.detect import inspect_file
from qwen_core.sources.fp8_weights import Fp8WeightLinear, fp8_layers, set_fp8_matmul
from qwen_core.sources.types import Component, WeightFormat

# Measured on the tiny model (max |diff| of the image, 0..1): fp8 transformer 0.011-0.013, fp8 text encoder
# 3e-4, GGUF Q8_0 1e-4, Q4_0 1.1e-3, bf16 file into fp32 compute 8e-4.
TOL = {"bf16": 3e-3, "fp8": 0.04, "fp8-scaled": 0.04, "comfy-quant": 0.04, "te-fp8": 3e-3, "Q8_0": 1e-3, "Q4_0": 5e-3}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("comfy-models")
    comfy_models_dir(root, tiny_model_dir, transformer_fmt="fp32", te_fmt="fp32", vae_fmt="fp32")
    d, t = root / "diffusion_models", root / "text_encoders"
    out = {"models": root, "configs": write_configs_folder(tiny_model_dir, root / "configs"),
           "transformer:fp32": d / "qwen_image_tiny_fp32.safetensors", "te:fp32": t / "qwen_2.5_vl_tiny_fp32.safetensors",
           "vae": root / "vae" / "qwen_image_vae.safetensors"}  # fmt: skip
    for fmt in ("bf16", "fp8", "fp8-scaled", "comfy-quant"):
        prefix = "model.diffusion_model." if fmt == "fp8" else ""  # one file with ComfyUI's checkpoint prefix
        out[f"transformer:{fmt}"] = write_transformer(tiny_model_dir, d / f"t_{fmt}.safetensors", fmt, prefix=prefix)
        out[f"te:{fmt}"] = write_text_encoder(tiny_model_dir, t / f"te_{fmt}.safetensors", fmt)
    for qtype in ("Q8_0", "Q4_0"):
        out[f"gguf:{qtype}"] = write_gguf_transformer(tiny_model_dir, d / f"qwen-image-tiny-{qtype}.gguf", qtype)
    return out


def _generate(model: Any, dtype: str = "auto") -> torch.Tensor:
    from qwen_core.generator import QwenImageGenerator
    from qwen_core.loading import PipelineLoader

    generator = QwenImageGenerator(PipelineLoader(model, dtype=dtype))
    try:
        return generator.generate("a red fox in the snow", width=64, height=64, steps=2, seed=0).images
    finally:
        generator.unload()


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> torch.Tensor:
    return _generate(tiny_model_dir)


def _source(files: dict[str, Path], transformer: str, te: str = "te:fp32", **kw: Any) -> SingleFilesSource:
    return SingleFilesSource(files[transformer], files[te], files["vae"], configs=files["configs"], **kw)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


class TestDetect:
    def test_each_file_kind_is_identified_from_its_header(self, files: dict[str, Path]) -> None:
        info = inspect_file(files["transformer:fp8"])
        assert (info.component, info.weight_format, info.prefix) == (Component.TRANSFORMER, WeightFormat.FP8,
                                                                     "model.diffusion_model.")
        assert info.architecture == "QwenImageTransformer2DModel" and info.quantized_params > 0
        assert inspect_file(files["transformer:fp8-scaled"]).weight_format is WeightFormat.FP8_SCALED
        assert inspect_file(files["transformer:comfy-quant"]).weight_format is WeightFormat.FP8_SCALED
        assert inspect_file(files["transformer:bf16"]).weight_format is WeightFormat.DENSE
        te = inspect_file(files["te:fp8-scaled"])
        assert (te.component, te.architecture) == (Component.TEXT_ENCODER, "Qwen2_5_VLForConditionalGeneration")
        vae = inspect_file(files["vae"])
        assert vae.component is Component.VAE and vae.notes == ("comfy layout",)
        gguf = inspect_file(files["gguf:Q8_0"])
        assert (gguf.weight_format, gguf.quant_types) == (WeightFormat.GGUF, ("Q8_0",))

    def test_a_flux_file_is_refused_by_name_before_any_weight_is_read(self, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
        from safetensors.torch import save_file

        flux = tmp_path / "flux1-dev-fp8.safetensors"
        save_file({"double_blocks.0.img_attn.proj.weight": torch.zeros(4, 4), "img_in.weight": torch.zeros(4, 4)}, str(flux))
        import safetensors

        monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: pytest.fail("weights were opened"))
        with pytest.raises(ModelFolderError, match="is a Flux file, not a Qwen-Image one"):
            inspect_file(flux)

    def test_pickles_and_unknown_files_are_refused(self, tmp_path: Path) -> None:
        (tmp_path / "model.ckpt").write_bytes(b"\x80\x04")
        with pytest.raises(ModelFolderError, match="pickle"):
            inspect_file(tmp_path / "model.ckpt")
        from safetensors.torch import save_file

        save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
        with pytest.raises(ModelFolderError, match="not a Qwen-Image"):
            inspect_file(tmp_path / "x.safetensors")

    def test_a_truncated_file_names_itself(self, files: dict[str, Path], tmp_path: Path) -> None:
        cut = tmp_path / "cut.safetensors"
        cut.write_bytes(files["transformer:bf16"].read_bytes()[:-100])
        with pytest.raises(ModelFolderError, match="truncated"):
            inspect_file(cut)
        gguf = tmp_path / "cut.gguf"
        gguf.write_bytes(files["gguf:Q8_0"].read_bytes()[:-100])
        with pytest.raises(ModelFolderError, match=r"cut\.gguf"):
            inspect_file(gguf)


class TestKeyLayouts:
    def test_text_encoder_keys_round_trip(self, tiny_model_dir: Path) -> None:
        for key in read_component(tiny_model_dir, "text_encoder"):
            module_key = comfy_keys.text_encoder_key(key)
            assert module_key.startswith(("model.language_model.", "model.visual.", "lm_head"))
            assert comfy_keys.text_encoder_file_key(module_key) == key

    def test_vae_keys_round_trip_on_the_tiny_vae(self, tiny_model_dir: Path) -> None:
        blocks = json.loads((tiny_model_dir / "vae" / "config.json").read_text())["num_res_blocks"]
        for key in read_component(tiny_model_dir, "vae"):
            comfy = comfy_keys.vae_file_key(key, blocks)
            assert comfy != key or key.startswith(("encoder.down_blocks", "decoder.up_blocks"))
            assert comfy_keys.vae_key(comfy, blocks) == key

    def test_vae_mapping_agrees_with_diffusers_converter_on_the_real_vae(self) -> None:
        """diffusers' convert_wan_vae_to_diffusers hard-codes the real VAE's block counts; ours must agree."""
        from diffusers import AutoencoderKLQwenImage
        from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

        from qwen_core.sources.materialize import empty_module

        vae = empty_module(lambda: AutoencoderKLQwenImage())  # the real Qwen-Image VAE config (defaults)
        keys = list(vae.state_dict())
        comfy = {comfy_keys.vae_file_key(k, 2): torch.empty(0) for k in keys}
        converted = convert_wan_vae_to_diffusers(comfy)
        assert sorted(converted) == sorted(keys)
        assert all(comfy_keys.vae_key(k, 2) in converted for k in comfy)


class TestOutputs:
    def test_dense_split_files_equal_the_folder(self, files: dict[str, Path], reference: torch.Tensor) -> None:
        out = _generate(_source(files, "transformer:fp32"))
        torch.testing.assert_close(out, reference, rtol=0, atol=0)

    def test_bf16_split_files_equal_the_folder_in_bf16(self, tiny_model_dir: Path, tmp_path: Path,
                                                       files: dict[str, Path]) -> None:
        te = write_text_encoder(tiny_model_dir, tmp_path / "te_bf16.safetensors", "bf16", lm_head=True)
        vae = write_vae(tiny_model_dir, tmp_path / "vae_bf16.safetensors", "bf16")
        source = SingleFilesSource(files["transformer:bf16"], te, vae, configs=files["configs"])
        torch.testing.assert_close(_generate(source, "bf16"), _generate(tiny_model_dir, "bf16"), rtol=0, atol=0)

    @pytest.mark.parametrize("fmt", ["bf16", "fp8", "fp8-scaled", "comfy-quant"])
    def test_transformer_formats_match_within_the_measured_error(self, files: dict[str, Path],
                                                                 reference: torch.Tensor, fmt: str) -> None:
        assert _max_err(_generate(_source(files, f"transformer:{fmt}")), reference) < TOL[fmt]

    @pytest.mark.parametrize("fmt", ["fp8", "fp8-scaled", "comfy-quant"])
    def test_text_encoder_in_comfy_layout_matches(self, files: dict[str, Path], reference: torch.Tensor,
                                                  fmt: str) -> None:
        assert _max_err(_generate(_source(files, "transformer:fp32", f"te:{fmt}")), reference) < TOL["te-fp8"]

    @pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
    def test_gguf_transformer_matches(self, files: dict[str, Path], reference: torch.Tensor, qtype: str) -> None:
        assert _max_err(_generate(_source(files, f"gguf:{qtype}")), reference) < TOL[qtype]

    def test_a_scaled_file_read_without_its_scales_fails(self, files: dict[str, Path], reference: torch.Tensor,
                                                          tmp_path: Path) -> None:
        """What diffusers' from_single_file does (it drops unknown keys): the output is far off, not close."""
        from safetensors.torch import load_file, save_file

        state = load_file(str(files["transformer:fp8-scaled"]))
        unscaled = {k: v for k, v in state.items() if not k.endswith(".scale_weight") and k != "scaled_fp8"}
        path = tmp_path / "diffusion_models" / "no_scales.safetensors"
        path.parent.mkdir()
        save_file(unscaled, str(path))
        source = SingleFilesSource(path, files["te:fp32"], files["vae"], configs=files["configs"])
        try:
            out = _generate(source)
        except QwenError as err:  # the weights are up to 448/amax times too large: the latents overflow
            assert "NaN/Inf" in str(err)
        else:
            assert _max_err(out, reference) > 25 * TOL["fp8-scaled"]

    def test_fp8_matmul_runs_on_fp8_products(self, files: dict[str, Path], reference: torch.Tensor) -> None:
        out = _generate(_source(files, "transformer:fp8-scaled", fp8_matmul=True))
        upcast = _generate(_source(files, "transformer:fp8-scaled"))
        assert not torch.equal(out, upcast)  # other math...
        assert _max_err(out, reference) < TOL["fp8-scaled"]  # ...within the same error budget


class TestMemory:
    def test_fp8_stays_fp8_and_weight_bytes_say_so(self, files: dict[str, Path]) -> None:
        source = _source(files, "transformer:fp8-scaled", "te:fp8-scaled")
        pipe = source.build(torch.float32, source.light_components())
        assert fp8_layers(pipe.transformer) == 2 * 14  # 14 Linear layers in each of the 2 blocks
        layer = pipe.transformer.transformer_blocks[0].attn.to_q
        assert isinstance(layer, Fp8WeightLinear) and layer.weight.dtype == torch.float8_e4m3fn
        assert pipe.transformer.dtype == torch.float32  # the first parameters (embedders) are dense
        assert fp8_layers(pipe.text_encoder) > 0 and pipe.text_encoder.dtype == torch.float32
        dense = _source(files, "transformer:fp32").weight_bytes(torch.bfloat16)["transformer"]
        assert source.weight_bytes(torch.bfloat16)["transformer"] < 0.7 * dense
        stored = sum(p.numel() * p.element_size() for p in pipe.transformer.parameters())
        assert abs(source.weight_bytes(torch.float32)["transformer"] - stored) < 0.02 * stored

    @pytest.mark.parametrize("transformer", ["transformer:fp8-scaled", "gguf:Q4_0"])
    def test_streamed_engine_holds_fp8_and_gguf(self, files: dict[str, Path], transformer: str) -> None:
        from qwen_core.streaming import disable_streamed_offload, enable_streamed_offload

        source = _source(files, transformer, "te:fp8-scaled")
        pipe = source.build(torch.float32, source.light_components())
        pipe.set_progress_bar_config(disable=True)

        def run() -> torch.Tensor:
            return pipe(prompt="a cat", negative_prompt="blurry", true_cfg_scale=4.0, height=64, width=64,
                        num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(5)).images

        ref = run()
        handle = enable_streamed_offload(pipe, "cpu", budget_gib=1e-4, max_pixels=64 * 64, num_slots=1)
        try:
            assert handle.plan.resident == ()  # every block streamed: the quantised bytes travel as stored
            out = run()
        finally:
            disable_streamed_offload(pipe)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(run(), ref, atol=0, rtol=0)  # weights restored as they were

    def test_sequential_offload_is_refused_for_quantised_files(self, files: dict[str, Path]) -> None:
        from qwen_core.loading import PipelineLoader

        with pytest.raises(InvalidInputError, match="memory_mode.*streamed"):
            PipelineLoader(_source(files, "gguf:Q8_0"), memory_mode="sequential")
        PipelineLoader(_source(files, "transformer:fp32", "te:fp32"), memory_mode="sequential")  # dense: fine

    def test_set_fp8_matmul_skips_the_modulation_layers(self, files: dict[str, Path]) -> None:
        source = _source(files, "transformer:fp8")
        transformer = source.build(torch.float32, source.light_components()).transformer
        assert set_fp8_matmul(transformer, True) == 2 * 12  # img_mod / txt_mod keep the upcast path
        assert not transformer.transformer_blocks[0].img_mod[1].fp8_matmul


class TestAssembly:
    def test_text_encoder_and_vae_default_to_what_is_present(self, files: dict[str, Path]) -> None:
        source = SingleFilesSource(files["transformer:fp8"], configs=files["configs"])
        assert source.files[Component.VAE].path == files["vae"]
        # An fp8 diffusion model gets an fp8 text encoder when there is one.
        assert source.files[Component.TEXT_ENCODER].weight_format is not WeightFormat.DENSE
        dense = find_companion(Component.TEXT_ENCODER, [files["models"] / "text_encoders"],
                               "Qwen2_5_VLForConditionalGeneration", prefer_fp8=False)
        assert dense is not None and inspect_file(dense).weight_format is WeightFormat.DENSE

    def test_a_file_in_the_wrong_slot_is_refused(self, files: dict[str, Path]) -> None:
        with pytest.raises(ModelFolderError, match="is a vae file, not a text encoder"):
            SingleFilesSource(files["transformer:fp8"], files["vae"], configs=files["configs"])
        with pytest.raises(ModelFolderError, match="not a transformer"):
            SingleFilesSource(files["te:fp32"], configs=files["configs"])

    def test_no_text_encoder_anywhere_says_where_it_looked(self, files: dict[str, Path], tmp_path: Path) -> None:
        with pytest.raises(ModelFolderError, match="no text encoder file"):
            SingleFilesSource(files["transformer:fp8"], configs=files["configs"],
                              companion_dirs={Component.TEXT_ENCODER: [tmp_path]})

    def test_configs_folder_is_checked_and_needs_no_weights(self, files: dict[str, Path], tmp_path: Path) -> None:
        configs = check_configs_folder(files["configs"])
        assert configs.family.key == "qwen-image" and is_configs_only(files["configs"])
        (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
        with pytest.raises(ModelFolderError, match="FluxPipeline"):
            check_configs_folder(tmp_path)

    def test_identity_names_every_file(self, files: dict[str, Path]) -> None:
        a, b = _source(files, "transformer:fp8"), _source(files, "transformer:fp8", "te:fp8-scaled")
        assert a.identity != b.identity and str(files["vae"].resolve()) in a.identity

    def test_a_tensor_without_a_place_is_an_error(self, files: dict[str, Path], tmp_path: Path,
                                                  tiny_model_dir: Path) -> None:
        from safetensors.torch import save_file

        state = encode(read_component(tiny_model_dir, "transformer"), "bf16")
        state["transformer_blocks.7.attn.to_q.weight"] = torch.zeros(48, 48, dtype=torch.bfloat16)
        path = tmp_path / "extra.safetensors"
        save_file(state, str(path))
        source = SingleFilesSource(path, files["te:fp32"], files["vae"], configs=files["configs"])
        with pytest.raises(ModelLoadError, match="no place"):
            source.build(torch.float32, {})
