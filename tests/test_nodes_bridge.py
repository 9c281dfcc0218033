"""nodes/comfy_bridge.py against small stand-ins for ComfyUI's modules (the real thing: test_comfyui_live.py).

The stand-ins behave like ComfyUI 0.3.x where it matters: ProgressBar's hook raises the interrupt
exception (and clears the flag) once /interrupt was called, /free calls model_management.unload_all_models(),
folder_paths lists models/diffusers plus extra_model_paths entries.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodes import comfy_bridge as bridge
from nodes import common
from nodes.downloader import QwenImageDownloader
from nodes.generate import QwenImageGenerate
from nodes.loader import QwenImageLoader
from qwen_core import loading, paths
from qwen_core.memory import get_residency_manager

pytest_plugins = ["download_fixtures"]


class FakeComfy:
    """Records what the pack asks of ComfyUI."""

    def __init__(self, dirs: list[Path], output: Path) -> None:
        self.dirs, self.output = dirs, output
        self.interrupt = False
        self.free_bytes = 10**12  # what get_free_memory reports
        self.freed: list[int] = []
        self.soft_empty = 0
        self.unloaded = 0
        self.progress: list[tuple[int, int, str | None]] = []
        self.events: list[tuple[str, dict]] = []
        self.texts: list[tuple[str, str]] = []

    def modules(self) -> dict[str, types.ModuleType]:
        fake = self
        folder_paths = types.ModuleType("folder_paths")
        folder_paths.models_dir = str(self.dirs[0].parent)
        folder_paths.get_folder_paths = lambda name: [str(d) for d in fake.dirs] if name == "diffusers" else []
        folder_paths.get_output_directory = lambda: str(fake.output)

        mm = types.ModuleType("comfy.model_management")

        class InterruptProcessingException(Exception):
            pass

        def throw_if_interrupted() -> None:
            if fake.interrupt:
                fake.interrupt = False
                raise InterruptProcessingException()

        def unload_all_models() -> None:
            fake.unloaded += 1

        mm.InterruptProcessingException = InterruptProcessingException
        mm.OOM_EXCEPTION = MemoryError
        mm.get_torch_device = lambda: "cpu"
        mm.free_memory = lambda needed, device, keep_loaded=(): fake.freed.append(int(min(needed, 2**62)))
        mm.get_free_memory = lambda device=None, torch_free_too=False: fake.free_bytes
        mm.soft_empty_cache = lambda force=False: setattr(fake, "soft_empty", fake.soft_empty + 1)
        mm.processing_interrupted = lambda: fake.interrupt
        mm.interrupt_current_processing = lambda value=True: setattr(fake, "interrupt", value)
        mm.throw_exception_if_processing_interrupted = throw_if_interrupted
        mm.unload_all_models = unload_all_models

        utils = types.ModuleType("comfy.utils")

        class ProgressBar:
            def __init__(self, total: int, node_id: str | None = None) -> None:
                self.total, self.node_id = total, node_id

            def update_absolute(self, value: int, total: int | None = None, preview: Any = None) -> None:
                throw_if_interrupted()  # what main.py's progress hook does first
                fake.progress.append((value, total or self.total, self.node_id))

        utils.ProgressBar = ProgressBar
        comfy = types.ModuleType("comfy")
        comfy.model_management, comfy.utils = mm, utils

        server = types.ModuleType("server")

        class Instance:
            def send_sync(self, event: str, data: dict, sid: str | None = None) -> None:
                fake.events.append((event, data))

            def send_progress_text(self, text: str, node_id: str, sid: str | None = None) -> None:
                fake.texts.append((node_id, text))

        server.PromptServer = type("PromptServer", (), {"instance": Instance()})
        version = types.ModuleType("comfyui_version")
        version.__version__ = "0.3.64"
        return {"folder_paths": folder_paths, "comfy": comfy, "comfy.model_management": mm,
                "comfy.utils": utils, "server": server, "comfyui_version": version}


def _reset_hooks() -> None:
    common._hooks_installed = False
    for hook in [h for h in loading._BEFORE_LOAD_HOOKS if getattr(h, "__module__", "") == bridge.__name__]:
        loading.remove_before_load_hook(hook)


@pytest.fixture
def comfy(tmp_path: Path, tiny_model_dir: Path, tiny_model_dir_b: Path,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeComfy]:
    main, extra = tmp_path / "ComfyUI" / "models" / "diffusers", tmp_path / "extra" / "diffusers"
    main.mkdir(parents=True)
    extra.mkdir(parents=True)
    (main / "qwen-image-tiny").symlink_to(tiny_model_dir, target_is_directory=True)
    (extra / "qwen-image-tiny-b").symlink_to(tiny_model_dir_b, target_is_directory=True)
    monkeypatch.delenv("QWEN_HOME", raising=False)
    fake = FakeComfy([main, extra], tmp_path / "ComfyUI" / "output")
    for name, module in fake.modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    importlib.reload(bridge)
    _reset_hooks()
    yield fake
    get_residency_manager().release_all()
    monkeypatch.undo()
    importlib.reload(bridge)  # back to headless
    _reset_hooks()
    paths.register_models_dirs([])


def test_progress_bar_of_older_comfyui_without_node_id(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []

    class OldProgressBar:  # ComfyUI before July 2025
        def __init__(self, total: int) -> None:
            self.total = total

        def update_absolute(self, value: int, total: int | None = None, preview: Any = None) -> None:
            seen.append((value, total))

    monkeypatch.setattr(bridge, "comfy_utils", types.SimpleNamespace(ProgressBar=OldProgressBar))
    bar = bridge.Progress(3, node_id="9")
    bar.update(2)
    assert seen == [(2, 3)]


def test_headless_fallbacks_are_inert() -> None:
    assert bridge.IN_COMFYUI is False and bridge.interrupted() is False
    bar = bridge.Progress(4)
    bar.update(9)
    assert (bar.value, bar.total) == (4, 4)
    bridge.send_status("1", "download", {})  # no server: nothing to do, no error
    assert bridge.on_unload_models(lambda: None) is False


@pytest.mark.slow
class TestInsideComfyUI:
    def test_model_folders_come_from_folder_paths_incl_extra_paths(self, comfy: FakeComfy) -> None:
        assert bridge.IN_COMFYUI is True
        choices = QwenImageLoader.INPUT_TYPES()["required"]["model"][0]
        assert choices == ["qwen-image-tiny", "qwen-image-tiny-b"]
        assert bridge.register_models_dirs() == comfy.dirs
        assert paths.models_root() == comfy.dirs[0]  # downloads go to ComfyUI's own models/diffusers
        (handle,) = QwenImageLoader().load("qwen-image-tiny-b", "auto", "auto", "auto")
        assert Path(handle.path) == comfy.dirs[1] / "qwen-image-tiny-b"

    def test_generate_frees_comfy_memory_first_and_reports_each_step(self, comfy: FakeComfy) -> None:
        (handle,) = QwenImageLoader().load("qwen-image-tiny", "auto", "auto", "auto")
        QwenImageGenerate().generate(handle, "a cat", "", 32, 32, 3, 1.0, 0, 1, unique_id="12")
        assert comfy.freed and comfy.freed[0] > 0, "ComfyUI was asked to free memory before our weights loaded"
        assert comfy.soft_empty >= 1
        assert [p[:2] for p in comfy.progress] == [(1, 3), (2, 3), (3, 3)]
        assert {p[2] for p in comfy.progress} == {"12"}
        assert comfy.texts[0][0] == "12" and "step 1/3" in comfy.texts[0][1]

    def test_cancel_stops_within_one_step_and_releases_the_model(self, comfy: FakeComfy) -> None:
        (handle,) = QwenImageLoader().load("qwen-image-tiny", "auto", "auto", "auto")
        interrupt = sys.modules["comfy.model_management"].InterruptProcessingException
        original = bridge.Progress.update

        def press_cancel_after_step_one(bar: bridge.Progress, value: int, total: int | None = None) -> None:
            original(bar, value, total)
            comfy.interrupt = True  # the user presses Cancel while step 1 finishes

        bridge.Progress.update = press_cancel_after_step_one
        try:
            with pytest.raises(interrupt):
                QwenImageGenerate().generate(handle, "a cat", "", 32, 32, 20, 1.0, 0, 1, unique_id="3")
        finally:
            bridge.Progress.update = original
        assert [p[0] for p in comfy.progress] == [1], "no step after the one that saw Cancel"
        assert get_residency_manager().resident_keys() == []
        assert comfy.interrupt is False, "the flag is consumed, or the next queued run would be cancelled"
        out = QwenImageGenerate().generate(handle, "a cat", "", 32, 32, 1, 1.0, 0, 1)  # still usable
        assert out["result"][0].shape == (1, 32, 32, 3)

    def test_comfy_free_releases_our_resident_model(self, comfy: FakeComfy) -> None:
        (handle,) = QwenImageLoader().load("qwen-image-tiny", "auto", "auto", "auto")
        QwenImageGenerate().generate(handle, "a cat", "", 32, 32, 1, 1.0, 0, 1)
        assert get_residency_manager().resident_keys()
        sys.modules["comfy.model_management"].unload_all_models()  # what /free {"unload_models": true} runs
        assert comfy.unloaded == 1 and get_residency_manager().resident_keys() == []

    def test_comfy_loading_its_own_model_under_pressure_evicts_ours(self, comfy: FakeComfy) -> None:
        (handle,) = QwenImageLoader().load("qwen-image-tiny", "auto", "auto", "auto")
        QwenImageGenerate().generate(handle, "a cat", "", 32, 32, 1, 1.0, 0, 1)
        mm = sys.modules["comfy.model_management"]
        mm.free_memory(2 * 1024**3, "cpu")  # enough memory left after ComfyUI's own unloading: ours stays
        assert get_residency_manager().resident_keys()
        comfy.free_bytes = 1024**3  # still short after ComfyUI unloaded its models
        mm.free_memory(2 * 1024**3, "cpu")
        assert get_residency_manager().resident_keys() == []
        assert comfy.freed[-1] == 2 * 1024**3, "ComfyUI's own free_memory still ran"

    def test_download_progress_in_bytes_and_cancel_keeps_partials(self, comfy: FakeComfy, hub: Any,
                                                                  tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        files = {p.relative_to(tiny_model_dir).as_posix(): p for p in tiny_model_dir.rglob("*") if p.is_file()}
        hub.add_repo("local/tiny", files)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        out = QwenImageDownloader().download("local/tiny", "main", "", "", 4, "", unique_id="5")
        total = out["ui"]["qwen_download"][0]["total_bytes"]
        assert Path(out["result"][0]) == comfy.dirs[0] / "local" / "tiny"
        assert comfy.progress[-1][:2] == (total, total) and total > 1_000_000, "the bar counts bytes"
        kinds = [e for e in comfy.events if e[0] == bridge.EVENT and e[1]["node"] == "5"]
        assert kinds and kinds[-1][1]["state"] == "complete"

        hub.add_repo("local/big", {"w.safetensors": b"y" * 3_000_000})
        hub.faults.rate_bps = 1_000_000  # ~3 s for the file: Cancel lands mid-file
        interrupt = sys.modules["comfy.model_management"].InterruptProcessingException
        target = comfy.dirs[0] / "local" / "big"

        def part_bytes() -> int:  # *.part only: the saved listing (plan.json) is there either way
            return sum(p.stat().st_size for p in target.rglob("*.part"))

        monkeypatch.setattr(bridge, "interrupted", lambda: part_bytes() > 0)  # Cancel once bytes are on disk
        with pytest.raises(interrupt):
            QwenImageDownloader().download("local/big", "main", "", "", 1, "", unique_id="6")
        assert 0 < part_bytes() < 3_000_000, "partials are kept for the next run to resume"
        assert [e[1]["state"] for e in comfy.events if e[1].get("node") == "6"][-1] == "cancelled"
