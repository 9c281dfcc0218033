"""Folder and safetensors checks on hand-made files (no pipeline needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qwen_core.errors import ModelFolderError
from qwen_core.integrity import (
    check_index,
    check_model_folder,
    read_model_index,
    read_safetensors_header,
)

LFS_POINTER = (
    "version https://git-lfs.github.com/spec/v1\n"
    "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
    "size 16384\n"
)


def _weights(path: Path, n: int = 4, seed: int = 0) -> Path:
    gen = torch.Generator().manual_seed(seed)
    save_file({"a.weight": torch.randn(n, n, generator=gen), "b.bias": torch.randn(n, generator=gen)}, str(path))
    return path


def _make_folder(root: Path, *, sharded: bool = False) -> Path:
    """A minimal diffusers-layout folder: the real component names, tiny fake weights."""
    root.mkdir(parents=True, exist_ok=True)
    index = {
        "_class_name": "QwenImagePipeline",
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "QwenImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLQwenImage"],
    }
    (root / "model_index.json").write_text(json.dumps(index))
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text("{}")
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "tokenizer_config.json").write_text("{}")
    for name in ("text_encoder", "vae"):
        (root / name).mkdir()
        (root / name / "config.json").write_text("{}")
        _weights(root / name / "model.safetensors")
    tr = root / "transformer"
    tr.mkdir()
    (tr / "config.json").write_text("{}")
    if sharded:
        save_file({"x": torch.ones(8)}, str(tr / "diffusion_pytorch_model-00001-of-00002.safetensors"))
        save_file({"y": torch.ones(8)}, str(tr / "diffusion_pytorch_model-00002-of-00002.safetensors"))
        weight_map = {
            "x": "diffusion_pytorch_model-00001-of-00002.safetensors",
            "y": "diffusion_pytorch_model-00002-of-00002.safetensors",
        }
        (tr / "diffusion_pytorch_model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": 64}, "weight_map": weight_map})
        )
    else:
        _weights(tr / "diffusion_pytorch_model.safetensors", n=8)
    return root


class TestSafetensorsHeader:
    def test_intact_file_reports_tensors_and_params(self, tmp_path):
        info = read_safetensors_header(_weights(tmp_path / "w.safetensors", n=4))
        assert set(info.tensors) == {"a.weight", "b.bias"}
        assert info.num_params == 16 + 4
        assert info.dtypes == {"F32"}

    def test_truncated_file_is_named_with_missing_bytes(self, tmp_path):
        path = _weights(tmp_path / "w.safetensors", n=16)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 100])
        with pytest.raises(ModelFolderError) as err:
            read_safetensors_header(path)
        msg = str(err.value)
        assert "truncated" in msg and "100 missing" in msg and str(path) in msg
        assert "MetadataIncompleteBuffer" in msg and "Downloader" in msg

    def test_truncated_inside_header(self, tmp_path):
        path = _weights(tmp_path / "w.safetensors")
        path.write_bytes(path.read_bytes()[:20])
        with pytest.raises(ModelFolderError, match="truncated inside its header"):
            read_safetensors_header(path)

    def test_lfs_pointer_is_named_as_such(self, tmp_path):
        path = tmp_path / "w.safetensors"
        path.write_text(LFS_POINTER)
        with pytest.raises(ModelFolderError) as err:
            read_safetensors_header(path)
        assert "Git-LFS pointer" in str(err.value) and "HeaderTooLarge" in str(err.value)

    def test_html_page_saved_as_weights(self, tmp_path):
        path = tmp_path / "w.safetensors"
        path.write_text("<!DOCTYPE html><html><body>502 Bad Gateway</body></html>" * 3)
        with pytest.raises(ModelFolderError, match="HTML error page"):
            read_safetensors_header(path)

    def test_empty_file(self, tmp_path):
        path = tmp_path / "w.safetensors"
        path.write_bytes(b"")
        with pytest.raises(ModelFolderError, match="too short"):
            read_safetensors_header(path)

    def test_trailing_bytes(self, tmp_path):
        path = _weights(tmp_path / "w.safetensors")
        with path.open("ab") as fh:
            fh.write(b"\0" * 10)
        with pytest.raises(ModelFolderError, match="10 unexpected bytes"):
            read_safetensors_header(path)

    def test_header_length_with_brace_low_byte_is_not_mistaken_for_text(self, tmp_path):
        # Regression: a header length whose low byte is 0x7B ('{') must parse as a normal file.
        # (safetensors pads to 8 bytes, but other writers need not, so the file is written by hand).
        header = json.dumps({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
        header += b" " * (123 - len(header))
        path = tmp_path / "w.safetensors"
        path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0\0\0\0")
        assert path.read_bytes()[0] == ord("{")
        assert read_safetensors_header(path).tensors["t"]["shape"] == [1]

    @staticmethod
    def _raw(path: Path, tensors: dict, data_bytes: int) -> Path:
        header = json.dumps(tensors).encode()
        path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * data_bytes)
        return path

    def test_byte_range_must_match_shape_and_dtype(self, tmp_path):
        path = self._raw(tmp_path / "w.safetensors", {"t": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, 12)
        with pytest.raises(ModelFolderError, match="'t': byte range does not match"):
            read_safetensors_header(path)

    def test_overlapping_offsets_are_corrupt(self, tmp_path):
        tensors = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                   "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}  # fmt: skip
        with pytest.raises(ModelFolderError, match="overlapping or gapped"):
            read_safetensors_header(self._raw(tmp_path / "w.safetensors", tensors, 12))

    def test_scalar_counts_one_element(self, tmp_path):
        path = self._raw(tmp_path / "w.safetensors", {"s": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}, 4)
        assert read_safetensors_header(path).num_params == 1


class TestIndex:
    def test_sharded_index_ok(self, tmp_path):
        folder = _make_folder(tmp_path / "m", sharded=True)
        infos = check_index(folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json")
        assert len(infos) == 2

    def test_missing_shard_is_named(self, tmp_path):
        folder = _make_folder(tmp_path / "m", sharded=True)
        shard = folder / "transformer" / "diffusion_pytorch_model-00002-of-00002.safetensors"
        shard.unlink()
        with pytest.raises(ModelFolderError) as err:
            check_model_folder(folder)
        assert shard.name in str(err.value) and "missing" in str(err.value)

    def test_shard_lacking_indexed_tensor(self, tmp_path):
        folder = _make_folder(tmp_path / "m", sharded=True)
        save_file({"z": torch.ones(8)}, str(folder / "transformer" / "diffusion_pytorch_model-00002-of-00002.safetensors"))
        with pytest.raises(ModelFolderError, match="lacks 1 tensor"):
            check_model_folder(folder)

    def test_shard_path_traversal_refused(self, tmp_path):
        folder = _make_folder(tmp_path / "m", sharded=True)
        index = folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
        index.write_text(json.dumps({"weight_map": {"x": "../../vae/model.safetensors"}}))
        with pytest.raises(ModelFolderError, match="outside its folder"):
            check_index(index)


class TestModelFolder:
    def test_good_folder(self, tmp_path):
        model = check_model_folder(_make_folder(tmp_path / "m"))
        assert model.class_name == "QwenImagePipeline"
        assert set(model.components) == {"scheduler", "text_encoder", "tokenizer", "transformer", "vae"}
        assert model.weight_files["tokenizer"] == []
        assert model.num_params("transformer") == 64 + 8
        assert model.stored_bytes() == model.stored_bytes("transformer") + 2 * (20 * 4)

    @pytest.mark.parametrize("name", ["transformer/diffusion_pytorch_model.bin", "text_encoder/x.pt", "extra.ckpt", "a.pth"])
    def test_pickle_refused_with_reason(self, tmp_path, name):
        folder = _make_folder(tmp_path / "m")
        (folder / name).write_bytes(b"\x80\x04not really a pickle")
        with pytest.raises(ModelFolderError) as err:
            check_model_folder(folder)
        msg = str(err.value)
        assert "pickle" in msg.lower() and "arbitrary code" in msg and Path(name).name in msg

    def test_missing_component_refused(self, tmp_path):
        folder = _make_folder(tmp_path / "m")
        for p in sorted((folder / "vae").iterdir()):
            p.unlink()
        (folder / "vae").rmdir()
        with pytest.raises(ModelFolderError, match="'vae'.*missing"):
            check_model_folder(folder)

    def test_component_without_weights_refused(self, tmp_path):
        folder = _make_folder(tmp_path / "m")
        (folder / "vae" / "model.safetensors").unlink()
        with pytest.raises(ModelFolderError, match="no .safetensors weights"):
            check_model_folder(folder)

    def test_hub_cache_repo_folder_resolves_to_its_snapshot(self, tmp_path):
        repo = tmp_path / "models--Qwen--Qwen-Image"
        commit = "0123456789abcdef0123456789abcdef01234567"
        _make_folder(repo / "snapshots" / commit)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit + "\n")
        model = check_model_folder(repo)
        assert model.path == repo / "snapshots" / commit and model.class_name == "QwenImagePipeline"

    def test_hub_cache_ref_cannot_escape(self, tmp_path):
        repo = tmp_path / "models--x--y"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text("../../elsewhere")
        _make_folder(tmp_path / "elsewhere")
        with pytest.raises(ModelFolderError, match="model_index.json"):
            check_model_folder(repo)

    def test_no_model_index(self, tmp_path):
        with pytest.raises(ModelFolderError, match="model_index.json"):
            check_model_folder(tmp_path)

    def test_missing_folder(self, tmp_path):
        with pytest.raises(ModelFolderError, match="no such folder"):
            check_model_folder(tmp_path / "nope")

    def test_lfs_pointer_anywhere_is_found(self, tmp_path):
        folder = _make_folder(tmp_path / "m")
        (folder / "tokenizer" / "tokenizer.json").write_text(LFS_POINTER)
        with pytest.raises(ModelFolderError, match="Git-LFS pointers.*tokenizer.json"):
            check_model_folder(folder)

    def test_truncated_weights_in_folder(self, tmp_path):
        folder = _make_folder(tmp_path / "m")
        path = folder / "transformer" / "diffusion_pytorch_model.safetensors"
        path.write_bytes(path.read_bytes()[:-8])
        with pytest.raises(ModelFolderError, match="diffusion_pytorch_model.safetensors: is truncated"):
            check_model_folder(folder)

    @pytest.mark.parametrize("cls", ["StableDiffusionPipeline", "os.system", ""])
    def test_unknown_pipeline_class_refused(self, tmp_path, cls):
        folder = _make_folder(tmp_path / "m")
        index = json.loads((folder / "model_index.json").read_text())
        index["_class_name"] = cls
        (folder / "model_index.json").write_text(json.dumps(index))
        with pytest.raises(ModelFolderError, match="not a Qwen-Image pipeline"):
            read_model_index(folder)

    def test_remote_code_component_refused(self, tmp_path):
        folder = _make_folder(tmp_path / "m")
        index = json.loads((folder / "model_index.json").read_text())
        index["transformer"] = ["my_module", "EvilTransformer"]
        (folder / "model_index.json").write_text(json.dumps(index))
        with pytest.raises(ModelFolderError, match="run code"):
            check_model_folder(folder)


class TestMalformedLayouts:
    """Regression (issue 14): malformed folders raised AttributeError / IsADirectoryError deep in the checks;
    each now gets the loader's usual ModelFolderError naming the file."""

    @pytest.mark.parametrize("content", ["[1, 2]", '"QwenImagePipeline"', "null", "3"])
    def test_model_index_of_the_wrong_json_shape(self, tmp_path, content):
        folder = _make_folder(tmp_path / "m")
        (folder / "model_index.json").write_text(content)
        with pytest.raises(ModelFolderError, match="model_index.json: must be a JSON object"):
            check_model_folder(folder)

    def test_model_index_that_is_a_folder(self, tmp_path):
        folder = tmp_path / "m"
        (folder / "model_index.json").mkdir(parents=True)
        with pytest.raises(ModelFolderError, match="model_index.json is a folder"):
            check_model_folder(folder)

    def test_weights_path_that_is_a_folder(self, tmp_path):
        folder = _make_folder(tmp_path / "m")
        (folder / "vae" / "model.safetensors").unlink()
        (folder / "vae" / "model.safetensors").mkdir()
        with pytest.raises(ModelFolderError, match=r"model.safetensors: is a folder, not a safetensors file"):
            check_model_folder(folder)

    def test_shard_that_is_a_folder(self, tmp_path):
        folder = _make_folder(tmp_path / "m", sharded=True)
        shard = folder / "transformer" / "diffusion_pytorch_model-00002-of-00002.safetensors"
        shard.unlink()
        shard.mkdir()
        with pytest.raises(ModelFolderError, match="00002-of-00002.safetensors: is a folder"):
            check_model_folder(folder)

    def test_index_whose_weight_map_is_not_an_object(self, tmp_path):
        folder = _make_folder(tmp_path / "m", sharded=True)
        index = next((folder / "transformer").glob("*.index.json"))
        index.write_text(json.dumps({"weight_map": ["x", "y"]}))
        with pytest.raises(ModelFolderError, match="`weight_map` must be a JSON object"):
            check_model_folder(folder)


class TestFamilyOfTheFolder:
    def test_family_is_read_from_the_pipeline_class(self, tmp_path):
        model = check_model_folder(_make_folder(tmp_path / "m"))
        assert model.family.key == "qwen-image" and model.family.pipeline_class == model.class_name

    def test_components_of_another_model_are_refused_naming_the_family(self, tmp_path):
        folder = _make_folder(tmp_path / "m")
        index = json.loads((folder / "model_index.json").read_text())
        index["transformer"] = ["diffusers", "QwenImage21Transformer2DModel"]
        (folder / "model_index.json").write_text(json.dumps(index))
        with pytest.raises(ModelFolderError, match=r"declares QwenImagePipeline \(Qwen-Image\), whose transformer is "
                                                    r"QwenImageTransformer2DModel, but the folder's transformer is "
                                                    r"QwenImage21Transformer2DModel"):
            check_model_folder(folder)

    def test_a_component_the_family_needs_must_be_listed(self, tmp_path):
        folder = _make_folder(tmp_path / "m")
        index = json.loads((folder / "model_index.json").read_text())
        del index["text_encoder"]
        (folder / "model_index.json").write_text(json.dumps(index))
        with pytest.raises(ModelFolderError, match="lists no 'text_encoder' component"):
            check_model_folder(folder)

    def test_fast_tokenizer_class_is_the_same_component(self, tmp_path):
        folder = _make_folder(tmp_path / "m")
        index = json.loads((folder / "model_index.json").read_text())
        index["tokenizer"] = ["transformers", "Qwen2TokenizerFast"]
        (folder / "model_index.json").write_text(json.dumps(index))
        assert check_model_folder(folder).family.key == "qwen-image"
