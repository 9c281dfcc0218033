"""Load and validate ``presets/quality_presets.yaml`` (plus an optional QWEN_PRESETS override): aspect presets
(Qwen-Image's native sizes) and quality presets (steps, true CFG, and optionally a time budget per step that caps
the governor's size). The pixel window itself is not a preset: it comes from the memory model
(``qwen_core.memory_model``). The retired ``vram_tiers``/``dtype_factor`` sections of older override files are
ignored with a warning.

Safety: the YAML is parsed with PyYAML's SafeLoader (no Python object tags) and anchors/aliases are refused
(they are how "billion laughs" files blow up memory); files over 1 MB are refused unread. Every problem is a
``PresetError`` naming the file, the dotted key and what is wrong.

Override (QWEN_PRESETS=/path/file.yaml): merged over the defaults entry by entry — an entry you give (e.g.
``quality_presets.fast``) replaces the default entry of that name whole, new names are added. With ``replace: true``
at the top level, each section you give replaces the default section instead.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qwen_core.errors import PresetError

DEFAULT_PRESETS_PATH = Path(__file__).resolve().parent.parent / "presets" / "quality_presets.yaml"
MAX_FILE_BYTES = 1_000_000
MAX_SIDE = 8192
REQUIRED_QUALITY = ("fast", "balanced", "high")
MAX_SECONDS_PER_STEP = 600.0
_SECTIONS = ("aspect_presets", "quality_presets")
# The VRAM tier table was the governor's pixel window until the window came from the memory model.
_RETIRED = ("vram_tiers", "dtype_factor")
_TOP_KEYS = {"version", "replace", *_SECTIONS, *_RETIRED}
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AspectPreset:
    name: str
    width: int
    height: int
    pixels: int
    native: bool = False
    description: str = ""


@dataclass(frozen=True)
class QualityPreset:
    name: str
    steps: int
    true_cfg_scale: float
    description: str = ""
    # A time budget: the governor caps the size so the estimated step fits it. None = no cap (size by memory only).
    max_seconds_per_step: float | None = None


@dataclass(frozen=True)
class Presets:
    aspect_presets: dict[str, AspectPreset]
    quality_presets: dict[str, QualityPreset]
    sources: tuple[Path, ...] = field(default=())

    def aspect(self, name: str) -> AspectPreset:
        try:
            return self.aspect_presets[name]
        except KeyError:
            raise PresetError(
                f"aspect preset {name!r} does not exist; choose one of: {', '.join(self.aspect_presets)}."
            ) from None

    def quality(self, name: str) -> QualityPreset:
        try:
            return self.quality_presets[name]
        except KeyError:
            raise PresetError(
                f"quality preset {name!r} does not exist; choose one of: {', '.join(self.quality_presets)}."
            ) from None


class _NoAliasSafeLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors/aliases: presets never need them and they enable memory bombs."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(f"anchors/aliases are not allowed (alias *{event.anchor} at {event.start_mark})")
        return super().compose_node(parent, index)


def _fail(path: Path, key: str, problem: str) -> PresetError:
    where = f"key `{key}`: " if key else ""
    return PresetError(
        f"presets file {path}: {where}{problem}",
        fix=f"correct {path} (see presets/quality_presets.yaml for the format) or unset QWEN_PRESETS.",
    )


def read_yaml(path: Path) -> dict:
    """Parse one presets file safely into a mapping (not yet validated)."""
    try:
        size = path.stat().st_size
    except OSError as err:
        raise _fail(path, "", f"cannot be read ({err.strerror or err}).") from err
    if size > MAX_FILE_BYTES:
        raise _fail(path, "", f"is {size} bytes; presets files are limited to {MAX_FILE_BYTES} bytes.")
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.load(text, Loader=_NoAliasSafeLoader)  # noqa: S506 - a SafeLoader subclass
    except UnicodeDecodeError as err:
        raise _fail(path, "", "is not UTF-8 text.") from err
    except yaml.YAMLError as err:
        raise _fail(path, "", f"is not valid YAML: {err}") from err
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise _fail(path, "", f"must be a mapping of sections at the top level (got {type(data).__name__}).")
    unknown = sorted(str(k) for k in data if k not in _TOP_KEYS)
    if unknown:
        allowed = sorted(_TOP_KEYS - set(_RETIRED))
        raise _fail(path, unknown[0], f"unknown section; allowed: {', '.join(allowed)}.")
    for name in _RETIRED:
        if name in data:
            logger.warning("presets file %s: section `%s` is ignored: the governor's pixel window comes from the "
                           "memory model (presets/memory_model.json) now; delete the section.", path, name)
    return data


def _number(path: Path, key: str, value: Any, *, low: float, high: float, integer: bool = False) -> float:
    # bool is an int subclass: `steps: yes` must not become 1.
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        kind = "an integer" if integer else "a number"
        raise _fail(path, key, f"must be {kind} in [{low}, {high}] (got {value!r}).")
    if not math.isfinite(value) or not low <= value <= high:
        raise _fail(path, key, f"must be in [{low}, {high}] (got {value!r}).")
    return value


def _entry(path: Path, key: str, value: Any, allowed: set[str], required: set[str]) -> dict:
    if not isinstance(value, dict):
        raise _fail(path, key, f"must be a mapping (got {type(value).__name__}).")
    unknown = sorted(str(k) for k in value if k not in allowed)
    if unknown:
        raise _fail(path, f"{key}.{unknown[0]}", f"unknown key; allowed: {', '.join(sorted(allowed))}.")
    missing = sorted(required - set(value))
    if missing:
        raise _fail(path, f"{key}.{missing[0]}", "is required.")
    return value


def _text(path: Path, key: str, value: Any) -> str:
    if not isinstance(value, str) or len(value) > 500:
        raise _fail(path, key, "must be a string of at most 500 characters.")
    return value


def _aspect(path: Path, name: str, raw: Any) -> AspectPreset:
    key = f"aspect_presets.{name}"
    entry = _entry(
        path, key, raw, {"width", "height", "pixels", "native", "description"}, {"width", "height"}
    )
    sides = {}
    for side in ("width", "height"):
        sides[side] = int(_number(path, f"{key}.{side}", entry[side], low=16, high=MAX_SIDE, integer=True))
        if sides[side] % 16:
            raise _fail(path, f"{key}.{side}", f"must be a multiple of 16 (got {sides[side]}).")
    pixels = sides["width"] * sides["height"]
    if "pixels" in entry and entry["pixels"] != pixels:
        raise _fail(path, f"{key}.pixels", f"is {entry['pixels']!r} but width*height is {pixels}.")
    native = entry.get("native", False)
    if not isinstance(native, bool):
        raise _fail(path, f"{key}.native", f"must be true or false (got {native!r}).")
    return AspectPreset(name, sides["width"], sides["height"], pixels, native,
                        _text(path, f"{key}.description", entry.get("description", "")))


def _quality(path: Path, name: str, raw: Any) -> QualityPreset:
    key = f"quality_presets.{name}"
    entry = _entry(path, key, raw, {"steps", "true_cfg_scale", "description", "max_seconds_per_step"},
                   {"steps", "true_cfg_scale"})
    budget = entry.get("max_seconds_per_step")
    return QualityPreset(
        name=name,
        steps=int(_number(path, f"{key}.steps", entry["steps"], low=1, high=200, integer=True)),
        true_cfg_scale=float(_number(path, f"{key}.true_cfg_scale", entry["true_cfg_scale"], low=1.0, high=20.0)),
        description=_text(path, f"{key}.description", entry.get("description", "")),
        max_seconds_per_step=None if budget is None else float(
            _number(path, f"{key}.max_seconds_per_step", budget, low=0.01, high=MAX_SECONDS_PER_STEP)),
    )


def _section(path: Path, data: dict, name: str) -> dict:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise _fail(path, name, f"must be a mapping of named entries (got {type(value).__name__}).")
    for key in value:
        if not isinstance(key, str) or not key.strip() or len(key) > 64:
            raise _fail(path, f"{name}.{key!r}", "entry names must be non-empty strings of at most 64 characters.")
    return value


def _merge(base: dict[str, dict], override: dict, path: Path) -> dict[str, dict]:
    """Merge each section of ``override`` over ``base`` (entry level), or replace it with ``replace: true``."""
    replace = override.get("replace", False)
    if not isinstance(replace, bool):
        raise _fail(path, "replace", f"must be true or false (got {replace!r}).")
    merged = {name: dict(entries) for name, entries in base.items()}
    for name in _SECTIONS:
        if name in override:
            entries = _section(path, override, name)
            merged[name] = dict(entries) if replace else {**merged.get(name, {}), **entries}
    return merged


def _build(raw: dict[str, dict], origin: dict[tuple[str, str], Path], sources: tuple[Path, ...]) -> Presets:
    def src(section: str, name: str) -> Path:
        return origin.get((section, name), sources[-1])

    aspects = {n: _aspect(src("aspect_presets", n), n, v) for n, v in raw["aspect_presets"].items()}
    quality = {n: _quality(src("quality_presets", n), n, v) for n, v in raw["quality_presets"].items()}
    for name in REQUIRED_QUALITY:
        if name not in quality:
            raise _fail(sources[-1], f"quality_presets.{name}", "is required (the nodes offer fast/balanced/high).")
    return Presets(aspects, quality, sources)


_CACHE: dict[tuple, Presets] = {}


def _stamp(path: Path) -> tuple:
    try:
        st = path.stat()
        return (str(path), st.st_mtime_ns, st.st_size)
    except OSError:
        return (str(path), None, None)


def load_presets(path: str | os.PathLike | None = None) -> Presets:
    """Defaults (or ``path``), with the QWEN_PRESETS override merged over them. Cached until a file changes."""
    base_path = Path(path) if path is not None else DEFAULT_PRESETS_PATH
    override_env = os.environ.get("QWEN_PRESETS", "").strip()
    override_path = Path(override_env).expanduser() if override_env else None
    key = (_stamp(base_path), _stamp(override_path) if override_path else None)
    if key in _CACHE:
        return _CACHE[key]

    base = read_yaml(base_path)
    raw = {name: dict(_section(base_path, base, name)) for name in _SECTIONS}
    origin = {(s, n): base_path for s in _SECTIONS for n in raw[s]}
    sources = (base_path,)
    if override_path is not None:
        if not override_path.is_file():
            raise PresetError(
                f"QWEN_PRESETS points to {override_path}, which is not a file.",
                fix="create it, fix the path, or unset QWEN_PRESETS.",
            )
        override = read_yaml(override_path)
        raw = _merge(raw, override, override_path)
        origin.update({(s, n): override_path for s in _SECTIONS for n in _section(override_path, override, s)})
        sources = (base_path, override_path)
    presets = _build(raw, origin, sources)
    _CACHE.clear()  # one live entry is enough; files rarely change
    _CACHE[key] = presets
    return presets
