"""nodes/comfy_bridge.py against small stand-ins for ComfyUI's modules (the real thing: test_comfyui_live.py).

Two stand-ins, one per API generation the pack supports:
- ``FakeComfy`` behaves like ComfyUI 0.3.64 where it matters: ProgressBar's hook raises the interrupt
  exception (an Exception, and clears the flag) once /interrupt was called, /free calls
  model_management.unload_all_models(), free_memory(memory_required, device, keep_loaded) unloads ComfyUI's
  own models until enough is free, folder_paths lists models/diffusers plus extra_model_paths entries.
- ``FakeComfy033`` adds what 0.33 changed: the interrupt is a BaseException; free_memory takes
  for_dynamic/pins_required/ram_required and, for_dynamic, keeps dynamic-VRAM models loaded (their memory
  counts as available); unload_model_and_clones; unload_all_models frees through free_memory(1e30, ...);
  comfy.memory_management's RAM-release callback and comfy_execution.caching.RAMPressureCache.
"""

from __future__ import annotations

import importlib
import logging
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nodes import comfy_bridge as bridge
from nodes import common
from nodes import memory_policy as policy
from nodes.downloader import QwenImageDownloader
from nodes.generate import QwenImageGenerate
from nodes.loader import QwenImageLoader
from qwen_core import loading, paths
from qwen_core.memory import get_residency_manager

pytest_plugins = ["download_fixtures"]
GIB = 1024**3


@dataclass(eq=False)
class FakeLoaded:
    """One entry of ComfyUI's current_loaded_models: a LoadedModel with its patcher in ``.model``."""

    device: str
    size: int
    dynamic: bool = False
    model_loaded_weight_memory: int = 0  # 0.33's dynamic patcher: weights force-loaded outside the pageable pool

    @property
    def model(self) -> FakeLoaded:  # the patcher (is_dynamic(), loaded_size()) and its model in one object
        return self

    def is_dynamic(self) -> bool:
        return self.dynamic

    def loaded_size(self) -> int:
        return self.size


class FakeComfy:
    """Records what the pack asks of ComfyUI 0.3.64."""

    version = "0.3.64"

    def __init__(self, dirs: list[Path], output: Path, user: Path) -> None:
        self.dirs, self.output, self.user = dirs, output, user
        self.interrupt = False
        self.free_bytes = 10**12  # what get_free_memory reports (any device)
        self.loaded: list[FakeLoaded] = []  # ComfyUI's own loaded models
        self.freed: list[int] = []
        self.free_calls: list[dict[str, Any]] = []
        self.soft_empty = 0
        self.unloaded = 0
        self.progress: list[tuple[int, int, str | None]] = []
        self.events: list[tuple[str, dict]] = []
        self.texts: list[tuple[str, str]] = []

    # -- ComfyUI's free_memory, simplified: unload its own models on `device` until enough is free --------
    def comfy_free(self, memory_required: float, device: Any, keep_loaded: Any = (), for_dynamic: bool = False,
                   **extra: Any) -> list[FakeLoaded]:
        self.freed.append(int(min(memory_required, 2**62)))
        self.free_calls.append({"required": memory_required, "device": str(device), "for_dynamic": for_dynamic, **extra})
        unloaded = []
        for model in list(self.loaded):
            if model in keep_loaded or policy.device_key(model.device) != policy.device_key(device):
                continue
            if model.dynamic and for_dynamic:  # 0.33: paged out on demand, so counted instead of unloaded
                memory_required -= model.size
                continue
            if self.free_bytes >= memory_required:
                break
            self.loaded.remove(model)
            self.free_bytes += model.size
            unloaded.append(model)
        return unloaded

    def interrupt_class(self) -> type[BaseException]:
        return type("InterruptProcessingException", (Exception,), {})

    def modules(self) -> dict[str, types.ModuleType]:
        fake = self
        folder_paths = types.ModuleType("folder_paths")
        folder_paths.models_dir = str(self.dirs[0].parent)
        folder_paths.get_folder_paths = lambda name: [str(d) for d in fake.dirs] if name == "diffusers" else []
        folder_paths.get_output_directory = lambda: str(fake.output)
        folder_paths.get_user_directory = lambda: str(fake.user)

        mm = types.ModuleType("comfy.model_management")
        interrupt_class = self.interrupt_class()

        def throw_if_interrupted() -> None:
            if fake.interrupt:
                fake.interrupt = False
                raise interrupt_class()

        def unload_all_models() -> None:
            fake.unloaded += 1
            mm.free_memory(1e30, mm.get_torch_device())  # a module global in ComfyUI: the wrapped one

        mm.InterruptProcessingException = interrupt_class
        mm.OOM_EXCEPTION = MemoryError
        mm.current_loaded_models = self.loaded
        mm.get_torch_device = lambda: "cpu"
        mm.free_memory = lambda memory_required, device, keep_loaded=(): fake.comfy_free(memory_required, device, keep_loaded)
        mm.get_free_memory = lambda dev=None, torch_free_too=False: fake.free_bytes
        mm.minimum_inference_memory = lambda: 0.8 * GIB + 400 * 1024**2
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
        version.__version__ = self.version
        return {"folder_paths": folder_paths, "comfy": comfy, "comfy.model_management": mm,
                "comfy.utils": utils, "server": server, "comfyui_version": version}


class FakeComfy033(FakeComfy):
    """What ComfyUI 0.33 changed, as far as the pack touches it."""

    version = "0.33.0"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.ram_calls: list[tuple[float, bool, float]] = []
        self.ram_released: list[float] = []

    def interrupt_class(self) -> type[BaseException]:
        return type("InterruptProcessingException", (BaseException,), {})

    def modules(self) -> dict[str, types.ModuleType]:
        fake, found = self, super().modules()
        mm = found["comfy.model_management"]

        def free_memory(memory_required: float, device: Any, keep_loaded: Any = (), for_dynamic: bool = False,
                        pins_required: int = 0, ram_required: int = 0) -> list[FakeLoaded]:
            return fake.comfy_free(memory_required, device, keep_loaded, for_dynamic, pins_required=pins_required)

        def unload_all_models() -> None:
            fake.unloaded += 1
            for device in ("cpu",):
                mm.free_memory(1e30, device)  # through the module, as ComfyUI's own code resolves it

        def unload_model_and_clones(model: FakeLoaded, unload_additional_models: bool = True,
                                    all_devices: bool = False) -> None:
            keep = [m for m in fake.loaded if m is not model]
            mm.free_memory(1e30, model.device, keep)

        mm.free_memory, mm.unload_all_models, mm.unload_model_and_clones = free_memory, unload_all_models, unload_model_and_clones

        memory_management = types.ModuleType("comfy.memory_management")
        memory_management.RAM_CACHE_HEADROOM = 2 * GIB
        memory_management.extra_ram_release = lambda target, free_active=False: fake.ram_released.append(target) or 0
        found["comfy"].memory_management = memory_management

        caching = types.ModuleType("comfy_execution.caching")

        class RAMPressureCache:
            def ram_release(self, target: float, free_active: bool = False, min_entry_size: float = 0) -> int:
                fake.ram_calls.append((target, free_active, min_entry_size))
                return 0

        caching.RAMPressureCache = RAMPressureCache
        package = types.ModuleType("comfy_execution")
        package.caching = caching
        return {**found, "comfy.memory_management": memory_management, "comfy_execution": package,
                "comfy_execution.caching": caching}


def _reset_hooks() -> None:
    common._hooks_installed = False
    for hook in [h for h in loading._BEFORE_LOAD_HOOKS if getattr(h, "__module__", "") == bridge.__name__]:
        loading.remove_before_load_hook(hook)


def _start(fake_class: type[FakeComfy], tmp_path: Path, tiny_model_dir: Path, tiny_model_dir_b: Path,
           monkeypatch: pytest.MonkeyPatch) -> FakeComfy:
    main, extra = tmp_path / "ComfyUI" / "models" / "diffusers", tmp_path / "extra" / "diffusers"
    main.mkdir(parents=True)
    extra.mkdir(parents=True)
    (main / "qwen-image-tiny").symlink_to(tiny_model_dir, target_is_directory=True)
    (extra / "qwen-image-tiny-b").symlink_to(tiny_model_dir_b, target_is_directory=True)
    monkeypatch.delenv("QWEN_HOME", raising=False)
    fake = fake_class([main, extra], tmp_path / "ComfyUI" / "output", tmp_path / "ComfyUI" / "user")
    for name, module in fake.modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    importlib.reload(bridge)
    _reset_hooks()
    return fake


def _stop(monkeypatch: pytest.MonkeyPatch) -> None:
    get_residency_manager().release_all()
    monkeypatch.undo()
    importlib.reload(bridge)  # back to headless
    _reset_hooks()
    paths.register_models_dirs([])
    paths.register_reports_dir(None)


@pytest.fixture
def comfy(tmp_path: Path, tiny_model_dir: Path, tiny_model_dir_b: Path,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeComfy]:
    yield _start(FakeComfy, tmp_path, tiny_model_dir, tiny_model_dir_b, monkeypatch)
    _stop(monkeypatch)


@pytest.fixture(params=[FakeComfy, FakeComfy033], ids=["comfy-0.3.64", "comfy-0.33"])
def any_comfy(request: pytest.FixtureRequest, tmp_path: Path, tiny_model_dir: Path, tiny_model_dir_b: Path,
              monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeComfy]:
    yield _start(request.param, tmp_path, tiny_model_dir, tiny_model_dir_b, monkeypatch)
    _stop(monkeypatch)


@pytest.fixture
def comfy033(tmp_path: Path, tiny_model_dir: Path, tiny_model_dir_b: Path,
             monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeComfy033]:
    fake = _start(FakeComfy033, tmp_path, tiny_model_dir, tiny_model_dir_b, monkeypatch)
    assert isinstance(fake, FakeComfy033)
    yield fake
    _stop(monkeypatch)


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

    def test_cancel_stops_within_one_step_and_keeps_the_model(self, comfy: FakeComfy) -> None:
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
        assert get_residency_manager().resident_keys(), "memory is not short: the next run needs no reload"
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


class TestMemoryPolicy:
    """The decision alone, with plain numbers (nodes/memory_policy.py)."""

    def test_device_keys(self) -> None:
        assert policy.device_key("cuda") == policy.device_key("cuda:0") == ("cuda", 0)
        assert policy.device_key("cuda:1") == ("cuda", 1)
        assert policy.device_key(types.SimpleNamespace(type="cpu", index=None)) == ("cpu", None)
        assert policy.device_key(None) is None

    @pytest.mark.parametrize(("request_", "release"), [
        (policy.DeviceRequest(4 * GIB, 8 * GIB, 0, 20 * GIB), False),  # enough after ComfyUI's own unloading
        (policy.DeviceRequest(4 * GIB, 1 * GIB, 0, 20 * GIB), True),  # still short and ours is there
        (policy.DeviceRequest(4 * GIB, 1 * GIB, 0, 0), False),  # short, but nothing of ours on that device
        (policy.DeviceRequest(4 * GIB, 1 * GIB, 6 * GIB, 20 * GIB), False),  # dynamic VRAM gives it on demand
        (policy.DeviceRequest(1e30, 0, 0, 20 * GIB, targeted=True), False),  # unload_model_and_clones
        (policy.DeviceRequest(1e30, 0, 0, 20 * GIB), True),  # "unload everything"
    ])
    def test_release_only_when_that_frees_the_memory(self, request_: policy.DeviceRequest, release: bool) -> None:
        assert policy.release_for_device(request_) is release

    def test_ram_pressure_only_at_the_last_tier(self) -> None:
        def decide(available: float, free_active: bool, min_entry: float, ours: int = GIB) -> bool:
            return policy.release_for_ram(10 * GIB, available, free_active=free_active, min_entry_size=min_entry,
                                          ours_in_ram=ours)

        assert not decide(GIB, False, 0), "inactive entries first"
        assert not decide(GIB, True, 512 * 1024**2), "large active entries next"
        assert decide(GIB, True, 0), "ComfyUI emptied its cache and RAM is still short"
        assert not decide(20 * GIB, True, 0), "not short"
        assert not decide(GIB, True, 0, ours=0), "nothing of ours in RAM"


@pytest.mark.slow
class TestMemoryCooperation:
    """Both ComfyUI generations: ComfyUI frees before our load; ours goes only when that frees the memory."""

    @staticmethod
    def generate_once(size: int = 32) -> None:
        (handle,) = QwenImageLoader().load("qwen-image-tiny", "auto", "auto", "auto")
        QwenImageGenerate().generate(handle, "a cat", "", size, size, 1, 1.0, 0, 1)
        assert get_residency_manager().resident_keys()

    def test_comfy_unloads_its_models_before_ours_load(self, any_comfy: FakeComfy) -> None:
        theirs = FakeLoaded("cpu", 3 * GIB, dynamic=isinstance(any_comfy, FakeComfy033))
        any_comfy.loaded.append(theirs)
        any_comfy.free_bytes = 0  # ComfyUI's model fills the device
        self.generate_once()
        first = any_comfy.free_calls[0]
        assert first["required"] > 0 and first["for_dynamic"] is False, "a real unload, also of dynamic models"
        assert theirs not in any_comfy.loaded, "ComfyUI unloaded its model for ours"
        if isinstance(any_comfy, FakeComfy033):
            assert any_comfy.ram_released and any_comfy.ram_released[0] >= 2 * GIB, "its RAM cache was asked too"

    def test_a_comfy_load_that_fits_keeps_ours(self, any_comfy: FakeComfy) -> None:
        self.generate_once()
        sys.modules["comfy.model_management"].free_memory(2 * GIB, "cpu")
        assert get_residency_manager().resident_keys()

    def test_a_comfy_load_still_short_releases_ours(self, any_comfy: FakeComfy) -> None:
        self.generate_once()
        any_comfy.free_bytes = GIB
        sys.modules["comfy.model_management"].free_memory(2 * GIB, "cpu")
        assert get_residency_manager().resident_keys() == []
        assert any_comfy.freed[-1] == 2 * GIB, "ComfyUI's own free_memory ran first"

    def test_a_request_for_another_device_keeps_ours(self, any_comfy: FakeComfy) -> None:
        self.generate_once()  # ours is in CPU RAM: dropping it frees no VRAM
        any_comfy.free_bytes = 0
        sys.modules["comfy.model_management"].free_memory(8 * GIB, "cuda:0")
        assert get_residency_manager().resident_keys()

    def test_free_button_releases_ours(self, any_comfy: FakeComfy) -> None:
        self.generate_once()
        sys.modules["comfy.model_management"].unload_all_models()
        assert any_comfy.unloaded == 1 and get_residency_manager().resident_keys() == []

    @pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic-vram-on", "dynamic-vram-off"])
    def test_dynamic_vram_models_count_as_available(self, comfy033: FakeComfy033, dynamic: bool) -> None:
        self.generate_once()
        theirs = FakeLoaded("cpu", 8 * GIB, dynamic=dynamic)
        comfy033.loaded.append(theirs)
        comfy033.free_bytes = GIB  # plain free memory is low: ComfyUI's model holds 8 GiB
        mm = sys.modules["comfy.model_management"]
        mm.free_memory(4 * GIB, "cpu", for_dynamic=dynamic)  # what load_models_gpu passes
        assert get_residency_manager().resident_keys(), "ComfyUI's own model covers the request"
        assert (theirs in comfy033.loaded) is dynamic, "dynamic: kept and paged on demand; else unloaded"
        comfy033.loaded.clear()
        comfy033.free_bytes = GIB
        mm.free_memory(4 * GIB, "cpu", for_dynamic=dynamic)  # nothing of ComfyUI's left to give
        assert get_residency_manager().resident_keys() == []

    def test_force_loaded_weights_of_a_dynamic_model_do_not_count_as_available(self, comfy033: FakeComfy033) -> None:
        """H200 (bench/comfy_cooperation.py, two mode): a dynamic model whose layers 0.33 force-loads (plain torch
        layers, or tiny ones) holds memory aimdo cannot page out; counting it as available kept ours, and
        ComfyUI's own load of a second model hit OOM."""
        self.generate_once()
        theirs = FakeLoaded("cpu", 8 * GIB, dynamic=True, model_loaded_weight_memory=6 * GIB)
        comfy033.loaded.append(theirs)
        comfy033.free_bytes = GIB
        sys.modules["comfy.model_management"].free_memory(4 * GIB, "cpu", for_dynamic=True)
        assert get_residency_manager().resident_keys() == [], "only 2 GiB of theirs is pageable: ours must go"

    def test_before_our_load_comfy_is_asked_for_what_its_own_loads_ask(self, any_comfy: FakeComfy) -> None:
        """ComfyUI unloads only the shortfall of a request: the weights alone left no room to run."""
        from nodes import comfy_bridge

        comfy_bridge.free_comfy_memory(10 * GIB)
        assert any_comfy.freed[-1] == int(10 * GIB * 1.1 + 0.8 * GIB + 400 * 1024**2)

    def test_unload_model_and_clones_keeps_ours(self, comfy033: FakeComfy033) -> None:
        self.generate_once()
        clone, other = FakeLoaded("cpu", GIB), FakeLoaded("cpu", GIB)
        comfy033.loaded += [clone, other]
        comfy033.free_bytes = 0
        sys.modules["comfy.model_management"].unload_model_and_clones(clone)
        assert clone not in comfy033.loaded and other in comfy033.loaded
        assert get_residency_manager().resident_keys(), "a targeted unload is not a request for memory"

    def test_ram_pressure_cache_releases_ours_only_at_its_last_tier(self, comfy033: FakeComfy033) -> None:
        self.generate_once()
        cache = sys.modules["comfy_execution.caching"].RAMPressureCache()
        short = 10**15  # more RAM than any machine has: still short after ComfyUI's cache is empty
        cache.ram_release(short)  # after each node: inactive entries
        cache.ram_release(short, free_active=True, min_entry_size=512 * 1024**2)
        cache.ram_release(0, free_active=True)  # not short
        assert get_residency_manager().resident_keys()
        freed = cache.ram_release(short, free_active=True)
        assert get_residency_manager().resident_keys() == [] and freed > 0
        assert len(comfy033.ram_calls) == 4, "ComfyUI's own release ran every time"

    def test_missing_hooks_are_named_once_and_the_rest_works(self, comfy: FakeComfy,
                                                             caplog: pytest.LogCaptureFixture) -> None:
        with caplog.at_level(logging.INFO, logger="qwen_image.nodes"):
            common.install_comfy_hooks()
            common._hooks_installed = False
            common.install_comfy_hooks()
        lines = [r.getMessage() for r in caplog.records if "memory hooks" in r.getMessage()]
        assert len(lines) == 1 and "unload_model_and_clones" in lines[0].split("skipped")[1]
        assert "RAMPressureCache" in lines[0].split("skipped")[1]
        self.generate_once()  # 0.3.64 has neither: nothing breaks

    def test_cancel_as_base_exception_keeps_the_model_and_clears_frames(self, comfy033: FakeComfy033) -> None:
        """0.33 raises InterruptProcessingException(BaseException) from the progress hook."""
        (handle,) = QwenImageLoader().load("qwen-image-tiny", "auto", "auto", "auto")
        interrupt = sys.modules["comfy.model_management"].InterruptProcessingException
        assert not issubclass(interrupt, Exception)
        comfy033.interrupt = False
        original = bridge.Progress.update

        def press_cancel(bar: bridge.Progress, value: int, total: int | None = None) -> None:
            comfy033.interrupt = True
            original(bar, value, total)  # the hook raises the BaseException

        bridge.Progress.update = press_cancel
        try:
            with pytest.raises(interrupt) as caught:
                QwenImageGenerate().generate(handle, "a cat", "", 32, 32, 20, 1.0, 0, 1, unique_id="3")
        finally:
            bridge.Progress.update = original
        assert get_residency_manager().resident_keys(), "Cancel keeps the model while memory is not short"
        frames = []
        tb = caught.value.__traceback__
        while tb is not None:
            frames.append(tb.tb_frame)
            tb = tb.tb_next
        pipeline = [f for f in frames if f.f_code.co_name == "__call__" and "diffusers" in f.f_code.co_filename]
        assert pipeline and all(not f.f_locals for f in pipeline), "the stored exception pins no latents"

    def test_cancel_releases_the_model_when_memory_is_short(self, comfy033: FakeComfy033) -> None:
        (handle,) = QwenImageLoader().load("qwen-image-tiny", "auto", "auto", "auto")
        QwenImageGenerate().generate(handle, "a cat", "", 32, 32, 1, 1.0, 0, 1)
        comfy033.free_bytes = 100 * 1024**2
        comfy033.interrupt = True
        with pytest.raises(sys.modules["comfy.model_management"].InterruptProcessingException):
            QwenImageGenerate().generate(handle, "a dog", "", 32, 32, 5, 1.0, 1, 1)
        assert get_residency_manager().resident_keys() == []

    def test_download_cancel_by_the_progress_hook_reaches_the_panel(self, comfy033: FakeComfy033, hub: Any,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
        hub.add_repo("local/big", {"w.safetensors": b"y" * 3_000_000})
        hub.faults.rate_bps = 1_000_000
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setattr(bridge, "interrupted", lambda: False)  # only the hook sees Cancel, as in 0.33
        original = bridge.Progress.update

        def press_cancel_once_bytes_flow(bar: bridge.Progress, value: int, total: int | None = None) -> None:
            comfy033.interrupt = comfy033.interrupt or value > 0
            original(bar, value, total)

        monkeypatch.setattr(bridge.Progress, "update", press_cancel_once_bytes_flow)
        with pytest.raises(sys.modules["comfy.model_management"].InterruptProcessingException):
            QwenImageDownloader().download("local/big", "main", "", "", 1, "", unique_id="6")
        assert [e[1]["state"] for e in comfy033.events if e[1].get("node") == "6"][-1] == "cancelled"


@pytest.mark.slow
def test_session_log_goes_to_comfyui_user_folder(comfy: FakeComfy, monkeypatch: pytest.MonkeyPatch) -> None:
    from qwen_core.session_log import get_session_log, reset_session_log

    monkeypatch.delenv("QWEN_REPORTS_DIR", raising=False)
    folder = bridge.register_reports_dir()
    assert folder == comfy.user / "qwen-image" and paths.reports_dir() == folder
    reset_session_log()
    try:
        get_session_log().info("hello from the test")
        assert "hello from the test" in (folder / "last_session.log").read_text()
    finally:
        reset_session_log()
    monkeypatch.setenv("QWEN_REPORTS_DIR", str(comfy.user / "mine"))
    assert paths.reports_dir() == comfy.user / "mine", "QWEN_REPORTS_DIR still wins"
