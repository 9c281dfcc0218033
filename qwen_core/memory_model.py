"""The memory model: what each memory mode needs on the GPU, per model family and dtype, and the decisions built
on it: ``choose_memory_mode`` (which mode, how many pixels) and ``estimate_step`` (seconds per step, an estimate).

A leaf module (standard library + ``qwen_core.errors``): Preflight, the loader, the governor and the streaming
engine all read this one model, so they cannot drift apart. Data: ``presets/memory_model.json``, measured by
bench/gpu_bench.py (bench/RESULTS.md, "Memory model and governor check"), loaded once per file version::

    {"version": 2, "families": {"qwen-image": {          # the key is the family's memory_model_key
        "card": ..., "date": ..., "versions": {...},      # where the numbers come from
        "reference_pixels": 1763584,                      # a chosen mode must hold this size (1328x1328)
        "weights_dtype": "bf16", "weights_gib": {"transformer": 38.06, "text_encoder": 15.45, "vae": 0.24},
        "entries": {"gpu/bf16": {"base_gib": 53.799, "gib_per_mpix": 3.9364, "headroom_gib": 1.0}, ...},
        "step_time": {...}}}}                             # optional: see StepTimeModel

An entry "<kind>/<dtype>" says ``peak = base_gib + gib_per_mpix * megapixels``; an image fits when ``peak +
headroom_gib`` is within the mode's budget. Kinds: the memory modes (gpu, model_offload, streamed, group_offload,
sequential) and the streaming planner's slopes (activations, vae). In the resident modes the measured base holds
the measured model's weights (all of them for gpu, the largest component for model_offload): a caller's own
weights replace those, the rest of the base is kept.

Budgets come from ONE VRAM reading (free GiB: Preflight's, or the loader's at load time). The resident modes may
use all of it (headroom_gib covers the CUDA context); the streamed engine is handed ``reading * memory_fraction``
(0.9, lowered by the loader's OOM ladder).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen_core.errors import PresetError

DEFAULT_MEMORY_MODEL_PATH = Path(__file__).resolve().parent.parent / "presets" / "memory_model.json"
DEFAULT_FAMILY = "qwen-image"
DEFAULT_MEMORY_FRACTION = 0.9
MIN_USEFUL_PIXELS = 256 * 256
MAX_PIXELS = 8192 * 8192  # presets.MAX_SIDE squared: the largest request the governor accepts
RESIDENT_MODES = ("gpu", "model_offload")  # heaviest first
ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
STREAM_SLOTS = 2  # qwen_core.streaming's default slots: streaming fewer blocks than this buys nothing
_GIB = 1024**3
_ENTRY_NUMBERS = ("base_gib", "gib_per_mpix", "headroom_gib")
_STEP_NUMBERS = ("reference_pixels", "two_pass_ms", "one_pass_ms", "attention_share", "transformer_blocks",
                 "pcie_gb_s", "overlap_exponent", "group_offload_factor")


def dtype_key(dtype: object) -> str:
    """"bf16"/"fp16"/"fp32" from a string, an option enum or a torch.dtype (without importing torch)."""
    text = str(getattr(dtype, "value", dtype)).lower().replace("torch.", "")
    aliases = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32",
               "auto": "bf16"}
    return aliases.get(text, text)


def mode_key(memory_mode: object) -> str:
    return str(getattr(memory_mode, "value", memory_mode)).lower()


def streaming_available() -> bool:
    """Whether our low-VRAM engine (qwen_core/streaming.py) ships with this install."""
    return importlib.util.find_spec("qwen_core.streaming") is not None


@dataclass(frozen=True)
class WeightSizes:
    """GiB of each weighted component (transformer, text encoder, VAE...) in the dtype it will run in."""

    parts: tuple[tuple[str, float], ...]

    @classmethod
    def of(cls, gib: Mapping[str, float]) -> WeightSizes:
        return cls(tuple((str(k), float(v)) for k, v in gib.items()))

    @classmethod
    def from_bytes(cls, sizes: Mapping[str, int]) -> WeightSizes:
        return cls(tuple((str(k), v / _GIB) for k, v in sizes.items()))

    @property
    def total(self) -> float:
        return sum(v for _, v in self.parts)

    @property
    def largest(self) -> float:
        return max((v for _, v in self.parts), default=0.0)

    def get(self, name: str) -> float | None:
        return next((v for k, v in self.parts if k == name), None)

    def scaled(self, factor: float) -> WeightSizes:
        return WeightSizes(tuple((k, v * factor) for k, v in self.parts))

    def resident(self, mode: str) -> float:
        """GiB that stay on the GPU in ``mode``: everything (gpu), the largest part (model_offload), else none."""
        return {"gpu": self.total, "model_offload": self.largest}.get(mode_key(mode), 0.0)

    def describe(self) -> str:
        return f"weights {self.total:.1f} GiB (largest part {self.largest:.1f})"


@dataclass(frozen=True)
class MemoryEntry:
    key: str  # "<kind>/<dtype>"
    base_gib: float
    gib_per_mpix: float
    headroom_gib: float
    measured: str = ""

    def need_gib(self, pixels: int, base_gib: float | None = None) -> float:
        """GiB an image of ``pixels`` needs, headroom included (``base_gib`` replaces the measured base)."""
        base = self.base_gib if base_gib is None else base_gib
        return base + self.gib_per_mpix * pixels / 1e6 + self.headroom_gib

    def max_pixels(self, budget_gib: float, base_gib: float | None = None) -> int:
        """The largest image whose need fits ``budget_gib`` (0 when not even the base fits)."""
        base = self.base_gib if base_gib is None else base_gib
        mpix = max((budget_gib - self.headroom_gib - base) / self.gib_per_mpix, 0.0)
        # The nudge absorbs float noise: the same budget reached by two sums (a measured base, or the rest of
        # the base plus resident weights) must give the same pixel count, not one pixel apart.
        return min(int(mpix * 1e6 + 1e-6), MAX_PIXELS)


@dataclass(frozen=True)
class StepTimeModel:
    """Seconds per denoising step, from measured figures (bench/RESULTS.md; the file's ``notes`` name each run).

    compute = (two_pass_ms with true CFG, else one_pass_ms) * ((1 - a) * r + a * r^2), r = pixels / reference
    (a = attention_share: attention grows with tokens squared, GEMMs and the rest with tokens). The streamed engine
    also moves its streamed blocks over PCIe once per step, overlapped with compute: step = (compute^p +
    transfer^p)^(1/p), p = overlap_exponent (fitted to the streamed caps). Group offload = compute x factor.
    """

    reference_gpu: str
    source: str
    reference_pixels: int
    two_pass_ms: float
    one_pass_ms: float
    attention_share: float
    transformer_blocks: int
    pcie_gb_s: float
    overlap_exponent: float
    group_offload_factor: float

    def compute_ms(self, pixels: int, two_pass: bool) -> float:
        r = pixels / self.reference_pixels
        a = self.attention_share
        return (self.two_pass_ms if two_pass else self.one_pass_ms) * ((1 - a) * r + a * r * r)

    def transfer_ms(self, streamed_gib: float) -> float:
        return streamed_gib * _GIB / (self.pcie_gb_s * 1e9) * 1e3


@dataclass(frozen=True)
class StepEstimate:
    seconds: float
    note: str  # how it was estimated ("estimate for an H100-class GPU: ...")


@dataclass(frozen=True)
class FamilyMemoryModel:
    family: str
    path: Path
    reference_pixels: int
    weights_dtype: str
    measured_weights: WeightSizes
    entries: Mapping[str, MemoryEntry]
    step_time: StepTimeModel | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    def entry(self, kind: object, dtype: object) -> MemoryEntry:
        key = f"{mode_key(kind)}/{dtype_key(dtype)}"
        try:
            return self.entries[key]
        except KeyError:
            raise PresetError(
                f"memory model {self.path}: `families.{self.family}.entries.{key}` does not exist "
                f"(entries: {', '.join(sorted(self.entries))}).",
                fix="use a memory mode/dtype it covers, or add a measured entry (bench/gpu_bench.py writes them).",
            ) from None

    def weights(self, dtype: object) -> WeightSizes:
        """The measured model's weights in ``dtype`` (element size scales the bytes)."""
        key = dtype_key(dtype)
        if key not in ELEMENT_BYTES:
            raise PresetError(f"memory model {self.path}: no element size for dtype {key!r}.",
                              fix=f"use one of {', '.join(ELEMENT_BYTES)}.")
        return self.measured_weights.scaled(ELEMENT_BYTES[key] / ELEMENT_BYTES[self.weights_dtype])

    def base_gib(self, mode: object, dtype: object, weights: WeightSizes | None = None) -> float:
        """The entry's base with the measured model's resident weights swapped for ``weights`` (resident modes)."""
        entry = self.entry(mode, dtype)
        if weights is None or mode_key(mode) not in RESIDENT_MODES:
            return entry.base_gib
        rest = max(entry.base_gib - self.weights(dtype).resident(mode), 0.0)  # CUDA buffers, VAE in model_offload
        return rest + weights.resident(mode)

    def activation_gib_per_mpix(self, dtype: object) -> float:
        """Batched (cond + uncond) transformer activations per megapixel: the streaming planner's reserve."""
        return self.entry("activations", dtype).gib_per_mpix

    def vae_gib_per_mpix(self, dtype: object) -> float:
        """Untiled VAE decode working memory per megapixel."""
        return self.entry("vae", dtype).gib_per_mpix

    def sequence_entry(self, mode: object, dtype: object) -> MemoryEntry:
        """``mode``'s entry for the transformer's sequence (output and reference tokens): only the output is
        decoded, so where the mode's slope is the untiled VAE decode's (resident modes, group offload) the
        sequence costs the activations' slope instead."""
        entry = self.entry(mode, dtype)
        activations = self.entries.get(f"activations/{dtype_key(dtype)}")
        if activations is not None and activations.gib_per_mpix < entry.gib_per_mpix:
            return dataclasses.replace(entry, gib_per_mpix=activations.gib_per_mpix)
        return entry

    def reference_cache_gib_per_mpix(self, dtype: object) -> float:
        """Keys/values a pipeline caches per megapixel of reference tokens and CFG branch, held until the call
        returns (Qwen-Image 2.1's condition cache); 0 where the family caches none."""
        entry = self.entries.get(f"reference_cache/{dtype_key(dtype)}")
        return entry.gib_per_mpix if entry is not None else 0.0


@dataclass(frozen=True)
class MemoryModel:
    path: Path
    families: Mapping[str, FamilyMemoryModel]

    def family(self, key: str = DEFAULT_FAMILY) -> FamilyMemoryModel:
        try:
            return self.families[key]
        except KeyError:
            raise PresetError(f"memory model {self.path}: `families.{key}` does not exist "
                              f"(families: {', '.join(sorted(self.families))}).",
                              fix="measure the family with bench/gpu_bench.py, or fix its memory_model_key.") from None


# ---- loading ----------------------------------------------------------------------------------------------

def _fail(path: Path, key: str, problem: str) -> PresetError:
    return PresetError(f"memory model {path}: `{key}` {problem}",
                       fix="fix the file, or restore presets/memory_model.json from the pack.")


def _number(path: Path, key: str, value: Any, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise _fail(path, key, f"must be a finite number >= 0 (got {value!r}).")
    if positive and value <= 0:
        raise _fail(path, key, f"must be > 0 (got {value!r}).")
    return float(value)


def _mapping(path: Path, key: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise _fail(path, key, f"must be a JSON object (got {type(value).__name__}).")
    return value


def _entry(path: Path, where: str, name: str, raw: Any) -> MemoryEntry:
    key = f"{where}.{name}"
    raw = _mapping(path, key, raw)
    if "/" not in name or name.split("/", 1)[1] not in ELEMENT_BYTES:
        raise _fail(path, key, f"must be named <kind>/<dtype> with a dtype of {', '.join(ELEMENT_BYTES)}.")
    missing = [k for k in _ENTRY_NUMBERS if k not in raw]
    if missing:
        raise _fail(path, f"{key}.{missing[0]}", "is required.")
    values = {k: _number(path, f"{key}.{k}", raw[k], positive=k == "gib_per_mpix") for k in _ENTRY_NUMBERS}
    return MemoryEntry(name.lower(), **values, measured=str(raw.get("measured", "")))


def _step_time(path: Path, where: str, raw: Any) -> StepTimeModel:
    raw = _mapping(path, where, raw)
    missing = [k for k in _STEP_NUMBERS if k not in raw]
    if missing:
        raise _fail(path, f"{where}.{missing[0]}", "is required.")
    v = {k: _number(path, f"{where}.{k}", raw[k], positive=True) for k in _STEP_NUMBERS}
    if v["attention_share"] >= 1:
        raise _fail(path, f"{where}.attention_share", f"must be below 1 (got {v['attention_share']}).")
    return StepTimeModel(str(raw.get("reference_gpu", "reference")), str(raw.get("source", "")),
                         int(v.pop("reference_pixels")), transformer_blocks=int(v.pop("transformer_blocks")), **v)


def _family(path: Path, name: str, raw: Any) -> FamilyMemoryModel:
    where = f"families.{name}"
    raw = _mapping(path, where, raw)
    for required in ("reference_pixels", "weights_gib", "entries"):
        if required not in raw:
            raise _fail(path, f"{where}.{required}", "is required.")
    weights_dtype = str(raw.get("weights_dtype", "bf16"))
    if weights_dtype not in ELEMENT_BYTES:
        raise _fail(path, f"{where}.weights_dtype", f"must be one of {', '.join(ELEMENT_BYTES)}.")
    weights = {k: _number(path, f"{where}.weights_gib.{k}", v)
               for k, v in _mapping(path, f"{where}.weights_gib", raw["weights_gib"]).items()}
    entries = {n.lower(): _entry(path, f"{where}.entries", n, e)
               for n, e in _mapping(path, f"{where}.entries", raw["entries"]).items()}
    step = _step_time(path, f"{where}.step_time", raw["step_time"]) if "step_time" in raw else None
    meta = {k: raw[k] for k in ("card", "date", "versions", "command", "note") if k in raw}
    return FamilyMemoryModel(name, path, int(_number(path, f"{where}.reference_pixels", raw["reference_pixels"],
                                                     positive=True)),
                             weights_dtype, WeightSizes.of(weights), entries, step, meta)


_CACHE: dict[tuple, MemoryModel] = {}


def load_memory_model(path: str | os.PathLike | None = None) -> MemoryModel:
    """The memory model file (default presets/memory_model.json), parsed once per file version."""
    path = Path(path) if path is not None else DEFAULT_MEMORY_MODEL_PATH
    try:
        st = path.stat()
        stamp = (str(path), st.st_mtime_ns, st.st_size)
    except OSError as err:
        raise PresetError(f"memory model {path} cannot be read ({err.strerror or err}).",
                          fix="restore presets/memory_model.json from the pack.") from err
    if stamp in _CACHE:
        return _CACHE[stamp]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise PresetError(f"memory model {path} cannot be read: {err}",
                          fix="fix the file, or restore presets/memory_model.json from the pack.") from err
    data = _mapping(path, "(top level)", data)
    families = _mapping(path, "families", data.get("families"))
    model = MemoryModel(path, {str(k): _family(path, str(k), v) for k, v in families.items()})
    if len(_CACHE) > 8:
        _CACHE.clear()
    _CACHE[stamp] = model
    return model


def family_model(family: str = DEFAULT_FAMILY, path: str | os.PathLike | None = None) -> FamilyMemoryModel:
    return load_memory_model(path).family(family)


# ---- decisions --------------------------------------------------------------------------------------------

def mode_budget_gib(mode: object, vram_gib: float, memory_fraction: float = DEFAULT_MEMORY_FRACTION) -> float:
    """GiB a mode may use of the reading: the streamed engine gets the fraction it is handed, the others all of it."""
    return vram_gib * memory_fraction if mode_key(mode) == "streamed" else vram_gib


def window_pixels(mode: object, vram_gib: float | None, *, weights: WeightSizes | None = None,
                  family: str = DEFAULT_FAMILY, dtype: object = "bf16",
                  memory_fraction: float = DEFAULT_MEMORY_FRACTION, path: str | os.PathLike | None = None,
                  sequence: bool = False) -> int:
    """The largest image (pixels) ``mode`` holds with this VRAM reading; no reading (no GPU) = no limit.

    ``sequence``: the largest transformer sequence instead (output and reference tokens, as pixels;
    ``FamilyMemoryModel.sequence_entry``)."""
    if vram_gib is None:
        return MAX_PIXELS
    fam = family_model(family, path)
    entry = fam.sequence_entry(mode, dtype) if sequence else fam.entry(mode, dtype)
    return entry.max_pixels(mode_budget_gib(mode, vram_gib, memory_fraction), fam.base_gib(mode, dtype, weights))


def reference_weights(mode: object, *, family: str = DEFAULT_FAMILY, dtype: object = "bf16", cfg_branches: int = 2,
                      path: str | os.PathLike | None = None) -> tuple[float, float]:
    """How many output pixels one reference pixel displaces, in the transformer phase and in the decode phase.

    A reference's tokens cost the sequence's slope (``FamilyMemoryModel.sequence_entry``) plus, in a family whose
    pipeline caches their keys/values (``reference_cache``), that cache for each CFG branch; the cache is held
    through the decode too, where nothing else of the references is."""
    fam = family_model(family, path)
    cache = fam.reference_cache_gib_per_mpix(dtype) * max(1, cfg_branches)
    return (1.0 + cache / fam.sequence_entry(mode, dtype).gib_per_mpix,
            cache / fam.entry(mode, dtype).gib_per_mpix)


@dataclass(frozen=True)
class MemoryChoice:
    mode: str  # a MemoryMode value
    reason: str
    vram_gib: float | None  # the one reading this was decided from
    max_pixels: int  # the memory window in this mode
    plan_pixels: int  # what the streamed engine reserves activations for: min(window, reference size)


def choose_memory_mode(weights: WeightSizes | None, vram_gib: float | None, *, family: str = DEFAULT_FAMILY,
                       dtype: object = "bf16", device: str = "cuda", streaming: bool | None = None,
                       memory_fraction: float = DEFAULT_MEMORY_FRACTION,
                       path: str | os.PathLike | None = None) -> MemoryChoice:
    """The heaviest (fastest) memory mode that holds the family's reference image with this free-VRAM reading.

    ``weights`` None = the family's measured weights. Order: gpu, model_offload, then the streamed engine (group
    offload without it) while it holds at least 256x256, else sequential offload. Off CUDA (or without a
    reading) everything stays resident on ``device``: memory mode "gpu", no pixel limit.
    """
    fam = family_model(family, path)
    ref = fam.reference_pixels
    if not device.startswith("cuda") or vram_gib is None:
        return MemoryChoice("gpu", f"device {device}: weights stay resident on it", None, MAX_PIXELS, ref)
    weights = weights if weights is not None and weights.parts else fam.weights(dtype)
    facts = f"{weights.describe()}, {vram_gib:.1f} GiB VRAM free"

    def window(mode: str) -> int:
        return window_pixels(mode, vram_gib, weights=weights, family=family, dtype=dtype,
                             memory_fraction=memory_fraction, path=path)

    def choice(mode: str, why: str) -> MemoryChoice:
        pixels = window(mode)
        return MemoryChoice(mode, f"{facts}: {why}", vram_gib, pixels, min(pixels, ref))

    side = f"{math.isqrt(ref)}x{math.isqrt(ref)}" if math.isqrt(ref) ** 2 == ref else f"{ref / 1e6:.2f} MP"
    if window("gpu") >= ref:
        return choice("gpu", f"all resident (a {side} image fits)")
    if window("model_offload") >= ref:
        return choice("model_offload", "one model at a time on the GPU")
    light = "streamed" if (streaming_available() if streaming is None else streaming) else "group_offload"
    if window(light) >= MIN_USEFUL_PIXELS:
        return choice(light, "transformer blocks streamed (low-VRAM engine)" if light == "streamed"
                      else "group offload (block level)")
    return choice("sequential", f"too little VRAM for {light}: sequential offload (slow)")


def streamed_blocks(pixels: int, vram_gib: float, *, weights: WeightSizes | None = None,
                    family: str = DEFAULT_FAMILY, dtype: object = "bf16",
                    memory_fraction: float = DEFAULT_MEMORY_FRACTION, path: str | os.PathLike | None = None,
                    ) -> tuple[int, float]:
    """(blocks the streamed engine streams, GiB per block) when planned for ``pixels``: what stays resident is
    what fits beside the measured working set (like qwen_core.streaming.plan_resident, from measured numbers)."""
    fam = family_model(family, path)
    if fam.step_time is None:
        raise PresetError(f"memory model {fam.path}: `families.{family}.step_time` is needed to count blocks.")
    blocks = fam.step_time.transformer_blocks
    weights = weights if weights is not None and weights.parts else fam.weights(dtype)
    block_gib = (weights.get("transformer") or weights.largest) / blocks
    room = mode_budget_gib("streamed", vram_gib, memory_fraction) - fam.entry("streamed", dtype).need_gib(pixels)
    resident = min(blocks, max(0, math.floor(room / block_gib))) if block_gib > 0 else blocks
    if resident >= blocks - STREAM_SLOTS:
        resident = blocks
    return blocks - resident, block_gib


def estimate_step(pixels: int, mode: object, vram_gib: float | None, *, two_pass: bool = True,
                  weights: WeightSizes | None = None, family: str = DEFAULT_FAMILY, dtype: object = "bf16",
                  memory_fraction: float = DEFAULT_MEMORY_FRACTION, plan_pixels: int | None = None,
                  path: str | os.PathLike | None = None) -> StepEstimate | None:
    """Estimated seconds per denoising step at ``pixels`` on the family's reference GPU, or None when there is no
    basis (no GPU, fp32, sequential offload, no step-time data). The streamed engine re-plans for an image larger
    than ``plan_pixels`` (default: the family's reference size), so it is counted at the larger of the two."""
    fam = family_model(family, path)
    model, mode = fam.step_time, mode_key(mode)
    if model is None or vram_gib is None or dtype_key(dtype) not in ("bf16", "fp16") or mode == "sequential":
        return None
    compute = model.compute_ms(pixels, two_pass)
    where = f"estimate for an {model.reference_gpu}-class GPU"
    if mode == "streamed":
        planned = max(pixels, plan_pixels if plan_pixels is not None else fam.reference_pixels)
        count, block_gib = streamed_blocks(planned, vram_gib, weights=weights, family=family, dtype=dtype,
                                           memory_fraction=memory_fraction, path=path)
        transfer = model.transfer_ms(count * block_gib)
        p = model.overlap_exponent
        ms = (compute**p + transfer**p) ** (1 / p)
        how = (f"compute {compute / 1e3:.2f} s overlapped with {count} of {model.transformer_blocks} blocks "
               f"over PCIe {transfer / 1e3:.2f} s")
    elif mode == "group_offload":
        ms, how = compute * model.group_offload_factor, f"compute x{model.group_offload_factor:g} for group offload"
    else:
        ms, how = compute, "compute"
    return StepEstimate(ms / 1e3, f"{where}: {how}; from {model.source}")


def streamed_budget(vram_gib: float, *, weights: WeightSizes | None = None, family: str = DEFAULT_FAMILY,
                    dtype: object = "bf16", memory_fraction: float = DEFAULT_MEMORY_FRACTION,
                    pixel_scale: float = 1.0, path: str | os.PathLike | None = None) -> tuple[float, int]:
    """(GiB handed to the streamed engine, pixels it reserves activations for). The reserve is for the family's
    reference size, or the memory window when that is smaller (x ``pixel_scale`` after an OOM fallback): a larger
    request re-plans the engine once (qwen_core.streaming.StreamingHandle.replan) instead of every image paying
    for the largest one with fewer resident blocks."""
    budget = mode_budget_gib("streamed", vram_gib, memory_fraction)
    window = window_pixels("streamed", vram_gib, weights=weights, family=family, dtype=dtype,
                           memory_fraction=memory_fraction, path=path)
    reference = family_model(family, path).reference_pixels
    return budget, max(int(min(window * pixel_scale, reference)), 16 * 16)
