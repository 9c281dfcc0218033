"""The pixel window governor: pick the largest safe image size before any compute.

The window is memory, nothing else: the largest image whose measured peak fits the VRAM reading in the memory
mode that will run it (``qwen_core.memory_model``; the same model Preflight and the loader choose the mode
with). A request that fits is kept as asked; "Safe Mode: Reduced pixel window" appears only when it truly does
not fit. Every decision carries an estimated time per step for its size (``memory_model.estimate_step``: from
figures measured on an H100, an estimate, not a promise). A time budget (``time_budget_s``, from a quality preset
with ``max_seconds_per_step``) caps the pixels further, and only when the caller passes one.

When the given memory mode cannot hold even a 256x256 image with this reading (``gpu`` on a 16 GB card), or the
mode is ``auto``, the window is that of the mode ``memory_model.choose_memory_mode`` picks, which is what the
loader's ``auto`` does with the same reading.

``clamp_image_size`` scales a request down proportionally (aspect kept within one 16-px step), keeps both
sides multiples of 16, never upscales, and never goes below ``min_side`` (or the request, if smaller).

Reference images (edit models) and extra output frames (Layered) lengthen the transformer's sequence: the
caller passes them as ``extra_pixels`` (sequence tokens x 16x16 px, e.g. ``ModelFamily.extra_pixels``) and
``pixel_cost`` (sequence pixels per output pixel, ``ModelFamily.sequence_frames``). They count against the
measured memory bound only; the tier window bounds the output image itself.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass

from qwen_core import memory_model as mm
from qwen_core.errors import InvalidInputError
from qwen_core.placement.plan import blocks_card_pixels
from qwen_core.presets import MAX_SIDE
from qwen_core.validation import whole_number

MIN_SIDE = 16
ALIGN = 16
MIN_USEFUL_PIXELS = mm.MIN_USEFUL_PIXELS
_LIGHTEST_MODES = ("streamed", "sequential")


@dataclass(frozen=True)
class OtherCard:
    """A card that runs some of a split transformer's blocks (``qwen_core.placement``): its free-VRAM reading and
    the weights it holds. It never decodes, so its window is the transformer's activations beside its blocks."""

    device: str
    vram_gb: float
    weights: mm.WeightSizes


@dataclass(frozen=True)
class Situation:
    """Where an image will run: one VRAM reading (GiB; free VRAM when the weights are not loaded yet, None = no
    GPU) and what shares it. The loader fills it from its load plan; without one, it describes this machine."""

    vram_gb: float | None = None
    memory_mode: str = "auto"  # a MemoryMode value; "auto" = what choose_memory_mode picks for this reading
    dtype: str = "bf16"
    family: str = mm.DEFAULT_FAMILY  # the family's memory_model_key
    weights: mm.WeightSizes | None = None  # None = the family's measured weights
    memory_fraction: float = mm.DEFAULT_MEMORY_FRACTION  # share of the reading the streamed engine is handed
    plan_pixels: int | None = None  # what the streamed engine planned for (None = the family's reference size)
    # The sequence beside the output image: reference images' tokens (as pixels) and Layered's frames per pixel.
    extra_pixels: int = 0
    pixel_cost: float = 1.0
    cfg_branches: int = 2  # forwards per step (true CFG: 2); a family's per-branch reference cache counts each
    # The main card is the one read above (VAE, latents; its weights exclude a text encoder placed elsewhere);
    # the cards a split transformer also runs on bound the window too.
    other_cards: tuple[OtherCard, ...] = ()


@dataclass(frozen=True)
class Window:
    pixels: int
    memory_mode: str  # the mode the window is for (auto and an impossible mode are resolved)
    reason: str


@dataclass(frozen=True)
class SizeDecision:
    width: int
    height: int
    requested_width: int
    requested_height: int
    scaled: bool  # True when reduced to fit the pixel window (memory or an explicit limit), not for alignment
    reason: str
    message: str  # "" when nothing changed; the Safe Mode line when scaled; the time-budget line
    max_pixels: int
    seconds_per_step: float | None = None  # estimated (see estimate_note), None when there is no basis
    estimate_note: str = ""
    memory_mode: str = ""
    limited_by: str = ""  # "" | "memory" | "time budget"

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def estimate_text(self) -> str:
        if self.seconds_per_step is None:
            return "no time estimate for this device/mode"
        return f"est. {self.seconds_per_step:.2f} s/step ({self.estimate_note})"


def validate_size(width: object, height: object) -> tuple[int, int]:
    """Both sides must be whole numbers in [16, 8192]; returns them as ints or raises naming the side."""
    why = " (multiples of 16 are used)"
    return (whole_number("width", width, MIN_SIDE, MAX_SIDE, why),
            whole_number("height", height, MIN_SIDE, MAX_SIDE, why))


def memory_window(situation: Situation, *, memory_model_path: str | os.PathLike | None = None) -> Window:
    """The memory window for this situation (for the output image, once references and frames are counted),
    and the memory mode it is for."""
    window = _mode_window(situation, memory_model_path)
    s = situation
    if s.vram_gb is None or (not s.extra_pixels and s.pixel_cost == 1.0):
        return window
    # The cards of a split run blocks too: their bound already is the sequence's.
    sequence = window.pixels if s.other_cards else mm.window_pixels(
        window.memory_mode, s.vram_gb, weights=s.weights, family=s.family, dtype=mm.dtype_key(s.dtype),
        memory_fraction=s.memory_fraction, path=memory_model_path, sequence=True)
    weights = mm.reference_weights(window.memory_mode, family=s.family, dtype=mm.dtype_key(s.dtype),
                                   cfg_branches=s.cfg_branches, path=memory_model_path)
    pixels, reason = _sequence_bound((window.pixels, window.reason), sequence, s.extra_pixels, s.pixel_cost, weights)
    return Window(pixels, window.memory_mode, reason)


def _mode_window(situation: Situation, memory_model_path: str | os.PathLike | None) -> Window:
    s = situation
    mode, dtype = mm.mode_key(s.memory_mode), mm.dtype_key(s.dtype)
    if s.vram_gb is None:
        return Window(mm.MAX_PIXELS, "gpu" if mode == "auto" else mode, "no GPU VRAM limit")
    where = f"{s.vram_gb:g} GB"
    if mode != "auto":
        pixels = mm.window_pixels(mode, s.vram_gb, weights=s.weights, family=s.family, dtype=dtype,
                                  memory_fraction=s.memory_fraction, path=memory_model_path)
        reason = f"memory model {mode}/{dtype}: {pixels / 1e6:.2f} MP fit in {where}"
        for card in s.other_cards:
            theirs = blocks_card_pixels(card.vram_gb, card.weights.total, family=s.family, dtype=dtype)
            if theirs < pixels:
                pixels = theirs
                reason = (f"{card.device} ({card.weights.total:.1f} GiB of blocks, {card.vram_gb:g} GB free) holds "
                          f"{theirs / 1e6:.2f} MP")
        if pixels >= MIN_USEFUL_PIXELS or mode in _LIGHTEST_MODES or s.other_cards:
            return Window(pixels, mode, reason)
    choice = mm.choose_memory_mode(s.weights, s.vram_gb, family=s.family, dtype=dtype,
                                   memory_fraction=s.memory_fraction, path=memory_model_path)
    lead = "auto memory mode" if mode == "auto" else f"'{mode}' does not fit {where}, the loader falls back to"
    return Window(choice.max_pixels, choice.mode, f"{lead} '{choice.mode}'; memory model {choice.mode}/{dtype}: "
                                                  f"{choice.max_pixels / 1e6:.2f} MP fit in {where}")


def _sequence_bound(memory: tuple[int, str], sequence: int, extra_pixels: int, pixel_cost: float,
                    weights: tuple[float, float]) -> tuple[int, str]:
    """The memory bound on the output image when the transformer's sequence also holds ``extra_pixels``
    (references) and ``pixel_cost`` copies of the output (Layered's frames): ``sequence`` bounds the transformer
    phase (output frames + references), ``memory`` the whole peak (the decode of the output frames). ``weights``:
    output pixels one reference pixel displaces in each phase (``memory_model.reference_weights``)."""
    if extra_pixels < 0 or not pixel_cost >= 1.0:
        raise InvalidInputError("extra_pixels", f"must be >= 0 with pixel_cost >= 1 (got {extra_pixels}, {pixel_cost}).")
    in_sequence, in_decode = weights
    by_sequence = max(int((sequence - extra_pixels * in_sequence) / pixel_cost), 0)
    by_decode = max(int((memory[0] - extra_pixels * in_decode) / pixel_cost), 0)
    limit = min(by_sequence, by_decode)
    parts = [f"{extra_pixels / 1e6:.2f} MP of reference tokens"] if extra_pixels else []
    parts += [f"{pixel_cost:g} frames per output pixel"] if pixel_cost != 1.0 else []
    bound = "the transformer's sequence" if by_sequence <= by_decode else "the decode"
    held = " (their key/value cache is held through it)" if in_decode and bound == "the decode" else ""
    return limit, (f"{memory[1]}, with {' and '.join(parts)}: {limit / 1e6:.2f} MP for the output ({bound} bounds "
                   f"it{held})")


def max_pixels_with_reason(
    vram_gb: float | None,
    dtype: object = "bf16",
    memory_mode: object = "auto",
    *,
    memory_model_path: str | os.PathLike | None = None,
    extra_pixels: int = 0,
    pixel_cost: float = 1.0,
) -> tuple[int, str]:
    """The memory window for a bare VRAM reading (the family's measured weights) and where it came from;
    ``extra_pixels``/``pixel_cost``: what reference images and Layered's frames add to the sequence."""
    situation = Situation(vram_gb, mm.mode_key(memory_mode), mm.dtype_key(dtype), extra_pixels=extra_pixels,
                          pixel_cost=pixel_cost)
    window = memory_window(situation, memory_model_path=memory_model_path)
    return window.pixels, window.reason


def max_pixels(
    vram_gb: float | None,
    dtype: object = "bf16",
    memory_mode: object = "auto",
    *,
    memory_model_path: str | os.PathLike | None = None,
    extra_pixels: int = 0,
    pixel_cost: float = 1.0,
) -> int:
    """Largest width*height that fits this VRAM reading, dtype and memory mode. vram_gb None = no GPU limit."""
    return max_pixels_with_reason(vram_gb, dtype, memory_mode, memory_model_path=memory_model_path,
                                  extra_pixels=extra_pixels, pixel_cost=pixel_cost)[0]


def estimate(pixels: int, situation: Situation, memory_mode: str, *, two_pass: bool = True,
             memory_model_path: str | os.PathLike | None = None) -> mm.StepEstimate | None:
    s = situation
    return mm.estimate_step(pixels, memory_mode, s.vram_gb, two_pass=two_pass, weights=s.weights, family=s.family,
                            dtype=s.dtype, memory_fraction=s.memory_fraction, plan_pixels=s.plan_pixels,
                            path=memory_model_path)


def time_limit_pixels(seconds_per_step: float, situation: Situation, memory_mode: str, limit: int, *,
                      two_pass: bool = True, memory_model_path: str | os.PathLike | None = None) -> int | None:
    """The largest pixel count <= ``limit`` whose estimated step fits ``seconds_per_step``; ``limit`` when there
    is no estimate; None when not even a 256x256 image meets it (a smaller size would not help)."""
    def secs(pixels: int) -> float | None:
        est = estimate(pixels, situation, memory_mode, two_pass=two_pass, memory_model_path=memory_model_path)
        return None if est is None else est.seconds

    top = secs(limit)
    if top is None or top <= seconds_per_step:
        return limit
    low, high = MIN_USEFUL_PIXELS, limit  # the estimate grows with pixels: bisect for the boundary
    if (secs(low) or 0.0) > seconds_per_step:
        return None
    while high - low > 256:
        mid = (low + high) // 2
        low, high = (mid, high) if (secs(mid) or 0.0) <= seconds_per_step else (low, mid)
    return low


def _fit(width: int, height: int, limit: int, floor_side: int) -> tuple[int, int]:
    """Largest 16-aligned (w, h) <= the request with w*h <= limit and w/h within one 16-px step of the aspect."""
    aspect = width / height
    best: tuple[int, int, float] | None = None  # (w, h, aspect error)
    for h in range(ALIGN, height - height % ALIGN + 1, ALIGN):
        ideal_w = h * aspect
        for w in {int(ideal_w // ALIGN) * ALIGN, int(math.ceil(ideal_w / ALIGN)) * ALIGN}:
            if w < ALIGN or w > width or w * h > limit:
                continue
            # "One 16-px step": each side is within 16 px of the exact-aspect partner of the other side.
            if abs(w - ideal_w) > ALIGN or abs(h - w / aspect) > ALIGN:
                continue
            err = abs(w / h - aspect)
            if best is None or w * h > best[0] * best[1] or (w * h == best[0] * best[1] and err < best[2]):
                best = (w, h, err)
    short = min(best[:2]) if best else 0
    if best is None or short < floor_side:
        # The window is below the minimum: use the minimum short side at the requested aspect.
        if width <= height:
            w = floor_side
            h = min(height - height % ALIGN, max(floor_side, int(round(floor_side / aspect / ALIGN)) * ALIGN))
        else:
            h = floor_side
            w = min(width - width % ALIGN, max(floor_side, int(round(floor_side * aspect / ALIGN)) * ALIGN))
        return w, h
    return best[0], best[1]


def _fmt_gb(vram_gb: float) -> str:
    return f"{vram_gb:.0f}" if abs(vram_gb - round(vram_gb)) < 0.05 else f"{vram_gb:.1f}"


def _positive(field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0 or not math.isfinite(value):
        raise InvalidInputError(field, f"{value!r} must be a positive number.")
    return float(value)


def clamp_image_size(
    width: object,
    height: object,
    *,
    vram_gb: float | None = None,
    dtype: object = "bf16",
    memory_mode: object = "auto",
    situation: Situation | None = None,
    max_pixels: int | None = None,
    time_budget_s: float | None = None,
    two_pass: bool = True,
    min_side: int = 256,
    memory_model_path: str | os.PathLike | None = None,
    extra_pixels: int = 0,
    pixel_cost: float = 1.0,
    cfg_branches: int | None = None,
) -> SizeDecision:
    """Decide the final size. ``situation`` (or its shorthand ``vram_gb``/``dtype``/``memory_mode``/
    ``extra_pixels``/``pixel_cost``/``cfg_branches``) gives the memory window; ``max_pixels`` overrides it (an OOM fallback's smaller
    window; the caller has already accounted for references in it). ``time_budget_s`` (seconds per step,
    estimated) caps the size further; ``two_pass`` = true CFG (two branches per step) for the estimate."""
    req_w, req_h = validate_size(width, height)
    branches = {} if cfg_branches is None else {"cfg_branches": cfg_branches}
    if situation is None:
        situation = Situation(vram_gb, mm.mode_key(memory_mode), mm.dtype_key(dtype), extra_pixels=extra_pixels,
                              pixel_cost=pixel_cost, **branches)
    elif extra_pixels or pixel_cost != 1.0 or branches:
        situation = dataclasses.replace(situation, extra_pixels=extra_pixels, pixel_cost=pixel_cost, **branches)
    window = memory_window(situation, memory_model_path=memory_model_path)
    if max_pixels is None:
        limit, source = window.pixels, window.reason
    else:
        _positive("max_pixels", max_pixels)
        limit, source = int(min(max_pixels, MAX_SIDE * MAX_SIDE)), f"limit of {max_pixels / 1e6:.2f} MP"
    budget_s = None if time_budget_s is None else _positive("time_budget_s", time_budget_s)
    vram = situation.vram_gb
    budget = f"{_fmt_gb(vram)} GB" if vram is not None and max_pixels is None else f"a {limit / 1e6:.2f} MP limit"
    # Never push a side below min_side by scaling, unless the request itself was smaller.
    aligned_w, aligned_h = req_w - req_w % ALIGN, req_h - req_h % ALIGN
    floor_side = min(max(ALIGN, min_side - min_side % ALIGN), aligned_w, aligned_h)
    w, h, scaled, reason, message = _memory_fit(req_w, req_h, limit, source, floor_side, budget)
    limited_by = "memory" if scaled else ""
    if budget_s is not None:
        cap = time_limit_pixels(budget_s, situation, window.memory_mode, limit, two_pass=two_pass,
                                memory_model_path=memory_model_path)
        if cap is None:
            reason += f"; the time budget {budget_s:g} s/step is not met even at 256x256 here, size kept"
        elif w * h > cap:
            before = (w, h)
            w, h = _fit(req_w, req_h, cap, floor_side)
            limited_by = "time budget"
            secs = estimate(w * h, situation, window.memory_mode, two_pass=two_pass, memory_model_path=memory_model_path)
            line = (f"Time budget: {before[0]}x{before[1]} -> {w}x{h} (est. {secs.seconds:.2f} s/step within "
                    f"{budget_s:g} s/step)") if secs else f"Time budget: {before[0]}x{before[1]} -> {w}x{h}"
            message = f"{message}; {line}" if message else line
            reason += f"; capped at {cap / 1e6:.2f} MP by the time budget of {budget_s:g} s/step (estimated)"
    est = estimate(w * h, situation, window.memory_mode, two_pass=two_pass, memory_model_path=memory_model_path)
    return SizeDecision(w, h, req_w, req_h, scaled, reason, message, limit,
                        est.seconds if est else None, est.note if est else "", window.memory_mode, limited_by)


def _memory_fit(req_w: int, req_h: int, limit: int, source: str, floor_side: int,
                budget: str) -> tuple[int, int, bool, str, str]:
    """(w, h, scaled, reason, message) of the request in the pixel window."""
    aligned_w, aligned_h = req_w - req_w % ALIGN, req_h - req_h % ALIGN
    if aligned_w * aligned_h <= limit:
        changed = (aligned_w, aligned_h) != (req_w, req_h)
        message = f"Aligned to multiples of 16 ({req_w}x{req_h} -> {aligned_w}x{aligned_h})" if changed else ""
        reason = f"fits the pixel window ({source})" + ("; aligned to multiples of 16" if changed else "")
        return aligned_w, aligned_h, False, reason, message
    w, h = _fit(req_w, req_h, limit, floor_side)
    reason = f"{req_w}x{req_h} = {req_w * req_h / 1e6:.2f} MP exceeds the window; {source}"
    if w * h > limit:
        reason += f"; kept the minimum side {floor_side} px although it exceeds the window"
    if (w, h) == (aligned_w, aligned_h):  # already at the minimum side: nothing to reduce
        message = (f"Safe Mode: {w}x{h} exceeds the pixel window for {budget} but is already at the minimum "
                   f"side ({floor_side} px); expect out-of-memory risk")
        return w, h, False, reason, message
    message = f"Safe Mode: Reduced pixel window ({req_w}x{req_h} -> {w}x{h}: {w * h / 1e6:.2f} MP for {budget})"
    return w, h, True, reason, message
