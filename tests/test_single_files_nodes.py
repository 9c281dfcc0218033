"""The Loader node and the CLI on ComfyUI-style single files (headless: the bridge falls back to QWEN_HOME,
whose sibling folders diffusion_models / text_encoders / vae play ComfyUI's models/ folders)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from single_files import comfy_models_dir

from nodes import common
from nodes.loader import QwenImageLoader
from qwen_core.errors import InvalidInputError, ModelFolderError
from qwen_core.memory import get_residency_manager
from qwen_core.sources.configs import write_configs_folder
from qwen_core.sources.listing import pick_configs


@pytest.fixture(scope="module")
def comfy_models(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """models/ with diffusers/{qwen-image-tiny, Qwen-Image-configs}, the tiny single files and a Flux file."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("models")
    comfy_models_dir(root, tiny_model_dir, transformer_fmt="fp8", te_fmt="fp8-scaled", gguf="Q8_0")
    (root / "diffusers").mkdir()
    (root / "diffusers" / "qwen-image-tiny").symlink_to(tiny_model_dir, target_is_directory=True)
    write_configs_folder(tiny_model_dir, root / "diffusers" / "Qwen-Image-configs")
    save_file({"double_blocks.0.img_attn.proj.weight": torch.zeros(2, 2)},
              str(root / "diffusion_models" / "flux1-dev.safetensors"))
    return root


@pytest.fixture
def home(comfy_models: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("QWEN_HOME", str(comfy_models / "diffusers"))
    yield comfy_models
    get_residency_manager().release_all()


class TestLoaderLists:
    def test_comfy_files_are_listed_beside_the_folders(self, home: Path) -> None:
        spec = QwenImageLoader.INPUT_TYPES()
        assert spec["required"]["model"][0] == ["qwen-image-tiny", "comfy: qwen-image-tiny-Q8_0.gguf",
                                                "comfy: qwen_image_tiny_fp8.safetensors"]  # no Flux, no configs-only
        assert spec["optional"]["text_encoder"][0] == ["auto", "qwen_2.5_vl_tiny_fp8-scaled.safetensors"]
        assert spec["optional"]["vae"][0] == ["auto", "qwen_image_vae.safetensors"]
        assert spec["optional"]["configs"][0] == ["auto", "Qwen-Image-configs", "qwen-image-tiny"]

    def test_configs_follow_the_edit_generation_of_the_file(self) -> None:
        folders = ["Qwen/Qwen-Image-Edit-2509", "Qwen/Qwen-Image", "Qwen/Qwen-Image-Edit"]
        assert pick_configs("qwen_image_fp8_e4m3fn.safetensors", folders) == "Qwen/Qwen-Image"
        assert pick_configs("qwen_image_edit_2509_fp8_e4m3fn.safetensors", folders) == "Qwen/Qwen-Image-Edit-2509"
        assert pick_configs("qwen-image-edit-Q4_K_M.gguf", folders) == "Qwen/Qwen-Image-Edit"
        assert pick_configs("qwen_image_edit_2511_bf16.safetensors", folders) is None


@pytest.mark.slow
class TestLoaderLoads:
    @pytest.mark.parametrize("model", ["comfy: qwen_image_tiny_fp8.safetensors", "comfy: qwen-image-tiny-Q8_0.gguf"])
    def test_a_comfy_entry_generates(self, home: Path, model: str) -> None:
        (handle,) = QwenImageLoader().load(model, "auto", "auto", "sdpa")
        assert handle.is_single_file and Path(handle.configs) == home / "diffusers" / "Qwen-Image-configs"
        generator = common.generator_for(handle)
        assert not generator.loader.is_loaded  # tokenizer now, weights on the first Generate
        images = generator.generate("a red fox", width=64, height=64, steps=2, seed=0).images
        assert images.shape == (1, 64, 64, 3) and torch.isfinite(images).all()

    def test_chosen_files_and_configs_are_used(self, home: Path) -> None:
        (handle,) = QwenImageLoader().load("comfy: qwen_image_tiny_fp8.safetensors", "auto", "auto", "auto",
                                           "qwen_2.5_vl_tiny_fp8-scaled.safetensors", "qwen_image_vae.safetensors",
                                           "qwen-image-tiny")
        assert handle.text_encoder == str(home / "text_encoders" / "qwen_2.5_vl_tiny_fp8-scaled.safetensors")
        assert handle.configs == str(home / "diffusers" / "qwen-image-tiny")

    def test_names_outside_the_folders_are_refused(self, home: Path) -> None:
        assert QwenImageLoader.VALIDATE_INPUTS("comfy: ../x.safetensors") is not True
        assert QwenImageLoader.VALIDATE_INPUTS("comfy: a.safetensors", vae="/etc/passwd") is not True
        with pytest.raises(ModelFolderError, match="is not in"):
            QwenImageLoader().load("comfy: missing.safetensors", "auto", "auto", "auto")
        with pytest.raises(ModelFolderError, match="Flux"):
            QwenImageLoader().load("comfy: flux1-dev.safetensors", "auto", "auto", "auto")

    def test_model_path_names_the_configs_of_a_comfy_entry(self, home: Path, tmp_path: Path) -> None:
        (handle,) = QwenImageLoader().load("comfy: qwen_image_tiny_fp8.safetensors", "auto", "auto", "auto",
                                           model_path=str(home / "diffusers" / "qwen-image-tiny"))
        assert handle.configs == str(home / "diffusers" / "qwen-image-tiny")
        with pytest.raises(InvalidInputError, match="model_path"):
            QwenImageLoader().load("comfy: qwen_image_tiny_fp8.safetensors", "auto", "auto", "auto",
                                   model_path=str(tmp_path))


@pytest.mark.slow
def test_cli_generates_from_single_files(home: Path, tmp_path: Path) -> None:
    from qwen_core.cli import main

    out = tmp_path / "fox.png"
    code = main(["generate", "--transformer-file", str(home / "diffusion_models" / "qwen_image_tiny_fp8.safetensors"),
                 "--configs", str(home / "diffusers" / "Qwen-Image-configs"), "--prompt", "a fox", "--out", str(out),
                 "--width", "64", "--height", "64", "--steps", "2"])
    assert code == 0 and out.is_file()
    assert main(["generate", "--transformer-file", "x.safetensors", "--prompt", "a", "--out", str(out)]) != 0
