"""The model-family seam: one small description per Qwen-Image family member.

The loader, the folder checks, the governor, Preflight and the generator ask the family instead of assuming
``QwenImagePipeline`` + Qwen2.5-VL: which pipeline class a folder must declare, which components (and
classes) it holds, what kind of text encoder it has, how many reference images it takes and what they cost,
which memory-model entries describe it, its model card's defaults and its repo ids.

Adding a family is one ``ModelFamily`` in ``FAMILIES`` plus its tests. This module is a leaf: plain data,
no torch, no diffusers (Preflight imports it without paying for them).

Where the numbers come from (diffusers 0.42.1, ``pipelines/qwenimage*/``):

- Every family's transformer sees one token per 16x16 output pixels (Qwen-Image: VAE /8 then 2x2 patches;
  2.1: VAE /16, no patching): ``PIXELS_PER_IMAGE_TOKEN``.
- Edit (``QwenImageEditPipeline``): the one reference is resized to ~1024x1024 (``calculate_dimensions(1024*1024,
  aspect)``) for the VAE, and the same 1 MP image goes to Qwen2.5-VL (patch 14, 2x2 merge: one text token per
  28x28 px).
- Edit-2509/2511 (``QwenImageEditPlusPipeline``): each reference is resized to ~1 MP for the VAE
  (``VAE_IMAGE_SIZE``) and to ~384x384 for Qwen2.5-VL (``CONDITION_IMAGE_SIZE``). 2511 is the same pipeline; its
  transformer config sets ``zero_cond_t`` (reference tokens are modulated with timestep 0).
- Layered (``QwenImageLayeredPipeline``): the input image fixes the output's aspect; the output area is one of
  two buckets (``resolution`` 640 or 1024). The sequence holds ``layers + 1`` output frames plus the input's
  latent, all at that area; the text encoder does not see the image (unless the prompt is left empty, when the
  pipeline captions the image first: we always pass a prompt).
- 2.1 (``QwenImage21Pipeline``): each condition image is resized to ``output_resolution``^2 (1024^2) for the
  VAE and goes to Qwen3-VL at that size (patch 16, 2x2 merge: one text token per 32x32 px). The transformer
  then sees the image's latent tokens in place of its vision tokens ("a condition image occupies the vision
  slots the encoder reserved for it"): a 1024^2 condition image and a short prompt make a 4114-token prefix
  (4096 latents + 18 text; counted on the tiny pipeline's key/value cache), not 4096 + 1024 + 18.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from qwen_core.errors import InvalidInputError, ModelFolderError

PIXELS_PER_IMAGE_TOKEN = 16 * 16
MP1024 = 1024 * 1024


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
class ReferenceSizing:
    """How the pipeline sizes each reference image, as its diffusers code does (see the module docstring)."""

    vae_area: int = 0  # pixels each reference is resized to before the VAE; its latent joins the sequence
    vision_area: int = 0  # pixels the text encoder's vision tower sees (0: the prompt holds no image)
    vision_pixels_per_token: int = 28 * 28  # Qwen2.5-VL: patch 14, 2x2 merge; Qwen3-VL: 32 * 32
    # 2.1: the latent tokens take the vision tokens' places in the transformer's sequence (module docstring), so
    # the vision tokens cost the text encoder only.
    latents_replace_vision_tokens: bool = False

    @property
    def image_tokens(self) -> int:
        return self.vae_area // PIXELS_PER_IMAGE_TOKEN

    @property
    def text_tokens(self) -> int:
        """The reference's vision tokens in the text encoder's prompt."""
        return self.vision_area // self.vision_pixels_per_token if self.vision_area else 0

    @property
    def sequence_tokens(self) -> int:
        """The tokens one reference adds to the transformer's sequence."""
        return self.image_tokens + (0 if self.latents_replace_vision_tokens else self.text_tokens)


@dataclass(frozen=True)
class ModelFamily:
    """What the rest of the library needs to know about one family. Sizes: GB = 1e9 bytes, as the Hub shows."""

    key: str  # stable id: CLI `--family`, residency keys
    display_name: str
    pipeline_class: str  # the diffusers class model_index.json must name
    # component -> (library, class) as model_index.json lists them; weighted components first.
    components: Mapping[str, tuple[str, str]]
    text_encoder_kind: TextEncoderKind
    image_inputs: ImageInputs = field(default_factory=ImageInputs)
    reference: ReferenceSizing = field(default_factory=ReferenceSizing)
    memory_model_key: str = "qwen-image"  # presets/memory_model.json entries that describe this family
    default_width: int = 1328
    default_height: int = 1328
    default_steps: int = 50
    default_true_cfg_scale: float = 4.0
    repo_ids: tuple[str, ...] = ()
    download_size_gb: float | None = None  # bf16 weights of all components, as the Hub lists them
    # GB per weighted component in bf16 (parameters x 2 bytes, from the configs): what must fit where (Preflight's
    # model_offload check needs the transformer's share, 0.71 for Qwen-Image but 0.44 for 2.1).
    component_gb: Mapping[str, float] = field(default_factory=dict)
    licence: str = "Apache-2.0"
    licence_note: str = ""  # shown by Preflight/README when the licence restricts use
    output_channels: int = 3  # 4: the VAE decodes RGBA (layers with alpha)
    default_layers: int = 0  # Layered: RGBA layers per image (the pipeline's `layers`)
    resolution_buckets: tuple[int, ...] = ()  # Layered: the output's side is one of these (area = side^2)
    max_batch_size: int = 16  # images per pipeline call this pipeline handles correctly
    cfg_batching: bool = True  # our batched cond+uncond forward (qwen_core.cfg_batch) applies
    guidance_distilled: bool = False  # trained to run without true CFG (true_cfg_scale > 1 only costs time)
    # Tells this family apart from another with the same pipeline class (from model_index.json and the
    # transformer config); None matches any folder of the class.
    variant: str | None = None

    @property
    def weighted_components(self) -> tuple[str, ...]:
        return tuple(name for name in ("transformer", "text_encoder", "vae") if name in self.components)

    @property
    def short_name(self) -> str:
        """The key without the "qwen-image-" prefix (`edit-2509`), as the CLI also accepts it."""
        return self.key.removeprefix("qwen-image-")

    @property
    def takes_images(self) -> bool:
        return self.image_inputs.maximum > 0

    @property
    def tokens_per_reference_image(self) -> int:
        """Extra sequence tokens each reference image adds to the transformer's sequence (its latent, plus its
        vision tokens in the prompt unless the latent takes their places)."""
        return self.reference.sequence_tokens

    def check_image_count(self, count: int) -> str | None:
        """None when ``count`` reference images are right for this family, else what is wrong (for an error)."""
        limits = self.image_inputs
        if limits.minimum <= count <= limits.maximum:
            return None
        return f"{self.display_name} takes {limits.describe()}; got {count}."

    def extra_pixels(self, count: int) -> int:
        """What ``count`` reference images add to the transformer's sequence, in output pixels (one token =
        16x16 px). The governor subtracts it from the memory window: a joint-attention token costs about the
        same activation memory whether it is output, reference latent or prompt."""
        return count * self.tokens_per_reference_image * PIXELS_PER_IMAGE_TOKEN

    def sequence_frames(self, layers: int | None = None) -> int:
        """Copies of the output area in the transformer's sequence: 1, or for Layered ``layers + 2`` (the
        composite frame, each layer, and the input image's latent, all at the output's area)."""
        if not self.resolution_buckets:
            return 1
        return (self.default_layers if layers is None else layers) + 2


_QWEN_IMAGE_COMPONENTS = {
    "transformer": ("diffusers", "QwenImageTransformer2DModel"),
    "text_encoder": ("transformers", "Qwen2_5_VLForConditionalGeneration"),
    "vae": ("diffusers", "AutoencoderKLQwenImage"),
    "tokenizer": ("transformers", "Qwen2Tokenizer"),
    "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
}
# The edit and layered pipelines also run Qwen2.5-VL's vision tower: its processor (image processor + tokenizer).
_QWEN_IMAGE_VL_COMPONENTS = {**_QWEN_IMAGE_COMPONENTS, "processor": ("transformers", "Qwen2VLProcessor")}
_QWEN_IMAGE_21_COMPONENTS = {
    "transformer": ("diffusers", "QwenImage21Transformer2DModel"),
    "text_encoder": ("transformers", "Qwen3VLForConditionalGeneration"),
    "vae": ("diffusers", "AutoencoderKLQwenImage21"),
    "processor": ("transformers", "Qwen3VLProcessor"),
    "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
}
# Sizes from the configs (parameters x 2 bytes): 20B transformer 40.9 GB + Qwen2.5-VL-7B 16.6 GB + VAE 0.25 GB;
# 2.1: 7.1B transformer 14.2 GB + Qwen3-VL-8B 17.5 GB + VAE 0.68 GB.
_QWEN_IMAGE_GB = 57.7
_QWEN_IMAGE_21_GB = 32.5
_QWEN_IMAGE_PARTS_GB = {"transformer": 40.86, "text_encoder": 16.58, "vae": 0.25}
_QWEN_IMAGE_21_PARTS_GB = {"transformer": 14.23, "text_encoder": 17.53, "vae": 0.68}
_RESEARCH_LICENCE = ("Qwen Research License Agreement: non-commercial research and evaluation only; commercial "
                     "use needs a separate licence from Qwen (see the LICENSE file in the model repo).")

QWEN_IMAGE = ModelFamily(
    key="qwen-image",
    display_name="Qwen-Image",
    pipeline_class="QwenImagePipeline",
    components=_QWEN_IMAGE_COMPONENTS,
    text_encoder_kind=TextEncoderKind.QWEN2_5_VL,
    # Model card: 1328x1328 (1:1), 50 steps, true_cfg_scale 4.0; 2512 is the same classes with new weights.
    repo_ids=("Qwen/Qwen-Image", "Qwen/Qwen-Image-2512"),
    download_size_gb=_QWEN_IMAGE_GB, component_gb=_QWEN_IMAGE_PARTS_GB,
)
QWEN_IMAGE_EDIT = ModelFamily(
    key="qwen-image-edit",
    display_name="Qwen-Image-Edit",
    pipeline_class="QwenImageEditPipeline",
    components=_QWEN_IMAGE_VL_COMPONENTS,
    text_encoder_kind=TextEncoderKind.QWEN2_5_VL,
    image_inputs=ImageInputs(1, 1),
    reference=ReferenceSizing(vae_area=MP1024, vision_area=MP1024),
    # Model card: the output follows the input's aspect at ~1 MP; 50 steps, true_cfg_scale 4.0.
    default_width=1024, default_height=1024,
    repo_ids=("Qwen/Qwen-Image-Edit",),
    download_size_gb=_QWEN_IMAGE_GB, component_gb=_QWEN_IMAGE_PARTS_GB,
)  # fmt: skip
_EDIT_PLUS = dict(
    pipeline_class="QwenImageEditPlusPipeline",
    components=_QWEN_IMAGE_VL_COMPONENTS,
    text_encoder_kind=TextEncoderKind.QWEN2_5_VL,
    image_inputs=ImageInputs(1, 3),  # the model card: "works best with 1 to 3 input images"
    reference=ReferenceSizing(vae_area=MP1024, vision_area=384 * 384),
    # Model cards (2509, 2511): 40 steps, true_cfg_scale 4.0, output ~1 MP at the last image's aspect.
    default_width=1024, default_height=1024, default_steps=40,
    download_size_gb=_QWEN_IMAGE_GB, component_gb=_QWEN_IMAGE_PARTS_GB,
)  # fmt: skip
QWEN_IMAGE_EDIT_2509 = ModelFamily(
    key="qwen-image-edit-2509", display_name="Qwen-Image-Edit-2509", repo_ids=("Qwen/Qwen-Image-Edit-2509",),
    variant="zero_cond_t=false", **_EDIT_PLUS,
)  # fmt: skip
QWEN_IMAGE_EDIT_2511 = ModelFamily(
    key="qwen-image-edit-2511", display_name="Qwen-Image-Edit-2511", repo_ids=("Qwen/Qwen-Image-Edit-2511",),
    variant="zero_cond_t=true", **_EDIT_PLUS,
)  # fmt: skip
QWEN_IMAGE_LAYERED = ModelFamily(
    key="qwen-image-layered",
    display_name="Qwen-Image-Layered",
    pipeline_class="QwenImageLayeredPipeline",
    components=_QWEN_IMAGE_VL_COMPONENTS,
    text_encoder_kind=TextEncoderKind.QWEN2_5_VL,
    image_inputs=ImageInputs(1, 1),
    reference=ReferenceSizing(),  # the input's latent is one more frame of the output area: sequence_frames
    # Model card: resolution 640 (or 1024), layers 4, 50 steps, true_cfg_scale 4.0.
    default_width=640, default_height=640, default_layers=4, resolution_buckets=(1024, 640),
    output_channels=4,
    # diffusers 0.42.1 slices the decoded layers per sample with the wrong stride when one call makes more than
    # one image (layers + 1 instead of layers): one image per call.
    max_batch_size=1,
    repo_ids=("Qwen/Qwen-Image-Layered",),
    download_size_gb=_QWEN_IMAGE_GB, component_gb=_QWEN_IMAGE_PARTS_GB,
)  # fmt: skip
_QWEN_IMAGE_21 = dict(
    pipeline_class="QwenImage21Pipeline",
    components=_QWEN_IMAGE_21_COMPONENTS,
    text_encoder_kind=TextEncoderKind.QWEN3_VL,
    # Text-to-image, or image-conditioned with any number of condition images (Qwen: up to 10).
    image_inputs=ImageInputs(0, 10),
    reference=ReferenceSizing(vae_area=MP1024, vision_area=MP1024, vision_pixels_per_token=32 * 32,
                              latents_replace_vision_tokens=True),
    memory_model_key="qwen-image-2.1",
    default_width=1024, default_height=1024,
    output_channels=4,  # its VAE decodes RGBA
    # Its single-stream transformer caches the prompt's keys/values per CFG branch (KV cache): batching the two
    # branches into one forward would mix the caches. The default needs no CFG at all.
    cfg_batching=False,
    download_size_gb=_QWEN_IMAGE_21_GB, component_gb=_QWEN_IMAGE_21_PARTS_GB,
    licence="Qwen Research License", licence_note=_RESEARCH_LICENCE,
)  # fmt: skip
QWEN_IMAGE_21 = ModelFamily(
    key="qwen-image-2.1", display_name="Qwen-Image 2.1", repo_ids=("Qwen/Qwen-Image-2.1",),
    # diffusers docs: "the values Qwen recommends: 40 steps and no guidance".
    default_steps=40, default_true_cfg_scale=1.0, variant="base", **_QWEN_IMAGE_21,
)  # fmt: skip
QWEN_IMAGE_21_TURBO = ModelFamily(
    key="qwen-image-2.1-turbo", display_name="Qwen-Image 2.1 Turbo", repo_ids=("Qwen/Qwen-Image-2.1-Turbo",),
    # Distilled: 8 steps from the checkpoint's own sigma grid (`sample_sigmas` in model_index.json), no CFG.
    default_steps=8, default_true_cfg_scale=1.0, guidance_distilled=True, variant="turbo", **_QWEN_IMAGE_21,
)  # fmt: skip

FAMILIES: dict[str, ModelFamily] = {
    family.key: family
    for family in (QWEN_IMAGE, QWEN_IMAGE_EDIT, QWEN_IMAGE_EDIT_2509, QWEN_IMAGE_EDIT_2511, QWEN_IMAGE_LAYERED,
                   QWEN_IMAGE_21, QWEN_IMAGE_21_TURBO)
}  # fmt: skip
DEFAULT_FAMILY = QWEN_IMAGE
# A distilled sigma grid is short (Turbo: 8); a base checkpoint that ships one lists its full step count.
TURBO_MAX_SIGMAS = 16


def get_family(key: str) -> ModelFamily:
    """The family with this key (``qwen-image-edit-2509`` or its short form ``edit-2509``); the error lists them."""
    wanted = str(key).strip().lower()
    family = FAMILIES.get(wanted) or FAMILIES.get(f"qwen-image-{wanted}")
    if family is None:
        raise InvalidInputError("family", f"{key!r} is not a known model family; choose one of {', '.join(FAMILIES)}.")
    return family


def _variant_of(pipeline_class: str, index: Mapping[str, Any], transformer_config: Mapping[str, Any]) -> str | None:
    """Which variant a folder of ``pipeline_class`` is, from its model_index.json and transformer config."""
    if pipeline_class == "QwenImageEditPlusPipeline":
        return f"zero_cond_t={'true' if transformer_config.get('zero_cond_t') else 'false'}"
    if pipeline_class == "QwenImage21Pipeline":
        sigmas = index.get("sample_sigmas")
        return "turbo" if isinstance(sigmas, list) and 0 < len(sigmas) <= TURBO_MAX_SIGMAS else "base"
    return None


def family_for_pipeline_class(
    class_name: str,
    where: str = "model_index.json",
    *,
    index: Mapping[str, Any] | None = None,
    transformer_config: Mapping[str, Any] | None = None,
) -> ModelFamily:
    """The family whose pipeline class is ``class_name`` (the variant decided from ``index`` and
    ``transformer_config`` where several share a class); ModelFolderError naming what was found otherwise."""
    candidates = [f for f in FAMILIES.values() if f.pipeline_class == class_name]
    if not candidates:
        known = ", ".join(sorted({f"{f.pipeline_class} ({f.display_name})" for f in FAMILIES.values()}))
        raise ModelFolderError(
            f"{where}: pipeline class {class_name!r} is not a Qwen-Image pipeline this pack runs.",
            fix=f"Use a diffusers folder of a supported family: {known}.",
        )
    variant = _variant_of(class_name, index or {}, transformer_config or {})
    return next((f for f in candidates if f.variant in (None, variant)), candidates[0])


def family_for_repo(repo_id: str) -> ModelFamily | None:
    """The family a Hub repo id belongs to, when it is one of the families' known repos."""
    wanted = str(repo_id).strip().lower()
    return next((f for f in FAMILIES.values() if wanted in (r.lower() for r in f.repo_ids)), None)


def known_repo_ids() -> list[str]:
    return [repo for family in FAMILIES.values() for repo in family.repo_ids]


@dataclass(frozen=True)
class FamilyRequirements:
    """What Preflight and the governor need to know about a family before anything is downloaded or loaded."""

    family_key: str
    display_name: str
    download_size_gb: float | None
    component_gb: Mapping[str, float]
    memory_model_key: str
    licence: str
    licence_note: str
    takes_images: str  # ImageInputs.describe()
    tokens_per_reference_image: int


def requirements(family: ModelFamily | str) -> FamilyRequirements:
    """The facts Preflight reports for ``family`` (a family or its key): download size, memory-model key,
    licence, image inputs and what each reference image costs."""
    family = get_family(family) if isinstance(family, str) else family
    return FamilyRequirements(
        family.key, family.display_name, family.download_size_gb, family.component_gb, family.memory_model_key,
        family.licence,
        family.licence_note, family.image_inputs.describe(), family.tokens_per_reference_image,
    )  # fmt: skip
