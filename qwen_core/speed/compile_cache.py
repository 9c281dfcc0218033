"""Persistent compile cache: torch's own on-disk caches (inductor FX graphs, AOTAutograd, Triton kernels)
in a folder of ours, keyed by torch / CUDA / GPU / Python, so the second process on a machine loads compiled
blocks instead of compiling them (~16 s on an H100 for the 60-block transformer).

Where (first that applies): ``QWEN_COMPILE_CACHE``; ``$QWEN_HOME/compile_cache``; a root registered by the
ComfyUI bridge (``register_cache_root``, e.g. ComfyUI's user folder); ``~/.cache/qwen_core/compile``
(``XDG_CACHE_HOME`` honoured). Inside it, one folder per key, e.g.
``torch2.11.0+cu130-cuda13.0-NVIDIA_H200-sm90-py3.12``: another torch, driver toolkit, GPU or Python gets
its own folder and compiles afresh instead of loading artifacts built for something else (torch's own cache
keys also hash the torch build, the device and every graph's shapes, so a shape it has not seen compiles
rather than crashes). Deleting the folder is always safe.

How: inductor reads ``TORCHINDUCTOR_CACHE_DIR`` whenever it looks up a cache, so ``activate`` points it at
our folder for the process. A value the user set (anything but torch's default) is respected. The variable is
process-wide: other ``torch.compile`` users in the same process (e.g. ComfyUI's TorchCompileModel node) share
the folder, which is harmless.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import platform
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qwen_core.atomic_io import write_bytes_atomic

ENV_DIR = "QWEN_COMPILE_CACHE"
MARKER = "qwen_compiled.json"  # written after a successful first compile: the folder is warm
_registered_root: Path | None = None


def register_cache_root(path: str | os.PathLike | None) -> None:
    """The ComfyUI bridge's folder for compile caches (used when neither env variable is set)."""
    global _registered_root
    _registered_root = Path(path).expanduser() if path else None


def cache_root() -> Path:
    env = os.environ.get(ENV_DIR, "").strip()
    if env:
        return Path(env).expanduser()
    home = os.environ.get("QWEN_HOME", "").strip()
    if home:
        return Path(home).expanduser() / "compile_cache"
    if _registered_root is not None:
        return _registered_root
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "qwen_core" / "compile"


def cache_key(device: str | torch.device = "cuda") -> str:
    """torch, CUDA toolkit, GPU name + compute capability (CPU: the machine), Python: a folder name."""
    dev = torch.device(device)
    parts = [f"torch{torch.__version__}"]
    if dev.type == "cuda" and torch.cuda.is_available():
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        parts += [f"cuda{torch.version.cuda}", props.name, f"sm{props.major}{props.minor}"]
    else:
        parts += [dev.type, platform.machine()]
    parts.append("py" + ".".join(platform.python_version_tuple()[:2]))
    return re.sub(r"[^A-Za-z0-9.+_-]+", "_", "-".join(parts))


@dataclass(frozen=True)
class CacheInfo:
    path: Path
    key: str
    ours: bool  # False: the user's TORCHINDUCTOR_CACHE_DIR is in force
    warm: bool  # a first compile already completed with this folder

    def describe(self) -> str:
        state = "warm" if self.warm else "empty"
        return f"{state} compile cache at {self.path}" + ("" if self.ours else " (TORCHINDUCTOR_CACHE_DIR)")


def _torch_default_dir() -> str:
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return os.path.abspath(default_cache_dir())


def activate(device: str | torch.device = "cuda") -> CacheInfo:
    """Point torch's compile caches at our keyed folder for this process (idempotent); returns where."""
    key = cache_key(device)
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current and os.path.abspath(current) != _torch_default_dir() and not _is_ours(Path(current)):
        path, ours = Path(current), False
    else:
        path, ours = cache_root() / key, True
        path.mkdir(parents=True, exist_ok=True)
        if current is None or os.path.abspath(current) != os.path.abspath(path):
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
            _clear_torch_cache_paths()
    _enable_disk_caches()
    if precompile_wanted():
        _names_past_other_processes()
        with precompiling():
            load_artifacts(path)
    return CacheInfo(path, key, ours, (path / MARKER).is_file())


def _is_ours(path: Path) -> bool:
    try:
        return path.resolve().parent == cache_root().resolve()
    except OSError:
        return False


def _clear_torch_cache_paths() -> None:
    # Some cache paths are memoised inside torch; torch's own temporary_cache_dir clears them the same way.
    try:
        from torch._inductor.utils import clear_caches
    except ImportError:
        return
    clear_caches()


def _enable_disk_caches() -> None:
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    if hasattr(functorch_config, "enable_autograd_cache"):
        functorch_config.enable_autograd_cache = True


# Dynamo's own cache ("precompile", torch >= 2.9), on by default (QWEN_COMPILE_PRECOMPILE=0 turns it off): the
# traced bytecode and guards are saved with torch's cache artifacts into our folder, so a cold process skips
# tracing too. Without it inductor's caches save codegen only and dynamo re-traces the blocks on each process start:
# on an H200 the first image of a new process took 1.67x a warm one (14 s of tracing), with it 1.19x (the saved
# traces load in ~2 s; bench/RESULTS.md). On a CPU the tiny model's first call in a fresh process went from 7.9 s to
# 0.05 s with torch 2.14, from 51 s to 0.02 s with torch 2.11 (tests/test_speed.py::TestColdStartWithWarmCache).
# Dynamo's switch for it is process-wide and changes how graphs compile (some guards are dropped, a graph that holds
# a class defined inside a function fails): ``precompiling`` turns it on only around our own compiles and calls, so
# other torch.compile users in the process (ComfyUI's nodes) keep their setting, and ``qwen_core.speed.compile``
# falls back to a plain compile when a graph cannot be stored.
PRECOMPILE_ENV = "QWEN_COMPILE_PRECOMPILE"
ARTIFACTS = "torch_cache_artifacts.bin"
_loaded_artifacts: set[Path] = set()
_precompile_refusal_logged = False
_guards_round_trip: bool | None = None  # repair_guard_pickling's answer, once per process


def precompile_wanted() -> bool:
    global _precompile_refusal_logged, _guards_round_trip
    import torch._dynamo.config as dynamo_config

    if os.environ.get(PRECOMPILE_ENV, "").strip().lower() in ("0", "false", "no", "off"):
        return False
    available = hasattr(dynamo_config, "caching_precompile") and hasattr(torch.compiler, "save_cache_artifacts")
    if available and _guards_round_trip is None:
        _guards_round_trip = repair_guard_pickling()
    if available and _guards_round_trip:
        return True
    if not _precompile_refusal_logged:
        _precompile_refusal_logged = True
        why = "its saved guards do not load back" if available else "it has no dynamo cache to save (torch >= 2.9)"
        logging.getLogger(__name__).warning(
            "The dynamo compile cache (%s) is off with torch %s: %s. A new process re-traces the transformer "
            "blocks, its first image takes longer.", PRECOMPILE_ENV, torch.__version__, why)
    return False


@contextlib.contextmanager
def precompiling(on: bool = True) -> Iterator[None]:
    """Dynamo's cache switch (``caching_precompile``) set to ``on`` inside the block only (see above)."""
    import torch._dynamo.config as dynamo_config

    if not hasattr(dynamo_config, "caching_precompile"):
        yield
        return
    # Set and restored directly: this wraps every block call (3000 per 50-step image), and a direct set costs
    # less than ``dynamo_config.patch`` (13 vs 30 us per use on a CPU).
    previous = dynamo_config.caching_precompile
    dynamo_config.caching_precompile = on
    try:
        yield
    finally:
        dynamo_config.caching_precompile = previous


def repair_guard_pickling() -> bool:
    """True when this torch can save and load back a guard on a function's default argument, repairing it first
    where needed; False when it still cannot (then nothing is saved: a saved trace that does not load would
    fail the next process's first image).

    torch 2.11 (the GPU image's) saves such a guard (``DefaultsSource``) with two computed fields that its
    constructor does not take, so the next process fails to load every trace (TypeError; seen on an H200, and
    reproduced on a CPU with torch 2.11.0, where the same trace then loaded and ran exactly once the reducer
    passed the constructor's fields only). torch 2.14 pickles it correctly and is left as it is. The check is the
    round trip itself, not a version number: the repair is applied only where the bug is, and verified.
    """
    import dataclasses
    import pickle

    try:
        from torch._dynamo.source import DefaultsSource, LocalSource
    except ImportError:
        return False

    def round_trip() -> bool:
        try:
            pickle.loads(pickle.dumps(DefaultsSource(LocalSource("x"), 0)))
        except Exception:  # noqa: BLE001 - any failure means: saved traces would not load
            return False
        return True

    if round_trip():
        return True

    def reduce_constructor_fields(self: Any) -> tuple[type, tuple]:
        return type(self), tuple(getattr(self, f.name) for f in dataclasses.fields(self) if f.init)

    DefaultsSource.__reduce__ = reduce_constructor_fields  # torch's own class: the bug is in its reducer
    return round_trip()


_names_moved = False


def _names_past_other_processes() -> None:
    """Start this process's dynamo global names past any a saving process used (once per process).

    torch names the globals a compiled frame installs (``__builtins_dict___2``...) from one process-wide counter
    that starts at 0, and a loaded trace installs the names its own process gave them. The next new compile in
    the loading process (another batch size, another attention kernel) then picks a taken name and fails
    ("Name ... already exists in scope"; CPU, torch 2.11 and 2.14). Starting the counter at the clock's
    nanoseconds orders the names by process start: an earlier process used far fewer names than the
    nanoseconds between two starts.
    """
    global _names_moved
    if _names_moved:
        return
    try:
        from torch._dynamo import bytecode_transformation
    except ImportError:
        return
    counter = getattr(bytecode_transformation, "_unique_id_counter", None)
    if counter is None:
        return
    bytecode_transformation._unique_id_counter = itertools.count(max(next(counter), time.time_ns()))
    _names_moved = True


def load_artifacts(path: Path) -> bool:
    """Load the saved artifacts of ``path`` into torch's caches (once per process); False if there are none."""
    file = path / ARTIFACTS
    if path in _loaded_artifacts or not file.is_file():
        return False
    _loaded_artifacts.add(path)  # tried once: a file that fails to load is not read again
    try:  # torch returns None for bytes it rejects (checksum, version) and may raise for others
        why = None if torch.compiler.load_cache_artifacts(file.read_bytes()) is not None else "rejected by torch"
    except Exception as err:  # noqa: BLE001 - a damaged or foreign cache only costs a compile, never the image
        why = f"{type(err).__name__}: {err}"
    if why is not None:
        logging.getLogger(__name__).warning("compile cache: %s could not be loaded (%s); compiling afresh, the next "
                                            "first compile rewrites it", file, why)
    return why is None


def save_artifacts(info: CacheInfo) -> None:
    """Everything compiled in this process so far, dynamo's traces included, into the folder (atomically)."""
    saved = torch.compiler.save_cache_artifacts()
    if saved:
        write_bytes_atomic(info.path / ARTIFACTS, saved[0])


def mark_warm(info: CacheInfo, seconds: float, what: str) -> None:
    """Record a completed first compile (atomically: a reader never sees half a marker)."""
    data = {"key": info.key, "what": what, "first_call_s": round(seconds, 2),
            "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_bytes_atomic(info.path / MARKER, json.dumps(data).encode())
