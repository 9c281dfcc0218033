"""Load policy: the fallback ladder, error classes, memory-mode choice and placement, attention backend.

``loading`` drives these; they are kept apart so the rules can be read (and tested) on their own, and so
the GPU engine has one place to plug a memory mode into (``apply_memory_mode``).

OOM ladder (``next_plan``): a lighter memory mode first (gpu -> model_offload -> group_offload ->
sequential; streamed -> group_offload), each step also shrinking the governor's pixel window by 25%; then a
smaller VRAM budget (``max_memory_fraction`` 0.9 -> 0.7 -> 0.5, the budget of the streamed engine). A load
that fails on bf16 itself moves to fp16. Transient errors (I/O, timeouts) retry the same plan.
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from qwen_core import devices
from qwen_core.errors import QwenError
from qwen_core.options import MemoryMode
from qwen_core.session_log import get_session_log

_GIB = 1024**3
# Activations, CUDA context and the VAE decode at ~1 MP need a few GiB beyond the weights.
ACTIVATION_HEADROOM_GIB = 3.0
LIGHTER_MODE: dict[MemoryMode, MemoryMode] = {
    MemoryMode.GPU: MemoryMode.MODEL_OFFLOAD,
    MemoryMode.MODEL_OFFLOAD: MemoryMode.GROUP_OFFLOAD,
    MemoryMode.STREAMED: MemoryMode.GROUP_OFFLOAD,
    MemoryMode.GROUP_OFFLOAD: MemoryMode.SEQUENTIAL,
}
MIN_MEMORY_FRACTION = 0.5
PIXEL_SCALE_PER_OOM = 0.75
SDPA = devices.SDPA_BACKEND

# ---- process-wide attention fallback ---------------------------------------------------------------
# Once a backend produced NaN/Inf latents in this process, every pipeline uses SDPA from then on: the
# fault is in the kernel/card combination, not in one model.
_sdpa_forced_reason: str | None = None


def force_sdpa(reason: str) -> None:
    global _sdpa_forced_reason
    if _sdpa_forced_reason is None:
        _sdpa_forced_reason = reason
        get_session_log().warning(f"attention: SDPA for the rest of this process ({reason})")


def sdpa_forced() -> str | None:
    """The reason SDPA was forced for this process, or None."""
    return _sdpa_forced_reason


def _reset_sdpa_flag() -> None:
    """For tests only."""
    global _sdpa_forced_reason
    _sdpa_forced_reason = None


# ---- plans, attempts, error classes -----------------------------------------------------------------
@dataclass(frozen=True)
class LoadPlan:
    """How to load: memory mode, dtype, the VRAM fraction the streamed engine may use, the window scale."""

    memory_mode: MemoryMode
    dtype: torch.dtype
    max_memory_fraction: float = 0.9
    pixel_scale: float = 1.0

    def describe(self) -> str:
        return (f"{self.memory_mode.value}/{devices.dtype_name(self.dtype)}, max_memory "
                f"{self.max_memory_fraction:.0%}, pixel window x{self.pixel_scale:.2f}")  # fmt: skip


@dataclass(frozen=True)
class LoadAttempt:
    number: int
    plan: LoadPlan
    outcome: str  # "ok" | "oom" | "transient" | "dtype" | "error"
    reason: str
    seconds: float

    def describe(self) -> str:
        return f"attempt {self.number} ({self.plan.describe()}): {self.outcome} in {self.seconds:.2f} s - {self.reason}"


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 6
    base_delay_s: float = 0.5
    max_delay_s: float = 8.0
    sleep: Callable[[float], None] = time.sleep

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Exponential backoff with "equal jitter": half fixed, half random, so retries of several
        processes that failed together (a flaky NFS mount) do not hammer it in lockstep."""
        cap = min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))
        return cap / 2 + rng.uniform(0, cap / 2)


_PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def is_oom(err: BaseException) -> bool:
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def classify_error(err: BaseException) -> str:
    """"oom", "transient" (retry the same plan), "dtype" (bf16 failed: try fp16) or "error" (give up)."""
    if is_oom(err):
        return "oom"
    if isinstance(err, TimeoutError) or (isinstance(err, OSError) and not isinstance(err, _PERMANENT_OS_ERRORS)):
        return "transient"
    text = str(err)
    if type(err).__name__ == "SafetensorError" and "i/o" in text.lower():
        return "transient"
    if isinstance(err, (RuntimeError, TypeError, NotImplementedError)) and ("BFloat16" in text or "bf16" in text):
        return "dtype"
    return "error"


def next_plan(plan: LoadPlan, kind: str) -> LoadPlan | None:
    """The plan to try after a failure of this kind, or None when the ladder is exhausted."""
    if kind == "transient":
        return plan
    if kind == "dtype":
        return replace(plan, dtype=torch.float16) if plan.dtype == torch.bfloat16 else None
    if kind != "oom":
        return None
    smaller_window = round(plan.pixel_scale * PIXEL_SCALE_PER_OOM, 4)
    lighter = LIGHTER_MODE.get(plan.memory_mode)
    if lighter is not None:
        return replace(plan, memory_mode=lighter, pixel_scale=smaller_window)
    if plan.max_memory_fraction - 0.2 >= MIN_MEMORY_FRACTION - 1e-9:
        return replace(plan, max_memory_fraction=round(plan.max_memory_fraction - 0.2, 2), pixel_scale=smaller_window)
    return None


def streaming_available() -> bool:
    return importlib.util.find_spec("qwen_core.streaming") is not None


def choose_memory_mode(sizes: dict[str, int], config: devices.DeviceConfig) -> tuple[MemoryMode, str]:
    """``auto``: the heaviest (fastest) mode whose weights (``sizes``: bytes per component) + headroom fit in
    free VRAM."""
    if not config.device.startswith("cuda") or config.vram_free_gb is None:
        return MemoryMode.GPU, f"device {config.device}: weights stay resident on it"
    gib = {name: size / _GIB for name, size in sizes.items()}
    total, largest = sum(gib.values()), max(gib.values(), default=0.0)
    free = config.vram_free_gb
    facts = f"weights {total:.1f} GiB (largest part {largest:.1f}), {free:.1f} GiB VRAM free"
    if free >= total + ACTIVATION_HEADROOM_GIB:
        return MemoryMode.GPU, f"{facts}: all resident"
    if free >= largest + ACTIVATION_HEADROOM_GIB:
        return MemoryMode.MODEL_OFFLOAD, f"{facts}: one model at a time on the GPU"
    if streaming_available():
        return MemoryMode.STREAMED, f"{facts}: transformer blocks streamed"
    return MemoryMode.GROUP_OFFLOAD, f"{facts}: group offload (block level)"


def apply_memory_mode(pipe: Any, plan: LoadPlan, config: devices.DeviceConfig) -> str:
    """Place a freshly loaded pipeline according to the plan. The one place memory modes are applied."""
    device = torch.device(config.device)
    mode = plan.memory_mode
    if device.type == "cpu":
        pipe.to(device)
        note = "" if mode is MemoryMode.GPU else f" ({mode.value} needs an accelerator: ignored)"
        return f"resident on cpu{note}"
    if mode is MemoryMode.GPU:
        pipe.to(device)
        return f"gpu on {device}{enable_fast_path(pipe)}"
    elif mode is MemoryMode.MODEL_OFFLOAD:
        pipe.enable_model_cpu_offload(device=device)
    elif mode is MemoryMode.GROUP_OFFLOAD:
        pipe.enable_group_offload(
            onload_device=device, offload_device=torch.device("cpu"), offload_type="block_level",
            num_blocks_per_group=1, use_stream=device.type == "cuda",
        )  # fmt: skip
    elif mode is MemoryMode.SEQUENTIAL:
        pipe.enable_sequential_cpu_offload(device=device)
    elif mode is MemoryMode.STREAMED:
        from qwen_core import governor

        budget = (config.vram_free_gb or config.vram_total_gb or 0.0) * plan.max_memory_fraction
        # The engine reserves activation memory for the largest image: the window the governor will allow.
        window = int(governor.max_pixels(config.vram_total_gb, devices.dtype_name(plan.dtype), mode.value) * plan.pixel_scale)
        _streaming_module().enable_streamed_offload(pipe, device=device, budget_gib=budget, max_pixels=window)
        return f"streamed on {device} within {budget:.1f} GiB (activations for {window / 1e6:.2f} MP)"
    else:
        raise ValueError(f"memory mode {mode} must be resolved before loading")
    return f"{mode.value} on {device}"


def enable_fast_path(pipe: Any) -> str:
    """Full-VRAM speed-ups measured in bench/RESULTS.md; returns a note for the placement text.

    Batched true CFG (cond + uncond in one forward) is always on: bit-identical for equal prompt lengths, within
    bf16 noise otherwise. Regional compilation (``compile_repeated_blocks``) saves ~20% per step (632 -> 502 ms on an H100) but costs
    ~15 s of compile on the first image, so it is opt-in: QWEN_COMPILE=1.
    """
    from qwen_core.cfg_batch import enable_cfg_batching

    batched = "batched CFG" if enable_cfg_batching(pipe) is not None else "CFG as two forwards (this model's family)"
    if os.environ.get("QWEN_COMPILE", "").strip() == "1":
        pipe.transformer.compile_repeated_blocks(fullgraph=True)
        return f" ({batched}, regional compile)"
    return f" ({batched})"


def _streaming_module() -> Any:
    try:
        return importlib.import_module("qwen_core.streaming")
    except ImportError as err:
        if err.name != "qwen_core.streaming":
            raise
        raise QwenError(
            "memory mode 'streamed' needs qwen_core/streaming.py (the low-VRAM engine), which this install lacks.",
            fix="Choose model_offload or group_offload, or update the pack.",
        ) from err


def _set_backend(transformer: Any, backend: str) -> None:
    # diffusers warns "experimental feature" on every call; our choice and its reason are logged instead.
    diffusers_logger = logging.getLogger("diffusers.models.modeling_utils")
    level = diffusers_logger.level
    diffusers_logger.setLevel(logging.ERROR)
    try:
        transformer.set_attention_backend(backend)
    finally:
        diffusers_logger.setLevel(level)


def apply_attention(pipe: Any, backend: str) -> str:
    """Set the transformer's attention backend; SDPA when the requested one cannot be set."""
    if backend.endswith("_hub"):
        # diffusers' *_hub backends download kernels from the Hub at runtime: never from here.
        backend = SDPA
    transformer = getattr(pipe, "transformer", None)
    if transformer is None or not hasattr(transformer, "set_attention_backend"):
        return "default"
    try:
        _set_backend(transformer, backend)
    except Exception as err:  # noqa: BLE001 - an unavailable kernel must not stop generation
        if backend == SDPA:
            raise
        get_session_log().warning(f"attention: {backend} could not be set ({err}); using SDPA")
        _set_backend(transformer, SDPA)
        return SDPA
    return backend


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()
