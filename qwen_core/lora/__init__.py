"""LoRAs for Qwen-Image pipelines: safe reading of every common format, exact fusing in every memory mode.

- ``spec``: ``LoraSpec`` (path, strength), ``LoraError``, ``parse_lora_arg`` (the CLI's FILE[:STRENGTH]);
- ``files``: the file checks (safetensors only), diffusers' format conversion, ``describe_file`` (header
  only) and ``load_file`` (factors);
- ``targets``: layer shapes from the loaded transformer or from its config (meta device), ``check_fits``;
- ``fuse``: ``apply_loras(pipe, specs, family)`` (exact, in place, reversible), ``lora_memory(pipe)``;
- ``lightning``: the Lightning quality presets' requirement and scheduler settings.

Import from the submodules; this file re-exports only the leaf types (no torch).
"""

from qwen_core.lora.spec import LoraError, LoraSpec, as_specs, is_lightning_name, parse_lora_arg

__all__ = ["LoraError", "LoraSpec", "as_specs", "is_lightning_name", "parse_lora_arg"]
