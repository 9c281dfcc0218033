"""The one door to ComfyUI. Every ComfyUI import is optional, so the nodes also run headless (tests, CLI).

What goes through here: model folders (folder_paths, incl. extra_model_paths.yaml), memory hand-over
(comfy.model_management.free_memory before our weights load, soft_empty_cache after), the interrupt flag
(Cancel in the UI), progress bars (comfy.utils.ProgressBar), text/progress messages to the web extension
(server.PromptServer) and a hook on ComfyUI's "unload models" (/free) so our resident model goes too.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def resolve_model_folder(name: str) -> Path:
    """Map a dropdown name back to its folder (first models dir that has it)."""
    from qwen_core import paths

    for root in models_dirs():
        candidate = paths.safe_join(root, name)
        if candidate.is_dir():
            return candidate
    return paths.safe_join(models_dirs()[0], name)


def free_comfy_memory(bytes_needed: int) -> None:
    """Before our weights load: ask ComfyUI to unload its own models until ``bytes_needed`` is free."""
    if model_management is None:
        return
    device = model_management.get_torch_device()
    model_management.free_memory(bytes_needed, device)
    model_management.soft_empty_cache()


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


_free_hooks: list[Callable[[], None]] = []
_pressure_hooks: list[Callable[[], object]] = []


def on_unload_models(callback: Callable[[], None]) -> bool:
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

    unload_all_models._qwen_image_hook = True  # type: ignore[attr-defined]
    model_management.unload_all_models = unload_all_models
    return True


def on_memory_pressure(release: Callable[[], object]) -> bool:
    """Let ComfyUI's own loads evict our model when unloading its models was not enough.

    ComfyUI's model management does not know our pipeline, so before loading one of its models (an
    upscaler after our Generate, say) it could only unload its own and then run out of memory. We wrap
    ``model_management.free_memory`` once: after ComfyUI freed what it could, if the device still lacks
    the memory asked for, ``release()`` drops our resident model too. Returns False headless.
    """
    original = getattr(model_management, "free_memory", None)
    get_free = getattr(model_management, "get_free_memory", None)
    if original is None or get_free is None:
        return False
    if release not in _pressure_hooks:
        _pressure_hooks.append(release)
    if getattr(original, "_qwen_image_hook", False):
        return True

    def free_memory(memory_required: float, device: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(memory_required, device, *args, **kwargs)
        try:
            if get_free(device) < memory_required:
                for hook in list(_pressure_hooks):
                    hook()
        except Exception:  # never break ComfyUI's own memory management
            log.exception("Qwen-Image: releasing the resident model under memory pressure failed")
        return result

    free_memory._qwen_image_hook = True  # type: ignore[attr-defined]
    model_management.free_memory = free_memory
    return True
