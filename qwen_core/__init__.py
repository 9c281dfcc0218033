"""qwen_core: a headless library for running Qwen-Image reliably.

It never imports ComfyUI; the node pack in ``nodes/`` is a thin adapter over it. Heavy modules
(torch, diffusers) are imported by the submodules that need them, not here, so ``import qwen_core``
stays cheap.
"""

__version__ = "0.1.0"
