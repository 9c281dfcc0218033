"""Load policy: the fallback ladder, error classes, memory-mode placement, attention backend. The ``auto`` memory
mode is ``qwen_core.memory_model.choose_memory_mode`` (the decision Preflight and the governor use too).

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
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from qwen_core import devices
from qwen_core import memory_model as mm
from qwen_core.errors import QwenError
from qwen_core.memory_model import streaming_available as streaming_available  # re-exported for loading
from qwen_core.options import MemoryMode
from qwen_core.session_log import get_session_log
from qwen_core.speed.options import SpeedOptions

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
    """How to load: memory mode, dtype, the VRAM fraction the streamed engine may use, the window scale, the
    one free-VRAM reading (GiB) the mode, the streamed budget and the governor's window are decided from (taken
    at load time on CUDA; None on other devices), and the speed-ups (compile, compute; ``qwen_core.speed``)."""

    memory_mode: MemoryMode
    dtype: torch.dtype
    max_memory_fraction: float = mm.DEFAULT_MEMORY_FRACTION
    pixel_scale: float = 1.0
    vram_gib: float | None = None
    speed: SpeedOptions = SpeedOptions()

    def describe(self) -> str:
        reading = "" if self.vram_gib is None else f", {self.vram_gib:.1f} GiB VRAM free"
        return (f"{self.memory_mode.value}/{devices.dtype_name(self.dtype)}, max_memory "
                f"{self.max_memory_fraction:.0%}, pixel window x{self.pixel_scale:.2f}{reading}")  # fmt: skip


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


def auto_memory_mode(sizes: dict[str, int], config: devices.DeviceConfig, dtype: torch.dtype,
                     vram_gib: float | None, family: str = mm.DEFAULT_FAMILY) -> mm.MemoryChoice:
    """``auto``: ``memory_model.choose_memory_mode`` for these weights (``sizes``: bytes per component in
    ``dtype``, from the model source) and one free-VRAM reading; ``family`` is the family's memory-model key."""
    weights = mm.WeightSizes.from_bytes(sizes)
    return mm.choose_memory_mode(weights, vram_gib, family=family, dtype=devices.dtype_name(dtype),
                                 device=config.device)


def apply_memory_mode(pipe: Any, plan: LoadPlan, config: devices.DeviceConfig, family: str = mm.DEFAULT_FAMILY) -> str:
    """Place a freshly loaded pipeline according to the plan. The one place memory modes are applied.
    ``family`` is the family's memory-model key (the streamed engine's budget and activation reserve)."""
    device = torch.device(config.device)
    mode = plan.memory_mode
    if device.type == "cpu":
        pipe.to(device)
        note = "" if mode is MemoryMode.GPU else f" ({mode.value} needs an accelerator: ignored)"
        from qwen_core.speed.apply import apply_speed

        extra = apply_speed(pipe, plan.speed)  # compile on the CPU only when asked for (QWEN_COMPILE=1)
        return f"resident on cpu{note}{f' ({extra})' if extra else ''}"
    if mode is MemoryMode.GPU:
        pipe.to(device)
        return f"gpu on {device}{enable_fast_path(pipe, plan.speed)}"
    elif mode is MemoryMode.MODEL_OFFLOAD:
        pipe.enable_model_cpu_offload(device=device)
    elif mode is MemoryMode.GROUP_OFFLOAD:
        # The VAE stays whole on the device (0.25-0.7 GiB): block-level group offload onloads a model's loose
        # layers (post_quant_conv) in a hook on forward(), but the pipelines call vae.decode(), so those layers
        # stayed on the CPU ("weight type CPUBFloat16Type" at the decode, H200 family run 2026-12-02).
        pipe.enable_group_offload(
            onload_device=device, offload_device=torch.device("cpu"), offload_type="block_level",
            num_blocks_per_group=1, use_stream=device.type == "cuda", exclude_modules=["vae"],
        )  # fmt: skip
    elif mode is MemoryMode.SEQUENTIAL:
        pipe.enable_sequential_cpu_offload(device=device)
    elif mode is MemoryMode.STREAMED:
        engine = _streaming_module()
        if plan.vram_gib is None:
            raise ValueError("`plan.vram_gib`: the streamed engine's budget comes from the plan's VRAM reading; "
                             "this plan has none.")
        budget, planned = mm.streamed_budget(plan.vram_gib, dtype=devices.dtype_name(plan.dtype), family=family,
                                             memory_fraction=plan.max_memory_fraction, pixel_scale=plan.pixel_scale)
        engine.enable_streamed_offload(pipe, device=device, budget_gib=budget, max_pixels=planned, family=family)
        from qwen_core.speed.apply import apply_speed

        extra = apply_speed(pipe, plan.speed, streamed=True)
        return (f"streamed on {device} within {budget:.1f} GiB (activations for {planned / 1e6:.2f} MP)"
                f"{f'; {extra}' if extra else ''}")
    else:
        raise ValueError(f"memory mode {mode} must be resolved before loading")
    return f"{mode.value} on {device}"


def enable_fast_path(pipe: Any, speed: SpeedOptions | None = None) -> str:
    """Full-VRAM speed-ups measured in bench/RESULTS.md; returns a note for the placement text.

    Batched true CFG (cond + uncond in one forward) is always on: bit-identical for equal prompt lengths, within
    bf16 noise otherwise. ``qwen_core.speed.apply_speed`` adds the real-valued RoPE (exact), optional fp8
    compute and regional compilation with a persistent compile cache (on by default for CUDA: QWEN_COMPILE=0 or
    the Loader's ``compile`` widget turns it off). ``speed`` None: resolved from the environment.
    """
    from qwen_core.cfg_batch import enable_cfg_batching
    from qwen_core.speed.apply import apply_speed
    from qwen_core.speed.options import resolve_speed

    batched = "batched CFG" if enable_cfg_batching(pipe) is not None else "CFG as two forwards (this model's family)"
    if speed is None:
        speed = resolve_speed(device=str(next(pipe.transformer.parameters()).device))
    extra = apply_speed(pipe, speed)
    return f" ({batched}{f', {extra}' if extra else ''})"


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
    from qwen_core.speed.apply import apply_attention_kernel

    # flash-attn 4 runs inside our RoPE processors; diffusers' dispatcher keeps SDPA for masked calls.
    if apply_attention_kernel(transformer, backend):
        _set_backend(transformer, SDPA)
        return backend
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
