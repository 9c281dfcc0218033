"""The pixel window governor: pick the largest safe image size before any compute.

``max_pixels(vram_gb, dtype, memory_mode)`` is the single source of the limit: the smaller of two bounds.
The hard bound is memory: the model measured on the GPU (bench/gpu_bench.py) in ``presets/memory_model.json``
for "<memory_mode>/<dtype>" (``memory_limit_pixels``). The soft bound is the VRAM tier's pixel window from the
presets: what a card of that class renders in a sensible time and at a size Qwen-Image was trained for. Without
a measured entry only the tier window applies. The memory model file is a JSON object::

    {"gpu/bf16": {"base_gib": 40.1, "gib_per_mpix": 2.3, "headroom_gib": 1.5}, ...}

(entries may also sit under a top-level "entries" key; other keys such as "_meta" are ignored). The model is
peak_gib = base_gib + gib_per_mpix * megapixels, and the window is the largest size whose peak plus
headroom_gib fits in the card's VRAM.

``clamp_image_size`` scales a request down proportionally (aspect kept within one 16-px step), keeps both
sides multiples of 16, never upscales, and never goes below ``min_side`` (or the request, if smaller).

Reference images (edit models) and extra output frames (Layered) lengthen the transformer's sequence: the
caller passes them as ``extra_pixels`` (sequence tokens x 16x16 px, e.g. ``ModelFamily.extra_pixels``) and
``pixel_cost`` (sequence pixels per output pixel, ``ModelFamily.sequence_frames``). They count against the
measured memory bound only; the tier window bounds the output image itself.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path

from qwen_core.errors import InvalidInputError, PresetError
from qwen_core.presets import MAX_SIDE, load_presets
from qwen_core.validation import whole_number

MIN_SIDE = 16
ALIGN = 16
DEFAULT_MEMORY_MODEL_PATH = Path(__file__).resolve().parent.parent / "presets" / "memory_model.json"
_MODEL_KEYS = ("base_gib", "gib_per_mpix", "headroom_gib")
MIN_USEFUL_PIXELS = 256 * 256
_LIGHTEST_MODES = ("streamed", "sequential")


@dataclass(frozen=True)
class SizeDecision:
    width: int
    height: int
    requested_width: int
    requested_height: int
    scaled: bool  # True when reduced to fit the pixel window (not for mere 16-alignment)
    reason: str
    message: str  # "" when nothing changed; the Safe Mode line when scaled
    max_pixels: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def _dtype_key(dtype: object) -> str:
    """"bf16"/"fp16"/"fp32" from a string, an option enum or a torch.dtype (without importing torch)."""
    text = str(getattr(dtype, "value", dtype)).lower().replace("torch.", "")
    aliases = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32",
               "auto": "bf16"}
    return aliases.get(text, text)


def _mode_key(memory_mode: object) -> str:
    return str(getattr(memory_mode, "value", memory_mode)).lower()


def validate_size(width: object, height: object) -> tuple[int, int]:
    """Both sides must be whole numbers in [16, 8192]; returns them as ints or raises naming the side."""
    why = " (multiples of 16 are used)"
    return (whole_number("width", width, MIN_SIDE, MAX_SIDE, why),
            whole_number("height", height, MIN_SIDE, MAX_SIDE, why))


def load_memory_model(path: str | os.PathLike | None = None) -> dict[str, dict[str, float]]:
    """The measured entries keyed "<memory_mode>/<dtype>"; {} when the file does not exist."""
    path = Path(path) if path is not None else DEFAULT_MEMORY_MODEL_PATH
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise PresetError(f"memory model {path} cannot be read: {err}", fix="fix or delete the file.") from err
    if isinstance(data, dict) and isinstance(data.get("entries"), dict):
        data = data["entries"]
    if not isinstance(data, dict):
        raise PresetError(f"memory model {path}: the top level must be a JSON object.", fix="fix or delete the file.")
    entries = {}
    for key, entry in data.items():
        if "/" not in str(key) or str(key).startswith("_"):
            continue  # metadata such as "_meta"
        if not isinstance(entry, dict) or not all(k in entry for k in _MODEL_KEYS):
            raise PresetError(f"memory model {path}: entry {key!r} needs numbers {', '.join(_MODEL_KEYS)}.",
                              fix="fix or delete the file.")
        values = {}
        for k in _MODEL_KEYS:
            v = entry[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise PresetError(f"memory model {path}: `{key}.{k}` must be a finite number >= 0 (got {v!r}).",
                                  fix="fix or delete the file.")
            values[k] = float(v)
        if values["gib_per_mpix"] <= 0:
            raise PresetError(f"memory model {path}: `{key}.gib_per_mpix` must be > 0.", fix="fix or delete the file.")
        entries[str(key).lower()] = values
    return entries


def memory_limit_pixels(
    vram_gb: float,
    dtype: object = "bf16",
    memory_mode: object = "gpu",
    *,
    memory_model_path: str | os.PathLike | None = None,
) -> tuple[int, str] | None:
    """The hard memory bound from the measured model for this mode/dtype, or None when it has no entry."""
    entries = load_memory_model(memory_model_path)
    return _memory_limit(entries, vram_gb, _dtype_key(dtype), _mode_key(memory_mode))


def _memory_limit(
    entries: dict[str, dict[str, float]], vram_gb: float, dtype_key: str, mode_key: str
) -> tuple[int, str] | None:
    entry = entries.get(f"{mode_key}/{dtype_key}")
    if entry is None:
        return None
    # Card sizes ("8 GB") are GiB in practice, and DeviceConfig reports GiB: no unit conversion.
    usable = vram_gb - entry["headroom_gib"] - entry["base_gib"]
    mpix = max(usable / entry["gib_per_mpix"], 0.0)
    limit = min(int(mpix * 1e6), MAX_SIDE * MAX_SIDE)
    return limit, f"measured memory model {mode_key}/{dtype_key}: {mpix:.2f} MP fit in {vram_gb:g} GB"


def max_pixels_with_reason(
    vram_gb: float | None,
    dtype: object = "bf16",
    memory_mode: object = "gpu",
    *,
    memory_model_path: str | os.PathLike | None = None,
    extra_pixels: int = 0,
    pixel_cost: float = 1.0,
) -> tuple[int, str]:
    """The pixel limit and where it came from (see ``max_pixels``; ``extra_pixels``/``pixel_cost``: the module
    docstring)."""
    dtype_key, mode_key = _dtype_key(dtype), _mode_key(memory_mode)
    presets = load_presets()
    tier = presets.tier_for_vram(vram_gb)
    window = int(tier.max_pixels * presets.dtype_factor.get(dtype_key, 1.0))
    where = "no GPU VRAM limit" if vram_gb is None else f"{vram_gb:g} GB VRAM"
    window_reason = f"VRAM tier '{tier.name}' ({where}, {dtype_key}): {window / 1e6:.2f} MP"
    if vram_gb is None:
        return window, window_reason
    entries = load_memory_model(memory_model_path)  # read once for the mode and its fallback
    memory = _memory_limit(entries, vram_gb, dtype_key, mode_key)
    if memory is not None and memory[0] < MIN_USEFUL_PIXELS and mode_key not in _LIGHTEST_MODES:
        # The mode's resident weights alone do not fit: the loader falls back to the streamed engine, so the
        # window is the one that engine can hold (refusing here would block a graph the loader can still run).
        fallback = _memory_limit(entries, vram_gb, dtype_key, "streamed")
        if fallback is not None:
            memory = (fallback[0], f"'{mode_key}' does not fit {vram_gb:g} GB, the loader falls back to "
                                   f"'streamed'; {fallback[1]}")
    if memory is None:
        return window, window_reason
    if extra_pixels or pixel_cost != 1.0:
        memory = _sequence_bound(memory, extra_pixels, pixel_cost)
    # The measured model is the hard memory bound; the tier window bounds time and quality (a 16 GB card
    # could hold a 19 MP image in the streamed engine, but a step would take ~10x a native-size one).
    if memory[0] < window:
        return memory[0], f"{memory[1]} (below the {window_reason})"
    return window, f"{window_reason}; memory allows {memory[0] / 1e6:.2f} MP ({memory[1]})"


def _sequence_bound(memory: tuple[int, str], extra_pixels: int, pixel_cost: float) -> tuple[int, str]:
    """The memory bound on the output image when the sequence also holds ``extra_pixels`` (references) and
    ``pixel_cost`` copies of the output (Layered's frames)."""
    if extra_pixels < 0 or not pixel_cost >= 1.0:
        raise InvalidInputError("extra_pixels", f"must be >= 0 with pixel_cost >= 1 (got {extra_pixels}, {pixel_cost}).")
    limit = max(int((memory[0] - extra_pixels) / pixel_cost), 0)
    parts = [f"{extra_pixels / 1e6:.2f} MP of reference tokens"] if extra_pixels else []
    parts += [f"{pixel_cost:g} frames per output pixel"] if pixel_cost != 1.0 else []
    return limit, f"{memory[1]}, less {' and '.join(parts)}: {limit / 1e6:.2f} MP for the output"


def max_pixels(
    vram_gb: float | None,
    dtype: object = "bf16",
    memory_mode: object = "gpu",
    *,
    memory_model_path: str | os.PathLike | None = None,
    extra_pixels: int = 0,
    pixel_cost: float = 1.0,
) -> int:
    """Largest width*height that is safe for this card, dtype and memory mode. vram_gb None = no GPU limit."""
    return max_pixels_with_reason(vram_gb, dtype, memory_mode, memory_model_path=memory_model_path,
                                  extra_pixels=extra_pixels, pixel_cost=pixel_cost)[0]


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


def clamp_image_size(
    width: object,
    height: object,
    *,
    vram_gb: float | None = None,
    dtype: object = "bf16",
    memory_mode: object = "gpu",
    max_pixels: int | None = None,
    min_side: int = 256,
    memory_model_path: str | os.PathLike | None = None,
    extra_pixels: int = 0,
    pixel_cost: float = 1.0,
) -> SizeDecision:
    """Decide the final size. ``max_pixels`` overrides the limit (the caller has already accounted for references
    in it); else it comes from ``max_pixels(vram_gb, ..., extra_pixels=, pixel_cost=)``."""
    req_w, req_h = validate_size(width, height)
    if max_pixels is None:
        limit, source = max_pixels_with_reason(vram_gb, dtype, memory_mode, memory_model_path=memory_model_path,
                                               extra_pixels=extra_pixels, pixel_cost=pixel_cost)
    else:
        if isinstance(max_pixels, bool) or not isinstance(max_pixels, numbers.Real) or not max_pixels > 0:
            raise InvalidInputError("max_pixels", f"{max_pixels!r} must be a positive number of pixels.")
        limit, source = int(min(max_pixels, MAX_SIDE * MAX_SIDE)), f"limit of {max_pixels / 1e6:.2f} MP"
    aligned_w, aligned_h = req_w - req_w % ALIGN, req_h - req_h % ALIGN
    if aligned_w * aligned_h <= limit:
        changed = (aligned_w, aligned_h) != (req_w, req_h)
        message = f"Aligned to multiples of 16 ({req_w}x{req_h} -> {aligned_w}x{aligned_h})" if changed else ""
        reason = f"fits the pixel window ({source})" + ("; aligned to multiples of 16" if changed else "")
        return SizeDecision(aligned_w, aligned_h, req_w, req_h, False, reason, message, limit)

    # Never push a side below min_side by scaling, unless the request itself was smaller.
    floor_side = min(max(ALIGN, min_side - min_side % ALIGN), aligned_w, aligned_h)
    w, h = _fit(req_w, req_h, limit, floor_side)
    budget = f"{_fmt_gb(vram_gb)} GB" if vram_gb is not None and max_pixels is None else f"a {limit / 1e6:.2f} MP limit"
    reason = f"{req_w}x{req_h} = {req_w * req_h / 1e6:.2f} MP exceeds the window; {source}"
    if w * h > limit:
        reason += f"; kept the minimum side {floor_side} px although it exceeds the window"
    if (w, h) == (aligned_w, aligned_h):  # already at the minimum side: nothing to reduce
        message = (f"Safe Mode: {w}x{h} exceeds the pixel window for {budget} but is already at the minimum "
                   f"side ({floor_side} px); expect out-of-memory risk")
        return SizeDecision(w, h, req_w, req_h, False, reason, message, limit)
    message = f"Safe Mode: Reduced pixel window ({req_w}x{req_h} -> {w}x{h}: {w * h / 1e6:.2f} MP for {budget})"
    return SizeDecision(w, h, req_w, req_h, True, reason, message, limit)
