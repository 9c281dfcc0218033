"""Where a pipeline's weights come from: the ``ModelSource`` seam the loader builds pipelines through.

A source knows its family, builds the light parts (tokenizer, processor, scheduler) at once, tells the
weight sizes before anything heavy is read, and builds the pipeline with its weights in CPU RAM when asked.
``FolderSource`` is a validated diffusers folder (see ``integrity``). Other sources (files assembled from
ComfyUI's model folders, a pipeline that already exists in memory for a benchmark) implement the same
methods, so the loader, its fallback ladder, residency and the generator work the same for all of them.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch

from qwen_core.errors import ModelFolderError, QwenError
from qwen_core.families import ModelFamily
from qwen_core.integrity import ModelFolder, check_model_folder
from qwen_core.memory import release_pipeline


class ModelSource(ABC):
    """One model, as the loader sees it. ``path`` names it in messages and keys (it may be a pseudo-path)."""

    path: Path
    family: ModelFamily
    # Memory modes that cannot hold this source's weights (e.g. quantised parameters that a mode re-creates one
    # by one); the loader refuses them when asked and skips them on its fallback ladder.
    unsupported_memory_modes: frozenset[str] = frozenset()

    @property
    def identity(self) -> str:
        """What makes two handles share one resident pipeline (with device, dtype and memory mode)."""
        return str(self.path.resolve())

    @abstractmethod
    def light_components(self) -> dict[str, Any]:
        """The components without weights (tokenizer, processor, scheduler), built now."""

    @abstractmethod
    def weight_bytes(self, dtype: torch.dtype) -> dict[str, int]:
        """Bytes each weighted component (transformer, text encoder, VAE) takes in ``dtype``."""

    @abstractmethod
    def configs(self) -> dict[str, dict]:
        """The weighted components' configs (from their config.json or config objects)."""

    @abstractmethod
    def build(self, dtype: torch.dtype, light_components: dict[str, Any]) -> Any:
        """The pipeline with its weights in CPU RAM in ``dtype``, reusing ``light_components``."""

    def discard(self, pipe: Any) -> None:
        """A built pipeline whose placement failed (e.g. OOM half way to the GPU): hooks off, modules dropped,
        memory collected; nothing of it may survive. A source that cannot rebuild overrides this."""
        release_pipeline(pipe, settle_s=0.0)


def _component_class(folder: Path, name: str, library: str, cls_name: str) -> type:
    module = importlib.import_module(library)  # library is allowlisted (diffusers/transformers)
    cls = getattr(module, cls_name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ModelFolderError(
            f"{folder}: component {name!r} names class {cls_name!r}, which {library} does not provide.",
            fix="Update diffusers/transformers (see requirements.txt) or re-download the model.",
        )
    return cls


def require_torchvision(model: str, processor_class: str) -> None:
    """transformers 5 builds Qwen2VLProcessor / Qwen3VLProcessor only with torchvision installed (their video
    processor needs it, even with no video; without it the constructor fails with an AttributeError deep in a
    class lookup): say so, with the command."""
    if importlib.util.find_spec("torchvision") is None:
        raise QwenError(
            f"{model} needs torchvision: transformers builds its {processor_class} (the text encoder's image "
            "processor) only with torchvision installed.",
            fix="pip install torchvision matching your torch (torch 2.14.1 <-> torchvision 0.29.1, 2.13.0 <-> "
            "0.28.0; ComfyUI installs it); scripts/setup.sh installs the pair.",
        )


def build_light_component(folder: Path, name: str, library: str, cls_name: str) -> Any:
    """A tokenizer/processor/scheduler from ``folder/name``: local files only, no remote code."""
    if library == "transformers" and cls_name.endswith("VLProcessor"):
        require_torchvision(f"{folder} ({cls_name})", cls_name)
    cls = _component_class(folder, name, library, cls_name)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if library == "transformers":
        kwargs["trust_remote_code"] = False
    try:
        if library == "diffusers":
            return cls.from_pretrained(folder, subfolder=name, **kwargs)
        return cls.from_pretrained(folder / name, **kwargs)
    except (OSError, ValueError, TypeError) as err:
        raise ModelFolderError(f"{folder / name}: cannot build the {name} ({err}).", fix="Re-download the model.") from err


def pipeline_class(family: ModelFamily) -> type:
    import diffusers

    return getattr(diffusers, family.pipeline_class)  # from our own family table, never from a file


class FolderSource(ModelSource):
    """A diffusers pipeline folder, validated now (components, safetensors only, intact headers, family)."""

    def __init__(self, path: str | Path) -> None:
        self.folder: ModelFolder = check_model_folder(path)
        self.path = self.folder.path  # a hub-cache repo folder resolves to its snapshot
        self.family = self.folder.family

    def light_components(self) -> dict[str, Any]:
        built = {}
        for name, (library, cls_name) in self.folder.components.items():
            if not self.folder.weight_files.get(name):  # no weights: tokenizer, processor, scheduler
                built[name] = build_light_component(self.path, name, library, cls_name)
        return built

    def weight_bytes(self, dtype: torch.dtype) -> dict[str, int]:
        width = torch.empty((), dtype=dtype).element_size()
        return {name: self.folder.num_params(name) * width for name in self.folder.weight_files}

    def configs(self) -> dict[str, dict]:
        configs = {}
        for name in self.folder.weight_files:
            config_path = self.path / name / "config.json"
            if config_path.is_file():
                try:
                    configs[name] = json.loads(config_path.read_text(encoding="utf-8"))
                except (OSError, ValueError) as err:
                    raise ModelFolderError(f"{config_path}: is not valid JSON ({err}).", fix="Re-download the model.") from err
        return configs

    def build(self, dtype: torch.dtype, light_components: dict[str, Any]) -> Any:
        # Re-check the folder: a download may have been running or a file replaced since construction.
        self.folder = check_model_folder(self.path)
        pipe = pipeline_class(self.family).from_pretrained(
            self.path,
            dtype=dtype,
            use_safetensors=True,
            local_files_only=True,
            trust_remote_code=False,
            **light_components,
        )
        if self.folder.pipeline_config:  # e.g. a Turbo grid found only in modular_model_index.json
            pipe.register_to_config(**self.folder.pipeline_config)
        return pipe
