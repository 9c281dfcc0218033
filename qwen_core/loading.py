"""Eager processor, lazy weights: ``PipelineLoader`` and ``load_model_with_retry``.

Constructing a loader is cheap and does everything that can fail fast: the folder is validated (see
``integrity``: components present, safetensors only, headers and sizes intact, an allowlisted pipeline
class), and the tokenizer/processor and scheduler are built. The weights (tens of GB for the real model)
load on the first ``generate`` or an explicit ``load()``. A failed load keeps the light parts, records why,
and the next call tries again.

Loading retries with exponential backoff and jitter. Transient errors (I/O, timeouts) retry the same plan;
an out-of-memory error first frees memory, then falls back one step along a documented ladder:

    gpu -> model_offload -> group_offload -> sequential   (lighter memory mode; each step also hands the
    streamed -> group_offload -> sequential                 governor a 25% smaller pixel window)
    then: max_memory_fraction 0.9 -> 0.7 -> 0.5           (VRAM budget of the streamed engine + window)
    bf16 -> fp16 when a load fails on bf16 itself (an op without a bf16 kernel)

Every attempt is in ``loader.attempts`` and in the session log. Safety: ``use_safetensors=True``,
``local_files_only=True``, no remote code (the pipeline class and component libraries are allowlisted).
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qwen_core import devices
from qwen_core.errors import InvalidInputError, ModelLoadError, QwenError
from qwen_core.families import ModelFamily
from qwen_core.integrity import check_model_folder
from qwen_core.load_policy import (
    LIGHTER_MODE,
    SDPA,
    LoadAttempt,
    LoadPlan,
    RetryPolicy,
    _reset_sdpa_flag,
    allowed_modes,
    apply_attention,
    apply_memory_mode,
    auto_memory_mode,
    classify_error,
    force_sdpa,
    free_memory,
    is_oom,
    next_plan,
    sdpa_forced,
    streaming_available,
)
from qwen_core.lora.spec import LoraSpec, as_specs
from qwen_core.memory import get_residency_manager
from qwen_core.model_source import FolderSource, ModelSource
from qwen_core.options import AttentionChoice, CompileChoice, ComputeChoice, DtypeChoice, MemoryMode
from qwen_core.pipeline_state import state_of
from qwen_core.placement import plan as placement_plan
from qwen_core.placement.spec import Placement, is_auto, normalize_device, parse_devices
from qwen_core.session_log import get_session_log, redact
from qwen_core.speed.options import resolve_speed

# The policy (ladder, placement, attention) lives in load_policy; callers may import it from here.
__all__ = [
    "LIGHTER_MODE", "SDPA", "LoadAttempt", "LoadPlan", "PipelineLoader", "RetryPolicy",
    "_reset_sdpa_flag", "add_before_load_hook", "apply_attention", "apply_memory_mode", "auto_memory_mode",
    "check_model_folder", "classify_error", "force_sdpa", "free_memory", "is_oom", "load_model_with_retry",
    "next_plan", "remove_before_load_hook", "sdpa_forced", "streaming_available",
]  # fmt: skip

# ---- hooks (the ComfyUI bridge asks ComfyUI to free its own models before our weights load) ---------
_BEFORE_LOAD_HOOKS: list[Callable[[int], None]] = []


def add_before_load_hook(hook: Callable[[int], None]) -> None:
    """``hook(bytes_needed_on_device)`` runs before each weight-load attempt; errors in it are logged only."""
    if hook not in _BEFORE_LOAD_HOOKS:
        _BEFORE_LOAD_HOOKS.append(hook)


def remove_before_load_hook(hook: Callable[[int], None]) -> None:
    if hook in _BEFORE_LOAD_HOOKS:
        _BEFORE_LOAD_HOOKS.remove(hook)


def _estimate_device_bytes(sizes: dict[str, int], plan: LoadPlan) -> int:
    if plan.memory_mode is MemoryMode.GPU:
        return sum(sizes.values())
    if plan.memory_mode is MemoryMode.MODEL_OFFLOAD:
        return max(sizes.values(), default=0)
    return 0


class PipelineLoader:
    """A light handle on one model: the source validated, tokenizer/processor and scheduler built now, weights on
    first use. ``model`` is a diffusers folder (path) or any ``ModelSource``. ``attempts`` lists every
    weight-load attempt (also in the session log). ``placement``: which card runs which component (the ``devices``
    text of ``qwen_core.placement.spec``, or a ``Placement``); ``devices`` holds the resolved ``Placement``."""

    def __init__(
        self,
        model: str | Path | ModelSource,
        *,
        dtype: str | DtypeChoice = "auto",
        memory_mode: str | MemoryMode = "auto",
        attention: str | AttentionChoice = "auto",
        device: str | None = None,
        retry: RetryPolicy | None = None,
        loras: Any = (),
        compile: str | CompileChoice = "auto",
        compute: str | ComputeChoice = "auto",
        placement: str | Placement = "single",
    ) -> None:
        self.dtype_choice = DtypeChoice.parse(dtype, "dtype")
        self.memory_mode_choice = MemoryMode.parse(memory_mode, "memory_mode")
        self.attention_choice = AttentionChoice.parse(attention, "attention")
        self.source = model if isinstance(model, ModelSource) else FolderSource(model)
        if self.memory_mode_choice.value in self.source.unsupported_memory_modes:
            raise InvalidInputError("memory_mode", f"{self.memory_mode_choice.value} cannot hold the weights of "
                                    f"{self.source.path.name} (quantised parameters).", fix="Choose streamed or auto.")
        self.path = self.source.path
        self.device_config = devices.get_device_config(
            device=device, dtype=self.dtype_choice.value, attention=self.attention_choice.value
        )
        self.retry = retry or RetryPolicy()
        self.light_components = self.source.light_components()
        self.configs = self.source.configs()
        # Which card runs which component (qwen_core.placement); the main card becomes this loader's device.
        self.placement_choice = placement
        self.devices, self.devices_reason, other_cards = self._resolve_devices(placement, device)
        # Until the first load takes a fresh reading, the plan carries the one from when this handle was made.
        reading = self.device_config.vram_free_gb if self.device_config.device.startswith("cuda") else None
        mode, self.memory_mode_reason = self._initial_mode(reading)
        # Speed-ups (qwen_core.speed): compile on by default for CUDA, exact compute unless fp8 is asked for.
        self.compile_choice = CompileChoice.parse(compile, "compile")
        self.compute_choice = ComputeChoice.parse(compute, "compute")
        self.speed = resolve_speed(self.compile_choice, self.compute_choice, device=self.device_config.device)
        self.plan = LoadPlan(memory_mode=mode, dtype=self.device_config.dtype, vram_gib=reading, speed=self.speed,
                             placement=self.devices, other_cards=other_cards)
        self.attempts: list[LoadAttempt] = []
        self.last_error: BaseException | None = None
        self.placement = ""
        self.attention_backend = ""
        self._lock = threading.RLock()
        self.loras: tuple[LoraSpec, ...] = ()
        self.lora_report: Any = None  # lora.fuse.LoraReport of the last change
        self.set_loras(loras)
        get_session_log().info(
            f"loader: {self.path} ({self.family.display_name}) on {self.device_config.device}; plan "
            f"{self.plan.describe()} ({self.memory_mode_reason}); attention {self.device_config.attention_backend} "
            f"({self.device_config.attention_reason}); {self.speed.describe()} ({self.speed.reason}); devices "
            f"{self.devices.describe(self.num_blocks)} ({self.devices_reason}); weights load on first use"
        )

    @property
    def family(self) -> ModelFamily:
        return self.source.family

    def weight_bytes(self, dtype: Any = None) -> dict[str, int]:
        """Bytes of each weighted component in ``dtype`` (default: the plan's)."""
        return self.source.weight_bytes(dtype if dtype is not None else self.plan.dtype)

    @property
    def num_blocks(self) -> int:
        """The transformer's blocks (from its config; 60 for Qwen-Image)."""
        config = self.configs.get("transformer") or {}
        return int(config.get("num_layers", 60))

    @property
    def unsupported_memory_modes(self) -> frozenset[str]:
        """Modes the source cannot hold, and modes the placement cannot run."""
        allowed = allowed_modes(self.devices)
        placed = frozenset() if allowed is None else frozenset(m.value for m in MemoryMode
                                                                if m is not MemoryMode.AUTO and m not in allowed)
        return frozenset(self.source.unsupported_memory_modes) | placed

    def main_card_bytes(self, dtype: Any) -> dict[str, int]:
        """Bytes per component on the main card: the text encoder's are not there when it has its own device,
        a split transformer's only in proportion to the blocks that run there."""
        sizes = self.source.weight_bytes(dtype)
        if self.devices.is_single:
            return sizes
        from qwen_core import memory_model

        held = placement_plan.main_card_weights(self.devices, memory_model.WeightSizes.from_bytes(sizes),
                                                self.num_blocks)
        return {name: int(gib * 1024**3) for name, gib in held.parts if gib > 0}

    def _resolve_devices(self, choice: str | Placement, device: str | None
                         ) -> tuple[Placement, str, tuple[tuple[str, float], ...]]:
        """(placement, why, readings of its other CUDA cards). ``auto`` plans from every visible card's free VRAM;
        an explicit transformer device becomes this loader's device."""
        main = self.device_config.device
        if is_auto(choice):
            placement, reason = self._plan_devices(main)
        else:
            placement, reason = parse_devices(choice, main), "as requested"
        if normalize_device(main, "device") != placement.main:
            if device not in (None, "", "auto") and normalize_device(device, "device") != placement.main:
                raise InvalidInputError("devices", f"names {placement.main} for the transformer, but device is "
                                        f"{device}.", fix="Leave device unset, or make them agree.")
            self.device_config = devices.get_device_config(device=placement.main, dtype=self.dtype_choice.value,
                                                           attention=self.attention_choice.value)
        if not placement.is_single:
            self._check_devices(placement)
        others = tuple((d, devices.probe_hardware(d).vram_free_gb or 0.0) for d in placement.cuda_devices()
                       if d != placement.main)
        return placement, reason, others

    def _plan_devices(self, main: str) -> tuple[Placement, str]:
        probe = devices.probe_hardware(main)
        if not main.startswith("cuda") or probe.cuda_device_count < 2:
            return Placement.single(main), "auto: one device"
        first = normalize_device(main, "device")
        names = [first] + [f"cuda:{i}" for i in range(probe.cuda_device_count) if f"cuda:{i}" != first]
        cards = [placement_plan.Card(d, devices.probe_hardware(d).vram_free_gb or 0.0) for d in names]
        from qwen_core import memory_model

        weights = memory_model.WeightSizes.from_bytes(self.source.weight_bytes(self.device_config.dtype))
        decision = placement_plan.plan_placement(weights, cards, self.num_blocks,
                                                 family=self.family.memory_model_key, dtype=self.device_config.dtype)
        return decision.placement, f"auto: {decision.reason}"

    def _check_devices(self, placement: Placement) -> None:
        """Every CUDA device the placement names is visible; the memory mode is one it can run."""
        cuda = placement.cuda_devices()
        if cuda:
            count = devices.probe_hardware(cuda[0]).cuda_device_count
            missing = [d for d in cuda if int(d.partition(":")[2]) >= count]
            if missing:
                raise InvalidInputError("devices", f"{', '.join(missing)}: only {count} CUDA device(s) are visible.",
                                        fix="Check CUDA_VISIBLE_DEVICES (ComfyUI's --cuda-device shows it one "
                                            "card), or choose single.")
        allowed = allowed_modes(placement) or ()
        mode = self.memory_mode_choice
        if mode is not MemoryMode.AUTO and mode not in allowed:
            raise InvalidInputError("memory_mode", f"{mode.value} cannot run with devices {placement.key}: "
                                    f"use {' or '.join(m.value for m in allowed)} (or auto).",
                                    fix="diffusers' offload modes run every component on one device.")

    def _initial_mode(self, vram_gib: float | None) -> tuple[MemoryMode, str]:
        if self.memory_mode_choice is MemoryMode.AUTO:
            if self.devices.is_split:
                return MemoryMode.GPU, "a split transformer runs resident"
            choice = auto_memory_mode(self.main_card_bytes(self.device_config.dtype), self.device_config,
                                      self.device_config.dtype, vram_gib, self.family.memory_model_key)
            return MemoryMode(choice.mode), choice.reason
        return self.memory_mode_choice, "as requested"

    # -- lazy part --
    @property
    def residency_key(self) -> tuple[str, ...]:
        """Key of this model in the process's residency registry (``memory.get_residency_manager``).

        Handles with the same folder, device, dtype and memory mode share one resident pipeline; the
        registry, not the handle, owns it (ComfyUI may cache a handle for ever, it must not pin 40 GB)."""
        cfg = self.device_config
        return (self.family.key, self.source.identity, cfg.device, self.dtype_choice.value, self.memory_mode_choice.value,
                "compiled" if self.speed.compile else "eager", self.speed.compute.value, self.devices.key)

    @property
    def pipeline(self) -> Any:
        """The resident pipeline, or None when not loaded (or evicted by another model's load)."""
        return get_residency_manager().get(self.residency_key)

    @property
    def is_loaded(self) -> bool:
        return self.pipeline is not None

    @property
    def tokenizer(self) -> Any:
        return self.light_components.get("tokenizer")

    @property
    def scheduler(self) -> Any:
        return self.light_components.get("scheduler")

    @property
    def dtype_name(self) -> str:
        return devices.dtype_name(self.plan.dtype)

    def set_loras(self, loras: Any) -> None:
        """The LoRA stack (``LoraSpec``s, ``(path, strength)`` pairs or ``FILE[:STRENGTH]``) the next ``load()``
        gives the pipeline. Each file is checked now against this model's layer shapes from its header alone
        (a pickle, another model's LoRA or a size mismatch is refused naming the first bad key). Not part of
        the residency key: changing LoRAs re-fuses the touched layers of the resident model, it never reloads."""
        from qwen_core.lora.targets import check_stack

        specs = as_specs(loras)
        if specs != self.loras:
            check_stack(specs, self.family, self.configs.get("transformer"), self.family.display_name)
        self.loras = specs

    def load(self) -> Any:
        """The loaded pipeline, loading it now if needed (with retries and fallbacks), carrying this loader's
        LoRA stack."""
        with self._lock:
            pipe = get_residency_manager().acquire(self.residency_key, lambda: load_model_with_retry(self))
            state = state_of(pipe)
            if state.load_plan is not None:  # it may have been loaded through another handle with the same key
                self.plan, self.placement = state.load_plan, state.placement
            wanted = self.wanted_attention()
            # Context parallelism chose its own backend (qwen_core.parallel.context): keep it.
            if state.attention_backend != wanted and state.context_parallel is None:
                state.attention_backend = apply_attention(pipe, wanted)
            self.attention_backend = state.attention_backend
            self._sync_loras(pipe)
            return pipe

    def _sync_loras(self, pipe: Any) -> None:
        from qwen_core.lora.fuse import apply_loras

        report = apply_loras(pipe, self.loras, self.family, model_name=self.family.display_name)
        if report.changed_layers or report.restored_layers:
            self.lora_report = report
            get_session_log().info(f"loader: {report.summary()}")

    def load_once(self, plan: LoadPlan) -> Any:
        """One attempt: build the pipeline (weights in CPU RAM, in the plan's dtype), then placement (memory
        mode) and attention."""
        pipe = self.source.build(plan.dtype, self.light_components)
        try:
            self.placement = apply_memory_mode(pipe, plan, self.device_config, self.family.memory_model_key)
            self.attention_backend = apply_attention(pipe, self.wanted_attention())
        except BaseException:
            self.source.discard(pipe)
            raise
        state = state_of(pipe)
        state.load_plan, state.placement, state.attention_backend = plan, self.placement, self.attention_backend
        return pipe

    def refresh_plan(self, plan: LoadPlan, *, rechoose: bool) -> LoadPlan:
        """``plan`` with one fresh free-VRAM reading (CUDA only), and with ``rechoose`` the ``auto`` memory mode
        decided again from it. That reading is the one the streamed budget and the governor's window use."""
        if not self.device_config.device.startswith("cuda"):
            return plan
        free = devices.probe_hardware(self.device_config.device).vram_free_gb
        others = tuple((d, devices.probe_hardware(d).vram_free_gb or 0.0) for d, _ in plan.other_cards)
        self._check_text_encoder_card(others, plan.dtype)
        if not rechoose or self.devices.is_split:
            return dataclasses.replace(plan, vram_gib=free, other_cards=others)
        choice = auto_memory_mode(self.main_card_bytes(plan.dtype), self.device_config, plan.dtype, free,
                                  self.family.memory_model_key)
        mode = MemoryMode(choice.mode)
        if mode is not plan.memory_mode:
            get_session_log().info(f"loader: auto memory mode now {mode.value} (was {plan.memory_mode.value}): {choice.reason}")
        self.memory_mode_reason = choice.reason
        return dataclasses.replace(plan, memory_mode=mode, vram_gib=free, other_cards=others)

    def _check_text_encoder_card(self, readings: tuple[tuple[str, float], ...], dtype: Any) -> None:
        """The text encoder's own card must hold it (before any weight moves there)."""
        te_device = self.devices.text_encoder
        free = dict(readings).get(te_device) if te_device else None
        te_gib = self.source.weight_bytes(dtype).get("text_encoder", 0) / 1024**3
        if free is not None and not placement_plan.text_encoder_fits(free, te_gib):
            raise InvalidInputError("devices", f"the text encoder needs {te_gib:.1f} GiB (+"
                                    f"{placement_plan.TEXT_ENCODER_MARGIN_GIB:g}) on {te_device}, which has "
                                    f"{free:.1f} GiB free.", fix="Free that card, put the text encoder on another "
                                    "card or on cpu, or choose auto.")

    def wanted_attention(self) -> str:
        return SDPA if sdpa_forced() else self.device_config.attention_backend

    def switch_to_sdpa(self, reason: str) -> None:
        """Use SDPA for the loaded pipeline and, from now on, for every pipeline in this process."""
        force_sdpa(reason)
        pipe = self.pipeline
        if pipe is not None and self.attention_backend != SDPA:
            self.attention_backend = state_of(pipe).attention_backend = apply_attention(pipe, SDPA)

    def unload(self) -> None:
        """Drop the weights (the tokenizer/scheduler stay); the next use loads them again."""
        with self._lock:
            if get_residency_manager().release(self.residency_key):
                get_session_log().info(f"loader: unloaded weights of {self.path}")

    def governor_inputs(self, extra_pixels: int = 0, pixel_cost: float = 1.0, cfg_branches: int = 2) -> dict[str, Any]:
        """Keyword arguments for ``governor.clamp_image_size`` that describe this loader's situation: the plan's
        VRAM reading, memory mode and dtype, the family and its weights, what the streamed engine planned for;
        ``extra_pixels``/``pixel_cost``: what reference images and Layered's frames add to the sequence;
        ``cfg_branches``: forwards per step (a per-branch reference cache counts each)."""
        from qwen_core import governor, memory_model

        plan = self.plan
        weights = memory_model.WeightSizes.from_bytes(self.main_card_bytes(plan.dtype))
        family = self.family.memory_model_key
        planned = None
        if plan.memory_mode is MemoryMode.STREAMED and plan.vram_gib is not None:
            planned = memory_model.streamed_budget(plan.vram_gib, dtype=self.dtype_name, pixel_scale=plan.pixel_scale,
                                                   memory_fraction=plan.max_memory_fraction, family=family)[1]
        situation = governor.Situation(plan.vram_gib, plan.memory_mode.value, self.dtype_name, family,
                                       weights=weights if weights.parts else None,
                                       memory_fraction=plan.max_memory_fraction, plan_pixels=planned,
                                       extra_pixels=extra_pixels, pixel_cost=pixel_cost, cfg_branches=cfg_branches,
                                       other_cards=self._other_cards(plan))
        max_pixels = None  # the governor derives the window from the situation itself
        if plan.pixel_scale < 1:  # an OOM fallback shrank the window
            limit = governor.memory_window(situation).pixels
            max_pixels = max(int(limit * plan.pixel_scale), 16 * 16)
        return {"situation": situation, "max_pixels": max_pixels}

    def _other_cards(self, plan: LoadPlan) -> tuple[Any, ...]:
        """The governor's view of the cards that run only transformer blocks (a split): reading + what they hold."""
        from qwen_core import governor, memory_model

        if not self.devices.is_split or plan.vram_gib is None:
            return ()
        sizes = memory_model.WeightSizes.from_bytes(self.weight_bytes(plan.dtype))
        loads = {c.device: c.weights for c in placement_plan.card_loads(self.devices, sizes, self.num_blocks)}
        return tuple(governor.OtherCard(device, free, loads[device]) for device, free in plan.other_cards
                     if device in loads)

    def describe(self) -> str:
        state = f"loaded ({self.placement}, attention {self.attention_backend})" if self.is_loaded else "not loaded"
        loras = f"; LoRAs {', '.join(s.describe() for s in self.loras)}" if self.loras else ""
        return f"{self.family.display_name} at {self.path}: {state}; plan {self.plan.describe()}{loras}"


def load_model_with_retry(loader: PipelineLoader, *, rng: random.Random | None = None) -> Any:
    """Load ``loader``'s weights following the fallback ladder (module docstring); raise ModelLoadError
    (with every attempt listed) when the ladder or the attempt budget is exhausted."""
    log, policy, rng = get_session_log(), loader.retry, rng or random.Random()
    plan = loader.plan
    if loader.device_config.device.startswith("cuda"):
        rechoose = loader.memory_mode_choice is MemoryMode.AUTO and not loader.attempts
        if rechoose:  # the first load of an "auto" loader: let ComfyUI free what it holds for the heaviest mode
            sizes = loader.main_card_bytes(plan.dtype)
            _run_before_load_hooks(_estimate_device_bytes(sizes, dataclasses.replace(plan, memory_mode=MemoryMode.GPU)))
        # One fresh reading, taken now rather than when the handle was made: it decides the auto mode, the
        # streamed engine's budget and the governor's window.
        plan = loader.refresh_plan(plan, rechoose=rechoose)
    for number in range(1, policy.max_attempts + 1):
        start = time.perf_counter()
        _run_before_load_hooks(_estimate_device_bytes(loader.main_card_bytes(plan.dtype), plan))
        try:
            pipe = loader.load_once(plan)
        except Exception as err:  # noqa: BLE001 - classified below; the last one is re-raised
            kind = "error" if isinstance(err, QwenError) else classify_error(err)
            free_memory()
            attempt = LoadAttempt(number, plan, kind, redact(f"{type(err).__name__}: {err}")[:500],
                                  time.perf_counter() - start)  # fmt: skip
            loader.attempts.append(attempt)
            loader.last_error = err
            following = next_plan(plan, kind) if number < policy.max_attempts else None
            while following is not None and following.memory_mode.value in loader.unsupported_memory_modes:
                following = next_plan(following, kind)
            if isinstance(err, QwenError) and following is None:
                log.error(f"loader: {attempt.describe()}", fix=err.fix)
                raise
            if following is None:
                raise _give_up(loader, err) from err
            delay = policy.delay(number, rng)
            log.warning(f"loader: {attempt.describe()}; retrying in {delay:.2f} s with {following.describe()}")
            policy.sleep(delay)
            plan = following
            continue
        attempt = LoadAttempt(number, plan, "ok", loader.placement, time.perf_counter() - start)
        loader.attempts.append(attempt)
        loader.plan, loader.last_error = plan, None
        log.info(f"loader: {attempt.describe()}; attention {loader.attention_backend}")
        return pipe
    raise AssertionError("unreachable: the loop returns or raises")


def _give_up(loader: PipelineLoader, err: BaseException) -> ModelLoadError:
    tried = "; ".join(a.describe() for a in loader.attempts[-4:])
    if is_oom(err):
        fix = ("Free GPU memory (close other apps/models), choose memory_mode sequential, or use a smaller "
               "dtype (fp16/bf16).")  # fmt: skip
    else:
        fix = "See reports/last_session.log for each attempt; re-download the model if a file is damaged."
    error = ModelLoadError(f"could not load the weights of {loader.path}: {tried}", fix=fix)
    get_session_log().error(f"loader: {error}", fix=fix)
    return error


def _run_before_load_hooks(bytes_needed: int) -> None:
    for hook in list(_BEFORE_LOAD_HOOKS):
        try:
            hook(bytes_needed)
        except Exception as err:  # noqa: BLE001 - freeing someone else's memory is best effort
            get_session_log().warning(f"loader: before-load hook {hook!r} failed: {err}")
