"""Every family end to end on the CPU with its tiny model: make-tiny, the demo with an input image, the Generate
node called headless, batched CFG and the streamed engine giving the images plain diffusers gives."""

from __future__ import annotations

import filecmp
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from qwen_core import family_call
from qwen_core.cfg_batch import cfg_batching_stats, disable_cfg_batching, enable_cfg_batching
from qwen_core.families import FAMILIES, ModelFamily, get_family
from qwen_core.memory import get_residency_manager
from qwen_core.streaming import disable_streamed_offload, enable_streamed_offload, pipeline_sees_images

pytestmark = pytest.mark.slow
KEYS = list(FAMILIES)
QWEN_IMAGE_MMDIT = [k for k, f in FAMILIES.items() if f.cfg_batching]


def _image(height: int = 48, width: int = 64, seed: int = 0) -> torch.Tensor:
    """A ComfyUI IMAGE [1, H, W, 3] in 0..1."""
    return torch.from_numpy(np.random.RandomState(seed).rand(1, height, width, 3).astype(np.float32))


def _images_for(family: ModelFamily) -> list[torch.Tensor]:
    """The most images the node offers that the family takes (3 for Edit-2509/2511 and 2.1)."""
    return [_image(seed=i) for i in range(min(3, family.image_inputs.maximum))]


@pytest.fixture
def small_references(monkeypatch: pytest.MonkeyPatch) -> None:
    """The edit pipelines resize every reference to ~1 MP (constants in their code): ~2 s of VAE per reference on
    one CPU thread. The equivalence tests compare two runs of the same code, so they shrink that to 128x128."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

    monkeypatch.setattr(plus, "VAE_IMAGE_SIZE", 128 * 128)
    monkeypatch.setattr(plus, "CONDITION_IMAGE_SIZE", 64 * 64)
    real = edit.calculate_dimensions
    monkeypatch.setattr(edit, "calculate_dimensions", lambda area, ratio: real(min(area, 128 * 128), ratio))


class TestMakeTinyCli:
    @pytest.mark.parametrize("key", KEYS)
    def test_every_family_builds_from_the_command_line(self, tiny_family_dir, tmp_path: Path, key: str, capsys) -> None:
        from qwen_core.cli import main

        family = FAMILIES[key]
        out = tmp_path / "m"
        assert main(["make-tiny", "--family", family.short_name, str(out)]) == 0
        assert family.display_name in capsys.readouterr().out
        # Same seed, same recipe: the files are those of the session's build.
        cached = tiny_family_dir(key)
        files = sorted(p.relative_to(cached) for p in cached.rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
        assert all(filecmp.cmp(cached / f, out / f, shallow=False) for f in files)


class TestDemo:
    @pytest.mark.parametrize("key", KEYS)
    def test_demo_makes_an_image_for_every_family(self, tiny_family_dir, tmp_path: Path, key: str, capsys) -> None:
        from qwen_core.cli import main

        family = FAMILIES[key]
        tiny_family_dir(key)  # build (or reuse) the session's model: the demo finds it in QWEN_TINY_CACHE
        args = ["demo", "--family", family.short_name, "--out", str(tmp_path / "x.png"), "--width", "64",
                "--height", "64", "--steps", "2"]  # fmt: skip
        for i in range(family.image_inputs.minimum):
            path = tmp_path / f"in{i}.png"
            Image.fromarray((np.random.RandomState(i).rand(48, 64, 3) * 255).astype(np.uint8)).save(path)
            args += ["--image", str(path)]
        assert main(args) == 0
        out = capsys.readouterr().out
        layers = family.default_layers
        written = [tmp_path / f"x_{i}.png" for i in range(1, layers + 1)] if layers else [tmp_path / "x.png"]
        for path in written:
            with Image.open(path) as image:
                assert image.mode == ("RGBA" if family.output_channels == 4 else "RGB")
                assert image.text["model"].startswith(f"tiny {key}")
        assert f"tiny pipeline: {family.display_name}" in out and "wrote" in out
        if family.image_inputs.minimum:
            assert "reference image(s)" in out


class TestGenerateNodeHeadless:
    """The node class called directly, as ComfyUI would: IMAGE inputs in, IMAGE (RGB or RGBA) out."""

    @pytest.mark.parametrize("key", KEYS)
    def test_every_family_through_the_node(self, tiny_family_dir, key: str) -> None:
        from nodes.common import PipeHandle
        from nodes.generate import QwenImageGenerate

        get_residency_manager().release_all()
        family = FAMILIES[key]
        images = dict(zip(("image1", "image2", "image3"), _images_for(family), strict=False))
        out = QwenImageGenerate().generate(
            pipe=PipeHandle(str(tiny_family_dir(key))), prompt="a red fox", negative_prompt="", width=64, height=64,
            steps=2, true_cfg_scale=2.0, seed=0, batch_size=1, **images,
        )  # fmt: skip
        (result,) = out["result"]
        assert result.dtype == torch.float32 and bool(torch.isfinite(result).all())
        assert float(result.min()) >= 0.0 and float(result.max()) <= 1.0
        if family_call.is_layered(family):  # 4 RGBA layers at 640^2 area in the input's 4:3 aspect
            assert tuple(result.shape) == (family.default_layers, 544, 736, 4)
        else:
            assert tuple(result.shape) == (1, 64, 64, family.output_channels)
        assert out["ui"]["text"][0].startswith(f"{result.shape[2]}x{result.shape[1]} x{result.shape[0]}")
        get_residency_manager().release_all()

    def test_layers_widget_sets_the_layer_count_and_other_models_refuse_it(self, tiny_family_dir) -> None:
        from nodes.common import PipeHandle
        from nodes.generate import QwenImageGenerate
        from qwen_core.errors import InvalidInputError

        get_residency_manager().release_all()
        call = dict(prompt="a red fox", negative_prompt="", width=64, height=64, steps=2, true_cfg_scale=1.0, seed=0,
                    batch_size=1)
        out = QwenImageGenerate().generate(pipe=PipeHandle(str(tiny_family_dir("layered"))), image1=_image(), layers=2,
                                           **call)  # fmt: skip
        assert tuple(out["result"][0].shape) == (2, 544, 736, 4)
        with pytest.raises(InvalidInputError, match="`layers`: only Qwen-Image-Layered makes layers"):
            QwenImageGenerate().generate(pipe=PipeHandle(str(tiny_family_dir("qwen-image"))), layers=3, **call)
        spec = QwenImageGenerate.INPUT_TYPES()["optional"]["layers"]
        assert spec[0] == "INT" and spec[1]["default"] == 0  # 0: the model's default, so every model accepts it
        get_residency_manager().release_all()

    def test_an_edit_model_without_an_image_is_refused_naming_the_input(self, tiny_family_dir) -> None:
        from nodes.common import PipeHandle
        from nodes.generate import QwenImageGenerate
        from qwen_core.errors import InvalidInputError

        with pytest.raises(InvalidInputError, match="`image1`: .*Qwen-Image-Edit-2511 takes 1 to 3 input images; got 0"):
            QwenImageGenerate().generate(pipe=PipeHandle(str(tiny_family_dir("edit-2511"))), prompt="a", negative_prompt="",
                                         width=64, height=64, steps=2, true_cfg_scale=1.0, seed=0, batch_size=1)  # fmt: skip


def _pipe(folder: Path) -> Any:
    from qwen_core.model_source import FolderSource

    source = FolderSource(folder)
    pipe = source.build(torch.float32, source.light_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(pipe: Any, family: ModelFamily, negative: str = "blurry, low quality") -> torch.Tensor:
    from qwen_core import reference_images

    refs = reference_images.prepare(_images_for(family), family)
    layered = family_call.is_layered(family)
    kwargs = family_call.call_kwargs(family, refs, width=64, height=64, layers=1 if layered else 0,
                                     resolution=640 if layered else None)  # fmt: skip
    out = pipe(prompt="a cat on a mat", negative_prompt=negative, true_cfg_scale=4.0, num_inference_steps=2,
               output_type="pt", generator=torch.Generator().manual_seed(5), **kwargs).images
    return family_call.output_images(out)


class TestBatchedCfg:
    @pytest.mark.parametrize("key", QWEN_IMAGE_MMDIT)
    def test_batched_equals_two_forwards(self, tiny_family_dir, small_references, key: str) -> None:
        family = FAMILIES[key]
        pipe = _pipe(tiny_family_dir(key))
        ref = _call(pipe, family)
        assert enable_cfg_batching(pipe) is not None
        try:
            out = _call(pipe, family)
            stats = cfg_batching_stats(pipe)
        finally:
            disable_cfg_batching(pipe)
        # 2 steps: one batched forward each, the uncond call served from it (2511's zero_cond_t and Layered's
        # per-sample additional_t_cond double with the batch).
        assert stats["batched"] == 2 and stats["reused"] == 2 and stats["plain"] == 0
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)

    @pytest.mark.parametrize("key", ["qwen-image-2.1", "qwen-image-2.1-turbo"])
    def test_families_without_support_get_no_wrapper(self, tiny_family_dir, key: str) -> None:
        pipe = _pipe(tiny_family_dir(key))
        assert enable_cfg_batching(pipe) is None
        assert "forward" not in pipe.transformer.__dict__


class TestStreamed:
    @pytest.mark.parametrize("key", KEYS)
    def test_streamed_equals_resident(self, tiny_family_dir, small_references, key: str) -> None:
        family = FAMILIES[key]
        pipe = _pipe(tiny_family_dir(key))
        ref = _call(pipe, family)
        # One slot for the two blocks: they really take turns (the text encoder streams too).
        handle = enable_streamed_offload(pipe, "cpu", budget_gib=1e-4, max_pixels=64 * 64, num_slots=1)
        try:
            assert handle.plan.resident == () and len(handle.plan.streamed) == 2
            assert (handle.cfg_batcher is not None) == family.cfg_batching
            out = _call(pipe, family)
        finally:
            disable_streamed_offload(pipe)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)

    def test_the_vision_tower_goes_to_the_device_for_families_that_use_it(self) -> None:
        from qwen_core.streaming import _text_encoder_modules
        from qwen_core.tiny import tiny_pipeline

        pipe = tiny_pipeline(family="edit")
        _, left = _text_encoder_modules(pipe.text_encoder, vision=pipeline_sees_images(pipe))
        assert pipeline_sees_images(pipe) and left == []
        _, left = _text_encoder_modules(pipe.text_encoder, vision=False)
        assert [type(m).__name__ for m in left] == ["Qwen2_5_VisionTransformerPretrainedModel"]
        assert not pipeline_sees_images(tiny_pipeline(family="qwen-image"))


def test_layered_and_turbo_specifics(tiny_family_dir) -> None:
    from qwen_core.generator import QwenImageGenerator

    get_residency_manager().release_all()
    turbo = QwenImageGenerator(tiny_family_dir("2.1-turbo"), device="cpu")
    result = turbo.generate("a cat", width=64, height=64, steps=3, true_cfg_scale=1.0)
    assert result.steps == 8 and any("8-step sigma grid" in w for w in result.warnings)
    assert result.images.shape[-1] == 4  # 2.1's VAE decodes RGBA
    layered = QwenImageGenerator(tiny_family_dir("layered"), device="cpu")
    result = layered.generate("a cat", images=[_image()], steps=2, true_cfg_scale=1.0, layers=2)
    assert tuple(result.images.shape) == (2, 544, 736, 4)
    assert get_family("layered").default_width == 640  # the model card's bucket when no size is given
    get_residency_manager().release_all()


def test_a_21_condition_image_adds_its_latent_tokens_only(tiny_family_dir, monkeypatch) -> None:
    """The governor's token count for 2.1 (``tokens_per_reference_image``) against what the pipeline builds: the
    key/value cache holds the transformer's prefix, in which the condition image's latents take the places of its
    vision tokens (a 256x256 condition: 256 latent tokens; its 64 vision tokens add nothing)."""
    from diffusers import DiffusionPipeline
    from diffusers.models.transformers import transformer_qwenimage21 as t21

    prefixes: list[int] = []
    store = t21.QwenImage21KVLayerCache.store
    monkeypatch.setattr(t21.QwenImage21KVLayerCache, "store",
                        lambda cache, k, v: (prefixes.append(k.shape[1]), store(cache, k, v))[1])  # fmt: skip
    pipe = DiffusionPipeline.from_pretrained(tiny_family_dir("2.1"))
    pipe.set_progress_bar_config(disable=True)
    condition = Image.fromarray((np.random.RandomState(0).rand(256, 256, 3) * 255).astype(np.uint8))
    firsts = []
    for images in (None, [condition], [condition, condition]):
        prefixes.clear()
        pipe(prompt="a cat", image=images, num_inference_steps=1, output_resolution=256, output_type="latent")
        firsts.append(prefixes[0])
    latents, vision = 256 * 256 // 256, 256 * 256 // (32 * 32)
    template = 16  # "<imageN><|vision_start|>...<|vision_end|>" around each image's slots
    for before, after in zip(firsts[:-1], firsts[1:], strict=True):
        assert latents <= after - before < latents + template < latents + vision
    family = get_family("2.1")
    assert family.tokens_per_reference_image == family.reference.vae_area // 256  # 1024^2: 4096 tokens
