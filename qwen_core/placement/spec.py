"""The ``devices`` choice: which card runs which component (issue 16). A leaf: plain types, no torch.

Text form (the Loader's ``devices`` widget, ``--devices`` on the CLI, ``PipelineLoader(devices=...)``):

- ``single`` (default): everything on the loader's device, as before.
- ``auto``: ``placement.plan.plan_placement`` decides from each card's free VRAM (one card when the model fits
  there; else the text encoder on another card; else the transformer's blocks split across the cards).
- ``component=device[,device...]`` pairs, separated by ``;`` or spaces:

  - ``text_encoder`` (``te``) = one device, ``cuda:N`` or ``cpu``: it runs once per prompt, and its 15 GiB
    (bf16) are then not on the transformer's card;
  - ``transformer`` (``dit``) = one device, or several CUDA devices: its 60 blocks run split across them in
    that order (one after another: this fits a model, it does not make one image faster).

  The first transformer device is the main card: the VAE, the latents and the transformer's own small layers
  live there (the pipeline computes on it). Not named: the loader's device.

Examples: ``text_encoder=cuda:1``, ``te=cpu``, ``transformer=cuda:0,cuda:1 te=cuda:1``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from qwen_core.errors import InvalidInputError

SINGLE = "single"
AUTO = "auto"
# The Loader's fixed list (its free-text field takes any valid spec).
PRESETS = (SINGLE, AUTO, "text_encoder=cuda:1", "text_encoder=cpu", "transformer=cuda:0,cuda:1")
MAX_SPLIT = 16
_KEYS = {"text_encoder": "text_encoder", "te": "text_encoder", "transformer": "transformer", "dit": "transformer"}
_DEVICE_RE = re.compile(r"^(cpu|mps|cuda(:\d{1,2})?)$")
_FIX = ("Write pairs like `text_encoder=cuda:1` or `transformer=cuda:0,cuda:1 te=cuda:1`; or choose single or "
        "auto.")


@dataclass(frozen=True)
class Placement:
    """Where each component runs. ``transformer``: its device, or several (its blocks split across them in order,
    the first is the main card). ``text_encoder`` None: on the main card. ``block_split``: blocks per transformer
    device (``()``: an even split, decided when applied)."""

    transformer: tuple[str, ...]
    text_encoder: str | None = None
    block_split: tuple[int, ...] = ()

    @classmethod
    def single(cls, device: str) -> Placement:
        return cls((normalize_device(device, "device"),))

    @property
    def main(self) -> str:
        """The main card: VAE, latents and the transformer's non-block layers (the pipeline's execution device)."""
        return self.transformer[0]

    @property
    def is_single(self) -> bool:
        return self.text_encoder is None and len(self.transformer) == 1

    @property
    def is_split(self) -> bool:
        """The transformer's blocks run on several devices."""
        return len(self.transformer) > 1

    @property
    def text_encoder_device(self) -> str:
        return self.text_encoder if self.text_encoder is not None else self.main

    def devices(self) -> tuple[str, ...]:
        """Every device this placement uses, main card first, each once."""
        seen = dict.fromkeys((*self.transformer, self.text_encoder_device))
        return tuple(seen)

    def cuda_devices(self) -> tuple[str, ...]:
        return tuple(d for d in self.devices() if d.startswith("cuda"))

    @property
    def key(self) -> str:
        """Canonical text (residency key, handle key): the same placement always reads the same."""
        if self.is_single:
            return SINGLE
        parts = [f"transformer={','.join(self.transformer)}"]
        if self.text_encoder is not None:
            parts.append(f"text_encoder={self.text_encoder}")
        return " ".join(parts)

    def blocks_per_device(self, num_blocks: int) -> tuple[int, ...]:
        """How many consecutive blocks each transformer device runs."""
        if self.block_split:
            if len(self.block_split) != len(self.transformer) or sum(self.block_split) != num_blocks:
                raise InvalidInputError("devices", f"block split {self.block_split} does not cover {num_blocks} "
                                        f"blocks on {len(self.transformer)} devices.", fix=_FIX)
            return self.block_split
        return even_split(num_blocks, len(self.transformer))

    def with_split(self, counts: tuple[int, ...]) -> Placement:
        return replace(self, block_split=tuple(int(c) for c in counts))

    def describe(self, num_blocks: int | None = None) -> str:
        if self.is_single:
            return f"everything on {self.main}"
        if self.is_split and num_blocks:
            counts = self.blocks_per_device(num_blocks)
            dit = "transformer blocks " + " + ".join(f"{n} on {d}" for n, d in zip(counts, self.transformer,
                                                                                   strict=True))
        else:
            dit = f"transformer on {', '.join(self.transformer)}"
        return f"{dit}; text encoder on {self.text_encoder_device}; VAE on {self.main}"


def even_split(num_blocks: int, parts: int) -> tuple[int, ...]:
    """``num_blocks`` in ``parts`` consecutive runs, the larger runs first (60 on 4 -> 15 each)."""
    if parts < 1 or num_blocks < parts:
        raise InvalidInputError("devices", f"cannot split {num_blocks} transformer blocks across {parts} devices.",
                                fix="Name fewer transformer devices.")
    base, extra = divmod(num_blocks, parts)
    return tuple(base + (1 if i < extra else 0) for i in range(parts))


def normalize_device(text: str, field: str = "devices") -> str:
    """``cpu``, ``mps`` or ``cuda:N`` (``cuda`` alone is ``cuda:0``, as torch reads it with one visible GPU)."""
    value = str(text).strip().lower()
    if not _DEVICE_RE.match(value):
        raise InvalidInputError(field, f"{text!r} is not a device; use cpu or cuda:N.", fix=_FIX)
    return "cuda:0" if value == "cuda" else value


def _placeable(text: str, field: str) -> str:
    device = normalize_device(text, field)
    if device == "mps":
        raise InvalidInputError(field, "mps is a single device; placement spreads components over CUDA cards and "
                                "the CPU.", fix="Choose single on a Mac.")
    return device


def is_auto(text: object) -> bool:
    return isinstance(text, str) and text.strip().lower() == AUTO


def parse_devices(text: str | Placement | None, device: str, *, field: str = "devices") -> Placement:
    """The placement ``text`` names, with the loader's ``device`` where it names none. ``auto`` is not parsed
    here (it needs readings: ``placement.plan.plan_placement``). Raises InvalidInputError naming ``field``."""
    if isinstance(text, Placement):
        return text
    raw = (text or SINGLE).strip()
    if raw.lower() == SINGLE:
        return Placement.single(device)
    if raw.lower() == AUTO:
        raise InvalidInputError(field, "'auto' needs the cards' readings; the loader resolves it.", fix=_FIX)
    chosen: dict[str, str] = {}
    for pair in re.split(r"[;\s]+", raw):
        if not pair:
            continue
        name, sep, value = pair.partition("=")
        key = _KEYS.get(name.strip().lower())
        if not sep or not value.strip():
            raise InvalidInputError(field, f"{pair!r} is not component=device.", fix=_FIX)
        if name.strip().lower() == "vae":
            raise InvalidInputError(field, "the VAE runs on the transformer's (first) card, where the latents are; "
                                    "it cannot be placed on its own.", fix=_FIX)
        if key is None:
            raise InvalidInputError(field, f"unknown component {name!r}; use text_encoder (te) or transformer "
                                    "(dit).", fix=_FIX)
        if key in chosen:
            raise InvalidInputError(field, f"{key} is named twice.", fix=_FIX)
        chosen[key] = value
    return _build(chosen, normalize_device(device, "device"), field)


def _build(chosen: dict[str, str], device: str, field: str) -> Placement:
    transformer = (device,)
    if "transformer" in chosen:
        transformer = tuple(_placeable(d, field) for d in chosen["transformer"].split(",") if d.strip())
        if len(set(transformer)) != len(transformer):
            raise InvalidInputError(field, f"{chosen['transformer']!r} names a device twice.", fix=_FIX)
        if len(transformer) > MAX_SPLIT:
            raise InvalidInputError(field, f"at most {MAX_SPLIT} transformer devices.", fix=_FIX)
        if len(transformer) > 1 and any(not d.startswith("cuda") for d in transformer):
            raise InvalidInputError(field, "a split transformer runs on CUDA devices only.", fix=_FIX)
    text_encoder = None
    if "text_encoder" in chosen:
        text_encoder = _placeable(chosen["text_encoder"], field)
        if text_encoder == transformer[0]:
            text_encoder = None  # with the transformer on the main card: nothing to place
    return Placement(transformer, text_encoder)
