"""GGUF diffusion models (ComfyUI-GGUF's Q8_0, Q5_K, Q4_K... files) through diffusers' GGUF support.

The ``gguf`` package reads the tensor table (names, block types, shapes, byte sizes) without reading the data,
so a file is identified like a .safetensors one. The weights stay block-quantised in memory as diffusers'
``GGUFParameter`` and each ``GGUFLinear`` dequantises its weight right before the product (CUDA kernels when
diffusers finds them, else torch code): memory is the file's size, quality is the quantisation's (Q8_0 is
near-lossless, Q4_K visibly softer; README has the measured errors). Text encoders and VAEs stay safetensors.

Memory modes: ``gpu``, ``model_offload``, ``group_offload`` and ``streamed`` hold GGUF weights (they move whole
tensors; the streamed engine stores the quantised bytes as they are, so a streamed Q4 block costs about a
quarter of its bf16 PCIe time). ``sequential`` (accelerate) re-creates each parameter from its class and loses
the quantisation type, so the loader refuses it for these files (``SingleFilesSource.unsupported_memory_modes``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from qwen_core.errors import ModelFolderError, ModelLoadError
from qwen_core.sources.types import Component, FileInfo, WeightFormat

GGUF_AVAILABLE = importlib.util.find_spec("gguf") is not None
INSTALL_GGUF = "pip install gguf (it is in requirements.txt; ComfyUI-GGUF users have it already)"
_DENSE_TYPES = {"F32", "F16", "BF16"}


def read_gguf(path: Path) -> Any:
    """A ``gguf.GGUFReader`` on the file; a clear error when the package is missing or the file is not GGUF."""
    try:
        import gguf
    except ImportError as err:
        if err.name != "gguf":
            raise
        raise ModelLoadError(f"{path}: reading GGUF files needs the `gguf` package.", fix=INSTALL_GGUF) from err
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError, KeyError) as err:  # bad magic, truncated table, unknown type
        raise ModelFolderError(f"{path}: is not a readable GGUF file ({err}).",
                               fix="Re-download it; an interrupted download leaves a truncated file.") from err


def gguf_tensor_table(path: Path) -> dict[str, Any]:
    """name -> tensor record (type, element count, bytes, offset) of a GGUF file, without reading weights."""
    return {t.name: t for t in read_gguf(path).tensors}


def gguf_file_info(path: Path, tensors: dict[str, Any], component: Component, architecture: str,
                   prefix: str) -> FileInfo:
    """What the loader needs to know of a classified GGUF diffusion-model file: sizes and quantisation types."""
    if component is not Component.TRANSFORMER:
        raise ModelFolderError(f"{path}: is a GGUF {component.value}; only diffusion models are read from GGUF here.",
                               fix="Use the text encoder / VAE as .safetensors (e.g. qwen_2.5_vl_7b_fp8_scaled).")
    kinds = sorted({t.tensor_type.name for t in tensors.values()} - _DENSE_TYPES)
    quantized = sum(int(t.n_elements) for t in tensors.values() if t.tensor_type.name not in _DENSE_TYPES)
    data_end = max((int(t.data_offset) + int(t.n_bytes) for t in tensors.values()), default=0)
    if data_end > path.stat().st_size:
        raise ModelFolderError(f"{path}: is truncated ({path.stat().st_size:,} bytes, its tensors need {data_end:,}).",
                               fix="Re-download it; an interrupted download leaves a truncated file.")
    return FileInfo(path=path, component=component, architecture=architecture, weight_format=WeightFormat.GGUF,
                    prefix=prefix, num_params=sum(int(t.n_elements) for t in tensors.values()),
                    stored_bytes=sum(int(t.n_bytes) for t in tensors.values()), quantized_params=quantized,
                    quant_types=tuple(kinds))


def load_gguf_transformer(info: FileInfo, cls: type, configs_path: Path, dtype: torch.dtype) -> Any:
    """The transformer with GGUF weights (quantised in CPU RAM), dequantised per layer to ``dtype``."""
    from diffusers import GGUFQuantizationConfig
    from diffusers.models.model_loading_utils import load_gguf_checkpoint

    read_gguf(info.path)  # the clear error when gguf is missing
    state = load_gguf_checkpoint(str(info.path))
    if info.prefix:
        state = {k[len(info.prefix):]: v for k, v in state.items() if k.startswith(info.prefix)}
    try:
        model = cls.from_single_file(
            state, config=str(configs_path), subfolder="transformer", local_files_only=True, torch_dtype=dtype,
            quantization_config=GGUFQuantizationConfig(compute_dtype=dtype),
        )
    except (ValueError, KeyError, RuntimeError) as err:
        raise ModelLoadError(f"{info.path}: does not load as a {cls.__name__} with the configs in {configs_path} "
                             f"({type(err).__name__}: {err}).",
                             fix="Use a GGUF of the family the configs folder describes.") from err
    return model.eval()
