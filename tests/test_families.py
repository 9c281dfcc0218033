"""The family table, family detection from a folder, the image-count rules and the governor's reference-token
accounting. Nothing here computes an image (see test_family_generation.py)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from qwen_core import governor, reference_images
from qwen_core import memory_model as mm
from qwen_core.errors import InvalidInputError, ModelFolderError, QwenError
from qwen_core.families import (
    FAMILIES,
    PIXELS_PER_IMAGE_TOKEN,
    family_for_pipeline_class,
    family_for_repo,
    get_family,
    known_repo_ids,
    requirements,
)
from qwen_core.generator import QwenImageGenerator, validate_request
from qwen_core.integrity import check_model_folder
from qwen_core.memory import get_residency_manager
from qwen_core.options import MemoryMode

KEYS = list(FAMILIES)
IMAGE = torch.rand(1, 48, 64, 3)  # a ComfyUI IMAGE: [B, H, W, C] in 0..1


class TestFamilyTable:
    @pytest.mark.parametrize("key", KEYS)
    def test_classes_exist_in_the_installed_libraries(self, key: str) -> None:
        import importlib

        family = FAMILIES[key]
        assert hasattr(importlib.import_module("diffusers"), family.pipeline_class)
        for library, cls in family.components.values():
            assert hasattr(importlib.import_module(library), cls), f"{library}.{cls}"

    def test_short_names_and_repo_ids(self) -> None:
        assert get_family("edit-2509") is FAMILIES["qwen-image-edit-2509"]
        assert get_family("2.1-turbo").guidance_distilled
        with pytest.raises(InvalidInputError, match="`family`.*choose one of"):
            get_family("sdxl")
        assert family_for_repo("qwen/qwen-image-2512").key == "qwen-image"
        assert set(known_repo_ids()) >= {"Qwen/Qwen-Image-Edit-2511", "Qwen/Qwen-Image-Layered", "Qwen/Qwen-Image-2.1"}

    def test_reference_sizing_is_what_the_pipelines_do(self) -> None:
        """The sizes are read from diffusers' code: a change there must show up here."""
        from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

        edit_plus = get_family("edit-2509").reference
        assert (edit_plus.vae_area, edit_plus.vision_area) == (plus.VAE_IMAGE_SIZE, plus.CONDITION_IMAGE_SIZE)
        # Tokens: VAE /8 then 2x2 patches = one per 16x16 px; Qwen2.5-VL: patch 14, 2x2 merge = one per 28x28 px.
        assert get_family("edit-2509").tokens_per_reference_image == 1024 * 1024 // 256 + 384 * 384 // 784
        assert get_family("edit").tokens_per_reference_image == 4096 + 1024 * 1024 // 784
        # 2.1: the latents fill the vision tokens' slots (Qwen3-VL: one per 32x32 px), which add nothing.
        assert get_family("2.1").reference.text_tokens == 1024
        assert get_family("2.1").tokens_per_reference_image == 4096
        assert get_family("layered").sequence_frames() == 4 + 2  # composite + 4 layers + the input's latent
        assert get_family("qwen-image").extra_pixels(0) == 0

    def test_requirements_for_preflight(self) -> None:
        facts = requirements("qwen-image-2.1")
        assert facts.download_size_gb == pytest.approx(32.5) and facts.memory_model_key == "qwen-image-2.1"
        assert "non-commercial" in facts.licence_note and "Research" in facts.licence
        assert requirements(get_family("edit-2511")).takes_images == "1 to 3 input images"
        for family in FAMILIES.values():  # the parts add up to the download (tokenizer/config files are MBs)
            assert sum(family.component_gb.values()) == pytest.approx(family.download_size_gb, abs=0.1)
            assert set(family.component_gb) == set(family.weighted_components)


@pytest.mark.slow
class TestDetection:
    @pytest.mark.parametrize("key", KEYS)
    def test_each_tiny_folder_is_its_family(self, tiny_family_dir, key: str) -> None:
        assert check_model_folder(tiny_family_dir(key)).family.key == key

    def test_variants_of_one_pipeline_class(self) -> None:
        edit_plus = "QwenImageEditPlusPipeline"
        assert family_for_pipeline_class(edit_plus, transformer_config={"zero_cond_t": True}).key.endswith("2511")
        assert family_for_pipeline_class(edit_plus, transformer_config={}).key.endswith("2509")
        base = family_for_pipeline_class("QwenImage21Pipeline", index={"sample_sigmas": [i / 40 for i in range(40, 0, -1)]})
        assert base.key == "qwen-image-2.1"
        assert family_for_pipeline_class("QwenImage21Pipeline", index={"sample_sigmas": [1.0, 0.5]}).guidance_distilled

    def test_a_turbo_grid_only_in_the_modular_index_is_found_and_used(self, tiny_family_dir, tmp_path: Path) -> None:
        """If a Turbo folder keeps its sigma grid only in modular_model_index.json, it is still Turbo, and the
        pipeline runs that grid (the 2.1 base schedule would be wrong for a distilled checkpoint)."""
        folder = Path(shutil.copytree(tiny_family_dir("2.1-turbo"), tmp_path / "m"))
        index = json.loads((folder / "model_index.json").read_text())
        sigmas = index.pop("sample_sigmas")
        (folder / "model_index.json").write_text(json.dumps(index))
        (folder / "modular_model_index.json").write_text(json.dumps({"_class_name": "QwenImage21TurboAutoBlocks",
                                                                     "sample_sigmas": sigmas}))
        get_residency_manager().release_all()
        gen = QwenImageGenerator(folder, device="cpu")
        assert gen.loader.family.key == "qwen-image-2.1-turbo"
        assert gen.generate("a cat", width=64, height=64, steps=3).steps == len(sigmas)
        get_residency_manager().release_all()

    def test_a_folder_whose_parts_belong_to_another_family_is_refused(self, tiny_family_dir, tmp_path: Path) -> None:
        folder = Path(shutil.copytree(tiny_family_dir("2.1"), tmp_path / "m"))
        index = json.loads((folder / "model_index.json").read_text())
        index["_class_name"] = "QwenImagePipeline"
        index["tokenizer"] = ["transformers", "Qwen2Tokenizer"]
        (folder / "model_index.json").write_text(json.dumps(index))
        with pytest.raises(ModelFolderError, match=r"declares QwenImagePipeline \(Qwen-Image\).*transformer is "
                           r"QwenImage21Transformer2DModel \(a Qwen-Image 2.1 / Qwen-Image 2.1 Turbo part\)"):
            QwenImageGenerator(folder, device="cpu")

    def test_an_edit_folder_without_its_processor_is_refused(self, tiny_family_dir, tmp_path: Path) -> None:
        folder = Path(shutil.copytree(tiny_family_dir("edit-2509"), tmp_path / "m"))
        index = json.loads((folder / "model_index.json").read_text())
        del index["processor"]
        (folder / "model_index.json").write_text(json.dumps(index))
        with pytest.raises(ModelFolderError, match=r"Qwen-Image-Edit-2509\) but lists no 'processor'"):
            check_model_folder(folder)

    def test_a_modular_only_folder_is_refused_saying_why(self, tmp_path: Path) -> None:
        (tmp_path / "modular_model_index.json").write_text('{"_class_name": "QwenImage21TurboAutoBlocks"}')
        with pytest.raises(ModelFolderError, match="modular.*no per-step callback.*Qwen/Qwen-Image-2.1-Turbo"):
            check_model_folder(tmp_path)

    def test_loader_builds_the_processor_among_the_light_parts(self, tiny_family_dir) -> None:
        gen = QwenImageGenerator(tiny_family_dir("edit"), device="cpu")
        assert type(gen.loader.light_components["processor"]).__name__ == "Qwen2VLProcessor"
        assert not gen.loader.is_loaded

    def test_without_torchvision_the_processor_error_says_so(self, tiny_family_dir, monkeypatch) -> None:
        import importlib.util

        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchvision" else real(name, *a))
        with pytest.raises(QwenError, match="needs torchvision.*pip install torchvision"):
            QwenImageGenerator(tiny_family_dir("layered"), device="cpu")


@pytest.mark.slow
class TestImageCountRules:
    """A wrong number of images is refused before any weight loads, naming the input and what the model wants."""

    @pytest.mark.parametrize(("key", "count", "field", "wants"), [
        ("qwen-image", 1, "image1", "Qwen-Image takes no input image \\(text-to-image\\); got 1"),
        ("edit", 0, "image1", "Qwen-Image-Edit takes exactly 1 input image; got 0"),
        ("edit", 2, "image2", "Qwen-Image-Edit takes exactly 1 input image; got 2"),
        ("edit-2509", 0, "image1", "Qwen-Image-Edit-2509 takes 1 to 3 input images; got 0"),
        ("edit-2511", 4, "image4", "Qwen-Image-Edit-2511 takes 1 to 3 input images; got 4"),
        ("layered", 0, "image1", "Qwen-Image-Layered takes exactly 1 input image; got 0"),
        ("2.1", 11, "image11", "Qwen-Image 2.1 takes 0 to 10 input images; got 11"),
    ])  # fmt: skip
    def test_wrong_count_refused_before_loading(self, tiny_family_dir, key, count, field, wants) -> None:
        get_residency_manager().release_all()
        gen = QwenImageGenerator(tiny_family_dir(key), device="cpu")
        with pytest.raises(InvalidInputError, match=f"`{field}`: .*{wants}") as caught:
            gen.generate("a cat", images=[IMAGE] * count, width=64, height=64, steps=2)
        assert caught.value.field == field
        assert not gen.loader.is_loaded

    @pytest.mark.parametrize(("key", "count"), [("edit", 1), ("edit-2509", 3), ("layered", 1), ("2.1", 0), ("2.1", 2)])
    def test_right_count_plans(self, tiny_family_dir, key: str, count: int) -> None:
        request = QwenImageGenerator(tiny_family_dir(key), device="cpu").plan("a cat", images=[IMAGE] * count)
        assert len(request.images) == count

    def test_unconnected_inputs_keep_the_names_of_the_others(self) -> None:
        family = get_family("edit")
        with pytest.raises(InvalidInputError, match="`image3`: .*got 2"):
            reference_images.prepare([IMAGE, None, IMAGE], family)
        assert len(reference_images.prepare([None, IMAGE, None], family)) == 1

    def test_a_batch_in_one_input_is_refused(self) -> None:
        with pytest.raises(InvalidInputError, match="`image2`: holds a batch of 2 images"):
            reference_images.prepare([IMAGE, torch.rand(2, 8, 8, 3)], get_family("edit-2509"))

    def test_layers_and_batch_rules(self) -> None:
        common = dict(width=640, height=640, steps=2, true_cfg_scale=4.0, seed=0)
        with pytest.raises(InvalidInputError, match="`layers`: only Qwen-Image-Layered"):
            validate_request("a", "", batch_size=1, layers=3, **common)
        with pytest.raises(InvalidInputError, match="`batch_size`.*one image, as 4 layers, per run"):
            validate_request("a", "", batch_size=2, family=get_family("layered"), images=[IMAGE], **common)


class TestConversion:
    def test_alpha_is_composited_over_white_for_rgb_pipelines(self) -> None:
        rgba = torch.zeros(1, 8, 8, 4)  # fully transparent black
        (image,) = reference_images.prepare([rgba], get_family("edit"))
        assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 255, 255)

    def test_rgba_pipelines_get_rgba(self) -> None:
        (image,) = reference_images.prepare([IMAGE], get_family("layered"))
        assert image.mode == "RGBA" and image.size == (64, 48) and image.getpixel((0, 0))[3] == 255
        (gray,) = reference_images.prepare([torch.rand(1, 16, 16, 1)], get_family("2.1"))
        assert gray.mode == "RGBA"

    def test_bad_images_name_the_input(self) -> None:
        with pytest.raises(InvalidInputError, match="`image1`: contains NaN"):
            reference_images.prepare([torch.full((1, 8, 8, 3), float("nan"))], get_family("edit"))
        with pytest.raises(InvalidInputError, match="`image1`: must have 1, 3 or 4 channels"):
            reference_images.prepare([torch.rand(1, 8, 8, 2)], get_family("edit"))
        with pytest.raises(InvalidInputError, match="`image1`: is 4x4"):
            reference_images.prepare([torch.rand(1, 4, 4, 3)], get_family("edit"))


class TestGovernorCountsReferenceTokens:
    """On a 72 GB card (the measured gpu/bf16 memory model), references shrink the output the governor allows."""

    CARD = {"vram_gb": 72.0, "dtype": "bf16", "memory_mode": "gpu"}

    def _plan(self, key: str, count: int, side: int = 2048, card: dict | None = None, **extra: object):
        return validate_request("a cat", "", width=side, height=side, steps=2, true_cfg_scale=4.0, seed=0, batch_size=1,
                                governor_kwargs=card or self.CARD, family=get_family(key), images=[IMAGE] * count,
                                **extra)  # fmt: skip

    def test_extra_pixels_are_the_reference_tokens(self) -> None:
        family = get_family("edit-2509")
        assert family.extra_pixels(3) == 3 * (4096 + 188) * PIXELS_PER_IMAGE_TOKEN

    def test_more_references_leave_a_smaller_output(self) -> None:
        # Streamed, 12 GB: the window is activations-bound, so every reference's tokens cost output pixels.
        card = {"vram_gb": 12.0, "dtype": "bf16", "memory_mode": "streamed"}
        pixels = [self._plan("edit-2509", n, side=4096, card=card).decision.pixels for n in (1, 2, 3)]
        assert pixels[0] > pixels[1] > pixels[2]
        memory = governor.max_pixels(12.0, "bf16", "streamed")
        for n, allowed in zip((1, 2, 3), pixels, strict=True):
            # Output + references stay inside the measured memory bound.
            assert allowed + get_family("edit-2509").extra_pixels(n) <= memory
        assert "reference tokens" in self._plan("edit-2509", 3, side=4096, card=card).decision.reason

    def test_where_the_decode_bounds_the_output_references_only_cost_the_transformer(self) -> None:
        # gpu mode, 72 GB: the untiled VAE decode (3.9 GiB/MP) bounds the output at 4.4 MP; the references' tokens
        # are never decoded and cost only the activations (0.68 GiB/MP), so three of them leave the output as is.
        decode_bound = governor.max_pixels(72.0, "bf16", "gpu")
        sequence_bound = mm.window_pixels("gpu", 72.0, sequence=True)
        for n in (1, 3):
            plan = self._plan("edit-2509", n, side=4096)
            assert plan.decision.pixels <= decode_bound < 1.02 * plan.decision.pixels
            assert plan.decision.pixels + get_family("edit-2509").extra_pixels(n) <= sequence_bound
            assert "the decode bounds it" in plan.decision.reason
        # So many references that the sequence binds: the output shrinks after all.
        many = governor.max_pixels(72.0, "bf16", "gpu", extra_pixels=sequence_bound - 2_000_000)
        assert 1_900_000 <= many <= 2_000_000

    def test_a_reference_cache_held_through_the_decode_costs_the_decode(self) -> None:
        # H200, 40 GiB cap: 2.1 with one condition image at the governor's 1152x1152 ran out of memory in the
        # decode (caught: tiled re-decode), because its pipeline keeps the condition's keys/values until it returns.
        situation = governor.Situation(40.0, "gpu", "bf16", "qwen-image-2.1")
        extra = get_family("2.1").extra_pixels(1)
        plain = governor.clamp_image_size(8192, 8192, situation=situation).pixels
        one, two = (governor.clamp_image_size(8192, 8192, situation=situation, extra_pixels=extra,
                                              cfg_branches=b) for b in (1, 2))  # fmt: skip
        cache = mm.family_model("qwen-image-2.1").reference_cache_gib_per_mpix("bf16")
        vae = mm.family_model("qwen-image-2.1").vae_gib_per_mpix("bf16")
        decode_window = governor.memory_window(situation).pixels  # the untiled decode's bound, no references
        for decision, branches in ((one, 1), (two, 2)):
            # The decode holds the output's decode and the cache of every branch; nothing else of the references.
            assert decision.pixels + extra * branches * cache / vae <= decode_window
            assert "key/value cache is held through it" in decision.reason
        assert two.pixels < one.pixels < 0.8 * plain
        # 1.12 MP: predicted peak 39.32 GiB, 39.82 with 2.1's 0.5 GiB headroom; measured 39.37 GiB (H200,
        # bench/RESULTS.md).
        assert (one.width, one.height) == (1056, 1056)
        # Qwen-Image's edit pipelines cache nothing: the branches do not change their window.
        card = {"vram_gb": 72.0, "dtype": "bf16", "memory_mode": "gpu"}
        e = get_family("edit-2509").extra_pixels(3)
        assert (governor.clamp_image_size(4096, 4096, **card, extra_pixels=e, cfg_branches=1).pixels
                == governor.clamp_image_size(4096, 4096, **card, extra_pixels=e, cfg_branches=2).pixels)

    def test_text_to_image_is_unchanged(self) -> None:
        plain = governor.clamp_image_size(2048, 2048, **self.CARD)
        assert self._plan("qwen-image", 0).decision == plain

    def test_layered_counts_its_frames_and_picks_the_bucket_that_fits(self) -> None:
        # 80 GB: 6.4 MP beside the weights / 6 frames (composite, 4 layers, input) -> 1.07 MP: the 1024 bucket.
        big = self._plan("layered", 1, side=1024, layers=4, card={**self.CARD, "vram_gb": 80.0})
        assert big.resolution == 1024 and "resolution 1024" in big.decision.reason
        # 72 GB: 4.4 MP / 6 = 0.73 MP: the 640 bucket, at the input's 4:3 aspect.
        small = self._plan("layered", 1, side=1024, layers=4)
        assert small.resolution == 640 and (small.decision.width, small.decision.height) == (736, 544)
        # Fewer layers, fewer frames: 4.4 / 3 fits 1024 again.
        assert self._plan("layered", 1, side=1024, layers=1).resolution == 1024

    def test_the_generator_passes_the_references_to_the_governor(self, tiny_family_dir) -> None:
        gen = QwenImageGenerator(tiny_family_dir("edit-2509"), device="cpu")
        loader = gen.loader
        # A 12 GB reading carried in the plan (what a CUDA load takes), bf16, streamed: that window is
        # activations-bound, so the references' tokens must shrink the output.
        loader.plan = dataclasses.replace(loader.plan, dtype=torch.bfloat16, vram_gib=12.0, memory_mode=MemoryMode.STREAMED)
        one, three = (gen.plan("a cat", images=[IMAGE] * n, width=4096, height=4096) for n in (1, 3))
        assert three.decision.pixels < one.decision.pixels
        assert not loader.is_loaded
