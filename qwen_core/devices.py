"""Device policy: which device, dtype and attention backend a pipeline should use, and why.

Nothing is computed at import time: every reading happens when ``get_device_config()`` is called, so
``CUDA_VISIBLE_DEVICES`` set after import is honoured and tests can inject readings. Hardware readings
come from ``probe_hardware()``; tests pass their own ``HardwareProbe`` (or monkeypatch the function).

Attention policy (``get_attention_implementation``): PyTorch SDPA (diffusers backend "native") is the
safe default. flash-attn 4 (``qwen_core.speed.attention``) is preferred for "auto" on sm_90+ when it imports
and its probe matches SDPA. flash-attn is chosen (for "auto" or "flash") only when it imports, is new enough for
diffusers (>= 2.6.3), the card's compute capability is >= 8.0, the dtype is fp16/bf16, and a tiny probe
call returns finite numbers. Otherwise SDPA, with the reason recorded.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import psutil
import torch

from qwen_core.errors import InvalidInputError
from qwen_core.options import AttentionChoice, DtypeChoice

SDPA_BACKEND = "native"  # diffusers AttentionBackendName.NATIVE: torch.nn.functional.scaled_dot_product_attention
FLASH_BACKEND = "flash"  # diffusers AttentionBackendName.FLASH: the flash-attn 2 package
FLASH4_BACKEND = "flash4"  # ours: flash-attn 4 through qwen_core.speed (diffusers has only a Hub-download variant)
FLASH_MIN_VERSION = (2, 6, 3)  # diffusers refuses older flash-attn (attention_dispatch._REQUIRED_FLASH_VERSION)
_GIB = 1024**3
_DEVICE_RE = re.compile(r"^(cpu|mps|cuda(:\d{1,2})?)$")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


@dataclass(frozen=True)
class HardwareProbe:
    """Raw readings of the machine. Built by ``probe_hardware()``; tests build their own."""

    cuda_available: bool
    cuda_device_count: int = 0
    device_name: str = "cpu"
    vram_total_gb: float | None = None
    vram_free_gb: float | None = None
    compute_capability: tuple[int, int] | None = None
    ram_total_gb: float = 0.0
    ram_available_gb: float = 0.0
    mps_available: bool = False


@dataclass(frozen=True)
class DeviceConfig:
    device: str
    dtype: torch.dtype
    attention_backend: str
    attention_reason: str
    device_name: str
    vram_total_gb: float | None
    vram_free_gb: float | None
    ram_total_gb: float
    ram_available_gb: float
    compute_capability: tuple[int, int] | None
    supports_bf16: bool
    dtype_reason: str = field(default="")

    @property
    def dtype_name(self) -> str:
        """"bf16", "fp16" or "fp32": the short name used by presets and the memory model."""
        return dtype_name(self.dtype)

    def to_dict(self) -> dict:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        data["dtype"] = self.dtype_name
        data["compute_capability"] = list(self.compute_capability) if self.compute_capability else None
        return data


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def _cuda_index(device: str) -> int:
    return int(device.split(":", 1)[1]) if ":" in device else 0


def probe_hardware(device: str = "cuda") -> HardwareProbe:
    """Read RAM, and for a CUDA device its name, VRAM (total/free) and compute capability."""
    vm = psutil.virtual_memory()
    ram = {"ram_total_gb": vm.total / _GIB, "ram_available_gb": vm.available / _GIB}
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if not torch.cuda.is_available():
        return HardwareProbe(cuda_available=False, mps_available=mps, **ram)
    index = _cuda_index(device) if device.startswith("cuda") else 0
    count = torch.cuda.device_count()
    index = min(index, count - 1)
    props = torch.cuda.get_device_properties(index)
    free, total = _capped_memory(index, *torch.cuda.mem_get_info(index))
    return HardwareProbe(
        cuda_available=True,
        cuda_device_count=count,
        device_name=props.name,
        vram_total_gb=total / _GIB,
        vram_free_gb=free / _GIB,
        compute_capability=(props.major, props.minor),
        mps_available=mps,
        **ram,
    )


def _capped_memory(index: int, free: int, total: int) -> tuple[int, int]:
    """(free, total) bytes as this process may use them: a per-process memory fraction set with
    ``torch.cuda.set_per_process_memory_fraction`` (by the host application, or a benchmark emulating a smaller
    card) caps the allocator below the card's size, which ``mem_get_info`` does not show."""
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    fraction = float(get_fraction(index)) if get_fraction is not None else 1.0
    if not 0 < fraction < 1:
        return free, total
    cap = int(total * fraction)
    return max(0, min(free, cap - torch.cuda.memory_reserved(index))), cap


def _resolve_device(requested: str | None, probe: HardwareProbe) -> str:
    """Explicit argument, else QWEN_DEVICE, else cuda > mps > cpu. An unusable explicit choice is an error."""
    field_name = "device"
    if requested in (None, "", "auto"):
        requested = os.environ.get("QWEN_DEVICE", "").strip() or "auto"
        field_name = "QWEN_DEVICE"
    requested = requested.strip().lower()
    if requested == "auto":
        if probe.cuda_available:
            return "cuda"
        return "mps" if probe.mps_available else "cpu"
    if not _DEVICE_RE.match(requested):
        raise InvalidInputError(field_name, f"{requested!r} is not a device; use auto, cpu, cuda, cuda:N or mps.")
    if requested.startswith("cuda"):
        if not probe.cuda_available:
            raise InvalidInputError(
                field_name,
                f"{requested!r} was requested but no CUDA GPU is visible to torch.",
                fix="install a CUDA build of torch (README 'Install torch'), check CUDA_VISIBLE_DEVICES, "
                "or use device 'cpu'.",
            )
        if _cuda_index(requested) >= max(probe.cuda_device_count, 1):
            raise InvalidInputError(
                field_name, f"{requested!r}: only {probe.cuda_device_count} CUDA device(s) are visible."
            )
    if requested == "mps" and not probe.mps_available:
        raise InvalidInputError(field_name, "'mps' was requested but Apple MPS is not available.", fix="use 'cpu'.")
    return requested


def _bf16_supported(device: str, probe: HardwareProbe) -> bool:
    if device.startswith("cuda"):
        # Ampere (8.0) and newer have native bf16; older cards emulate it slowly or produce garbage.
        return probe.compute_capability is not None and probe.compute_capability >= (8, 0)
    return True  # CPU and MPS (torch >= 2.3) compute bf16 correctly


def resolve_dtype_with_reason(
    requested: str | DtypeChoice | torch.dtype | None, device: str, supports_bf16: bool
) -> tuple[torch.dtype, str]:
    """The dtype to run in and a one-line reason (see ``resolve_dtype``)."""
    if isinstance(requested, torch.dtype):
        if requested not in _DTYPE_NAMES:
            raise InvalidInputError("dtype", f"{requested} is not supported; use auto, bf16, fp16 or fp32.")
        choice = DtypeChoice(_DTYPE_NAMES[requested])
    else:
        choice = DtypeChoice.parse(requested or "auto", "dtype")
    on_gpu = device.startswith("cuda") or device == "mps"
    if choice is DtypeChoice.AUTO:
        if not on_gpu:
            return torch.float32, "CPU: float32 (half precision on CPU is slow and incomplete)"
        if supports_bf16:
            return torch.bfloat16, "bf16: the precision Qwen-Image was trained in"
        return torch.float16, "fp16: this card has no native bf16 (compute capability < 8.0)"
    if choice is DtypeChoice.BF16 and on_gpu and not supports_bf16:
        return torch.float16, "bf16 requested, but this card has no native bf16: using fp16"
    if choice is DtypeChoice.FP16 and not on_gpu:
        return torch.float32, "fp16 requested on CPU, where half kernels are incomplete: using float32"
    return _DTYPES[choice.value], f"{choice.value} as requested"


def resolve_dtype(requested: str | DtypeChoice | torch.dtype | None, device: str, supports_bf16: bool) -> torch.dtype:
    """auto: bf16 on GPUs that have it, else fp16; float32 on CPU. bf16 -> fp16 on cards without bf16."""
    return resolve_dtype_with_reason(requested, device, supports_bf16)[0]


# (device, dtype) -> None when the probe passed, else the failure text. Probing once per process is enough.
_FLASH_PROBE_CACHE: dict[tuple[str, torch.dtype], str | None] = {}


def clear_probe_cache() -> None:
    _FLASH_PROBE_CACHE.clear()


def flash_attn_status() -> tuple[str | None, str]:
    """(version or None, why not usable or "") without running anything on a GPU."""
    try:
        import flash_attn  # noqa: F401  (optional dependency)
    except ImportError as err:
        if err.name == "flash_attn":
            return None, "flash-attn is not installed (optional: pip install flash-attn)"
        # The package is there but something it needs is not (e.g. built for another torch).
        return None, f"flash_attn is installed but its import failed ({err}); reinstall it for this torch"
    except Exception as err:  # a broken binary build raises OSError/RuntimeError at import
        return None, f"flash_attn failed to import: {err}"
    version = str(getattr(flash_attn, "__version__", "0"))
    parts = tuple(int(p) for p in re.findall(r"\d+", version)[:3])
    if parts < FLASH_MIN_VERSION:
        return version, f"flash-attn {version} is older than diffusers needs (>= 2.6.3)"
    return version, ""


def _run_flash_probe(device: str, dtype: torch.dtype) -> str | None:
    """One tiny flash-attn call on the device; returns None when it works, else what went wrong."""
    try:
        from flash_attn import flash_attn_func

        q = torch.randn(1, 32, 2, 64, device=device, dtype=dtype)
        out = flash_attn_func(q, q, q)
        torch.cuda.synchronize(device)
        if not bool(torch.isfinite(out).all()):
            return "probe call returned NaN/Inf"
        return None
    except Exception as err:  # any failure (no kernel image for this arch, ABI mismatch...) means: don't use it
        return f"probe call failed: {type(err).__name__}: {err}"


def _flash_probe_cached(device: str, dtype: torch.dtype) -> str | None:
    key = (device, dtype)
    if key not in _FLASH_PROBE_CACHE:
        _FLASH_PROBE_CACHE[key] = _run_flash_probe(device, dtype)
    return _FLASH_PROBE_CACHE[key]


def get_attention_implementation(
    device: str,
    dtype: torch.dtype,
    requested: str | AttentionChoice = "auto",
    *,
    compute_capability: tuple[int, int] | None = None,
) -> tuple[str, str]:
    """(diffusers ``set_attention_backend`` name, reason). "native" (SDPA) unless flash-attn passes every test.

    ``compute_capability`` is read from the device when not given (tests pass it).
    """
    choice = AttentionChoice.parse(requested or "auto", "attention")
    if choice is AttentionChoice.SDPA:
        return SDPA_BACKEND, "PyTorch SDPA as requested"
    if choice in (AttentionChoice.AUTO, AttentionChoice.FLASH4):
        flash4, why = _flash4_choice(device, dtype, compute_capability)
        if flash4 or choice is AttentionChoice.FLASH4:
            return (FLASH4_BACKEND, why) if flash4 else (SDPA_BACKEND, f"flash-attn 4 requested but not used: {why}")
    prefix = "flash-attn requested but not used: " if choice is AttentionChoice.FLASH else ""
    if not device.startswith("cuda"):
        return SDPA_BACKEND, f"{prefix}PyTorch SDPA: flash-attn needs a CUDA GPU (device is {device})"
    if dtype not in (torch.float16, torch.bfloat16):
        return SDPA_BACKEND, f"{prefix}PyTorch SDPA: flash-attn needs fp16/bf16 (dtype is {dtype_name(dtype)})"
    version, problem = flash_attn_status()
    if problem:
        return SDPA_BACKEND, f"{prefix}PyTorch SDPA: {problem}"
    if compute_capability is None:
        compute_capability = tuple(torch.cuda.get_device_capability(_cuda_index(device)))
    if compute_capability < (8, 0):
        cc = ".".join(map(str, compute_capability))
        return SDPA_BACKEND, f"{prefix}PyTorch SDPA: flash-attn needs compute capability >= 8.0 (card has {cc})"
    failure = _flash_probe_cached(device, dtype)
    if failure:
        return SDPA_BACKEND, f"{prefix}PyTorch SDPA: flash-attn {version} {failure}"
    return FLASH_BACKEND, f"flash-attn {version} passed the probe on {device} ({dtype_name(dtype)})"


def _flash4_choice(device: str, dtype: torch.dtype, cc: tuple[int, int] | None) -> tuple[bool, str]:
    """(usable, reason) for flash-attn 4 (``qwen_core.speed.attention``): sm_90+, fp16/bf16, imports, probe."""
    if not device.startswith("cuda"):
        return False, f"PyTorch SDPA: flash-attn 4 needs a CUDA GPU (device is {device})"
    if dtype not in (torch.float16, torch.bfloat16):
        return False, f"PyTorch SDPA: flash-attn 4 needs fp16/bf16 (dtype is {dtype_name(dtype)})"
    from qwen_core.speed import attention

    version, problem = attention.status()
    if problem:
        return False, f"PyTorch SDPA: {problem}"
    cc = cc if cc is not None else tuple(torch.cuda.get_device_capability(_cuda_index(device)))
    if cc < (9, 0):
        return False, f"PyTorch SDPA: flash-attn 4 needs compute capability >= 9.0 (card has {cc[0]}.{cc[1]})"
    failure = attention.probe(device, dtype)
    if failure:
        return False, f"PyTorch SDPA: flash-attn 4 {version} {failure}"
    return True, f"flash-attn 4 {version} passed the probe on {device} ({dtype_name(dtype)})"


def get_device_config(
    *,
    device: str | None = None,
    dtype: str | DtypeChoice | torch.dtype | None = "auto",
    attention: str | AttentionChoice | None = "auto",
    probe: HardwareProbe | None = None,
) -> DeviceConfig:
    """Decide device, dtype and attention now. QWEN_DEVICE / QWEN_DTYPE / QWEN_ATTENTION apply when an
    argument is None or "auto". ``probe`` injects hardware readings (tests); by default they are read live."""
    if dtype in (None, "", "auto"):
        dtype = os.environ.get("QWEN_DTYPE", "").strip() or "auto"
        dtype_field = "QWEN_DTYPE"
    else:
        dtype_field = "dtype"
    if attention in (None, "", "auto"):
        attention = os.environ.get("QWEN_ATTENTION", "").strip() or "auto"
        attention_field = "QWEN_ATTENTION"
    else:
        attention_field = "attention"
    # Validate the choices before touching the hardware, naming the env var when that is where they came from.
    if not isinstance(dtype, torch.dtype):
        dtype = DtypeChoice.parse(dtype, dtype_field)
    attention = AttentionChoice.parse(attention, attention_field)

    if probe is None:
        requested_device = device or os.environ.get("QWEN_DEVICE", "") or "cuda"
        probe = probe_hardware(requested_device if requested_device.startswith("cuda") else "cuda")
    resolved = _resolve_device(device, probe)
    bf16 = _bf16_supported(resolved, probe)
    torch_dtype, dtype_reason = resolve_dtype_with_reason(dtype, resolved, bf16)
    backend, reason = get_attention_implementation(
        resolved, torch_dtype, attention, compute_capability=probe.compute_capability
    )
    on_cuda = resolved.startswith("cuda")
    return DeviceConfig(
        device=resolved,
        dtype=torch_dtype,
        attention_backend=backend,
        attention_reason=reason,
        device_name=probe.device_name if on_cuda else resolved,
        vram_total_gb=probe.vram_total_gb if on_cuda else None,
        vram_free_gb=probe.vram_free_gb if on_cuda else None,
        ram_total_gb=probe.ram_total_gb,
        ram_available_gb=probe.ram_available_gb,
        compute_capability=probe.compute_capability if on_cuda else None,
        supports_bf16=bf16,
        dtype_reason=dtype_reason,
    )
