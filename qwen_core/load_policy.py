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
from qwen_core.pipeline_state import state_of
from qwen_core.placement.spec import Placement
from qwen_core.session_log import get_session_log
from qwen_core.speed.options import SpeedOptions

LIGHTER_MODE: dict[MemoryMode, MemoryMode] = {
    MemoryMode.GPU: MemoryMode.MODEL_OFFLOAD,
    MemoryMode.MODEL_OFFLOAD: MemoryMode.GROUP_OFFLOAD,
    MemoryMode.STREAMED: MemoryMode.GROUP_OFFLOAD,
    MemoryMode.GROUP_OFFLOAD: MemoryMode.SEQUENTIAL,
}
# With components on several devices (``qwen_core.placement``) diffusers' offload modes, which run every
# component on one device, do not apply: the text encoder has its card, the transformer's card is resident or
# streamed. A split transformer is resident only.
PLACED_LIGHTER_MODE: dict[MemoryMode, MemoryMode] = {MemoryMode.GPU: MemoryMode.STREAMED}
PLACED_MODES = (MemoryMode.GPU, MemoryMode.STREAMED)
SPLIT_MODES = (MemoryMode.GPU,)
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
    placement: Placement | None = None  # None or single: everything on the loader's device
    other_cards: tuple[tuple[str, float], ...] = ()  # (device, free GiB) of the placement's other CUDA cards

    def describe(self) -> str:
        reading = "" if self.vram_gib is None else f", {self.vram_gib:.1f} GiB VRAM free"
        placed = "" if self.placement is None or self.placement.is_single else f", devices {self.placement.key}"
        return (f"{self.memory_mode.value}/{devices.dtype_name(self.dtype)}, max_memory "
                f"{self.max_memory_fraction:.0%}, pixel window x{self.pixel_scale:.2f}{reading}{placed}")  # fmt: skip

    @property
    def placed(self) -> bool:
        """Components on more than one device (``qwen_core.placement``)."""
        return self.placement is not None and not self.placement.is_single


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


def allowed_modes(placement: Placement | None) -> tuple[MemoryMode, ...] | None:
    """The memory modes a placement can run (None: all of them)."""
    if placement is None or placement.is_single:
        return None
    return SPLIT_MODES if placement.is_split else PLACED_MODES


def next_plan(plan: LoadPlan, kind: str) -> LoadPlan | None:
    """The plan to try after a failure of this kind, or None when the ladder is exhausted. A placed plan
    (components on several devices) steps gpu -> streamed, then down the streamed engine's budget."""
    if kind == "transient":
        return plan
    if kind == "dtype":
        return replace(plan, dtype=torch.float16) if plan.dtype == torch.bfloat16 else None
    if kind != "oom":
        return None
    smaller_window = round(plan.pixel_scale * PIXEL_SCALE_PER_OOM, 4)
    ladder, allowed = LIGHTER_MODE, allowed_modes(plan.placement)
    if allowed is not None:
        ladder = {k: v for k, v in PLACED_LIGHTER_MODE.items() if k in allowed and v in allowed}
        if plan.memory_mode not in allowed:
            return None
        if plan.memory_mode is MemoryMode.GPU and MemoryMode.GPU not in ladder:
            return None  # a split transformer: resident or nothing
    lighter = ladder.get(plan.memory_mode)
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
    if plan.placed:
        return _apply_placed(pipe, plan, family)
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
        return _apply_streamed(pipe, plan, device, family)
    else:
        raise ValueError(f"memory mode {mode} must be resolved before loading")
    return f"{mode.value} on {device}"


def _apply_streamed(pipe: Any, plan: LoadPlan, device: torch.device, family: str,
                    placed_elsewhere: tuple[str, ...] = ()) -> str:
    """The streamed engine on ``device``, its budget from the plan's reading of that card."""
    engine = _streaming_module()
    if plan.vram_gib is None and device.type == "cuda":
        raise ValueError("`plan.vram_gib`: the streamed engine's budget comes from the plan's VRAM reading; "
                         "this plan has none.")
    if plan.vram_gib is None:  # a CPU main device (tests): the engine's own default budget (available RAM)
        budget, planned = None, mm.family_model(family).reference_pixels
    else:
        budget, planned = mm.streamed_budget(plan.vram_gib, dtype=devices.dtype_name(plan.dtype), family=family,
                                             memory_fraction=plan.max_memory_fraction, pixel_scale=plan.pixel_scale)
    handle = engine.enable_streamed_offload(pipe, device=device, budget_gib=budget, max_pixels=planned,
                                            family=family, placed_elsewhere=placed_elsewhere)
    from qwen_core.speed.apply import apply_speed

    extra = apply_speed(pipe, plan.speed, streamed=True)
    shown = budget if budget is not None else handle.options["budget_gib"]
    return (f"streamed on {device} within {shown:.1f} GiB (activations for {planned / 1e6:.2f} MP)"
            f"{f'; {extra}' if extra else ''}")


def _apply_placed(pipe: Any, plan: LoadPlan, family: str) -> str:
    """Components on several devices (``qwen_core.placement``): gpu = each resident on its card (a split
    transformer's blocks on theirs), streamed = the streamed engine on the main card with the text encoder on
    its own card. The boundary hooks are kept in the pipeline's state."""
    from qwen_core.placement.hooks import apply_placement, remove_placement

    placement, mode = plan.placement, plan.memory_mode
    remove_placement(state_of(pipe).devices)  # an earlier attempt's hooks (a source that reuses its pipeline)
    allowed = allowed_modes(placement) or ()
    if mode not in allowed:
        raise ValueError(f"memory mode {mode.value} cannot run with devices {placement.key} "
                         f"(allowed: {', '.join(m.value for m in allowed)})")
    main = torch.device(placement.main)
    if mode is MemoryMode.STREAMED:
        text = _apply_streamed(pipe, plan, main, family, placed_elsewhere=("text_encoder",))
        handle = apply_placement(pipe, placement, transformer=False)
        state_of(pipe).devices = handle
        return f"{text}; text encoder on {placement.text_encoder_device}"
    handle = apply_placement(pipe, placement)
    state_of(pipe).devices = handle
    if main.type == "cpu":  # as a single CPU device: no batched CFG, compile only when asked for
        from qwen_core.speed.apply import apply_speed

        extra = apply_speed(pipe, plan.speed)
        return f"resident: {handle.describe()}{f' ({extra})' if extra else ''}"
    return f"gpu: {handle.describe()}{enable_fast_path(pipe, plan.speed)}"


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
