"""The one door to ComfyUI. Every ComfyUI import is optional, so the nodes also run headless (tests, CLI).

What goes through here: model folders (folder_paths, incl. extra_model_paths.yaml), the session log's folder
(ComfyUI's user folder), memory hand-over both ways (``free_comfy_memory`` before our weights load;
``install_memory_hooks`` so ComfyUI's /free, its loads and its RAM-pressure cache can release our model,
only when that is what frees the memory: ``memory_policy``), the interrupt flag (Cancel in the UI), progress
bars (comfy.utils.ProgressBar) and text/progress messages to the web extension (server.PromptServer).

Features are detected, never version numbers: ComfyUI 0.3.64 and 0.33 (dynamic VRAM, RAM-pressure cache,
``unload_model_and_clones``) both work; a hook that cannot be installed is named once in the log.
"""

from __future__ import annotations

import inspect
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import memory_policy as policy

log = logging.getLogger("qwen_image.nodes")

try:  # ComfyUI's modules are top-level names inside a running ComfyUI only.
    import folder_paths  # type: ignore[import-not-found]
except ImportError as err:  # pragma: no cover - depends on the host
    if err.name != "folder_paths":
        raise
    folder_paths = None
try:
    import comfy.model_management as model_management  # type: ignore[import-not-found]
    import comfy.utils as comfy_utils  # type: ignore[import-not-found]
except ImportError as err:  # pragma: no cover - depends on the host
    if not (err.name or "").startswith("comfy"):
        raise
    model_management = comfy_utils = None
try:  # ComfyUI >= 0.33: the RAM-pressure cache's release hook (comfy.memory_management)
    import comfy.memory_management as memory_management  # type: ignore[import-not-found]
except ImportError as err:  # pragma: no cover - depends on the host
    if not (err.name or "").startswith("comfy"):
        raise
    memory_management = None
try:  # ComfyUI's output cache; RAMPressureCache exists from 0.33 on
    from comfy_execution import caching as comfy_caching  # type: ignore[import-not-found]
except ImportError as err:  # pragma: no cover - depends on the host
    if not (err.name or "").startswith("comfy_execution"):
        raise
    comfy_caching = None
try:
    from server import PromptServer  # type: ignore[import-not-found]
except ImportError as err:  # pragma: no cover - depends on the host
    if err.name != "server":
        raise
    PromptServer = None

IN_COMFYUI = folder_paths is not None and model_management is not None
FOLDER_KEY = "diffusers"  # ComfyUI's own key for diffusers-layout folders (models/diffusers)
EVENT = "qwen-image.status"  # websocket event the web extension listens to
QWEN_CLASS_PREFIX = "QwenImage"  # model_index.json _class_name of every Qwen-Image pipeline


def models_dirs() -> list[Path]:
    """Folders that hold diffusers model folders: ComfyUI's models/diffusers + extra_model_paths entries."""
    if folder_paths is not None:
        try:
            return [Path(p) for p in folder_paths.get_folder_paths(FOLDER_KEY)]
        except KeyError:
            return [Path(folder_paths.models_dir) / FOLDER_KEY]
    from qwen_core import paths

    return [paths.models_root()]


# ComfyUI's folder_paths keys for single files (the second name is the pre-2025 alias).
FILE_FOLDER_KEYS = {"diffusion_models": ("diffusion_models", "unet"), "text_encoders": ("text_encoders", "clip"),
                    "vae": ("vae",)}  # fmt: skip


def comfy_file_dirs(kind: str) -> list[Path]:
    """ComfyUI's folders for single files of ``kind`` (diffusion_models, text_encoders, vae), extra_model_paths
    included. Headless: ``<kind>`` beside the diffusers store (``<models>/diffusion_models`` for ``<models>/diffusers``)."""
    if folder_paths is not None:
        for key in FILE_FOLDER_KEYS[kind]:
            try:
                return [Path(p) for p in folder_paths.get_folder_paths(key)]
            except KeyError:
                continue
        return [Path(folder_paths.models_dir) / kind]
    from qwen_core import paths

    return [paths.models_root().parent / kind]


def comfy_models_dir() -> Path:
    """ComfyUI's models folder (``folder_paths.models_dir``); headless, the folder that holds the diffusers store."""
    if folder_paths is not None:
        return Path(folder_paths.models_dir)
    return models_dirs()[0].parent


def comfy_download_dirs() -> dict[str, Path]:
    """Where the Downloader's comfyui layout puts each kind: the first of ComfyUI's folders for it that carries the
    kind's own name (``models/diffusion_models``, not the legacy ``models/unet`` that ComfyUI lists first), else
    the first; headless, ``<kind>`` beside the diffusers store."""
    folders = {kind: comfy_file_dirs(kind) for kind in FILE_FOLDER_KEYS} | {LORA_KEY: lora_dirs()}
    return {kind: next((d for d in dirs if d.name == kind), dirs[0]) if dirs else comfy_models_dir() / kind
            for kind, dirs in folders.items()}


def comfy_tokenizer_dir() -> Path | None:
    """ComfyUI's own Qwen2.5 tokenizer folder (comfy/text_encoders/qwen25_tokenizer), when running inside ComfyUI."""
    if model_management is None:
        return None
    folder = Path(model_management.__file__).resolve().parent / "text_encoders" / "qwen25_tokenizer"
    return folder if (folder / "tokenizer_config.json").is_file() else None


def comfyui_version() -> str | None:
    """ComfyUI's version when running inside it (comfyui_version.py exists since 0.3.x)."""
    if folder_paths is None:
        return None
    try:
        from comfyui_version import __version__  # type: ignore[import-not-found]
    except ImportError:
        return "unknown"
    return str(__version__)


def register_models_dirs() -> list[Path]:
    """Tell qwen_core where ComfyUI keeps models, so downloads land in ComfyUI's folder."""
    dirs = models_dirs()
    if folder_paths is not None:
        from qwen_core import paths

        paths.register_models_dirs(dirs)
    return dirs


def _is_qwen_folder(folder: Path) -> bool:
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return str(index.get("_class_name", "")).startswith(QWEN_CLASS_PREFIX)


def list_model_folders(*, configs_only: bool = False) -> list[str]:
    """Qwen-Image diffusers folders (relative names, up to two levels deep) in every models dir. Folders without
    weights (configs-only downloads, the config source of single files) are listed only with ``configs_only``."""
    from qwen_core.sources.configs import is_configs_only

    found: list[str] = []
    for root in models_dirs():
        if not root.is_dir():
            continue
        for child in _subdirs(root):
            for folder in [child, *_subdirs(child)]:  # "name" or "org/name" (the Downloader's layout)
                name = folder.relative_to(root).as_posix()
                if _is_qwen_folder(folder) and name not in found and is_configs_only(folder) == configs_only:
                    found.append(name)
    return found


def _subdirs(folder: Path) -> list[Path]:
    """Visible subfolders; an unreadable folder lists nothing instead of breaking /object_info."""
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


def _first_in(roots: list[Path], name: str, exists: Callable[[Path], bool]) -> Path:
    """``name`` in the first root that has it (else in the first root); a name never leaves its root."""
    from qwen_core import paths

    for root in roots:
        candidate = paths.safe_join(root, name)
        if exists(candidate):
            return candidate
    return paths.safe_join(roots[0], name)


def resolve_model_folder(name: str) -> Path:
    """Map a dropdown name back to its folder (first models dir that has it)."""
    return _first_in(models_dirs(), name, Path.is_dir)


def register_reports_dir() -> Path | None:
    """Inside ComfyUI the session log goes to ``<ComfyUI user folder>/qwen-image/last_session.log``.

    Not the pack's own folder: a registry install may be read-only and is replaced on update. The user
    folder (``--user-directory``, ``--base-directory``) is ComfyUI's place for files a user keeps; it is not
    served over HTTP outside its per-user subfolders. QWEN_REPORTS_DIR still wins.
    """
    if folder_paths is None:
        return None
    getter = getattr(folder_paths, "get_user_directory", None) or folder_paths.get_output_directory
    from qwen_core import paths

    folder = Path(getter()) / "qwen-image"
    paths.register_reports_dir(folder)
    return folder


def free_comfy_memory(bytes_needed: int) -> None:
    """Before our weights load: ComfyUI unloads its own models until ``bytes_needed`` is free on its device,
    and (0.33's RAM-pressure cache) drops cached outputs of earlier workflows until as much RAM is free.

    Not ``for_dynamic``: our weights are ordinary allocations that ComfyUI's dynamic VRAM cannot page out,
    so its dynamic models must really give the memory back.
    """
    if model_management is None:
        return
    device = model_management.get_torch_device()
    model_management.free_memory(comfy_load_request(bytes_needed), device)
    release_ram = getattr(memory_management, "extra_ram_release", None)
    if release_ram is not None:
        headroom = int(getattr(memory_management, "RAM_CACHE_HEADROOM", 0) or 0)
        release_ram(headroom + int(bytes_needed))  # inactive entries only: the running workflow keeps its data
    model_management.soft_empty_cache()


def comfy_load_request(weight_bytes: int) -> float:
    """What ComfyUI's own ``load_models_gpu`` asks ``free_memory`` for before loading ``weight_bytes`` of a model:
    10% over the weights plus its minimum inference memory (its reserve included). ComfyUI unloads only what the
    request leaves short (a partial unload), so asking for the bare weights left ours no room to run (H200:
    a 30 GiB native model gave back 3.8 GiB and our reload hit OOM)."""
    minimum = getattr(model_management, "minimum_inference_memory", None)
    return weight_bytes * 1.1 + (float(minimum()) if minimum is not None else float(1024**3))


def memory_is_short() -> bool:
    """After a Cancel: would keeping our model resident starve the next run? ComfyUI's own yardstick (its
    minimum inference memory) against the free memory of its device and of RAM; 1 GiB headless."""
    import psutil

    floor = float(1024**3)
    if model_management is not None:
        minimum = getattr(model_management, "minimum_inference_memory", None)
        floor = float(minimum()) if minimum is not None else floor
        if model_management.get_free_memory(model_management.get_torch_device()) < floor:
            return True
    return psutil.virtual_memory().available < floor


def is_interrupt(err: BaseException) -> bool:
    """ComfyUI's Cancel (an Exception in 0.3.x, a BaseException from 0.33 on)."""
    cls = getattr(model_management, "InterruptProcessingException", None)
    return cls is not None and isinstance(err, cls)


def interrupted() -> bool:
    """True once the user pressed Cancel (ComfyUI's /interrupt flag); never clears it."""
    return bool(model_management is not None and model_management.processing_interrupted())


def raise_as_interrupt(err: BaseException) -> None:
    """Re-raise our cancel error as ComfyUI's interrupt, so the UI shows "interrupted", not a failure.

    The flag is consumed like ComfyUI's own progress hook does: ComfyUI never clears it at the start of a
    prompt, so a flag we only read would cancel the next queued run before its first step.
    """
    if model_management is not None:
        model_management.interrupt_current_processing(False)
        raise model_management.InterruptProcessingException() from err
    raise err


class Progress:
    """A ComfyUI progress bar (headless: remembers the last value for tests)."""

    def __init__(self, total: int, node_id: str | None = None) -> None:
        self.total, self.value, self.node_id = max(int(total), 1), 0, node_id
        self._bar = None
        if comfy_utils is not None:
            try:
                self._bar = comfy_utils.ProgressBar(self.total, node_id=node_id)
            except TypeError:  # ComfyUI before July 2025: no node_id (the bar follows the running node)
                self._bar = comfy_utils.ProgressBar(self.total)

    def update(self, value: int, total: int | None = None) -> None:
        """Set the absolute value. Inside ComfyUI its hook raises on Cancel (between steps)."""
        self.total = max(int(total), 1) if total is not None else self.total
        self.value = min(int(value), self.total)
        if self._bar is not None:
            self._bar.update_absolute(self.value, self.total)


def send_status(node_id: str | None, kind: str, data: dict[str, Any]) -> None:
    """Push a JSON status (download speed, preflight table...) to the web extension; no-op headless."""
    if PromptServer is None or getattr(PromptServer, "instance", None) is None:
        return
    payload = {"node": None if node_id is None else str(node_id), "kind": kind, **data}
    PromptServer.instance.send_sync(EVENT, payload)


def send_text(node_id: str | None, text: str) -> None:
    """Show a line of progress text on the node (ComfyUI >= 0.3.4x); silently skipped elsewhere."""
    server = getattr(PromptServer, "instance", None) if PromptServer is not None else None
    if server is not None and node_id is not None and hasattr(server, "send_progress_text"):
        server.send_progress_text(text, str(node_id))


@dataclass
class _Owner:
    """Our side of the memory hand-over: drop every resident model; bytes of ours on a device."""

    release: Callable[[], object]
    footprint: Callable[[Any], int]


_owner: _Owner | None = None
_free_hooks: list[Callable[[], object]] = []
_targeted = threading.local()  # set while ComfyUI's unload_model_and_clones runs
_said: set[str] = set()


def _say_once(key: str, level: int, message: str) -> None:
    if key not in _said:
        _said.add(key)
        log.log(level, message)


def install_memory_hooks(release: Callable[[], object], footprint: Callable[[Any], int]) -> dict[str, bool]:
    """Let ComfyUI release our resident model, each time only when that is what frees the memory.

    ``release()`` drops our resident models; ``footprint(device)`` is how many bytes of ours sit on a
    device ("cpu" for RAM). Installed once per process (idempotent); returns which hooks are active. Each
    hook wraps a ComfyUI function found by name; one that is missing (older or newer ComfyUI) is named
    once in the log and the pack keeps working without it.
    """
    global _owner
    _owner = _Owner(release, footprint)
    active = {
        "unload_all_models (/free)": on_unload_models(release),
        "free_memory (ComfyUI loads)": _wrap_free_memory(),
        "unload_model_and_clones (targeted unloads)": _wrap_targeted_unload(),
        "RAMPressureCache.ram_release (RAM pressure)": _wrap_ram_release(),
    }
    if model_management is not None:
        missing = [name for name, ok in active.items() if not ok]
        level = logging.WARNING if not all(list(active.values())[:2]) else logging.INFO
        _say_once("hooks", level, "Qwen-Image memory hooks: " + ", ".join(n for n, ok in active.items() if ok)
                  + (f"; not in this ComfyUI (skipped): {', '.join(missing)}" if missing else ""))
    return active


def on_unload_models(callback: Callable[[], object]) -> bool:
    """Run ``callback`` whenever ComfyUI unloads all its models (the /free button, OOM recovery).

    ComfyUI has no public event for this; main.py calls ``model_management.unload_all_models()`` for
    /free, so we wrap that function once. Returns False headless (nothing to hook).
    """
    original = getattr(model_management, "unload_all_models", None)
    if original is None:  # headless, or a ComfyUI without this function: nothing to hook
        return False
    if callback not in _free_hooks:
        _free_hooks.append(callback)
    if getattr(original, "_qwen_image_hook", False):
        return True

    def unload_all_models(*args: Any, **kwargs: Any) -> Any:
        try:
            return original(*args, **kwargs)
        finally:
            for hook in list(_free_hooks):
                try:
                    hook()
                except Exception:  # a failing release must never break ComfyUI's own unload
                    log.exception("Qwen-Image: releasing the resident model on /free failed")

    _mark_and_set(model_management, "unload_all_models", unload_all_models)
    return True


def _mark_and_set(owner: Any, name: str, wrapper: Callable[..., Any]) -> None:
    wrapper._qwen_image_hook = True  # type: ignore[attr-defined]
    wrapper.__wrapped__ = getattr(owner, name)  # type: ignore[attr-defined]
    setattr(owner, name, wrapper)


def _arguments(signature: inspect.Signature | None, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The call's arguments by name, defaults filled in (empty if the signature does not fit)."""
    if signature is None:
        return {}
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return {}
    bound.apply_defaults()
    return dict(bound.arguments)


def _signature(fn: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def _wrap_free_memory() -> bool:
    """``free_memory(memory_required, device, keep_loaded, [for_dynamic, pins_required, ram_required])`` is
    what ComfyUI calls before loading one of its models. After it freed its own, ours may go too."""
    original = getattr(model_management, "free_memory", None)
    if original is None or getattr(model_management, "get_free_memory", None) is None:
        return False
    if getattr(original, "_qwen_image_hook", False):
        return True
    signature = _signature(original)

    def free_memory(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        try:
            _after_free_memory(_arguments(signature, args, kwargs))
        except Exception:  # never break ComfyUI's own memory management
            log.exception("Qwen-Image: releasing the resident model under memory pressure failed")
        return result

    _mark_and_set(model_management, "free_memory", free_memory)
    return True


def _after_free_memory(call: dict[str, Any]) -> None:
    device = call.get("device")
    if _owner is None or device is None or "memory_required" not in call:
        return
    ours = _owner.footprint(device)
    if ours <= 0:  # nothing of ours there: don't even read the free memory
        return
    for_dynamic = bool(call.get("for_dynamic", False))
    request = policy.DeviceRequest(
        required=float(call["memory_required"]),
        free_after=float(model_management.get_free_memory(device)),
        reclaimable=_dynamic_loaded_bytes(device, call.get("keep_loaded") or ()) if for_dynamic else 0.0,
        ours_on_device=ours,
        targeted=bool(getattr(_targeted, "active", False)),
    )
    if policy.release_for_device(request):
        log.info("Qwen-Image: ComfyUI needs %.2f GiB more on %s; releasing our model (%.2f GiB there)",
                 request.shortfall / 1024**3, device, ours / 1024**3)
        _owner.release()


def _dynamic_loaded_bytes(device: Any, keep_loaded: Any) -> float:
    """VRAM that ComfyUI's dynamic-VRAM models hold on ``device`` and page out on demand (0.33): their
    ``loaded_size()`` less the weights they force-loaded (small or non-``comfy.ops`` layers are copied to the
    card outside the pageable pool, counted in ``model_loaded_weight_memory``; only an unload frees those)."""
    total = 0.0
    want = policy.device_key(device)
    for loaded in list(getattr(model_management, "current_loaded_models", [])):
        patcher = getattr(loaded, "model", None)
        is_dynamic = getattr(patcher, "is_dynamic", None)
        if patcher is None or not callable(is_dynamic) or not is_dynamic():
            continue
        if policy.device_key(getattr(loaded, "device", None)) != want or loaded in keep_loaded:
            continue
        forced = getattr(getattr(patcher, "model", None), "model_loaded_weight_memory", 0) or 0
        total += max(0.0, float(patcher.loaded_size()) - float(forced))
    return total


def _wrap_targeted_unload() -> bool:
    """``unload_model_and_clones(model)`` (0.33) frees one model and its clones through free_memory(1e30,
    device, keep_loaded=<all others>): that call is not a request for memory, so ours stays."""
    original = getattr(model_management, "unload_model_and_clones", None)
    if original is None:
        return False
    if getattr(original, "_qwen_image_hook", False):
        return True

    def unload_model_and_clones(*args: Any, **kwargs: Any) -> Any:
        outer = getattr(_targeted, "active", False)
        _targeted.active = True
        try:
            return original(*args, **kwargs)
        finally:
            _targeted.active = outer

    _mark_and_set(model_management, "unload_model_and_clones", unload_model_and_clones)
    return True


def _wrap_ram_release() -> bool:
    """0.33's default output cache frees cached outputs when RAM runs short (``ram_release``, called after
    each node and before pinning memory). After its last tier, if RAM is still short, ours goes too.

    Wrapped on the class: the executor binds ``caches.outputs.ram_release`` at the start of each prompt,
    so the pack must be imported (it is, at ComfyUI's start) before the first prompt runs.
    """
    cache_class = getattr(comfy_caching, "RAMPressureCache", None)
    original = getattr(cache_class, "ram_release", None)
    if original is None:
        return False
    if getattr(original, "_qwen_image_hook", False):
        return True
    signature = _signature(original)

    def ram_release(*args: Any, **kwargs: Any) -> Any:
        freed = original(*args, **kwargs)
        try:
            freed = (freed or 0) + _after_ram_release(_arguments(signature, args, kwargs))
        except Exception:  # never break ComfyUI's cache
            log.exception("Qwen-Image: releasing the resident model under RAM pressure failed")
        return freed

    _mark_and_set(cache_class, "ram_release", ram_release)
    return True


def _after_ram_release(call: dict[str, Any]) -> int:
    import psutil

    if _owner is None or "target" not in call:
        return 0
    ours = _owner.footprint("cpu")
    if not policy.release_for_ram(float(call["target"]), psutil.virtual_memory().available,
                                  free_active=bool(call.get("free_active", False)),
                                  min_entry_size=float(call.get("min_entry_size", 0) or 0), ours_in_ram=ours):
        return 0
    log.info("Qwen-Image: RAM still short after ComfyUI emptied its cache; releasing our model (%.2f GiB RAM)",
             ours / 1024**3)
    _owner.release()
    return ours


# ---- LoRA files (models/loras) ---------------------------------------------------------------------------
LORA_KEY = "loras"  # ComfyUI's folder key for LoRAs (models/loras + extra_model_paths "loras:" entries)


def lora_dirs() -> list[Path]:
    """Folders holding LoRA files: ComfyUI's models/loras and extra_model_paths entries; headless, the
    QWEN_LORA_DIR folder, else a ``loras`` folder beside each models dir (ComfyUI's layout)."""
    if folder_paths is not None:
        try:
            return [Path(p) for p in folder_paths.get_folder_paths(LORA_KEY)]
        except KeyError:
            return [Path(folder_paths.models_dir) / LORA_KEY]
    import os

    env = os.environ.get("QWEN_LORA_DIR", "").strip()
    return [Path(env).expanduser()] if env else [d.parent / LORA_KEY for d in models_dirs()]


def list_loras() -> list[str]:
    """``.safetensors`` LoRA files (relative names, sub-folders included) in every LoRA folder; pickled
    formats are not offered at all."""
    found: list[str] = []
    for root in lora_dirs():
        try:
            files = sorted(p for p in root.rglob("*.safetensors") if p.is_file())
        except OSError:  # an unreadable folder lists nothing instead of breaking /object_info
            continue
        for path in files:
            name = path.relative_to(root).as_posix()
            if name not in found and not any(part.startswith(".") for part in path.relative_to(root).parts):
                found.append(name)
    return found


def resolve_lora(name: str) -> Path:
    """The file of a dropdown name (first LoRA folder that has it); a name never leaves its folder."""
    return _first_in(lora_dirs(), name, Path.is_file)
