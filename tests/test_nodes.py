"""The ComfyUI nodes, headless: INPUT_TYPES valid for ComfyUI, and every node run on the tiny pipeline.

No ComfyUI here: nodes/comfy_bridge.py falls back to qwen_core (QWEN_HOME is the model folder). The
ComfyUI side of the bridge is tested with stand-ins in test_nodes_bridge.py, and for real in
test_comfyui_live.py.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import nodes
from nodes import comfy_bridge as bridge
from nodes import common
from nodes.downloader import QwenImageDownloader
from nodes.generate import QwenImageGenerate
from nodes.loader import QwenImageLoader
from nodes.pixel_governor import QwenImagePixelGovernor
from nodes.preflight import QwenImagePreflight
from nodes.switch_model import QwenImageSwitchModel
from qwen_core.errors import InvalidInputError
from qwen_core.memory import get_residency_manager

pytest_plugins = ["download_fixtures"]  # the `hub` fixture: a Hub stand-in on 127.0.0.1, offline mode lifted

WIDGET_SCALARS = {"INT", "FLOAT", "STRING", "BOOLEAN"}
ALL = list(nodes.NODE_CLASS_MAPPINGS.items())


@pytest.fixture
def models_home(tmp_path: Path, tiny_model_dir: Path, tiny_model_dir_b: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A model store like ComfyUI's models/diffusers holding the two tiny models."""
    get_residency_manager().release_all()  # an earlier test (the in-process demo) may have left one resident
    home = tmp_path / "diffusers"
    home.mkdir()
    (home / "qwen-image-tiny").symlink_to(tiny_model_dir, target_is_directory=True)
    (home / "qwen-image-tiny-b").symlink_to(tiny_model_dir_b, target_is_directory=True)
    monkeypatch.setenv("QWEN_HOME", str(home))
    yield home
    get_residency_manager().release_all()


class TestInputTypes:
    """What ComfyUI's validation and the frontend require of a node definition."""

    @pytest.mark.parametrize(("name", "cls"), ALL)
    def test_classic_api_and_docs(self, name: str, cls: type) -> None:
        assert name == cls.__name__ and name in nodes.NODE_DISPLAY_NAME_MAPPINGS
        assert cls.CATEGORY.startswith("Qwen-Image/")
        assert callable(getattr(cls, cls.FUNCTION))
        assert cls.DESCRIPTION and len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES)

    @pytest.mark.parametrize(("name", "cls"), ALL)
    def test_every_input_valid(self, name: str, cls: type) -> None:
        types = cls.INPUT_TYPES()
        assert set(types) <= {"required", "optional", "hidden"}
        for section in ("required", "optional"):
            for field, spec in types.get(section, {}).items():
                kind, opts = spec[0], spec[1]
                assert opts.get("tooltip"), f"{name}.{field} has no tooltip"
                if isinstance(kind, list):
                    assert kind and opts.get("default", kind[0]) in kind, f"{name}.{field} default not in list"
                elif kind in ("INT", "FLOAT"):
                    assert opts["min"] <= opts["default"] <= opts["max"], f"{name}.{field} default out of range"
                    assert not (isinstance(opts["default"], float) and math.isnan(opts["default"]))
                elif kind == "STRING":
                    assert opts.get("forceInput") or isinstance(opts.get("default"), str)
                elif kind == "BOOLEAN":
                    assert isinstance(opts.get("default"), bool), f"{name}.{field} default is not a bool"
                else:
                    assert kind.isupper() and kind not in WIDGET_SCALARS  # a socket type

    @pytest.mark.parametrize(("name", "cls"), ALL)
    def test_sizes_step_16(self, name: str, cls: type) -> None:
        for field, spec in cls.INPUT_TYPES()["required"].items():
            if field in ("width", "height"):
                assert spec[1]["step"] == 16 and spec[1]["default"] % 16 == 0 and spec[1]["min"] % 16 == 0

    @pytest.mark.parametrize(("name", "cls"), ALL)
    def test_no_token_or_target_path_widget(self, name: str, cls: type) -> None:
        """Tokens end up in saved workflows and PNG metadata; free-form write paths are a security hole."""
        types = cls.INPUT_TYPES()
        fields = [f for s in ("required", "optional") for f in types.get(s, {})]
        assert not [f for f in fields if "token" in f.lower() or f.lower() in ("out_dir", "target_dir", "local_dir")]

    def test_seed_has_control_after_generate(self) -> None:
        spec = QwenImageGenerate.INPUT_TYPES()["required"]["seed"]
        assert spec[0] == "INT" and spec[1]["control_after_generate"] is True and spec[1]["max"] == 2**64 - 1

    def test_steps_widget_starts_at_two(self) -> None:
        """Regression: the widget accepted 1, which Qwen-Image's scheduler turns into NaN (error at run time)."""
        assert QwenImageGenerate.INPUT_TYPES()["required"]["steps"][1]["min"] == 2

    def test_pack_root_imports_without_comfyui(self, tmp_path: Path) -> None:
        """Loaded the way ComfyUI loads a pack (by file, under its folder name), from an unrelated cwd; no torch yet."""
        root = Path(nodes.__file__).resolve().parent.parent
        code = (
            "import importlib.util, json, sys\n"
            f"spec = importlib.util.spec_from_file_location('qwen_pack', {str(root / '__init__.py')!r}, "
            f"submodule_search_locations=[{str(root)!r}])\n"
            "m = importlib.util.module_from_spec(spec); sys.modules['qwen_pack'] = m; spec.loader.exec_module(m)\n"
            "print(json.dumps([sorted(m.NODE_CLASS_MAPPINGS), m.WEB_DIRECTORY, 'comfy' in sys.modules, "
            "'torch' in sys.modules]))\n"
        )
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
        out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
        names, web, comfy_loaded, torch_loaded = json.loads(out.stdout.strip().splitlines()[-1])
        assert names == sorted(nodes.NODE_CLASS_MAPPINGS) and web == "./web" and comfy_loaded is False
        assert torch_loaded is False, "the root import must stay light: torch loads when a node first needs it"


class TestValidateInputs:
    @pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, 20.5])
    def test_generate_rejects_nan_and_out_of_range_cfg(self, bad: float) -> None:
        message = QwenImageGenerate.VALIDATE_INPUTS(true_cfg_scale=bad)
        assert isinstance(message, str) and "true_cfg_scale" in message

    def test_generate_accepts_valid_or_linked_cfg(self) -> None:
        assert QwenImageGenerate.VALIDATE_INPUTS(true_cfg_scale=4.0) is True
        assert QwenImageGenerate.VALIDATE_INPUTS(true_cfg_scale=None) is True  # linked: checked at run time

    @pytest.mark.parametrize("bad", ["../etc", "/abs/path", "a\\b", "x/../../y", ""])
    def test_model_names_must_stay_inside_the_store(self, bad: str) -> None:
        assert isinstance(QwenImageLoader.VALIDATE_INPUTS(model=bad), str)
        assert isinstance(QwenImageSwitchModel.VALIDATE_INPUTS(model=bad), str)

    def test_unknown_but_plain_model_name_is_accepted_for_download_in_the_same_run(self) -> None:
        assert QwenImageLoader.VALIDATE_INPUTS(model="Qwen/Qwen-Image") is True


@pytest.mark.slow
class TestNodesOnTinyPipeline:
    def test_loader_lists_and_loads_the_tiny_models(self, models_home: Path) -> None:
        choices = QwenImageLoader.INPUT_TYPES()["required"]["model"][0]
        assert choices == ["qwen-image-tiny", "qwen-image-tiny-b"]
        (handle,) = QwenImageLoader().load("qwen-image-tiny", "auto", "auto", "auto")
        assert Path(handle.path) == models_home / "qwen-image-tiny"
        loader = common.generator_for(handle).loader
        assert loader.tokenizer is not None and not loader.is_loaded  # eager tokenizer, lazy weights
        assert common.generator_for(handle) is common.generator_for(handle)

    def test_loader_refuses_paths_outside_the_model_folders(self, models_home: Path, tiny_model_dir: Path) -> None:
        with pytest.raises(InvalidInputError, match="model_path"):
            QwenImageLoader().load("qwen-image-tiny", "auto", "auto", "auto", model_path=str(tiny_model_dir))
        with pytest.raises(InvalidInputError, match="model_path"):  # '..' cannot climb out of the store
            QwenImageLoader().load("x", "auto", "auto", "auto", model_path=f"{models_home}/../../{tiny_model_dir.name}")
        # A link the user placed inside the store (e.g. to another disk) is trusted, like in qwen_core.paths.
        (handle,) = QwenImageLoader().load("x", "auto", "auto", "auto", model_path=str(models_home / "qwen-image-tiny"))
        assert handle.path == str(models_home / "qwen-image-tiny")
        with pytest.raises(InvalidInputError, match="model"):
            QwenImageLoader().load("missing-model", "auto", "auto", "auto")

    def test_governor_then_generate_gives_comfy_images(self, models_home: Path) -> None:
        (handle,) = QwenImageLoader().load("qwen-image-tiny", "fp32", "auto", "sdpa")
        out = QwenImagePixelGovernor().decide(72, 48, "custom", "fast", pipe=handle)
        width, height, steps, cfg, message, seconds, preset = out["result"]  # seconds_per_step, quality_preset: added last
        assert (width, height, steps, cfg, preset) == (64, 48, 20, 1.0, "fast")
        assert out["ui"]["qwen_governor"][0]["scaled"] is False and "72x48 -> 64x48" in message
        assert seconds == 0.0 and "no time estimate" in message  # CPU: no basis for an estimate
        result = QwenImageGenerate().generate(handle, "a red square", "", width, height, 1, cfg, 7, 2)
        images = result["result"][0]
        assert images.shape == (2, 48, 64, 3) and images.dtype == torch.float32
        assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
        assert "64x48 x2, 1 steps, seed 7" in result["ui"]["text"][0]

    def test_governor_shows_safe_mode_when_it_reduces(self) -> None:
        out = QwenImagePixelGovernor().decide(1328, 1328, "16:9", "balanced", system=_FakeReport(500_000))
        width, height, steps, cfg, message, _, preset = out["result"]
        assert width * height <= 500_000 and width % 16 == height % 16 == 0 and (steps, cfg) == (30, 4.0)
        assert message.startswith("Safe Mode: Reduced pixel window (1664x928 ->")
        assert out["ui"]["qwen_governor"][0]["scaled"] is True

    def test_governor_keeps_a_size_that_fits_and_estimates_its_step(self) -> None:
        # Issue 9: a 12 GB card's report recommends 'streamed' with room for ~12 MP: 1328x1328 stays.
        report = _FakeReport(12_000_000, memory_mode="streamed", vram_free_gb=12.0)
        out = QwenImagePixelGovernor().decide(1328, 1328, "custom", "high", system=report)
        width, height, steps, _, message, seconds, _ = out["result"]
        assert (width, height, steps) == (1328, 1328, 50) and "Safe Mode" not in message
        assert 0.6 < seconds < 0.75 and "est. " in message and "estimate" in message
        assert out["ui"]["qwen_governor"][0]["scaled"] is False

    def test_time_budget_preset_caps_only_when_picked(self) -> None:
        report = _FakeReport(60_000_000, memory_mode="gpu", vram_free_gb=80.0)
        free = QwenImagePixelGovernor().decide(1328, 1328, "custom", "balanced", system=report)
        timed = QwenImagePixelGovernor().decide(1328, 1328, "custom", "balanced, max 0.5 s/step", system=report)
        assert free["result"][:2] == (1328, 1328)
        width, height, _, _, message, seconds, _ = timed["result"]
        assert width * height < 1328 * 1328 and seconds <= 0.5 and message.startswith("Time budget:")
        assert timed["ui"]["qwen_governor"][0]["limited_by"] == "time budget"
        assert timed["ui"]["qwen_governor"][0]["scaled"] is False  # no Safe Mode badge for a chosen budget

    def test_preflight_node_reports_for_a_local_folder(self, models_home: Path) -> None:
        out = QwenImagePreflight().check("qwen-image-tiny")
        report, text = out["result"]
        assert report.status in ("ok", "warn", "fail") and "verdict" in text
        assert report.model == str(models_home / "qwen-image-tiny")
        ui = out["ui"]["qwen_report"][0]
        assert ui["status"] == report.status and len(ui["checks"]) == len(report.checks)

    def test_preflight_node_refuses_folders_outside_the_model_folders(self, models_home: Path, tmp_path: Path) -> None:
        """A workflow must not make the preflight walk and report on any folder of the disk."""
        with pytest.raises(InvalidInputError, match="outside the model folders"):
            QwenImagePreflight().check(str(tmp_path))
        report, _ = QwenImagePreflight().check("not a repo id!")["result"]  # still a report, with a failed row
        assert any(c.name == "model" and c.status == "fail" for c in report.checks)

    def test_switch_model_releases_the_old_model_and_loads_the_new(self, models_home: Path) -> None:
        (a,) = QwenImageLoader().load("qwen-image-tiny", "auto", "auto", "auto")
        QwenImageGenerate().generate(a, "cat", "", 32, 32, 1, 1.0, 0, 1)
        b, report = QwenImageSwitchModel().switch(a, "qwen-image-tiny-b")
        assert Path(b.path).name == "qwen-image-tiny-b" and b.dtype == a.dtype
        new_loader = common.generator_for(b).loader
        assert get_residency_manager().resident_keys() == [new_loader.residency_key] and new_loader.is_loaded
        assert not common.generator_for(a).loader.is_loaded
        assert "before" in report and "after" in report
        assert a.key == ("%s" % (models_home / "qwen-image-tiny"), "auto", "auto", "auto", "auto", "auto", "single")  # input unchanged

    def test_generate_error_releases_the_resident_model(self, models_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        (handle,) = QwenImageLoader().load("qwen-image-tiny", "auto", "auto", "auto")
        QwenImageGenerate().generate(handle, "cat", "", 32, 32, 1, 1.0, 0, 1)
        generator = common.generator_for(handle)

        def boom(*args: object, **kwargs: object) -> None:
            raise RuntimeError("injected failure")

        monkeypatch.setattr(generator, "generate", boom)
        with pytest.raises(RuntimeError, match="injected"):
            QwenImageGenerate().generate(handle, "cat", "", 32, 32, 1, 1.0, 0, 1)
        assert get_residency_manager().resident_keys() == []

    def test_invalid_input_is_named_and_keeps_the_model(self, models_home: Path) -> None:
        (handle,) = QwenImageLoader().load("qwen-image-tiny", "auto", "auto", "auto")
        QwenImageGenerate().generate(handle, "cat", "", 32, 32, 1, 1.0, 0, 1)
        with pytest.raises(InvalidInputError, match="prompt"):
            QwenImageGenerate().generate(handle, "   ", "", 32, 32, 1, 1.0, 0, 1)
        assert common.generator_for(handle).loader.residency_key in get_residency_manager().resident_keys()


class TestCacheKeys:
    """IS_CHANGED: equal on a re-queue of an unchanged graph (ComfyUI's cache works), different after a real change.

    Regression: Preflight returned NaN, so every queue re-ran the whole graph and the Downloader asked the Hub.
    """

    def test_preflight_key_is_stable_and_follows_the_model_folder(self, tmp_path: Path, tiny_model_dir: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
        import shutil

        home = tmp_path / "diffusers"
        model = Path(shutil.copytree(tiny_model_dir, home / "qwen-image-tiny"))
        monkeypatch.setenv("QWEN_HOME", str(home))
        first = QwenImagePreflight.IS_CHANGED(model="qwen-image-tiny")
        assert first == first and first == QwenImagePreflight.IS_CHANGED(model="qwen-image-tiny")
        (model / "transformer" / "extra.safetensors").write_bytes(b"x")
        second = QwenImagePreflight.IS_CHANGED(model="qwen-image-tiny")
        assert second != first, "a new file in the model folder re-runs the check"
        (model / "transformer" / "extra.safetensors").write_bytes(b"xy")
        assert QwenImagePreflight.IS_CHANGED(model="qwen-image-tiny") != second, "so does a new size"

    def test_preflight_key_for_a_repo_id_is_the_disk_verdict(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("QWEN_HOME", str(tmp_path / "store"))
        key = QwenImagePreflight.IS_CHANGED(model="Qwen/Qwen-Image")
        assert key == QwenImagePreflight.IS_CHANGED(model="Qwen/Qwen-Image")
        assert key.split()[-1] in ("ok", "warn", "fail")

    @pytest.mark.slow
    def test_downloader_key_survives_its_own_download_but_not_a_damaged_folder(
            self, hub: Any, tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("QWEN_HOME", str(tmp_path / "store"))
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        files = {p.relative_to(tiny_model_dir).as_posix(): p for p in tiny_model_dir.rglob("*") if p.is_file()}
        hub.add_repo("local/tiny", files)
        before = QwenImageDownloader.IS_CHANGED(repo_id="local/tiny", revision="main")
        path = QwenImageDownloader().download("local/tiny", "main", "", "", 4, "")["result"][0]
        assert QwenImageDownloader.IS_CHANGED(repo_id="local/tiny", revision="main") == before, \
            "the folder is as our run left it: the re-queue comes from ComfyUI's cache"
        (Path(path) / "model_index.json").unlink()
        assert QwenImageDownloader.IS_CHANGED(repo_id="local/tiny") != before, "a damaged folder is checked again"
        assert QwenImageDownloader.IS_CHANGED(repo_id="not a repo") != before


class _FakeReport:
    """Just what the governor reads from a PreflightReport."""

    def __init__(self, max_pixels: int, memory_mode: str = "gpu", vram_free_gb: float | None = None) -> None:
        self.profile = type("P", (), {"dtype": "bf16", "memory_mode": memory_mode, "max_pixels": max_pixels})()
        self.device = {"vram_free_gb": vram_free_gb}


@pytest.mark.slow
class TestDownloaderNode:
    def test_downloads_from_a_local_hub_then_returns_at_once(self, hub: Any, tmp_path: Path, tiny_model_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("QWEN_HOME", str(tmp_path / "store"))
        files = {p.relative_to(tiny_model_dir).as_posix(): p for p in tiny_model_dir.rglob("*") if p.is_file()}
        hub.add_repo("local/tiny", files)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)  # the user configured this mirror: loopback allowed
        node = QwenImageDownloader()
        out = node.download("local/tiny", "main", "", "", 4, "")
        path, report = out["result"]
        assert Path(path) == tmp_path / "store" / "local" / "tiny"
        assert (Path(path) / "model_index.json").is_file() and f"Endpoint: {hub.url} (from HF_ENDPOINT)" in report
        assert out["ui"]["qwen_download"][0]["state"] == "complete"
        served = hub.total_served()
        # Same host as HF_ENDPOINT typed into the workflow: allowed; the complete repo is not fetched again.
        again = node.download("local/tiny", "main", "", "", 4, hub.url)["result"][1]
        assert hub.total_served() == served
        assert f"0 fetched, {len(files)} already present" in again and "same host as HF_ENDPOINT" in again
        (handle,) = QwenImageLoader().load("ignored", "auto", "auto", "auto", model_path=path)
        assert Path(handle.path) == Path(path)

    def test_cancel_keeps_partials_and_names_the_cause(self, hub: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        from qwen_core.errors import DownloadCancelled

        monkeypatch.setenv("QWEN_HOME", str(tmp_path / "store"))
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        hub.add_repo("local/big", {"weights.safetensors": b"x" * 3_000_000})
        hub.faults.rate_bps = 1_000_000  # ~3 s for the file: cancel arrives mid-file

        def part_bytes() -> int:  # *.part only: the saved listing (plan.json) is there either way
            return sum(p.stat().st_size for p in (tmp_path / "store").rglob("*.part"))

        monkeypatch.setattr(bridge, "interrupted", lambda: part_bytes() > 0)  # Cancel once bytes are on disk
        with pytest.raises(DownloadCancelled):
            QwenImageDownloader().download("local/big", "main", "", "", 2, "")
        assert 0 < part_bytes() < 3_000_000, "the partial download must be kept for resume"

    def test_refuses_a_private_endpoint_from_the_workflow(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("HF_ENDPOINT", raising=False)
        with pytest.raises(InvalidInputError, match="endpoint"):
            QwenImageDownloader().download("Qwen/Qwen-Image", "main", "", "", 8, "http://169.254.169.254/")


class TestLoaderSpeedWidgets:
    """The Loader's compile and compute widgets reach the core's load plan (issue 13)."""

    def test_widgets_are_optional_with_auto_defaults(self):
        from nodes.loader import QwenImageLoader

        optional = QwenImageLoader.INPUT_TYPES()["optional"]
        assert optional["compile"][0] == ["auto", "on", "off"] and optional["compile"][1]["default"] == "auto"
        assert optional["compute"][0] == ["auto", "exact", "fp8"] and "tooltip" in optional["compute"][1]

    def test_handle_carries_them_to_the_loader(self):
        from nodes.common import PipeHandle

        handle = PipeHandle("/x", compile="off", compute="fp8")
        assert handle.loader_kwargs()["compile"] == "off" and handle.loader_kwargs()["compute"] == "fp8"
        assert handle.key != PipeHandle("/x").key
