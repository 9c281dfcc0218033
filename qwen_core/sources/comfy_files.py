"""``SingleFilesSource``: a pipeline assembled from ComfyUI's single files plus a config source.

A ComfyUI user has ``models/diffusion_models/qwen_image_fp8_e4m3fn.safetensors`` (or a GGUF),
``models/text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors`` and ``models/vae/qwen_image_vae.safetensors``.
This source identifies each file from its header (``detect``), checks that all three belong to the family of
the configs folder, and builds that family's diffusers pipeline from them, with the loader, its fallback
ladder, residency, the memory modes and the generator unchanged (it is a ``ModelSource``).

What each storage format becomes in memory (``weight_bytes`` reports exactly this, so ``auto`` memory mode,
the governor and Preflight see the real sizes):
- dense (bf16/fp16/fp32): the compute dtype, like a diffusers folder (bit-identical when the dtypes agree);
- fp8 / fp8-scaled: the Linear layers of the repeated blocks (transformer blocks, text-encoder layers, > 98% of
  the weights) stay fp8 (``Fp8WeightLinear``: upcast per layer, or fp8 tensor cores with ``fp8_matmul``);
  the small embedders, norms and heads are dequantised once to the compute dtype;
- GGUF: block-quantised as stored (``gguf_files``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qwen_core.errors import ModelFolderError
from qwen_core.model_source import ModelSource, pipeline_class
from qwen_core.session_log import get_session_log
from qwen_core.sources import comfy_keys
from qwen_core.sources.configs import ConfigsFolder, check_configs_folder
from qwen_core.sources.detect import GGUF_SUFFIX, SAFETENSORS_SUFFIXES, inspect_file
from qwen_core.sources.fp8_weights import set_fp8_matmul
from qwen_core.sources.materialize import LoadReport, empty_module, load_safetensors_into
from qwen_core.sources.types import FP8_KEPT_IN, Component, FileInfo, WeightFormat

_PREFERRED_NAMES = {Component.TEXT_ENCODER: ("qwen_2.5_vl_7b", "qwen2.5"), Component.VAE: ("qwen_image_vae", "qwen")}


def _same_file(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def find_companion(kind: Component, folders: Sequence[Path], architecture: str, prefer_fp8: bool) -> Path | None:
    """The file of ``kind`` to use when none was chosen: Qwen's own file names first, then one stored like the
    diffusion model (fp8 next to fp8), then the first by name. Files of other models are skipped."""
    found: list[FileInfo] = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in SAFETENSORS_SUFFIXES):
            try:
                info = inspect_file(path)
            except ModelFolderError:
                continue
            if info.component is kind and info.architecture == architecture:
                found.append(info)

    def rank(info: FileInfo) -> tuple[int, int, str]:
        named = any(token in info.name.lower() for token in _PREFERRED_NAMES[kind])
        fp8 = info.weight_format in (WeightFormat.FP8, WeightFormat.FP8_SCALED)
        return (0 if named else 1, 0 if fp8 == prefer_fp8 else 1, info.name)

    return min(found, key=rank).path if found else None


class SingleFilesSource(ModelSource):
    """A pipeline from single files: ``transformer`` (.safetensors or .gguf), ``text_encoder`` and ``vae``
    (.safetensors; found beside the diffusion model's folder when not given) and ``configs`` (a diffusers
    folder of the family, weights optional). ``fp8_matmul`` runs fp8 files on fp8 tensor cores (lossy)."""

    def __init__(self, transformer: str | Path, text_encoder: str | Path | None = None, vae: str | Path | None = None,
                 *, configs: str | Path, tokenizer_dir: str | Path | None = None,
                 companion_dirs: Mapping[Component, Sequence[Path]] | None = None, fp8_matmul: bool = False) -> None:
        self.configs_folder: ConfigsFolder = check_configs_folder(configs, tokenizer_dir)
        self.family = self.configs_folder.family
        self.fp8_matmul = fp8_matmul
        self.files: dict[Component, FileInfo] = {Component.TRANSFORMER: self._checked(Component.TRANSFORMER, transformer)}
        prefer_fp8 = self.files[Component.TRANSFORMER].weight_format is not WeightFormat.DENSE
        models = Path(transformer).expanduser().resolve().parent.parent  # <models>/diffusion_models/<file>
        for kind, chosen in ((Component.TEXT_ENCODER, text_encoder), (Component.VAE, vae)):
            if chosen is None:
                dirs = list((companion_dirs or {}).get(kind, [])) or [models / ("text_encoders" if kind is Component.TEXT_ENCODER else "vae")]
                chosen = find_companion(kind, dirs, self._expected(kind), prefer_fp8)
                if chosen is None:
                    raise ModelFolderError(
                        f"no {kind.value.replace('_', ' ')} file for {self.family.display_name} in "
                        f"{', '.join(str(d) for d in dirs)}.",
                        fix="Put ComfyUI's file there (qwen_2.5_vl_7b_fp8_scaled.safetensors in text_encoders, "
                            "qwen_image_vae.safetensors in vae) or choose one.")
            self.files[kind] = self._checked(kind, chosen)
        self.path = self.files[Component.TRANSFORMER].path
        if any(info.weight_format is not WeightFormat.DENSE for info in self.files.values()):
            # accelerate's sequential offload re-creates each parameter from its class: fp8 layers and GGUF
            # parameters do not survive that (tested); streamed holds them and is faster anyway.
            self.unsupported_memory_modes = frozenset({"sequential"})
        get_session_log().info("single files: " + "; ".join(info.describe() for info in self.files.values())
                               + f"; configs {self.configs_folder.path}")

    # -- checks -----------------------------------------------------------------------------------
    def _expected(self, kind: Component) -> str:
        return self.family.components[kind.value][1]

    def _checked(self, kind: Component, path: str | Path) -> FileInfo:
        info = inspect_file(Path(path).expanduser())
        if info.component is not kind:
            raise ModelFolderError(f"{info.path}: is a {info.component.value.replace('_', ' ')} file, not a "
                                   f"{kind.value.replace('_', ' ')}.", fix=f"Choose a {kind.value} file for this slot.")
        expected = self._expected(kind)
        if info.architecture != expected:
            raise ModelFolderError(
                f"{info.path}: holds a {info.architecture}, but the configs in {self.configs_folder.path} are "
                f"{self.family.display_name}'s, whose {kind.value} is a {expected}.",
                fix="Use files and configs of the same family.")
        if info.weight_format is WeightFormat.GGUF and kind is not Component.TRANSFORMER:
            raise ModelFolderError(f"{info.path}: GGUF is read for diffusion models only.", fix="Use the .safetensors file.")
        if "wan" in info.name.lower() and kind is Component.VAE:
            get_session_log().warning(f"single files: {info.name} looks like a Wan VAE; Qwen-Image's is "
                                      "qwen_image_vae.safetensors (same shapes, other weights)")
        return info

    # -- ModelSource ------------------------------------------------------------------------------
    @property
    def identity(self) -> str:
        parts = [str(info.path.resolve()) for info in self.files.values()] + [str(self.configs_folder.path.resolve())]
        return "files:" + "|".join(parts) + ("|fp8mm" if self.fp8_matmul else "")

    @property
    def weight_format(self) -> WeightFormat:
        return self.files[Component.TRANSFORMER].weight_format

    def file_sizes(self) -> dict[str, int]:
        """Bytes on disk of each chosen file (Preflight's size of this model)."""
        return {info.name: info.path.stat().st_size for info in self.files.values()}

    def light_components(self) -> dict[str, Any]:
        return self.configs_folder.light_components()

    def configs(self) -> dict[str, dict]:
        return {kind.value: self.configs_folder.config(kind.value) for kind in self.files}

    def weight_bytes(self, dtype: torch.dtype) -> dict[str, int]:
        width = torch.empty((), dtype=dtype).element_size()
        sizes = {}
        for kind, info in self.files.items():
            if info.weight_format is WeightFormat.GGUF:
                dense = info.num_params - info.quantized_params
                sizes[kind.value] = info.stored_bytes - dense * 4 + dense * width  # dense GGUF tensors: F32/F16 -> dtype
            else:  # fp8 kept in the blocks: 1 byte each (+ a 4-byte scale per matrix), the rest in dtype
                sizes[kind.value] = info.quantized_params + (info.num_params - info.quantized_params) * width
        return sizes

    def build(self, dtype: torch.dtype, light_components: dict[str, Any]) -> Any:
        transformer = self._build_transformer(dtype)
        text_encoder = self._build_text_encoder(dtype)
        vae = self._build_vae(dtype)
        pipe = pipeline_class(self.family)(transformer=transformer, text_encoder=text_encoder, vae=vae, **light_components)
        if self.fp8_matmul:
            get_session_log().info(f"single files: fp8 matmul on for {set_fp8_matmul(transformer, True)} layers")
        return pipe

    # -- components -------------------------------------------------------------------------------
    def _class(self, kind: Component) -> type:
        import importlib

        library, cls_name = self.family.components[kind.value]
        return getattr(importlib.import_module(library), cls_name)  # from our family table, never from a file

    def _load(self, module: nn.Module, kind: Component, key_map: Any, dtype: torch.dtype, **kw: Any) -> nn.Module:
        info = self.files[kind]
        keep = info.weight_format in (WeightFormat.FP8, WeightFormat.FP8_SCALED)
        report: LoadReport = load_safetensors_into(module, info, key_map, dtype, keep_fp8=keep,
                                                   keep_fp8_for=FP8_KEPT_IN, **kw)
        get_session_log().info(f"single files: {info.name} -> {kind.value}: {report.tensors} tensors, "
                               f"{report.fp8_kept} fp8 kept, {report.fp8_dequantized} fp8 dequantised, "
                               f"{report.scaled} scaled" + (f", filled {report.filled}" if report.filled else ""))
        return module.eval()

    def _build_transformer(self, dtype: torch.dtype) -> nn.Module:
        cls, info = self._class(Component.TRANSFORMER), self.files[Component.TRANSFORMER]
        if info.weight_format is WeightFormat.GGUF:
            from qwen_core.sources.gguf_files import load_gguf_transformer

            return load_gguf_transformer(info, cls, self.configs_folder.path, dtype)
        config = cls.load_config(self.configs_folder.path, subfolder="transformer", local_files_only=True)
        module = empty_module(lambda: cls.from_config(config))
        return self._load(module, Component.TRANSFORMER, lambda key: key, dtype)

    def _build_text_encoder(self, dtype: torch.dtype) -> nn.Module:
        cls = self._class(Component.TEXT_ENCODER)
        config = cls.config_class.from_pretrained(self.configs_folder.path / "text_encoder", local_files_only=True)
        module = empty_module(lambda: cls._from_config(config, dtype=dtype))
        # ComfyUI's files have no lm_head: the pipeline reads hidden states only, so an empty head computes nothing.
        return self._load(module, Component.TEXT_ENCODER, comfy_keys.text_encoder_key, dtype,
                          fill={"lm_head.weight": lambda m: _empty_head(m, dtype)})

    def _build_vae(self, dtype: torch.dtype) -> nn.Module:
        cls, info = self._class(Component.VAE), self.files[Component.VAE]
        config = cls.load_config(self.configs_folder.path, subfolder="vae", local_files_only=True)
        module = empty_module(lambda: cls.from_config(config))
        blocks = int(config.get("num_res_blocks", 2))
        key_map = (lambda key: comfy_keys.vae_key(key, blocks)) if "comfy layout" in info.notes else (lambda key: key)
        return self._load(module, Component.VAE, key_map, dtype)


def _empty_head(module: nn.Module, dtype: torch.dtype) -> None:
    head = module.get_output_embeddings()
    with warnings.catch_warnings():  # nn.Linear warns that initialising a zero-element weight does nothing
        warnings.simplefilter("ignore", UserWarning)
        module.lm_head = nn.Linear(head.in_features, 0, bias=False, dtype=dtype)


__all__ = ["GGUF_SUFFIX", "SingleFilesSource", "find_companion"]
