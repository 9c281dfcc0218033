"""How each family's diffusers pipeline is called, and how its output becomes ComfyUI IMAGEs.

The generator is the same for every family; what differs is kept here, read from each pipeline's
``__call__`` in diffusers 0.42.1:

- size: Qwen-Image pipelines floor width/height to ``2 * vae_scale_factor`` (16 for the real VAE); 2.1 to 32
  (its VAE compresses 16x and the transformer takes latents unpatched). Layered ignores width/height: the
  output has the input image's aspect at ``resolution``^2 pixels, ``resolution`` in (640, 1024).
- images: Edit takes one image, Edit-2509/2511 and 2.1 a list; Layered one RGBA image.
- steps: a 2.1 checkpoint with ``sample_sigmas`` in its model_index.json (Turbo) runs that grid, whatever
  ``num_inference_steps`` says.
- output ("pt"): [B, C, H, W] (C = 4 for 2.1's RGBA VAE); Layered returns per image a [layers, 4, H, W] stack,
  which becomes ``layers`` consecutive IMAGEs with alpha.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qwen_core.families import ModelFamily
from qwen_core.reference_images import fitted_size

# Qwen-Image-Layered's model card call: CFG normalisation on; the (unused: we always pass a prompt) automatic
# caption in English.
LAYERED_CALL = {"cfg_normalize": True, "use_en_prompt": True}
MAX_LAYERS = 16


def is_layered(family: ModelFamily) -> bool:
    return bool(family.resolution_buckets)


def size_multiple(family: ModelFamily, configs: dict[str, dict]) -> int:
    """The multiple the pipeline floors width and height to (from the VAE config; no weights needed)."""
    if family.pipeline_class == "QwenImage21Pipeline":
        return 32
    downsamples = len(configs.get("vae", {}).get("temperal_downsample", [False, True, True]))
    return 2 * 2**downsamples


@dataclass(frozen=True)
class LayeredSize:
    resolution: int
    width: int
    height: int


def layered_size(family: ModelFamily, allowed_pixels: int, image: Any, multiple: int) -> LayeredSize:
    """The largest resolution bucket whose area fits ``allowed_pixels`` (else the smallest), and the output size
    the pipeline derives from it and the input's aspect (its ``calculate_dimensions``, then its floor)."""
    buckets = sorted(family.resolution_buckets, reverse=True)
    resolution = next((b for b in buckets if b * b <= allowed_pixels), buckets[-1])
    width, height = fitted_size(resolution * resolution, image)
    return LayeredSize(resolution, max(multiple, width // multiple * multiple), max(multiple, height // multiple * multiple))


def auto_size(family: ModelFamily, images: list[Any]) -> tuple[int, int]:
    """The size a family's model card uses when none is given: the default area at the last reference's aspect
    (Edit, Edit-2509/2511, 2.1 with images), else the default width x height."""
    if images:
        return fitted_size(family.default_width * family.default_height, images[-1])
    return family.default_width, family.default_height


def call_kwargs(family: ModelFamily, images: list[Any], *, width: int, height: int, layers: int,
                resolution: int | None = None) -> dict[str, Any]:
    """The family-specific keyword arguments of the pipeline call (prompt, steps, CFG, ... are common)."""
    kwargs: dict[str, Any] = {}
    if images:
        kwargs["image"] = images[0] if family.image_inputs.maximum == 1 else list(images)
    if is_layered(family):
        kwargs.update(layers=layers, resolution=resolution, **LAYERED_CALL)
    else:
        kwargs.update(width=width, height=height)
    return kwargs


def fixed_steps(pipe: Any) -> int | None:
    """Steps a checkpoint's own sigma grid fixes (2.1 Turbo's ``sample_sigmas``), or None."""
    config = getattr(pipe, "config", None)
    sigmas = config.get("sample_sigmas") if hasattr(config, "get") else None
    return len(sigmas) if sigmas else None


def output_images(images: Any) -> Any:
    """The pipeline's "pt" output as one [N, C, H, W] tensor (Layered: its per-image stacks of layers, in order)."""
    import torch

    if isinstance(images, (list, tuple)):
        return torch.cat([stack if stack.ndim == 4 else stack[None] for stack in images])
    return images


def decode_latents(pipe: Any, family: ModelFamily, latents: Any, width: int, height: int, layers: int) -> Any:
    """The pipeline's own decode steps (unpack, de-normalise, ``vae.decode``, postprocess) on final latents, for a
    decode done again (in tiles after an OOM, or in float32 after NaN pixels). [N, C, H, W] in 0..1."""
    import torch

    vae = pipe.vae
    shape = (1, vae.config.z_dim, 1, 1, 1)
    with torch.no_grad():
        if is_layered(family):
            z = pipe._unpack_latents(latents, height, width, layers, pipe.vae_scale_factor).to(vae.dtype)
        else:
            z = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor).to(vae.dtype)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(z.device, z.dtype)
        std = torch.tensor(vae.config.latents_std).view(shape).to(z.device, z.dtype)
        z = z * std + mean
        if is_layered(family):  # frame 0 is the composite of the input: the layers follow it
            z = z[:, :, 1:].permute(0, 2, 1, 3, 4).reshape(-1, z.shape[1], 1, *z.shape[3:])
        image = vae.decode(z, return_dict=False)[0][:, :, 0]
        return pipe.image_processor.postprocess(image, output_type="pt")
