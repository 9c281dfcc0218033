"""Reference (input) images: checked, counted against the family's rule and converted for its pipeline.

An image arrives as ComfyUI's IMAGE (a float tensor [B, H, W, C] in 0..1, B = 1; C = 1, 3 or 4), a single
[H, W, C] tensor or array, or a PIL image. Everything is checked before any compute, naming the input
(``image1``...), and converted to the PIL image the family's pipeline expects:

- Edit, Edit-2509/2511: RGB. An alpha channel is composited over white (what Qwen does for 2.1's vision
  encoder), not dropped: transparent pixels would otherwise show whatever colour they happen to store.
- Layered and 2.1: RGBA (their VAEs encode the alpha channel; a missing one is opaque).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from qwen_core.errors import InvalidInputError
from qwen_core.families import ModelFamily

MIN_REFERENCE_SIDE = 8
MAX_REFERENCE_PIXELS = 8192 * 8192


def field_name(index: int) -> str:
    """The node's input name for the index-th image (0-based): image1, image2, ..."""
    return f"image{index + 1}"


def _array_from_tensor(value: Any, name: str) -> Any:
    import numpy as np
    import torch

    tensor = value.detach().to("cpu")
    if tensor.ndim == 4:
        if tensor.shape[0] != 1:
            raise InvalidInputError(
                name, f"holds a batch of {tensor.shape[0]} images; each image input takes one image.",
                fix="Pick one image of the batch (e.g. ComfyUI's ImageFromBatch) or use the other image inputs.",
            )  # fmt: skip
        tensor = tensor[0]
    if tensor.ndim != 3:
        raise InvalidInputError(name, f"must be an image [height, width, channels], got shape {tuple(value.shape)}.")
    if not tensor.is_floating_point():
        return tensor.numpy()
    tensor = tensor.float()
    if not bool(torch.isfinite(tensor).all()):
        raise InvalidInputError(name, "contains NaN or infinite values.")
    return (tensor.clamp(0, 1) * 255.0).round().to(torch.uint8).numpy().astype(np.uint8)


def to_pil(value: Any, name: str) -> Any:
    """One reference image as a PIL image in its own mode (L, RGB or RGBA); InvalidInputError naming ``name``."""
    import numpy as np
    from PIL import Image

    if isinstance(value, Image.Image):
        image = value
    else:
        if hasattr(value, "detach"):  # a torch tensor (ComfyUI IMAGE)
            array = _array_from_tensor(value, name)
        elif isinstance(value, np.ndarray):
            array = value
        else:
            raise InvalidInputError(name, f"must be an IMAGE, a PIL image or an array, got {type(value).__name__}.")
        if array.ndim == 2:
            array = array[:, :, None]
        if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
            raise InvalidInputError(name, f"must have 1, 3 or 4 channels (gray, RGB, RGBA), got shape {array.shape}.")
        if array.dtype != np.uint8:
            array = (np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
        image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    _check_size(image, name)
    return image


def _check_size(image: Any, name: str) -> None:
    width, height = image.size
    if min(width, height) < MIN_REFERENCE_SIDE:
        raise InvalidInputError(name, f"is {width}x{height}; each side needs at least {MIN_REFERENCE_SIDE} px.")
    if width * height > MAX_REFERENCE_PIXELS:
        raise InvalidInputError(name, f"is {width}x{height}, above {MAX_REFERENCE_PIXELS / 1e6:.0f} MP.",
                                fix="Scale it down first (the pipeline resizes references to about 1 MP anyway).")


def for_family(image: Any, family: ModelFamily) -> Any:
    """``image`` (PIL) in the mode the family's pipeline needs: RGBA when its VAE has an alpha channel, else RGB
    with any alpha composited over white."""
    from PIL import Image

    if family.output_channels == 4:
        return image if image.mode == "RGBA" else image.convert("RGBA")
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        return white
    return image if image.mode == "RGB" else image.convert("RGB")


def prepare(images: Sequence[Any] | None, family: ModelFamily, *, where: str = "") -> list[Any]:
    """Check the images (each, and their count for ``family``) and convert them; nothing is computed.

    ``None`` entries are skipped (unconnected optional inputs) but keep their position for the names:
    ``[None, img]`` reports problems as ``image2``. ``where`` names the model in the count error.
    """
    if images is not None and not isinstance(images, (list, tuple)):
        images = [images]
    named = [(field_name(i), image) for i, image in enumerate(images or []) if image is not None]
    problem = family.check_image_count(len(named))
    if problem is not None:
        if len(named) < family.image_inputs.minimum:
            name, fix = field_name(len(named)), "Connect the input image(s) this model needs (image1..image3)."
        else:
            name = named[family.image_inputs.maximum][0]
            fix = ("Disconnect the image inputs, or load an edit model (e.g. Qwen-Image-Edit-2509)."
                   if not family.takes_images else "Disconnect the extra image inputs.")
        raise InvalidInputError(name, f"{where + ': ' if where else ''}{problem}", fix=fix)
    return [for_family(to_pil(image, name), family) for name, image in named]


def fitted_size(area: int, image: Any, multiple: int = 32) -> tuple[int, int]:
    """Width and height of about ``area`` pixels at ``image``'s aspect, rounded to ``multiple`` (the pipelines'
    ``calculate_dimensions``): the output size the edit pipelines pick when none is given."""
    width, height = image.size
    ratio = width / height
    w = math.sqrt(area * ratio)
    h = w / ratio
    return max(multiple, round(w / multiple) * multiple), max(multiple, round(h / multiple) * multiple)
