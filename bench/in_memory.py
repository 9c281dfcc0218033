"""``InMemorySource``: the loader's model source for a pipeline that already exists in memory.

Benchmarks build the full-size architecture with random weights (``fullsize``); saving 40 GB first to load
it back would be pointless. Wrapped in this source, our own ``PipelineLoader`` (placement, attention, retries
on placement OOM, residency) and ``QwenImageGenerator`` run on it as on a folder. Once released (unload, or
evicted by another model) it cannot be loaded again: there is no folder to rebuild from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qwen_core.devices import dtype_name
from qwen_core.errors import ModelLoadError, QwenError
from qwen_core.families import FAMILIES, ModelFamily
from qwen_core.loading import PipelineLoader, free_memory
from qwen_core.model_source import ModelSource


def _config_dict(config: Any) -> dict:
    """diffusers configs are dicts; transformers configs have to_dict()."""
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


class InMemorySource(ModelSource):
    def __init__(self, pipe: Any, name: str = "in-memory", family: ModelFamily | None = None) -> None:
        # Several families share a pipeline class (Edit-2509/2511, 2.1/Turbo): the caller may say which one.
        family = family or next((f for f in FAMILIES.values() if f.pipeline_class == type(pipe).__name__), None)
        if family is None:
            raise QwenError(f"{type(pipe).__name__} is not a Qwen-Image family pipeline.",
                            fix="Pass a diffusers QwenImagePipeline (or another family's pipeline).")
        self.pipe: Any = pipe
        self.family = family
        self.path = Path(f"<{name}>")
        self._identity = f"{name}#{id(self)}"

    @property
    def identity(self) -> str:
        return self._identity

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.transformer.dtype

    def light_components(self) -> dict[str, Any]:
        return {name: getattr(self.pipe, name) for name in ("tokenizer", "scheduler", "processor")
                if getattr(self.pipe, name, None) is not None}

    def weight_bytes(self, dtype: torch.dtype) -> dict[str, int]:
        width = torch.empty((), dtype=dtype).element_size()
        return {name: sum(p.numel() for p in module.parameters()) * width
                for name in self.family.weighted_components if (module := getattr(self.pipe, name, None)) is not None}

    def configs(self) -> dict[str, dict]:
        return {name: _config_dict(module.config) for name in self.family.weighted_components
                if (module := getattr(self.pipe, name, None)) is not None and hasattr(module, "config")}

    def build(self, dtype: torch.dtype, light_components: dict[str, Any]) -> Any:
        if getattr(self.pipe, "transformer", None) is None:
            raise ModelLoadError(f"{self.path} was released and has no folder to load from.",
                                 fix="Build the pipeline again and wrap it in a new InMemorySource.")
        if dtype != self.pipe.transformer.dtype:
            self.pipe.to(dtype=dtype)
        return self.pipe

    def discard(self, pipe: Any) -> None:
        # No folder to rebuild from: undo the placement instead, so the next rung of the ladder can try.
        pipe.remove_all_hooks()
        pipe.to("cpu")
        free_memory()


def in_memory_loader(pipe: Any, *, name: str = "in-memory", memory_mode: str = "gpu", attention: str = "auto",
                     device: str | None = None, family: ModelFamily | None = None, **kwargs: Any) -> PipelineLoader:
    """A ``PipelineLoader`` over ``pipe`` in its own dtype (``auto`` memory mode sizes from its parameters)."""
    source = InMemorySource(pipe, name, family)
    return PipelineLoader(source, dtype=dtype_name(source.dtype), memory_mode=memory_mode, attention=attention,
                          device=device, **kwargs)
