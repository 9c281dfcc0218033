"""Reading a LoRA file safely and turning any common format into per-layer factors.

Safety first: only ``.safetensors`` is read. A pickled checkpoint (``.ckpt/.pt/.pth/.bin`` or a
"``.safetensors``" whose bytes are a pickle or a torch zip) is refused from its name or its first bytes,
before anything is parsed. The header is checked (length inside the file, JSON object) before tensors load.

Formats: every format diffusers' Qwen-Image LoRA loader (``QwenImageLoraLoaderMixin.lora_state_dict``)
converts is accepted, because conversion is that function: diffusers/PEFT (``transformer.<layer>.lora_A/B``,
with PEFT's ``lora_alpha``/``r`` from the file's ``lora_adapter_metadata``), Kohya (``lora_unet_<flat>`` +
``lora_down/lora_up/alpha``), lightx2v's Qwen-Image-Lightning releases (``<layer>.lora_down/lora_up/alpha``),
ComfyUI-style keys (``diffusion_model.<layer>...``) and DiffSynth's ``...lora_A.default.weight``. DoRA, LoHa,
LoKr, bias and full-weight-diff keys are refused naming the key (they are not plain low-rank products).

``describe_file`` needs only the header (and the few scalar ``alpha`` tensors): it converts tensors on the
meta device, so a LoRA node can check a 1.7 GB Lightning file against the model's layer shapes in
milliseconds, before any weight is loaded. ``load_file`` reads the factors for fusing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qwen_core.families import ModelFamily
from qwen_core.lora.spec import LoraError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
_METADATA_KEY = "lora_adapter_metadata"  # diffusers' key for the PEFT config in a saved LoRA
# Keys of adapters that are not a plain B @ A product (or not for the transformer): refused, named.
_UNSUPPORTED = (
    ("dora_scale", "DoRA"), ("lora_magnitude_vector", "DoRA"), ("hada_w", "LoHa"), ("lokr_w", "LoKr"),
    ("lora_B.bias", "a LoRA bias"), ("lora_up.bias", "a LoRA bias"), (".diff_b", "a bias difference"),
    (".diff", "a full weight difference"), ("lora_te", "a text-encoder LoRA"), ("text_encoder.", "a text-encoder LoRA"),
)
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_A_SUFFIX, _B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


@dataclass(frozen=True)
class LoraFactors:
    """One layer's low-rank update: delta W = scale * (B @ A), A [rank, in], B [out, rank]."""

    down: torch.Tensor  # A
    up: torch.Tensor  # B
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.down, self.up) if t.device.type != "meta")


@dataclass(frozen=True)
class LoraFile:
    """A LoRA converted to diffusers layer names: ``layers`` maps a transformer module name to its factors."""

    path: Path
    stamp: tuple[int, int]  # (size, mtime_ns): a changed file is read again
    format: str
    layers: dict[str, LoraFactors] = field(repr=False)
    keys: dict[str, str] = field(default_factory=dict, repr=False)  # layer -> the file key it came from

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.layers.values())

    @property
    def ranks(self) -> list[int]:
        return sorted({f.rank for f in self.layers.values()})

    def summary(self) -> str:
        ranks = "/".join(str(r) for r in self.ranks) or "-"
        return f"{self.path.name}: {self.format}, {len(self.layers)} layers, rank {ranks}, {self.nbytes / 2**20:.1f} MiB"


def file_stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return (st.st_size, st.st_mtime_ns)


def check_lora_path(path: str | Path) -> Path:
    """The file, if it may be read: it exists, it is named ``.safetensors``, and its bytes are not a pickle."""
    path = Path(path).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoraError(f"{path}: {path.suffix} files are pickled Python objects, which can run code when loaded; "
                        "this pack reads LoRAs only as .safetensors.",
                        fix="Download the .safetensors release of this LoRA, or convert it in a trusted environment.")
    if path.suffix.lower() != ".safetensors":
        raise LoraError(f"{path}: only .safetensors LoRA files are read (got {path.suffix or 'no suffix'!r}).",
                        fix="Pick a .safetensors file from the loras folder.")
    if not path.is_file():
        raise LoraError(f"{path}: no such LoRA file.", fix="Put the file in ComfyUI's models/loras folder.")
    return path


def read_header(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The safetensors header (tensor name -> dtype/shape/offsets) and its ``__metadata__``, checked first."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if head[:1] == b"\x80" or head[:4] == b"PK\x03\x04":
            raise LoraError(f"{path}: this is a pickled (torch.save) checkpoint renamed to .safetensors; it was not "
                            "loaded.", fix="Get the real .safetensors release of this LoRA.")
        if len(head) < 8:
            raise LoraError(f"{path}: {size} bytes is too short for a safetensors file.", fix="Download it again.")
        (length,) = struct.unpack("<Q", head)
        if not 2 <= length <= min(MAX_HEADER_BYTES, size - 8):
            raise LoraError(f"{path}: not a safetensors file (header length {length} in a {size}-byte file).",
                            fix="Download it again; only .safetensors LoRAs are supported.")
        raw = fh.read(length)
    try:
        header = json.loads(raw)
    except ValueError as err:
        raise LoraError(f"{path}: the safetensors header is not valid JSON ({err}).", fix="Download it again.") from err
    if not isinstance(header, dict):
        raise LoraError(f"{path}: the safetensors header is not a JSON object.", fix="Download it again.")
    metadata = header.pop("__metadata__", None) or {}
    return header, {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}


def detect_format(keys: list[str]) -> str:
    """A human name for the key layout (for messages and reports)."""
    if any(k.startswith("lora_unet_") for k in keys):
        return "Kohya (lora_unet_)"
    if any(k.startswith("diffusion_model.") for k in keys):
        return "ComfyUI (diffusion_model.)"
    if any(".default." in k for k in keys):
        return "DiffSynth (lora_A.default)"
    if any(".lora_down." in k for k in keys):
        return "Lightning/lightx2v (lora_down/lora_up/alpha)"
    if any(k.startswith("transformer.") for k in keys):
        return "diffusers/PEFT (transformer.)"
    return "PEFT (no prefix)"


def _refuse_unsupported(path: Path, keys: list[str]) -> None:
    for key in keys:
        for marker, kind in _UNSUPPORTED:
            if marker in key:
                raise LoraError(f"{path}: key `{key}` is {kind}; only plain LoRA (B @ A) layers can be applied.",
                                fix="Use a plain LoRA release of this adapter.")


def _peft_scales(metadata: Mapping[str, str], path: Path) -> tuple[float | None, int | None, dict, dict, bool]:
    """(lora_alpha, r, alpha_pattern, rank_pattern, rslora) from diffusers' saved PEFT config, if any."""
    raw = metadata.get(_METADATA_KEY)
    if not raw:
        return None, None, {}, {}, False
    try:
        config = json.loads(raw)
    except ValueError as err:
        raise LoraError(f"{path}: its {_METADATA_KEY} is not valid JSON ({err}).", fix="Save the LoRA again.") from err
    config = {str(k).removeprefix("transformer."): v for k, v in config.items()} if isinstance(config, dict) else {}
    if config.get("use_dora"):
        raise LoraError(f"{path}: a DoRA adapter (use_dora in its metadata); only plain LoRA layers can be applied.",
                        fix="Use a plain LoRA release of this adapter.")
    alpha, rank = config.get("lora_alpha"), config.get("r")
    return (float(alpha) if alpha else None, int(rank) if rank else None, dict(config.get("alpha_pattern") or {}),
            dict(config.get("rank_pattern") or {}), bool(config.get("use_rslora")))


def _pattern_value(layer: str, patterns: Mapping[str, Any]) -> Any:
    """PEFT's pattern rule: a pattern matches a module name that ends with it (at a dot boundary)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", layer):
            return value
    return None


def _convert(family: ModelFamily, state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """diffusers' own conversion of this family's LoRA formats to ``transformer.<layer>.lora_A/B.weight``."""
    from qwen_core.model_source import pipeline_class

    loader = getattr(pipeline_class(family), "lora_state_dict", None)
    if loader is None:
        raise LoraError(f"{path}: diffusers has no LoRA loader for {family.display_name}.",
                        fix="Update diffusers (see requirements.txt), or use this model without LoRAs.")
    quiet = logging.getLogger("diffusers.loaders.lora_pipeline")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return loader(dict(state))
    except (ValueError, KeyError, IndexError, AttributeError, RuntimeError) as err:
        raise LoraError(f"{path}: diffusers' {family.display_name} LoRA loader cannot convert it ({err}); it is "
                        f"probably a LoRA for another model.", fix="Use a LoRA made for this model.") from err
    finally:
        quiet.setLevel(level)


def _pair_layers(converted: dict[str, torch.Tensor], path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, down in converted.items():
        if key.endswith(_B_SUFFIX):
            continue
        if not key.endswith(_A_SUFFIX):
            raise LoraError(f"{path}: key `{key}` is not a LoRA factor (lora_A/lora_B).",
                            fix="Use a LoRA made for this model.")
        up = converted.get(key[: -len(_A_SUFFIX)] + _B_SUFFIX)
        if up is None:
            raise LoraError(f"{path}: `{key}` has no matching lora_B.", fix="Download the LoRA again.")
        layer = key[: -len(_A_SUFFIX)].removeprefix("transformer.")
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise LoraError(f"{path}: `{key}` has shapes {list(down.shape)} / {list(up.shape)}, not a rank-r pair.",
                            fix="Use a plain LoRA (linear layers only).")
        layers[layer] = (down, up)
    if not layers:
        raise LoraError(f"{path}: holds no LoRA layers.", fix="Pick a LoRA file.")
    return layers


_FACTOR_SUFFIX = re.compile(r"\.(lora_(A|B|down|up)(\.default)?\.weight|alpha)$")


def _origin_keys(raw_keys: list[str], layers: dict[str, Any]) -> dict[str, str]:
    """layer -> the first key of the user's file it came from (messages name what the file has).

    diffusers' conversion keeps the file's order, one layer per group of keys (A/B/alpha), so the n-th layer
    comes from the n-th group; when the counts differ, a layer names itself."""
    groups: dict[str, str] = {}
    for key in raw_keys:
        groups.setdefault(_FACTOR_SUFFIX.sub("", key), key)
    if len(groups) != len(layers):
        return {layer: layer for layer in layers}
    return dict(zip(layers, groups.values(), strict=True))


def _build(path: Path, stamp: tuple[int, int], family: ModelFamily, state: dict[str, torch.Tensor],
           metadata: Mapping[str, str]) -> LoraFile:
    raw_keys = list(state)
    _refuse_unsupported(path, raw_keys)
    alpha, rank, alpha_pattern, rank_pattern, rslora = _peft_scales(metadata, path)
    layers = _pair_layers(_convert(family, state, path), path)
    factors = {}
    for layer, (down, up) in layers.items():
        scale = 1.0  # alphas in the file were folded into A/B by the conversion
        if alpha is not None:
            layer_alpha = _pattern_value(layer, alpha_pattern) or alpha
            layer_rank = _pattern_value(layer, rank_pattern) or rank or down.shape[0]
            scale = float(layer_alpha) / (math.sqrt(layer_rank) if rslora else float(layer_rank))
        factors[layer] = LoraFactors(down, up, scale)
    return LoraFile(path, stamp, detect_format(raw_keys), factors, _origin_keys(raw_keys, factors))


def describe_file(path: str | Path, family: ModelFamily) -> LoraFile:
    """The file's layers with their shapes, from the header alone (factors on the meta device)."""
    path = check_lora_path(path)
    stamp = file_stamp(path)
    header, metadata = read_header(path)
    alpha_keys = [k for k in header if k.endswith(".alpha")]
    state: dict[str, torch.Tensor] = {}
    for key, entry in header.items():
        if key in alpha_keys:
            continue
        dtype = _DTYPES.get(entry.get("dtype") if isinstance(entry, dict) else None)
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if dtype is None or not isinstance(shape, list):
            raise LoraError(f"{path}: tensor `{key}` has dtype {entry.get('dtype') if isinstance(entry, dict) else '?'}; "
                            "a LoRA holds floating-point factors.", fix="Use a LoRA made for this model.")
        state[key] = torch.empty(shape, dtype=dtype, device="meta")
    if alpha_keys:
        state.update(_read_tensors(path, alpha_keys))
    return _build(path, stamp, family, state, metadata)


def load_file(path: str | Path, family: ModelFamily) -> LoraFile:
    """The file's layers with their factors in CPU memory."""
    path = check_lora_path(path)
    stamp = file_stamp(path)
    header, metadata = read_header(path)
    _refuse_unsupported(path, list(header))
    state = _read_tensors(path, list(header))
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            raise LoraError(f"{path}: tensor `{key}` is {tensor.dtype}; a LoRA holds floating-point factors.",
                            fix="Use a LoRA made for this model.")
    return _build(path, stamp, family, state, metadata)


def _read_tensors(path: Path, keys: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as fh:
            return {key: fh.get_tensor(key) for key in keys}
    except (SafetensorError, OSError, ValueError) as err:
        raise LoraError(f"{path}: cannot be read as safetensors ({err}).", fix="Download it again.") from err
