"""ComfyUI entry point of the Qwen-Image pack.

Importing this file must work without ComfyUI and without a GPU: the nodes are thin adapters over
``qwen_core`` and reach ComfyUI only through ``nodes/comfy_bridge.py``.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
