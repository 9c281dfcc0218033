"""Preflight: can this machine run Qwen-Image, and with which settings?

``perform_preflight_checks()`` measures GPU/VRAM, RAM, disk at the download target, CUDA runtime/driver,
package versions, flash-attn and (when given) the ComfyUI version, and returns a ``PreflightReport`` with
one ``Check`` per item (status ok/warn/fail, measured, needed, message, recommendation), an overall status
(the worst check) and a recommended profile (device, dtype, memory mode, max pixels from the governor). With
two or more CUDA cards a "devices" check shows each card's free VRAM and the ``auto`` placement
(``qwen_core.placement.plan``); the profile's memory mode and window are then those of the main card under it.

Units: model and disk sizes are GB = 1e9 bytes, as the Hub shows them; VRAM and RAM are GiB, as drivers
and task managers show them (both printed "GB").

CLI: ``python -m qwen_core preflight [--json] [--model REPO_OR_PATH] [--target DIR]``; exit status 0 when
the verdict is ok or warn, 1 when any check fails. Every reading can be injected for tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from qwen_core import __version__, governor
from qwen_core import memory_model as mm
from qwen_core.errors import InvalidInputError
from qwen_core.paths import models_root, validate_repo_id
from qwen_core.placement import plan as placement_plan

if TYPE_CHECKING:  # devices imports torch; the CLI's --help should not pay for it
    from qwen_core.devices import DeviceConfig

DEFAULT_MODEL = "Qwen/Qwen-Image"
DISK_MARGIN_GB = 2.0
# Whole-repo download sizes (GB = 1e9 bytes) as listed on the Hub: transformer ~40.9, text encoder ~16.6,
# VAE ~0.25. Used for the disk check when no file listing is passed in; the memory mode then uses the family's
# measured weights (qwen_core.memory_model).
MODEL_SIZES_GB: dict[str, float] = {
    "Qwen/Qwen-Image": 57.7,
    "Qwen/Qwen-Image-Edit": 57.7,
    "Qwen/Qwen-Image-Edit-2509": 57.7,
}
WEIGHT_SUFFIXES = (".safetensors",)
STORED_DTYPE = "bf16"  # Qwen-Image repos store bf16 weights: file bytes / 2 = parameters
# (minimum, first untested version or None). Qwen-Image needs diffusers >= 0.35 (Edit-2509: 0.36) and
# transformers >= 4.49; diffusers >= 0.40 needs huggingface_hub >= 1.23. Upper bounds = requirements.txt.
PACKAGE_RANGES: dict[str, tuple[str, str | None]] = {
    "torch": ("2.3", None),
    "diffusers": ("0.35", "0.43"),
    "transformers": ("4.49", "6"),
    "huggingface_hub": ("1.23", "3"),
    "accelerate": ("1.0", "2"),
    "safetensors": ("0.4.3", "1"),
}
OK, WARN, FAIL = "ok", "warn", "fail"
_RANK = {OK: 0, WARN: 1, FAIL: 2}
_GIB = 1024**3


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok | warn | fail
    measured: str
    needed: str
    message: str
    recommendation: str = ""


@dataclass(frozen=True)
class Profile:
    device: str
    dtype: str
    memory_mode: str
    attention_backend: str
    max_pixels: int
    example_size: str  # what 1328x1328 becomes under the governor
    reason: str
    devices: str = "single"  # the Loader's devices value (qwen_core.placement) this profile is for


@dataclass
class PreflightReport:
    checks: list[Check]
    status: str
    profile: Profile
    model: str
    model_size_gb: float | None
    target_dir: str
    device: dict  # DeviceConfig.to_dict(): the JSON report keeps plain values
    created_utc: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    qwen_core_version: str = __version__

    def check(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def to_text(self) -> str:
        rows = [("STATUS", "CHECK", "MEASURED", "NEEDED")]
        rows += [(c.status.upper(), c.name, c.measured, c.needed) for c in self.checks]
        widths = [min(max(len(r[i]) for r in rows), cap) for i, cap in enumerate((6, 18, 44, 30))]
        lines = [f"Qwen-Image preflight — verdict: {self.status.upper()}  (model {self.model})", ""]
        for r in rows:
            lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
        notes = [c for c in self.checks if c.status != OK or c.recommendation]
        if notes:
            lines.append("")
        for c in notes:
            lines.append(f"[{c.status}] {c.name}: {c.message}")
            if c.recommendation:
                lines.append(f"       -> {c.recommendation}")
        p = self.profile
        lines += ["", f"Recommended profile: device={p.device} devices={p.devices!r} dtype={p.dtype} memory_mode="
                      f"{p.memory_mode} attention={p.attention_backend} max_pixels={p.max_pixels} "
                      f"({p.max_pixels / 1e6:.2f} MP; "
                      f"1328x1328 -> {p.example_size})", f"  why: {p.reason}"]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- readings

def _parse_version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:3])


def installed_versions(names: Iterable[str] = PACKAGE_RANGES) -> dict[str, str | None]:
    """Installed distribution versions (None when missing), read from metadata without importing them."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def read_cuda_info() -> dict[str, str | None]:
    """torch's CUDA runtime, and the driver version + highest CUDA it supports (from nvidia-smi)."""
    info: dict[str, str | None] = {"runtime": None, "driver": None, "driver_cuda": None}
    try:
        import torch

        info["runtime"] = torch.version.cuda
    except ImportError:
        pass
    exe = shutil.which("nvidia-smi")
    if exe:
        try:
            out = subprocess.run([exe], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        driver = re.search(r"Driver Version:\s*([\d.]+)", out)
        cuda = re.search(r"CUDA Version:\s*([\d.]+)", out)
        info["driver"] = driver.group(1) if driver else None
        info["driver_cuda"] = cuda.group(1) if cuda else None
    return info


def folder_size_bytes(path: Path) -> int:
    """Bytes on disk of every file below ``path`` (file symlinks followed: the hub cache links to blobs)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
    return total


def _free_bytes(path: Path) -> int:
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent  # the target may not exist yet: measure the disk it will be created on
    return shutil.disk_usage(probe).free


def _listing_bytes(file_sizes: Mapping[str, int] | Iterable[int]) -> int:
    values = file_sizes.values() if isinstance(file_sizes, Mapping) else file_sizes
    return int(sum(int(v) for v in values))


# -------------------------------------------------------------------------------------------------- checks

def _gib(size_gb: float) -> float:
    """A Hub size (GB = 1e9 bytes) in GiB, the unit VRAM and RAM are measured in."""
    return size_gb * 1e9 / _GIB


def _gb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} GB"


def check_gpu(dev: DeviceConfig) -> Check:
    if not dev.device.startswith("cuda"):
        return Check("gpu", WARN, f"none (device {dev.device})", "an NVIDIA GPU (compute capability >= 7.0)",
                     "No CUDA GPU visible: the tiny demo runs on CPU, a real 20B model is impractically slow.",
                     "Install a CUDA build of torch (README 'Install torch') and check CUDA_VISIBLE_DEVICES.")
    cc = dev.compute_capability
    cc_text = ".".join(map(str, cc)) if cc else "?"
    status = OK if cc and tuple(cc) >= (7, 0) else WARN
    rec = "" if status == OK else "Cards older than Volta (7.0) are untested and very slow."
    return Check("gpu", status, f"{dev.device_name} (cc {cc_text})", "compute capability >= 7.0",
                 f"Using {dev.device} ({dev.device_name}); bf16 {'yes' if dev.supports_bf16 else 'no'}.", rec)


def _vram_needed(weights: mm.WeightSizes, dtype: str, family: str) -> str:
    """What the memory model says the lightest and the heaviest mode need for the family's reference image."""
    fam = mm.family_model(family)
    ref = fam.reference_pixels
    # The streamed engine is handed a fraction of the reading: the card needs its working set / that fraction.
    lightest = fam.entry("streamed", dtype).need_gib(ref) / mm.mode_budget_gib("streamed", 1.0)
    resident = fam.entry("gpu", dtype).need_gib(ref, fam.base_gib("gpu", dtype, weights))
    return f">= {lightest:.1f} GB (streamed); {resident:.0f} GB for memory mode gpu (at {ref / 1e6:.2f} MP)"


def check_vram(dev: DeviceConfig, choice: mm.MemoryChoice, needed: str, reference_pixels: int) -> Check:
    total, free = dev.vram_total_gb, dev.vram_free_gb
    if total is None or free is None:
        return Check("vram", WARN, "no GPU", needed, "No VRAM to measure; generation runs on the CPU.", "")
    measured = f"{free:.1f} GB free of {total:.1f} GB"
    if choice.mode == "sequential":
        return Check("vram", WARN, measured, needed, "Too little free VRAM for the streamed engine: sequential "
                     "offload, very slow.", "Close other GPU programs; the governor keeps sizes small.")
    if free < 0.5 * total:
        return Check("vram", WARN, measured, needed,
                     f"Other processes hold {total - free:.1f} GB of this GPU.",
                     "Close other GPU programs, or restart ComfyUI with scripts/safe_restart.sh to release memory.")
    if choice.max_pixels < reference_pixels:
        return Check("vram", WARN, measured, needed,
                     f"Memory mode '{choice.mode}' holds at most {choice.max_pixels / 1e6:.2f} MP here: the governor "
                     f"reduces larger sizes.", "Free VRAM for the native size, or accept the smaller images.")
    return Check("vram", OK, measured, needed, f"Memory mode '{choice.mode}' fits this card.", "")


def read_cards(dev: DeviceConfig) -> list[placement_plan.Card]:
    """Every visible CUDA card's free VRAM, the device's own first (none off CUDA)."""
    if not dev.device.startswith("cuda"):
        return []
    from qwen_core.devices import probe_hardware

    count = probe_hardware(dev.device).cuda_device_count
    first = dev.device if ":" in dev.device else "cuda:0"
    names = [first, *(f"cuda:{i}" for i in range(count) if f"cuda:{i}" != first)]
    return [placement_plan.Card(name, probe_hardware(name).vram_free_gb or 0.0) for name in names]


def check_devices(cards: list[placement_plan.Card], decision: placement_plan.PlacementDecision) -> Check:
    measured = f"{len(cards)} CUDA cards: " + ", ".join(f"{c.device} {c.free_gib:.1f} GB free" for c in cards)
    key = decision.placement.key
    rec = "" if key == "single" else f"Loader devices: {key} (or auto, which decides the same at load)."
    return Check("devices", OK, measured, "one card, or the model spread over several", decision.reason, rec)


@dataclass(frozen=True)
class _Placed:
    """The profile's memory decision under the ``auto`` placement: the main card's choice, the Loader's devices
    text, the weights on the main card (None: all of them) and the other cards of a split."""

    choice: mm.MemoryChoice
    devices: str = "single"
    main_weights: mm.WeightSizes | None = None
    other_cards: tuple = ()


def _placed_choice(dev: DeviceConfig, weights: mm.WeightSizes | None, family: str, cards: list[placement_plan.Card],
                   checks: list[Check]) -> _Placed:
    """What the loader's ``auto`` placement and ``auto`` memory mode would decide with these readings."""
    if len(cards) < 2:
        return _Placed(recommend_memory_mode(dev, weights, family))
    fam = mm.family_model(family)
    full = weights if weights is not None and weights.get("transformer") else fam.weights(dev.dtype_name)
    blocks = fam.step_time.transformer_blocks if fam.step_time else 60
    decision = placement_plan.plan_placement(full, cards, blocks, family=family, dtype=dev.dtype_name)
    checks.append(check_devices(cards, decision))
    placement = decision.placement
    if placement.is_single:
        return _Placed(recommend_memory_mode(dev, weights, family))
    loads = placement_plan.card_loads(placement, full, blocks)
    main = next(c.weights for c in loads if c.main)
    if placement.is_split:  # resident on every card; the governor bounds the window by each of them
        window = mm.window_pixels("gpu", cards[0].free_gib, weights=main, family=family, dtype=dev.dtype_name)
        choice = mm.MemoryChoice("gpu", decision.reason, cards[0].free_gib, window, fam.reference_pixels)
    else:
        choice = mm.choose_memory_mode(main, cards[0].free_gib, family=family, dtype=dev.dtype_name, device=dev.device)
    free = {c.device: c.free_gib for c in cards}
    others = tuple(governor.OtherCard(c.device, free[c.device], c.weights) for c in loads
                   if placement.is_split and not c.main and c.device in placement.transformer)
    return _Placed(choice, placement.key, main, others)


def check_ram(dev: DeviceConfig, memory_mode: str, size_gb: float | None) -> Check:
    total, avail = dev.ram_total_gb, dev.ram_available_gb
    offloaded = memory_mode in ("model_offload", "group_offload", "sequential", "streamed")
    need = max(16.0, _gib(size_gb) + 4) if (size_gb and offloaded) else 16.0
    measured = f"{avail:.1f} GB available of {total:.1f} GB"
    needed = f">= {need:.0f} GB" + (" (offloaded weights live in RAM)" if offloaded and size_gb else "")
    if total < need:
        return Check("ram", WARN, measured, needed, f"{total:.1f} GB RAM is less than the {need:.0f} GB advised.",
                     "Add RAM or swap, close other programs, or use a lighter model/memory mode.")
    if avail < need:
        return Check("ram", WARN, measured, needed, "Enough RAM installed, but little of it is free now.",
                     "Close other programs before loading the model.")
    return Check("ram", OK, measured, needed, "Enough RAM.", "")


def check_disk(target: Path, model: str, size_gb: float | None, local: bool, explicit: bool,
               disk_free: Callable[[Path], int]) -> Check:
    try:
        free_gb = disk_free(target) / 1e9
    except OSError as err:
        return Check("disk", WARN, "unreadable", "", f"Cannot measure free space at {target}: {err}", "")
    measured = f"{free_gb:.1f} GB free at {target}"
    if local:
        return Check("disk", OK, measured, "already on disk", f"{model} is a local folder ({_gb(size_gb)}).", "")
    if size_gb is None:
        return Check("disk", WARN, measured, f"model size + {DISK_MARGIN_GB:.0f} GB",
                     f"The size of {model} is unknown here.", "Check the repo size on the Hub before downloading.")
    need = size_gb + DISK_MARGIN_GB
    needed = f">= {need:.1f} GB ({model} {size_gb:.1f} GB + {DISK_MARGIN_GB:.0f} GB)"
    if free_gb >= need:
        return Check("disk", OK, measured, needed, "Enough space for the download.", "")
    return Check("disk", FAIL if explicit else WARN, measured, needed,
                 f"Not enough space to download {model}: {need - free_gb:.1f} GB short.",
                 "Free space, or download elsewhere: set QWEN_HOME (or pass --target) to a bigger disk.")


def check_cuda(dev: DeviceConfig, cuda: Mapping[str, str | None]) -> Check:
    runtime, driver, driver_cuda = cuda.get("runtime"), cuda.get("driver"), cuda.get("driver_cuda")
    measured = f"runtime {runtime or 'none (CPU build)'}; driver {driver or 'n/a'}" + (
        f" (supports CUDA {driver_cuda})" if driver_cuda else "")
    needed = "driver CUDA >= torch's CUDA runtime"
    if runtime is None and driver:
        return Check("cuda", WARN, measured, needed, "An NVIDIA driver is present but torch is a CPU-only build.",
                     "Install a CUDA build of torch matching the driver (README 'Install torch').")
    if runtime and driver_cuda and _parse_version(driver_cuda)[:2] < _parse_version(runtime)[:2]:
        return Check("cuda", FAIL, measured, needed,
                     f"torch was built for CUDA {runtime} but the driver supports only CUDA {driver_cuda}.",
                     "Update the NVIDIA driver, or install the torch wheel for an older CUDA (README 'Install torch').")
    if runtime and not dev.device.startswith("cuda") and driver is None:
        return Check("cuda", WARN, measured, needed, "torch has CUDA but no GPU/driver is visible.",
                     "Check the NVIDIA driver (nvidia-smi) and CUDA_VISIBLE_DEVICES.")
    return Check("cuda", OK, measured, needed, "CPU only: nothing to match." if runtime is None else "Compatible.", "")


def check_package(name: str, version: str | None, model: str) -> Check:
    minimum, below = PACKAGE_RANGES[name]
    if name == "diffusers" and "2509" in model:
        minimum = "0.36"  # QwenImageEditPlusPipeline
    needed = f">= {minimum}" + (f", < {below}" if below else "")
    fix_cmd = "pip install -r requirements.txt" if name != "torch" else "see README 'Install torch'"
    if version is None:
        return Check(name, FAIL, "not installed", needed, f"{name} is missing.", fix_cmd)
    if _parse_version(version) < _parse_version(minimum):
        return Check(name, FAIL, version, needed, f"{name} {version} is too old for Qwen-Image.",
                     f"Upgrade: {fix_cmd} (constraints.txt has the tested versions).")
    if below and _parse_version(version) >= _parse_version(below):
        return Check(name, WARN, version, needed, f"{name} {version} is newer than the tested range.",
                     "If something breaks, install the versions in constraints.txt.")
    return Check(name, OK, version, needed, "Supported.", "")


def check_flash(dev: DeviceConfig) -> Check:
    from qwen_core.devices import flash_attn_status

    version, problem = flash_attn_status()
    backend, reason = dev.attention_backend, dev.attention_reason
    measured = f"{version or 'not installed'}; using {'flash-attn' if backend == 'flash' else 'PyTorch SDPA'}"
    needed = "optional"
    if backend == "flash" or version is None:
        return Check("flash-attn", OK, measured, needed, reason, "")
    return Check("flash-attn", WARN, measured, needed, f"flash-attn is installed but not used: {reason}",
                 "Nothing to do (SDPA works); to use flash-attn, reinstall it for this torch/CUDA.")


def check_python() -> Check:
    ok = sys.version_info >= (3, 10)
    return Check("python", OK if ok else FAIL, platform.python_version(), ">= 3.10",
                 "Supported." if ok else "Python is too old.", "" if ok else "Use Python 3.10-3.13.")


def check_comfyui(version: str | None) -> Check:
    if version is None:
        return Check("comfyui", OK, "not inside ComfyUI (headless)", "optional", "Headless use of qwen_core.", "")
    return Check("comfyui", OK, version, "any recent ComfyUI", f"Running inside ComfyUI {version}.", "")


# ------------------------------------------------------------------------------------------ profile + main

def recommend_memory_mode(dev: DeviceConfig, weights: mm.WeightSizes | None,
                          family: str = mm.DEFAULT_FAMILY) -> mm.MemoryChoice:
    """The loader's own ``auto`` decision (``memory_model.choose_memory_mode``) for this device's free VRAM."""
    return mm.choose_memory_mode(weights, dev.vram_free_gb, family=family, dtype=dev.dtype_name,
                                 device=dev.device)


def model_weights(model: str, local: bool, file_sizes: Mapping[str, int] | Iterable[int] | None,
                  dtype: str) -> mm.WeightSizes | None:
    """GiB per weighted component in ``dtype``, from the listing or the local folder's safetensors (grouped by
    component folder; stored as bf16); None when neither is given (the family's measured weights apply)."""
    if file_sizes is not None:
        if not isinstance(file_sizes, Mapping):
            sizes = {"model": _listing_bytes(file_sizes)}
        else:
            sizes = _component_bytes((name, int(size)) for name, size in file_sizes.items())
            sizes = sizes or {"model": _listing_bytes(file_sizes)}
    elif local:
        root = Path(model).expanduser()
        sizes = _component_bytes((str(f.relative_to(root)), f.stat().st_size) for f in root.rglob("*")
                                 if f.is_file())
    else:
        return None
    if not sizes:
        return None
    factor = mm.ELEMENT_BYTES.get(dtype, 2) / mm.ELEMENT_BYTES[STORED_DTYPE]
    return mm.WeightSizes.from_bytes(sizes).scaled(factor)


def _component_bytes(files: Iterable[tuple[str, int]]) -> dict[str, int]:
    """Bytes of weight files per component (the folder holding the file; "model" for files at the top)."""
    sizes: dict[str, int] = {}
    for name, size in files:
        if name.endswith(WEIGHT_SUFFIXES):
            parts = name.replace(os.sep, "/").split("/")
            component = parts[-2] if len(parts) > 1 else "model"
            sizes[component] = sizes.get(component, 0) + size
    return sizes


def _model_size(model: str, local: bool, file_sizes: Mapping[str, int] | Iterable[int] | None) -> float | None:
    if file_sizes is not None:
        return _listing_bytes(file_sizes) / 1e9
    if local:
        return folder_size_bytes(Path(model).expanduser()) / 1e9
    return MODEL_SIZES_GB.get(model)


def _device_config(device_config: DeviceConfig | None) -> tuple[DeviceConfig, Check | None]:
    from qwen_core.devices import get_device_config

    problem = None
    if device_config is None:
        try:
            device_config = get_device_config()
        except InvalidInputError as err:
            problem = Check("device", FAIL, str(err.field), "a usable device", str(err),
                            err.fix or "Unset QWEN_DEVICE/QWEN_DTYPE/QWEN_ATTENTION or fix their values.")
            device_config = get_device_config(device="cpu", dtype="auto", attention="sdpa")
    return device_config, problem


def perform_preflight_checks(
    model: str | os.PathLike | None = None,
    target_dir: str | os.PathLike | None = None,
    *,
    device_config: DeviceConfig | None = None,
    file_sizes: Mapping[str, int] | Iterable[int] | None = None,
    comfyui_version: str | None = None,
    versions: Mapping[str, str | None] | None = None,
    cuda_info: Mapping[str, str | None] | None = None,
    disk_free: Callable[[Path], int] = _free_bytes,
    cards: list[placement_plan.Card] | None = None,
) -> PreflightReport:
    """Run every check. ``model``: a repo id or a local folder (default Qwen/Qwen-Image). ``file_sizes``:
    the repo listing (name -> bytes) when the caller has it. The rest injects readings (tests, ComfyUI);
    ``cards``: every CUDA card's free VRAM, the device's own first (default: read)."""
    if file_sizes is not None and not isinstance(file_sizes, Mapping):
        file_sizes = list(file_sizes)  # read twice: the disk size and the weights per component
    explicit = model is not None
    model_text = str(model) if explicit else DEFAULT_MODEL
    local = explicit and Path(model_text).expanduser().is_dir()
    checks: list[Check] = []
    if explicit and not local:
        try:
            model_text = validate_repo_id(model_text)
        except InvalidInputError as err:
            checks.append(Check("model", FAIL, model_text, "a local folder or a repo id like Qwen/Qwen-Image",
                                str(err), "Pass an existing folder or a Hub repo id."))
    size_gb = _model_size(model_text, local, file_sizes)
    target = Path(target_dir).expanduser() if target_dir is not None else models_root()

    dev, device_problem = _device_config(device_config)
    if device_problem:
        checks.append(device_problem)
    family = mm.DEFAULT_FAMILY
    weights = model_weights(model_text, local, file_sizes, dev.dtype_name)
    placed_checks: list[Check] = []
    placed = _placed_choice(dev, weights, family, read_cards(dev) if cards is None else cards, placed_checks)
    choice = placed.choice
    reference = mm.family_model(family).reference_pixels
    needed = _vram_needed(weights or mm.family_model(family).weights(dev.dtype_name), dev.dtype_name, family)
    versions = installed_versions() if versions is None else versions
    checks += [
        check_gpu(dev),
        check_vram(dev, choice, needed, reference),
        check_ram(dev, choice.mode, size_gb),
        check_disk(target, model_text, size_gb, local, explicit, disk_free),
        check_cuda(dev, read_cuda_info() if cuda_info is None else cuda_info),
        check_python(),
        *(check_package(name, versions.get(name), model_text) for name in PACKAGE_RANGES),
        check_flash(dev),
        check_comfyui(comfyui_version),
        *placed_checks,
    ]
    status = max((c.status for c in checks), key=_RANK.__getitem__)
    situation = governor.Situation(dev.vram_free_gb, choice.mode, dev.dtype_name, family,
                                   placed.main_weights or weights, other_cards=placed.other_cards)
    example = governor.clamp_image_size(1328, 1328, situation=situation)  # its window is choice.max_pixels
    reason = "; ".join(r for r in (choice.reason, dev.dtype_reason, f"1328x1328: {example.estimate_text}") if r)
    window = choice.max_pixels if placed.devices == "single" else example.max_pixels
    profile = Profile(dev.device, dev.dtype_name, choice.mode, dev.attention_backend, window,
                      f"{example.width}x{example.height}", reason, placed.devices)
    report = PreflightReport(checks, status, profile, model_text, size_gb, str(target), dev.to_dict())
    _log(report)
    return report


def _log(report: PreflightReport) -> None:
    from qwen_core.session_log import get_session_log

    log = get_session_log()
    log.info(f"preflight: verdict {report.status} for {report.model}; profile {asdict(report.profile)}")
    for c in report.checks:
        if c.status == FAIL:
            log.error(f"preflight {c.name}: {c.message} (measured {c.measured}; needed {c.needed})",
                      fix=c.recommendation or None)
        elif c.status == WARN:
            log.warning(f"preflight {c.name}: {c.message} {c.recommendation}".strip())


def configure_preflight(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "Exit status: 0 when the verdict is ok or warn, 1 when a check fails."
    parser.add_argument("--json", action="store_true", help="print the report as JSON (for programs)")
    parser.add_argument("--model", default=None, metavar="REPO_OR_PATH",
                        help=f"repo id or local folder to check for (default {DEFAULT_MODEL})")
    parser.add_argument("--target", default=None, metavar="DIR",
                        help="where the model would be downloaded (default: the model store, see QWEN_HOME)")


def run_preflight(args: argparse.Namespace) -> int:
    report = perform_preflight_checks(model=args.model, target_dir=args.target)
    print(report.to_json() if args.json else report.to_text())
    return 1 if report.status == FAIL else 0
