"""What the nodes share: socket types, the light QWEN_PIPE handle, model-folder lookup, residency access.

The handle is six strings. The pipeline itself lives in qwen_core's residency registry (one resident
model by default, keyed by the loader), so ComfyUI's output cache, which keeps node outputs and node
instances alive, never pins a 40 GB model: /free, an error or a cancel releases it and the next Generate
loads it again.
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen_core.errors import InvalidInputError
from qwen_core.options import AttentionChoice, CompileChoice, ComputeChoice, DtypeChoice, MemoryMode

from . import comfy_bridge as bridge

QWEN_PIPE = "QWEN_PIPE"
QWEN_SYSTEM = "QWEN_SYSTEM"
NO_MODEL = "(no Qwen-Image folder found: run the Downloader or make-tiny)"
DTYPES = [c.value for c in DtypeChoice]
MEMORY_MODES = [m.value for m in MemoryMode]
ATTENTIONS = [a.value for a in AttentionChoice]
COMPILES = [c.value for c in CompileChoice]
COMPUTES = [c.value for c in ComputeChoice]
HIDDEN = {"unique_id": "UNIQUE_ID"}


@dataclass(frozen=True)
class PipeHandle:
    """QWEN_PIPE: which model with which settings. Light and immutable (safe in ComfyUI's cache)."""

    path: str
    dtype: str = "auto"
    memory_mode: str = "auto"
    attention: str = "auto"
    compile: str = "auto"
    compute: str = "auto"

    @property
    def key(self) -> tuple[str, ...]:
        return (self.path, self.dtype, self.memory_mode, self.attention, self.compile, self.compute)

    def loader_kwargs(self) -> dict[str, str]:
        return {"dtype": self.dtype, "memory_mode": self.memory_mode, "attention": self.attention,
                "compile": self.compile, "compute": self.compute}


def model_choices() -> list[str]:
    return bridge.list_model_folders() or [NO_MODEL]


def _inside(path: Path, roots: list[Path]) -> bool:
    """Lexically inside a root ('..' resolved). Like qwen_core.paths, a symlink the user placed inside the
    model folder (e.g. to another disk) is trusted; the pack itself never creates links."""
    full = os.path.abspath(path)
    for root in roots:
        base = os.path.abspath(root)
        try:
            if os.path.commonpath([full, base]) == base:
                return True
        except ValueError:  # different drives on Windows
            continue
    return False


def validate_float(name: str, value: float | None, low: float, high: float) -> bool | str:
    """VALIDATE_INPUTS for a FLOAT widget: NaN passes ComfyUI's min/max check (both comparisons are false).

    Naming an input in VALIDATE_INPUTS makes ComfyUI skip its own range check for it, so the range is
    checked here too. ``None`` means the input is linked: its value is checked when the node runs.
    """
    if value is None:
        return True
    number = float(value)
    if not math.isfinite(number) or not low <= number <= high:
        return f"{name} must be a finite number in {low:g}..{high:g}, got {value!r}"
    return True


def validate_model_name(model: str) -> bool | str:
    """VALIDATE_INPUTS for a model dropdown.

    A workflow may name a model that the Downloader fetches in the same run, so an unknown name is accepted
    (ComfyUI's own list check would refuse it before the download could run); it must still be a plain
    relative name, and resolve_model() reports a missing folder naming the input.
    """
    from qwen_core.paths import safe_join

    try:
        safe_join("/models", str(model))
    except InvalidInputError as err:
        return f"model: {err}"
    return True


def resolve_model(model: str, model_path: str | None = None, field: str = "model") -> Path:
    """The model folder from the dropdown or a linked path; it must lie in one of the model folders.

    A workflow is shared data: refusing paths outside ComfyUI's model folders keeps it from pointing the
    loader at arbitrary places on the disk.
    """
    roots = bridge.models_dirs()
    if model_path:
        candidate, field = Path(model_path).expanduser(), "model_path"
        if not candidate.is_absolute():
            candidate = bridge.resolve_model_folder(model_path)
        if not _inside(candidate, roots):
            shown = ", ".join(str(r) for r in roots)
            raise InvalidInputError(field, f"{model_path!r} is outside the model folders ({shown}).",
                                    fix="Download into ComfyUI's models/diffusers folder with the Downloader.")
    elif not model or model == NO_MODEL:
        raise InvalidInputError(field, "no Qwen-Image model folder is selected.",
                                fix="Run the Downloader node, or `python -m qwen_core make-tiny "
                                "<ComfyUI>/models/diffusers/qwen-image-tiny` for a CPU try-out.")
    else:
        candidate = bridge.resolve_model_folder(model)
    if not (candidate / "model_index.json").is_file():
        raise InvalidInputError(field, f"{candidate} is not a diffusers model folder (no model_index.json).",
                                fix="Pick another folder, or download the model with the Downloader node.")
    return candidate


_generators: OrderedDict[tuple[str, ...], Any] = OrderedDict()
_generators_lock = threading.Lock()
MAX_GENERATORS = 4  # light objects (tokenizer, configs); the weights live in the residency registry


def generator_for(handle: PipeHandle) -> Any:
    """The generator of ``handle``: folder checked and tokenizer built once; weights load on first use.

    Generators are cached here, apart from the weights registry, because they are light: in the registry a
    generator would count as the resident model and be evicted by its own weights' load. The pipeline they
    load lives in qwen_core's residency registry (``memory.get_residency_manager``), one model by default.
    """
    from qwen_core.generator import QwenImageGenerator

    with _generators_lock:
        if handle.key in _generators:
            _generators.move_to_end(handle.key)
            return _generators[handle.key]
    generator = QwenImageGenerator(handle.path, **handle.loader_kwargs())
    with _generators_lock:
        _generators[handle.key] = generator
        while len(_generators) > MAX_GENERATORS:
            _generators.popitem(last=False)
    return generator


def release_resident() -> list[Any]:
    """Release every resident model (ComfyUI /free, errors, cancel). Returns the released keys."""
    from qwen_core.memory import get_residency_manager

    return get_residency_manager().release_all()


_hooks_lock = threading.Lock()
_hooks_installed = False


def install_comfy_hooks() -> None:
    """Once per process: free ComfyUI's models before ours load; release ours on ComfyUI's /free and when
    ComfyUI needs memory for its own models that unloading its models did not give it."""
    global _hooks_installed
    with _hooks_lock:
        if _hooks_installed:
            return
        from qwen_core import loading

        loading.add_before_load_hook(bridge.free_comfy_memory)
        bridge.on_unload_models(release_resident)
        bridge.on_memory_pressure(release_resident)
        _hooks_installed = True
