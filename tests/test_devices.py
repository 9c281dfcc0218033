"""Device policy with injected hardware readings (no GPU is touched)."""

import pytest
import torch

from qwen_core import devices
from qwen_core.devices import HardwareProbe, get_attention_implementation, get_device_config, resolve_dtype
from qwen_core.errors import InvalidInputError

CPU = HardwareProbe(cuda_available=False, ram_total_gb=16.0, ram_available_gb=8.0)
AMPERE = HardwareProbe(
    cuda_available=True, cuda_device_count=1, device_name="NVIDIA RTX 4080", vram_total_gb=16.0,
    vram_free_gb=15.0, compute_capability=(8, 9), ram_total_gb=64.0, ram_available_gb=48.0,
)
TURING = HardwareProbe(
    cuda_available=True, cuda_device_count=1, device_name="NVIDIA T4", vram_total_gb=15.0,
    vram_free_gb=14.5, compute_capability=(7, 5), ram_total_gb=32.0, ram_available_gb=30.0,
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ("QWEN_DEVICE", "QWEN_DTYPE", "QWEN_ATTENTION"):
        monkeypatch.delenv(name, raising=False)
    devices.clear_probe_cache()
    yield
    devices.clear_probe_cache()


def _flash_present(monkeypatch, version="2.7.4", probe_result=None):
    monkeypatch.setattr(devices, "flash_attn_status", lambda: (version, ""))
    calls = []

    def fake_probe(device, dtype):
        calls.append((device, dtype))
        return probe_result

    monkeypatch.setattr(devices, "_run_flash_probe", fake_probe)
    return calls


class TestDeviceConfig:
    def test_cpu_gets_float32_and_sdpa(self):
        cfg = get_device_config(probe=CPU)
        assert cfg.device == "cpu"
        assert cfg.dtype == torch.float32
        assert cfg.attention_backend == "native"
        assert "CUDA" in cfg.attention_reason
        assert cfg.vram_total_gb is None and cfg.compute_capability is None
        assert cfg.ram_total_gb == 16.0

    def test_real_machine_reading_is_cpu_in_tests(self):
        # scripts/test.sh hides GPUs; the live probe must still produce a complete config.
        cfg = get_device_config(device="cpu")
        assert cfg.device == "cpu" and cfg.ram_total_gb > 0

    def test_ampere_gets_bf16(self):
        cfg = get_device_config(probe=AMPERE)
        assert cfg.device == "cuda" and cfg.dtype == torch.bfloat16 and cfg.supports_bf16
        assert cfg.vram_total_gb == 16.0 and cfg.compute_capability == (8, 9)
        assert cfg.to_dict()["dtype"] == "bf16"

    def test_turing_bf16_request_falls_back_to_fp16(self):
        cfg = get_device_config(dtype="bf16", probe=TURING)
        assert cfg.dtype == torch.float16 and not cfg.supports_bf16
        assert "no native bf16" in cfg.dtype_reason

    def test_env_overrides_apply_to_auto(self, monkeypatch):
        monkeypatch.setenv("QWEN_DEVICE", "cpu")
        monkeypatch.setenv("QWEN_DTYPE", "bf16")
        monkeypatch.setenv("QWEN_ATTENTION", "sdpa")
        cfg = get_device_config(probe=AMPERE)
        assert cfg.device == "cpu" and cfg.dtype == torch.bfloat16
        assert cfg.attention_reason == "PyTorch SDPA as requested"

    def test_explicit_argument_beats_env(self, monkeypatch):
        monkeypatch.setenv("QWEN_DTYPE", "fp32")
        assert get_device_config(dtype="fp16", probe=AMPERE).dtype == torch.float16

    def test_bad_env_value_names_the_variable(self, monkeypatch):
        monkeypatch.setenv("QWEN_DTYPE", "int8")
        with pytest.raises(InvalidInputError) as err:
            get_device_config(probe=CPU)
        assert err.value.field == "QWEN_DTYPE" and "fp16" in str(err.value)

    def test_cuda_requested_without_gpu_is_a_clear_error(self):
        with pytest.raises(InvalidInputError) as err:
            get_device_config(device="cuda", probe=CPU)
        assert err.value.field == "device" and "Install torch" in str(err.value)

    @pytest.mark.parametrize("bad", ["gpu0", "cuda:x", "/dev/nvidia0", "cuda:3"])
    def test_invalid_or_missing_device(self, bad):
        with pytest.raises(InvalidInputError) as err:
            get_device_config(device=bad, probe=AMPERE)
        assert err.value.field == "device" and repr(bad) in str(err.value)


class TestResolveDtype:
    def test_table(self):
        assert resolve_dtype("auto", "cpu", True) == torch.float32
        assert resolve_dtype("fp16", "cpu", True) == torch.float32
        assert resolve_dtype("bf16", "cpu", True) == torch.bfloat16
        assert resolve_dtype("auto", "cuda", True) == torch.bfloat16
        assert resolve_dtype("auto", "cuda", False) == torch.float16
        assert resolve_dtype("bf16", "cuda:0", False) == torch.float16
        assert resolve_dtype(torch.float32, "cuda", True) == torch.float32

    def test_unknown_dtype(self):
        with pytest.raises(InvalidInputError) as err:
            resolve_dtype("fp8", "cuda", True)
        assert err.value.field == "dtype"


class TestAttention:
    def test_flash_chosen_only_when_every_condition_holds(self, monkeypatch):
        calls = _flash_present(monkeypatch)
        backend, reason = get_attention_implementation("cuda", torch.bfloat16, compute_capability=(9, 0))
        assert backend == "flash" and "passed the probe" in reason
        assert calls == [("cuda", torch.bfloat16)]
        # The probe runs once per device/dtype.
        get_attention_implementation("cuda", torch.bfloat16, compute_capability=(9, 0))
        assert len(calls) == 1

    def test_old_card_gets_sdpa(self, monkeypatch):
        calls = _flash_present(monkeypatch)
        backend, reason = get_attention_implementation("cuda", torch.float16, compute_capability=(7, 5))
        assert backend == "native" and "compute capability >= 8.0" in reason and "7.5" in reason
        assert calls == []

    def test_fp32_gets_sdpa(self, monkeypatch):
        _flash_present(monkeypatch)
        backend, reason = get_attention_implementation("cuda", torch.float32, "flash", compute_capability=(9, 0))
        assert backend == "native" and reason.startswith("flash-attn requested but not used") and "fp32" in reason

    def test_failed_probe_gets_sdpa_with_the_reason(self, monkeypatch):
        _flash_present(monkeypatch, probe_result="probe call failed: RuntimeError: no kernel image")
        backend, reason = get_attention_implementation("cuda", torch.bfloat16, compute_capability=(8, 0))
        assert backend == "native" and "no kernel image" in reason

    def test_missing_or_old_flash_attn(self, monkeypatch):
        monkeypatch.setattr(devices, "flash_attn_status", lambda: (None, "flash-attn is not installed"))
        assert get_attention_implementation("cuda", torch.bfloat16, compute_capability=(9, 0)) == (
            "native", "PyTorch SDPA: flash-attn is not installed")

    def test_flash_attn_not_installed_here(self):
        version, problem = devices.flash_attn_status()
        assert version is None and "not installed" in problem

    def test_sdpa_request_never_probes(self, monkeypatch):
        calls = _flash_present(monkeypatch)
        assert get_attention_implementation("cuda", torch.bfloat16, "sdpa")[0] == "native"
        assert calls == []

    def test_backend_names_exist_in_diffusers(self):
        from diffusers.models.attention_dispatch import AttentionBackendName

        assert AttentionBackendName(devices.SDPA_BACKEND) and AttentionBackendName(devices.FLASH_BACKEND)


def test_importing_the_foundation_touches_no_device():
    """Regression guard: device globals computed at import time ignore CUDA_VISIBLE_DEVICES set later."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "def boom(*a, **k): raise SystemExit('device queried at import time')\n"
        "torch.cuda.is_available = torch.cuda.device_count = torch.cuda.mem_get_info = boom\n"
        "import qwen_core.devices, qwen_core.governor, qwen_core.preflight, qwen_core.paths, qwen_core.session_log\n"
        "print('clean')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "clean", out.stderr


class TestPerProcessMemoryCap:
    """Regression (H200 family run, 2026-12-02): in a 16 GiB per-process cap the load's fresh VRAM reading came
    from mem_get_info (the whole card free), so the streamed engine planned for ~125 GiB and ran out of memory."""

    def test_a_fraction_caps_free_and_total(self, monkeypatch):
        import torch

        from qwen_core import devices

        monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda index=0: 0.1, raising=False)
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda index=0: 2 * 1024**3)
        free, total = devices._capped_memory(0, 130 * 1024**3, 140 * 1024**3)
        assert total == 14 * 1024**3 and free == 12 * 1024**3

    def test_no_fraction_reads_the_card(self, monkeypatch):
        import torch

        from qwen_core import devices

        monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda index=0: 1.0, raising=False)
        assert devices._capped_memory(0, 100, 140) == (100, 140)
