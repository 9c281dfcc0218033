"""The model-family seam: one small description per Qwen-Image family member.

The loader, the folder checks, the governor, Preflight and the generator ask the family instead of assuming
``QwenImagePipeline`` + Qwen2.5-VL: which pipeline class a folder must declare, which components (and
classes) it holds, what kind of text encoder it has, how many reference images it takes and how many tokens
each adds, which memory-model entries describe it, its model card's defaults and its repo ids.

Adding a family is one ``ModelFamily`` in ``FAMILIES`` plus its tests. This module is a leaf: plain data,
no torch, no diffusers (Preflight imports it without paying for them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

from qwen_core.errors import InvalidInputError, ModelFolderError


class TextEncoderKind(str, Enum):
    QWEN2_5_VL = "qwen2.5-vl"
    QWEN3_VL = "qwen3-vl"


@dataclass(frozen=True)
class ImageInputs:
    """How many reference images a family takes (``minimum == maximum == 0``: text-to-image only)."""

    minimum: int = 0
    maximum: int = 0

    def describe(self) -> str:
        if self.maximum == 0:
            return "no input image (text-to-image)"
        if self.minimum == self.maximum:
            return f"exactly {self.minimum} input image{'s' if self.minimum > 1 else ''}"
        return f"{self.minimum} to {self.maximum} input images"


@dataclass(frozen=True)
class ModelFamily:
    """What the rest of the library needs to know about one family. Sizes: GB = 1e9 bytes, as the Hub shows."""

    key: str  # stable id: CLI `--family`, memory-model key, residency keys
    display_name: str
    pipeline_class: str  # the diffusers class model_index.json must name
    # component -> (library, class) as model_index.json lists them; weighted components first.
    components: Mapping[str, tuple[str, str]]
    text_encoder_kind: TextEncoderKind
    image_inputs: ImageInputs = field(default_factory=ImageInputs)
    # Extra transformer tokens per reference image, as a multiple of the output image's own tokens (the Edit
    # pipelines concatenate each reference's latent, resized to about the output's area, to the sequence).
    tokens_per_reference_image: float = 0.0
    memory_model_key: str = "qwen-image"
    default_width: int = 1328
    default_height: int = 1328
    default_steps: int = 50
    default_true_cfg_scale: float = 4.0
    repo_ids: tuple[str, ...] = ()
    download_size_gb: float | None = None
    licence: str = "Apache-2.0"

    @property
    def weighted_components(self) -> tuple[str, ...]:
        return tuple(name for name in ("transformer", "text_encoder", "vae") if name in self.components)

    def check_image_count(self, count: int) -> str | None:
        """None when ``count`` reference images are right for this family, else what is wrong (for an error)."""
        limits = self.image_inputs
        if limits.minimum <= count <= limits.maximum:
            return None
        return f"{self.display_name} takes {limits.describe()}; got {count}."


_QWEN_IMAGE_COMPONENTS = {
    "transformer": ("diffusers", "QwenImageTransformer2DModel"),
    "text_encoder": ("transformers", "Qwen2_5_VLForConditionalGeneration"),
    "vae": ("diffusers", "AutoencoderKLQwenImage"),
    "tokenizer": ("transformers", "Qwen2Tokenizer"),
    "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
}

QWEN_IMAGE = ModelFamily(
    key="qwen-image",
    display_name="Qwen-Image",
    pipeline_class="QwenImagePipeline",
    components=_QWEN_IMAGE_COMPONENTS,
    text_encoder_kind=TextEncoderKind.QWEN2_5_VL,
    # Model card: 1328x1328 (1:1), 50 steps, true_cfg_scale 4.0; 2512 is the same classes with new weights.
    repo_ids=("Qwen/Qwen-Image", "Qwen/Qwen-Image-2512"),
    download_size_gb=57.7,
)

FAMILIES: dict[str, ModelFamily] = {family.key: family for family in (QWEN_IMAGE,)}
DEFAULT_FAMILY = QWEN_IMAGE


def get_family(key: str) -> ModelFamily:
    """The family with this key; the error lists the known ones."""
    family = FAMILIES.get(str(key).strip().lower())
    if family is None:
        raise InvalidInputError("family", f"{key!r} is not a known model family; choose one of {', '.join(FAMILIES)}.")
    return family


def family_for_pipeline_class(class_name: str, where: str = "model_index.json") -> ModelFamily:
    """The family whose pipeline class is ``class_name``; ModelFolderError naming what was found otherwise."""
    for family in FAMILIES.values():
        if family.pipeline_class == class_name:
            return family
    known = ", ".join(f"{f.pipeline_class} ({f.display_name})" for f in FAMILIES.values())
    raise ModelFolderError(
        f"{where}: pipeline class {class_name!r} is not a Qwen-Image pipeline this pack runs.",
        fix=f"Use a diffusers folder of a supported family: {known}.",
    )


def family_for_repo(repo_id: str) -> ModelFamily | None:
    """The family a Hub repo id belongs to, when it is one of the families' known repos."""
    wanted = str(repo_id).strip().lower()
    return next((f for f in FAMILIES.values() if wanted in (r.lower() for r in f.repo_ids)), None)


def known_repo_ids() -> list[str]:
    return [repo for family in FAMILIES.values() for repo in family.repo_ids]
