"""Preflight with injected readings; plus the real CLI on this CPU machine."""

import json
import subprocess
import sys

import pytest
import torch

from qwen_core import governor, memory_model, session_log
from qwen_core.devices import DeviceConfig
from qwen_core.preflight import (
    MODEL_SIZES_GB,
    PACKAGE_RANGES,
    check_gpu,
    check_vram,
    perform_preflight_checks,
)

GOOD_VERSIONS = {"torch": "2.11.0+cu130", "diffusers": "0.42.1", "transformers": "5.24.0",
                 "huggingface_hub": "2.4.0", "accelerate": "1.15.0", "safetensors": "0.8.0"}
CUDA_OK = {"runtime": "13.0", "driver": "580.65", "driver_cuda": "13.0"}
TB = 10**12


def gpu(vram_total, vram_free=None, cc=(8, 9), name="NVIDIA GeForce RTX 4080", ram=64.0):
    return DeviceConfig("cuda", torch.bfloat16, "native", "PyTorch SDPA: flash-attn is not installed", name,
                        vram_total, vram_total if vram_free is None else vram_free, ram, ram * 0.8, cc, True)


CPU = DeviceConfig("cpu", torch.float32, "native", "PyTorch SDPA: flash-attn needs a CUDA GPU", "cpu",
                   None, None, 32.0, 24.0, None, True)


@pytest.fixture(autouse=True)
def _isolated_log(monkeypatch, tmp_path):
    monkeypatch.setenv("QWEN_REPORTS_DIR", str(tmp_path / "reports"))
    session_log.reset_session_log()
    yield
    session_log.reset_session_log()


def run(dev, **kw):
    kw.setdefault("versions", GOOD_VERSIONS)
    kw.setdefault("cuda_info", CUDA_OK)
    kw.setdefault("disk_free", lambda path: TB)
    return perform_preflight_checks(device_config=dev, **kw)


class TestVerdictAndProfile:
    def test_h100_is_ok_and_keeps_everything_on_the_gpu(self, tmp_path):
        r = run(gpu(79.2, name="NVIDIA H100 80GB HBM3", cc=(9, 0), ram=256), target_dir=tmp_path)
        assert r.status == "ok", [c for c in r.checks if c.status != "ok"]
        assert r.profile.memory_mode == "gpu" and r.profile.dtype == "bf16"
        assert r.profile.example_size == "1328x1328"
        assert {c.name for c in r.checks} >= {"gpu", "vram", "ram", "disk", "cuda", "python", "flash-attn",
                                               "comfyui", *PACKAGE_RANGES}

    def test_rtx_4080_16gb_streams_at_the_native_size(self):
        r = run(gpu(16.0))
        assert r.profile.memory_mode == "streamed"  # qwen_core/streaming.py, the low-VRAM engine
        # The window is the memory model's (the governor's, for the same reading), not a tier table's 1.8 MP.
        assert r.profile.max_pixels == governor.max_pixels(16.0) > 1328 * 1328
        assert r.profile.example_size == "1328x1328" and "est. 0.66 s/step" in r.profile.reason
        assert "offloaded weights live in RAM" in r.check("ram").needed
        assert r.check("vram").status == "ok"

    def test_4gb_card_gets_a_smaller_window_and_a_warning(self):
        r = run(gpu(4.0))
        assert r.profile.memory_mode == "streamed" and r.profile.max_pixels < 1328 * 1328
        w, h = map(int, r.profile.example_size.split("x"))
        assert w * h <= r.profile.max_pixels and w % 16 == 0
        assert r.check("vram").status == "warn" and "governor reduces" in r.check("vram").message

    def test_without_the_streaming_engine_group_offload(self, monkeypatch):
        monkeypatch.setattr(memory_model, "streaming_available", lambda: False)
        assert run(gpu(16.0)).profile.memory_mode == "group_offload"

    def test_48gb_card_uses_model_offload(self):
        assert run(gpu(48.0)).profile.memory_mode == "model_offload"

    def test_60gb_card_agrees_with_the_loader(self):
        # Issue 9: 57-61 GiB cards got gpu from the loader (3 GiB headroom) and model_offload from Preflight.
        r = run(gpu(60.0))
        assert r.profile.memory_mode == memory_model.choose_memory_mode(None, 60.0).mode == "model_offload"

    def test_recommendation_follows_free_vram(self):
        # One reading: the free VRAM the loader will decide from, not the card's total.
        assert run(gpu(80.0, vram_free=30.0)).profile.memory_mode == "streamed"

    def test_listing_weights_per_component_set_the_mode(self):
        # A model with a 20 GB transformer and a 10 GB text encoder: model_offload holds it on a 28 GB card.
        listing = {"transformer/a.safetensors": 20 * 10**9, "text_encoder/b.safetensors": 10 * 10**9,
                   "vae/c.safetensors": 10**8, "tokenizer/vocab.json": 10**7}
        r = run(gpu(28.0), model="Qwen/Qwen-Image", file_sizes=listing)
        assert r.profile.memory_mode == "model_offload"

    def test_cpu_machine_warns_but_passes(self):
        r = run(CPU)
        assert r.status == "warn" and r.check("gpu").status == "warn" and r.profile.device == "cpu"
        assert r.profile.dtype == "fp32"

    def test_busy_gpu_warns_with_restart_hint(self):
        r = run(gpu(24.0, vram_free=4.0))
        assert r.check("vram").status == "warn" and "safe_restart" in r.check("vram").recommendation


class TestDisk:
    def test_not_enough_space_for_an_explicit_model_fails(self, tmp_path):
        r = run(gpu(80), model="Qwen/Qwen-Image", target_dir=tmp_path, disk_free=lambda p: 40 * 10**9)
        disk = r.check("disk")
        assert r.status == "fail" and disk.status == "fail"
        assert "59.7" in disk.needed and "QWEN_HOME" in disk.recommendation

    def test_default_model_shortage_is_only_a_warning(self):
        assert run(gpu(80), disk_free=lambda p: 10**9).check("disk").status == "warn"

    def test_listing_sizes_win_over_the_table(self):
        r = run(gpu(80), model="Qwen/Qwen-Image", file_sizes={"a.safetensors": 3 * 10**9, "b.json": 10**9},
                disk_free=lambda p: 5 * 10**9)
        assert r.model_size_gb == pytest.approx(4.0) and r.check("disk").status == "fail"  # needs 6 GB
        assert run(gpu(80), model="Qwen/Qwen-Image", file_sizes=[10**9]).check("disk").status == "ok"

    def test_local_folder_size_is_measured(self, tmp_path):
        (tmp_path / "transformer").mkdir()
        (tmp_path / "transformer" / "w.safetensors").write_bytes(b"x" * 5000)
        r = run(CPU, model=str(tmp_path))
        assert r.model_size_gb == pytest.approx(5000 / 1e9) and r.check("disk").needed == "already on disk"

    def test_missing_target_measures_its_existing_parent(self, tmp_path):
        r = perform_preflight_checks(device_config=CPU, target_dir=tmp_path / "not" / "yet", versions=GOOD_VERSIONS,
                                     cuda_info=CUDA_OK)
        assert "GB free" in r.check("disk").measured

    def test_unknown_repo_size_warns(self):
        assert run(gpu(80), model="someone/other-model").check("disk").status == "warn"

    def test_invalid_model_is_a_failed_check(self):
        r = run(gpu(80), model="no such/folder or repo!")
        assert r.check("model").status == "fail"

    def test_known_sizes(self):
        assert MODEL_SIZES_GB["Qwen/Qwen-Image"] == pytest.approx(57.7)
        assert {"Qwen/Qwen-Image-Edit", "Qwen/Qwen-Image-Edit-2509"} <= set(MODEL_SIZES_GB)


class TestVersionsAndCuda:
    def test_old_seed_pins_fail(self):
        r = run(gpu(80), versions={**GOOD_VERSIONS, "diffusers": "0.30.0", "transformers": "4.46.3"})
        assert r.status == "fail"
        assert r.check("diffusers").status == "fail" and r.check("transformers").status == "fail"
        assert "requirements.txt" in r.check("diffusers").recommendation

    def test_edit_2509_needs_diffusers_036(self):
        r = run(gpu(80), model="Qwen/Qwen-Image-Edit-2509", versions={**GOOD_VERSIONS, "diffusers": "0.35.2"})
        assert r.check("diffusers").status == "fail" and ">= 0.36" in r.check("diffusers").needed

    def test_missing_package_and_untested_newer(self):
        r = run(gpu(80), versions={**GOOD_VERSIONS, "accelerate": None, "diffusers": "0.50.0"})
        assert r.check("accelerate").status == "fail" and r.check("diffusers").status == "warn"

    def test_driver_older_than_runtime_fails(self):
        r = run(gpu(80), cuda_info={"runtime": "13.0", "driver": "550.54", "driver_cuda": "12.4"})
        assert r.check("cuda").status == "fail" and "driver" in r.check("cuda").recommendation

    def test_cpu_torch_with_nvidia_driver_warns(self):
        r = run(CPU, cuda_info={"runtime": None, "driver": "570.1", "driver_cuda": "12.8"})
        assert r.check("cuda").status == "warn" and "Install torch" in r.check("cuda").recommendation

    def test_comfyui_version_is_reported(self):
        assert run(CPU, comfyui_version="0.3.64").check("comfyui").measured == "0.3.64"


class TestTypedDevice:
    def test_checks_take_the_device_config(self):
        assert check_gpu(gpu(16.0)).measured == "NVIDIA GeForce RTX 4080 (cc 8.9)"
        choice = memory_model.choose_memory_mode(None, 16.0)
        assert check_vram(gpu(16.0), choice, "x", 1328 * 1328).status == "ok"

    def test_report_device_keeps_its_json_shape(self):
        dev = gpu(16.0)
        data = json.loads(run(dev).to_json())["device"]
        assert data == json.loads(json.dumps(dev.to_dict())) and data["dtype"] == "bf16"


class TestOutput:
    def test_json_and_text(self):
        r = run(gpu(8.0))
        data = json.loads(r.to_json())
        assert data["status"] == r.status and data["profile"]["max_pixels"] == r.profile.max_pixels
        assert all({"name", "status", "measured", "needed", "message", "recommendation"} <= set(c)
                   for c in data["checks"])
        text = r.to_text()
        assert "verdict" in text and "Recommended profile" in text and "memory_mode=streamed" in text

    def test_fails_are_in_the_session_log_with_fix(self, tmp_path):
        run(gpu(80), model="Qwen/Qwen-Image", disk_free=lambda p: 10**9)
        log = (tmp_path / "reports" / "last_session.log").read_text()
        assert "preflight disk" in log and "fix: Free space" in log

    def test_cli_json_on_this_machine(self, tmp_path):
        out = subprocess.run([sys.executable, "-m", "qwen_core", "preflight", "--json", "--target", str(tmp_path)],
                             capture_output=True, text=True, timeout=120)
        data = json.loads(out.stdout)
        assert data["status"] in ("ok", "warn", "fail") and len(data["checks"]) >= 10
        assert out.returncode == (1 if data["status"] == "fail" else 0)

    def test_cli_bad_env_device_is_a_failed_check(self, monkeypatch, tmp_path):
        monkeypatch.setenv("QWEN_DEVICE", "cuda:7")
        out = subprocess.run([sys.executable, "-m", "qwen_core", "preflight", "--target", str(tmp_path)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 1 and "QWEN_DEVICE" in out.stdout
