"""Node registry. Each node lives in its own module; this file only collects them.

Node ids equal class names (ComfyUI stores them in saved workflows: never rename one). Inside ComfyUI the
import also points the session log at ComfyUI's user folder and installs the memory hooks, before the
first prompt runs (the executor binds its RAM-pressure release at the start of each prompt).
"""

from . import comfy_bridge as _bridge
from .common import install_comfy_hooks
from .downloader import QwenImageDownloader
from .generate import QwenImageGenerate
from .loader import QwenImageLoader
from .lora import QwenImageLoRA
from .pixel_governor import QwenImagePixelGovernor
from .preflight import QwenImagePreflight
from .switch_model import QwenImageSwitchModel

_NODES = {
    QwenImagePreflight: "Qwen-Image Preflight",
    QwenImageDownloader: "Qwen-Image Downloader",
    QwenImageLoader: "Qwen-Image Loader",
    QwenImageLoRA: "Qwen-Image LoRA",
    QwenImagePixelGovernor: "Qwen-Image Pixel Governor",
    QwenImageGenerate: "Qwen-Image Generate",
    QwenImageSwitchModel: "Qwen-Image Switch Model",
}

NODE_CLASS_MAPPINGS: dict[str, type] = {cls.__name__: cls for cls in _NODES}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {cls.__name__: name for cls, name in _NODES.items()}

if _bridge.IN_COMFYUI:
    _bridge.register_reports_dir()
    install_comfy_hooks()
