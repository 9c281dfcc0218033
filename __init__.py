"""ComfyUI entry point of the Qwen-Image pack.

Importing this file must work without ComfyUI and without a GPU: the nodes are thin adapters over
``qwen_core`` and reach ComfyUI only through ``nodes/comfy_bridge.py``.
"""

import os
import sys

# ComfyUI imports this folder as a package, but qwen_core is a top-level package (also used by the CLI
# and the tests). Append, never prepend: our folder names must not shadow ComfyUI's modules.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)

if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    # Imported as a plain module, not as ComfyUI's package: pytest does this with a checkout whose folder name
    # is not a Python identifier (e.g. "comfyui-qwen-image"). Nothing to register then.
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
