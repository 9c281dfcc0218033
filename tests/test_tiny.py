"""The tiny offline Qwen-Image pipeline: layout, determinism, tokenizer template, reload + generate, CLI."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qwen_core import tiny
from qwen_core.cli import main
from qwen_core.errors import InvalidInputError

pytestmark = pytest.mark.slow


def file_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny_pipe(tiny_model_dir: Path):
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(tiny_model_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, seed: int = 0) -> torch.Tensor:
    return pipe(
        "a red fox in the snow",
        width=64,
        height=64,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images


class TestLayout:
    def test_diffusers_layout_with_safetensors_only(self, tiny_model_dir: Path):
        names = {p.name for p in tiny_model_dir.iterdir()}
        assert names == {"model_index.json", "transformer", "vae", "text_encoder", "tokenizer", "scheduler"}
        files = file_hashes(tiny_model_dir)
        assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))]
        for component in ("transformer", "vae", "text_encoder"):
            assert any(f.startswith(component + "/") and f.endswith(".safetensors") for f in files)
        assert tiny.is_complete_pipeline_dir(tiny_model_dir)

    def test_no_partial_folder_left_beside_the_build(self, tiny_model_dir: Path):
        assert not [p for p in tiny_model_dir.parent.iterdir() if p.name.endswith(".partial")]


class TestDeterminism:
    def test_same_seed_gives_identical_files_and_keeps_caller_rng(self, tiny_model_dir: Path, tmp_path: Path):
        torch.manual_seed(1234)
        expected_next = torch.rand(3)
        torch.manual_seed(1234)
        again = tiny.build_tiny_pipeline(tmp_path / "again", seed=0)
        assert torch.equal(torch.rand(3), expected_next), "building must not consume the caller's RNG"
        assert file_hashes(again) == file_hashes(tiny_model_dir)

    def test_other_seed_gives_other_weights_same_configs(self, tiny_model_dir: Path, tiny_model_dir_b: Path):
        a, b = file_hashes(tiny_model_dir), file_hashes(tiny_model_dir_b)
        assert a.keys() == b.keys()
        differing = {name for name in a if a[name] != b[name]}
        assert differing == {name for name in a if name.endswith(".safetensors")}


class TestTokenizer:
    def test_template_constants_match_installed_diffusers(self, tiny_pipe):
        assert tiny_pipe.prompt_template_encode == tiny.T2I_TEMPLATE
        assert tiny_pipe.prompt_template_encode_start_idx == tiny.T2I_DROP == 34

    @pytest.mark.parametrize("template", ["t2i", "edit"])
    def test_template_prefix_is_exactly_the_dropped_token_count(self, tiny_pipe, template: str):
        prefix, drop = tiny.template_prefix(template)
        assert len(tiny_pipe.tokenizer(prefix)["input_ids"]) == drop

    def test_pipeline_drop_keeps_the_prompt_and_nothing_of_the_template(self, tiny_pipe):
        prompt = "a red fox in the snow"
        ids = tiny_pipe.tokenizer(tiny.T2I_TEMPLATE.format(prompt))["input_ids"]
        dropped, kept = ids[: tiny.T2I_DROP], ids[tiny.T2I_DROP :]
        assert tiny_pipe.tokenizer.decode(dropped) == tiny.template_prefix()[0]
        assert tiny_pipe.tokenizer.decode(kept).startswith(prompt + "<|im_end|>")

    def test_special_tokens_are_single_tokens(self, tiny_pipe):
        tok = tiny_pipe.tokenizer
        for token in tiny.SPECIAL_TOKENS:
            assert len(tok(token)["input_ids"]) == 1, token
        assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
        assert tiny_pipe.text_encoder.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")


class TestReloadAndGenerate:
    def test_offline_reload_generates_a_finite_image(self, tiny_pipe):
        assert os.environ["HF_HUB_OFFLINE"] == "1"
        image = generate(tiny_pipe)
        assert image.shape == (1, 3, 64, 64)
        assert torch.isfinite(image).all() and image.min() >= 0 and image.max() <= 1
        assert image.std() > 0.01, "random weights should give a non-flat image"

    def test_same_seed_same_image_other_model_other_image(self, tiny_pipe, tiny_model_dir_b: Path):
        from diffusers import QwenImagePipeline

        first, second = generate(tiny_pipe, seed=3), generate(tiny_pipe, seed=3)
        assert torch.equal(first, second)
        other = QwenImagePipeline.from_pretrained(tiny_model_dir_b, local_files_only=True)
        other.set_progress_bar_config(disable=True)
        assert not torch.allclose(generate(other, seed=3), first)


class TestBuildSafety:
    def test_refuses_a_non_empty_folder(self, tmp_path: Path):
        (tmp_path / "keep.txt").write_text("mine")
        with pytest.raises(InvalidInputError) as err:
            tiny.build_tiny_pipeline(tmp_path)
        assert err.value.field == "out_dir"
        assert (tmp_path / "keep.txt").read_text() == "mine"

    @pytest.mark.parametrize(("kwargs", "field"), [({"seed": -1}, "seed"), ({"family": "sdxl"}, "family")])
    def test_rejects_bad_seed_and_family(self, tmp_path: Path, kwargs: dict, field: str):
        with pytest.raises(InvalidInputError) as err:
            tiny.build_tiny_pipeline(tmp_path / "x", **kwargs)
        assert err.value.field == field

    def test_failed_save_leaves_neither_target_nor_partial(self, tmp_path: Path, monkeypatch):
        from diffusers import QwenImagePipeline

        def crash(self, save_directory, **kwargs):
            (Path(save_directory) / "model_index.json").write_text("{}")  # half written, then killed
            raise OSError("disk full")

        monkeypatch.setattr(QwenImagePipeline, "save_pretrained", crash)
        with pytest.raises(OSError, match="disk full"):
            tiny.build_tiny_pipeline(tmp_path / "out")
        assert list(tmp_path.iterdir()) == []


class TestEnsure:
    def test_reuses_a_complete_build_without_rebuilding(self, tiny_model_dir: Path, monkeypatch):
        monkeypatch.setattr(
            tiny, "build_tiny_pipeline", lambda *a, **k: pytest.fail("rebuilt a cached build")
        )
        assert tiny.ensure_tiny_pipeline(tiny_model_dir.parent, seed=0) == tiny_model_dir
        # The fixtures share QWEN_TINY_CACHE, so the default cache resolves to the same build.
        assert tiny.ensure_tiny_pipeline() == tiny_model_dir

    def test_rebuilds_an_incomplete_folder(self, tiny_model_dir: Path, tmp_path: Path):
        target = tmp_path / tiny.tiny_dir_name(0)
        target.mkdir()
        (target / "model_index.json").write_text((tiny_model_dir / "model_index.json").read_text())
        assert not tiny.is_complete_pipeline_dir(target)
        assert tiny.ensure_tiny_pipeline(tmp_path, seed=0) == target
        assert file_hashes(target) == file_hashes(tiny_model_dir)

    def test_a_build_that_lands_first_elsewhere_is_reused(
        self, tiny_model_dir: Path, tmp_path: Path, monkeypatch
    ):
        """Two processes building the same cache entry: the loser keeps the winner's folder, leaves no temp."""
        from diffusers import QwenImagePipeline

        target = tmp_path / tiny.tiny_dir_name(0)
        real_save = QwenImagePipeline.save_pretrained

        def other_process_wins(self, save_directory, **kwargs):
            shutil.copytree(tiny_model_dir, target)  # the other build is renamed into place meanwhile
            return real_save(self, save_directory, **kwargs)

        monkeypatch.setattr(QwenImagePipeline, "save_pretrained", other_process_wins)
        assert tiny.ensure_tiny_pipeline(tmp_path, seed=0) == target
        assert file_hashes(target) == file_hashes(tiny_model_dir)
        assert [p.name for p in tmp_path.iterdir()] == [target.name]

    def test_sweeps_temp_folders_of_killed_builds_but_not_live_ones(
        self, tiny_model_dir: Path, tmp_path: Path
    ):
        name = tiny.tiny_dir_name(0)
        killed, live = tmp_path / f".{name}.old.partial", tmp_path / f".{name}.new.partial"
        for folder in (killed, live):
            folder.mkdir()
            (folder / "model_index.json").write_text("{}")
        os.utime(killed, (time.time() - 3600, time.time() - 3600))
        tiny.ensure_tiny_pipeline(tmp_path, seed=0)
        assert not killed.exists() and live.exists()


class TestMakeTinyCli:
    def test_cli_in_a_fresh_process_builds_the_same_files(self, tiny_model_dir: Path, tmp_path: Path):
        out = tmp_path / "cli-tiny"
        run = subprocess.run(
            [sys.executable, "-m", "qwen_core", "make-tiny", str(out), "--seed", "0"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr
        assert str(out) in run.stdout and "MB" in run.stdout
        # A fresh interpreter gives byte-identical files: determinism does not depend on process state.
        assert file_hashes(out) == file_hashes(tiny_model_dir)

    def test_cli_refuses_a_non_empty_folder_with_exit_1(self, tmp_path: Path, capsys):
        (tmp_path / "x").write_text("x")
        assert main(["make-tiny", str(tmp_path)]) == 1
        assert "out_dir" in capsys.readouterr().err
