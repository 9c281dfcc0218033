"""Models assembled from single files (ComfyUI's diffusion_models / text_encoders / vae, GGUF) + a config source.

``types`` (leaf: plain types), ``detect`` (what a file is, from its header), ``comfy_keys`` (key layouts),
``fp8_weights`` (fp8 kept in memory), ``materialize`` (a module filled from one file), ``gguf_files``,
``configs`` (the config source) and ``comfy_files`` (``SingleFilesSource``, the ``ModelSource``).
"""

from qwen_core.sources.types import Component, FileInfo, FileSet, WeightFormat

__all__ = ["Component", "FileInfo", "FileSet", "WeightFormat"]
