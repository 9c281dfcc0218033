"""Plain types of the single-file sources (the leaf module: no torch, no diffusers, no other source module).

A *single file* is one component of a pipeline stored the way ComfyUI keeps it: a diffusion model in
``models/diffusion_models``, a text encoder in ``models/text_encoders``, a VAE in ``models/vae``. What the
header of such a file tells us (which component, which architecture, how the weights are stored) is a
``FileInfo``; what each storage format does to quality and memory is ``WeightFormat``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

# fp8 weights stay fp8 in memory for the Linear layers inside these repeated blocks (transformer blocks,
# text-encoder layers and vision blocks: > 98% of the weights); the small embedders, norms and heads are
# dequantised once to the compute dtype.
FP8_KEPT_IN = re.compile(r"(^|\.)(transformer_blocks|layers|blocks)\.\d+\.")


class Component(str, Enum):
    TRANSFORMER = "transformer"
    TEXT_ENCODER = "text_encoder"
    VAE = "vae"


class WeightFormat(str, Enum):
    """How a file stores its large matrices."""

    DENSE = "dense"  # bf16 / fp16 / fp32: loaded as the compute dtype, bit-exact when the dtypes agree
    FP8 = "fp8"  # float8 e4m3fn/e5m2 straight cast, no scales (ComfyUI's qwen_image_fp8_e4m3fn)
    FP8_SCALED = "fp8-scaled"  # float8 + one fp32 scale per matrix (`scale_weight`, or `weight_scale` +
    # `comfy_quant`): the value is fp8 * scale; loading it without the scales gives wrong weights
    GGUF = "gguf"  # llama.cpp block quantisation (Q8_0, Q5_K, Q4_K...), dequantised per layer at run time


@dataclass(frozen=True)
class FileInfo:
    """What one file's header says, read before any weight.

    ``prefix`` is stripped from every key (ComfyUI checkpoints may say ``model.diffusion_model.``).
    ``architecture`` is the diffusers/transformers class the weights belong to. ``stored_bytes`` is the size
    of the tensor data as stored (what the file costs in RAM/VRAM when kept in its format); ``num_params``
    counts elements (what it costs once dequantised).
    """

    path: Path
    component: Component
    architecture: str
    weight_format: WeightFormat
    prefix: str = ""
    num_params: int = 0
    stored_bytes: int = 0
    # Elements kept quantised in memory (fp8 matrices in FP8_KEPT_IN blocks, every GGUF-quantised tensor); the
    # rest is held in the compute dtype.
    quantized_params: int = 0
    quant_types: tuple[str, ...] = ()  # GGUF block types found (e.g. ("Q4_K", "Q6_K")), fp8 dtypes for fp8
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def name(self) -> str:
        return self.path.name

    def describe(self) -> str:
        kinds = f" ({', '.join(self.quant_types)})" if self.quant_types else ""
        return (f"{self.name}: {self.component.value} {self.architecture}, {self.weight_format.value}{kinds}, "
                f"{self.num_params / 1e9:.2f} B params, {self.stored_bytes / 1e9:.2f} GB stored")


@dataclass(frozen=True)
class FileSet:
    """The files one model is assembled from. ``configs`` is a diffusers folder holding at least
    model_index.json and the components' config.json (tokenizer/scheduler too, unless ``tokenizer_dir``
    names another tokenizer folder, e.g. ComfyUI's own ``comfy/text_encoders/qwen25_tokenizer``)."""

    transformer: Path
    text_encoder: Path
    vae: Path
    configs: Path
    tokenizer_dir: Path | None = None
