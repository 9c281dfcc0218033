"""What the nodes share: socket types, the light QWEN_PIPE handle, model-folder lookup, residency access.

The handle is six strings. The pipeline itself lives in qwen_core's residency registry (one resident
model by default, keyed by the loader), so ComfyUI's output cache, which keeps node outputs and node
instances alive, never pins a 40 GB model: /free, an error or a cancel releases it and the next Generate
loads it again.
"""

from __future__ import annotations

import dataclasses
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


COMFY_PREFIX = "comfy: "  # Loader entries assembled from ComfyUI's single files (models/diffusion_models ...)
AUTO = "auto"
CUSTOM = "custom"  # the Loader's devices list: take the custom_devices text instead


@dataclass(frozen=True)
class PipeHandle:
    """QWEN_PIPE: which model with which settings. Light and immutable (safe in ComfyUI's cache).

    ``path`` is a diffusers folder, or a diffusion-model file; then ``text_encoder`` / ``vae`` name the chosen
    files ("" = picked from what is present) and ``configs`` the config source folder."""

    path: str
    dtype: str = "auto"
    memory_mode: str = "auto"
    attention: str = "auto"
    loras: tuple[tuple[str, float], ...] = ()  # (file, strength) in stacking order; not part of ``key``
    text_encoder: str = ""
    vae: str = ""
    configs: str = ""
    compile: str = "auto"
    compute: str = "auto"
    devices: str = "single"  # qwen_core.placement's text: which card runs which component

    @property
    def key(self) -> tuple[str, ...]:
        """The generator (and resident model) of this handle: LoRAs are fused into that one model, so handles
        that differ only in LoRAs share it."""
        base = (self.path, self.dtype, self.memory_mode, self.attention, self.compile, self.compute, self.devices)
        return (*base, self.text_encoder, self.vae, self.configs) if self.is_single_file else base

    @property
    def is_single_file(self) -> bool:
        return bool(self.configs)

    def with_lora(self, path: str, strength: float) -> PipeHandle:
        """A new handle with one more LoRA on top of the stack (this one is left as it is)."""
        return dataclasses.replace(self, loras=(*self.loras, (str(path), float(strength))))

    def loader_kwargs(self) -> dict[str, str]:
        return {"dtype": self.dtype, "memory_mode": self.memory_mode, "attention": self.attention,
                "compile": self.compile, "compute": self.compute, "placement": self.devices}


def model_choices() -> list[str]:
    """Diffusers folders, then "comfy: <file>" for each Qwen-Image diffusion model in ComfyUI's folders."""
    from qwen_core.sources.listing import list_files
    from qwen_core.sources.types import Component

    files = list_files(bridge.comfy_file_dirs("diffusion_models"), Component.TRANSFORMER)
    return bridge.list_model_folders() + [COMFY_PREFIX + name for name in files] or [NO_MODEL]


def file_choices(kind: str) -> list[str]:
    """"auto" + the Qwen-Image text encoders / VAEs in ComfyUI's ``kind`` folders."""
    from qwen_core.sources.listing import list_files
    from qwen_core.sources.types import Component

    component = Component.TEXT_ENCODER if kind == "text_encoders" else Component.VAE
    return [AUTO, *list_files(bridge.comfy_file_dirs(kind), component)]


def configs_choices() -> list[str]:
    """"auto" + folders a single-file model can take its configs from (configs-only downloads first)."""
    return [AUTO, *bridge.list_model_folders(configs_only=True), *bridge.list_model_folders()]


def resolve_single_files(model: str, text_encoder: str = AUTO, vae: str = AUTO, configs: str = AUTO,
                         configs_path: str | None = None) -> tuple[Path, str, str, str]:
    """(diffusion-model file, text encoder file or "", VAE file or "", configs folder) for a "comfy: " entry.
    Every path must lie in ComfyUI's model folders; "auto" configs pick a folder of the same Edit generation."""
    from qwen_core.sources.listing import pick_configs, require_file

    name = model[len(COMFY_PREFIX):]
    path = require_file(bridge.comfy_file_dirs("diffusion_models"), name, "diffusion model")
    chosen = {}
    for field, kind, value in (("text_encoder", "text_encoders", text_encoder), ("vae", "vae", vae)):
        chosen[field] = "" if value in ("", AUTO) else str(require_file(bridge.comfy_file_dirs(kind), value, field))
    if configs_path:
        folder = resolve_model(configs, configs_path, field="configs")
    elif configs in ("", AUTO):
        picked = pick_configs(name, configs_choices()[1:])
        if picked is None:
            raise InvalidInputError("configs", f"no Qwen-Image configs folder for {name} in {bridge.models_dirs()[0]}.",
                                    fix="Run the Downloader with allow_patterns 'model_index.json,*/config.json,"
                                        "tokenizer/*,scheduler/*' (a few MB), or pick a diffusers folder.")
        folder = resolve_model(picked, field="configs")
    else:
        folder = resolve_model(configs, field="configs")
    return path, chosen["text_encoder"], chosen["vae"], str(folder)


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


def devices_text(devices: str, custom_devices: str = "") -> tuple[str, str]:
    """(the placement text, the widget it came from): the list's entry, or the free text for "custom"."""
    if devices == CUSTOM:
        return (custom_devices or "").strip(), "custom_devices"
    return devices, "devices"


def check_devices(devices: str, custom_devices: str = "") -> str:
    """The placement text of the Loader's devices widgets, its syntax checked (InvalidInputError naming the
    widget); which cards exist is checked when the loader is made, on the machine that runs it."""
    from qwen_core.placement.spec import is_auto, parse_devices

    text, field = devices_text(devices, custom_devices)
    if field == "custom_devices" and not text:
        raise InvalidInputError(field, "is empty.", fix="Write e.g. text_encoder=cuda:1, or pick an entry of devices.")
    if not is_auto(text):
        parse_devices(text, "cuda", field=field)
    return text


def validate_devices(devices: str, custom_devices: str = "") -> bool | str:
    """VALIDATE_INPUTS for the Loader's devices widgets (``check_devices``)."""
    try:
        check_devices(devices, custom_devices)
    except InvalidInputError as err:
        return str(err)
    return True


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
        generator = _generators.get(handle.key)
        if generator is not None:
            _generators.move_to_end(handle.key)
    if generator is None:
        if handle.is_single_file:
            from qwen_core.loading import PipelineLoader

            generator = QwenImageGenerator(PipelineLoader(single_files_source(handle), **handle.loader_kwargs()))
        else:
            generator = QwenImageGenerator(handle.path, **handle.loader_kwargs())
        with _generators_lock:
            _generators[handle.key] = generator
            while len(_generators) > MAX_GENERATORS:
                _generators.popitem(last=False)
    generator.set_loras(handle.loras)  # checked against the model now; fused (no reload) on the next load
    return generator


def single_files_source(handle: PipeHandle) -> Any:
    """The ``SingleFilesSource`` of a single-file handle; the tokenizer comes from the configs folder, else
    from ComfyUI's own qwen25_tokenizer."""
    from qwen_core.sources.comfy_files import SingleFilesSource
    from qwen_core.sources.types import Component

    configs = Path(handle.configs)
    tokenizer = None if (configs / "tokenizer").is_dir() else bridge.comfy_tokenizer_dir()
    return SingleFilesSource(
        handle.path, handle.text_encoder or None, handle.vae or None, configs=configs, tokenizer_dir=tokenizer,
        companion_dirs={Component.TEXT_ENCODER: bridge.comfy_file_dirs("text_encoders"),
                        Component.VAE: bridge.comfy_file_dirs("vae")},
    )


def release_resident() -> list[Any]:
    """Release every resident model (ComfyUI /free, errors, cancel). Returns the released keys."""
    from qwen_core.memory import get_residency_manager

    return get_residency_manager().release_all()


def resident_bytes(device: Any) -> int:
    """Bytes of our resident models' weights and buffers on ``device`` ("cpu" = RAM), for the bridge's memory
    hooks. Shared tensors count once; nothing resident costs no torch import."""
    from qwen_core.memory import get_residency_manager

    from .memory_policy import device_key

    manager = get_residency_manager()
    keys = manager.resident_keys()
    if not keys:
        return 0
    import torch

    want, seen, total = device_key(device), set(), 0
    for key in keys:
        obj = manager.get(key)
        components = getattr(obj, "components", None)
        modules = components.values() if isinstance(components, dict) else [obj]
        for module in modules:
            if not isinstance(module, torch.nn.Module):
                continue
            for tensor in [*module.parameters(), *module.buffers()]:
                if id(tensor) in seen or device_key(tensor.device) != want:
                    continue
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


_hooks_lock = threading.Lock()
_hooks_installed = False


def install_comfy_hooks() -> None:
    """Once per process: ComfyUI frees its models before ours load (qwen_core's before-load hook), and
    ComfyUI's /free, its own loads and its RAM-pressure cache may release ours when that is what frees the
    memory (the bridge's hooks). Called when the pack is imported inside ComfyUI, and again (no-op) by the
    nodes, so a headless use of the nodes installs them too."""
    global _hooks_installed
    with _hooks_lock:
        if _hooks_installed:
            return
        from qwen_core import loading

        loading.add_before_load_hook(bridge.free_comfy_memory)
        bridge.install_memory_hooks(release_resident, resident_bytes)
        _hooks_installed = True
