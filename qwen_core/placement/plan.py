"""What each card holds under a placement, and the ``auto`` planner. No torch: readings come in as numbers.

Memory per card, from the one memory model (``qwen_core.memory_model``):

- the main card holds the VAE, the transformer's blocks that run there (all of them without a split) and the
  text encoder unless it is placed elsewhere; its window is the memory mode's own (``window_pixels`` with these
  weights: for ``gpu`` the measured base minus the measured weights plus these, and the slope that covers the
  larger of the batched forward and the untiled VAE decode);
- a card that only runs transformer blocks needs its blocks + the transformer's activations (the memory
  model's ``activations/<dtype>`` slope, measured for one batched cond+uncond forward) + the CUDA context
  (the ``gpu`` entry's headroom); it never decodes;
- the text encoder's card needs its weights + ``TEXT_ENCODER_MARGIN_GIB`` (a 512-token prompt's activations
  and the CUDA context).

``plan_placement`` (the ``auto`` choice) prefers, in this order: one card (``gpu`` mode holds the reference
image) > the text encoder on another card with the transformer resident on the main card > the transformer's
blocks split across the cards, every card resident > the text encoder on another card with whatever memory mode
the main card then gets (streamed) > one card.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from qwen_core import memory_model as mm
from qwen_core.placement.spec import Placement

TEXT_ENCODER_MARGIN_GIB = 1.5
MIN_BLOCKS_PER_CARD = 1


@dataclass(frozen=True)
class Card:
    """One CUDA card and its free-VRAM reading (GiB)."""

    device: str
    free_gib: float


@dataclass(frozen=True)
class CardLoad:
    """The weights one card holds under a placement; ``main``: the card with the VAE (it decodes)."""

    device: str
    weights: mm.WeightSizes
    main: bool


@dataclass(frozen=True)
class PlacementDecision:
    placement: Placement
    reason: str


def _part(weights: mm.WeightSizes, name: str) -> float:
    return weights.get(name) or 0.0


def card_loads(placement: Placement, weights: mm.WeightSizes, num_blocks: int) -> list[CardLoad]:
    """What each device of ``placement`` holds (GiB per component; the CPU is listed too, as a non-main device).
    A split transformer's bytes are shared in proportion to each device's blocks."""
    held: dict[str, dict[str, float]] = {d: {} for d in placement.devices()}
    transformer = _part(weights, "transformer")
    counts = placement.blocks_per_device(num_blocks) if placement.is_split else (num_blocks,)
    for device, count in zip(placement.transformer, counts, strict=True):
        held[device]["transformer"] = transformer * count / max(num_blocks, 1)
    if weights.get("text_encoder") is not None:
        held[placement.text_encoder_device]["text_encoder"] = _part(weights, "text_encoder")
    for name, gib in weights.parts:
        if name not in ("transformer", "text_encoder"):
            held[placement.main][name] = held[placement.main].get(name, 0.0) + gib
    return [CardLoad(d, mm.WeightSizes.of(parts), d == placement.main) for d, parts in held.items()]


def main_card_weights(placement: Placement, weights: mm.WeightSizes, num_blocks: int) -> mm.WeightSizes:
    """The weights on the main card: what ``choose_memory_mode`` and the governor's window count there."""
    return next(c.weights for c in card_loads(placement, weights, num_blocks) if c.main)


def blocks_card_pixels(free_gib: float, held_gib: float, *, family: str = mm.DEFAULT_FAMILY,
                       dtype: object = "bf16") -> int:
    """The largest image a card that holds ``held_gib`` of transformer blocks (and maybe the text encoder, idle
    while denoising) can run: the activation slope of one batched forward, plus the CUDA context."""
    fam = mm.family_model(family)
    headroom = fam.entry("gpu", dtype).headroom_gib
    return fam.entry("activations", dtype).max_pixels(free_gib - headroom, held_gib)


def text_encoder_fits(free_gib: float | None, te_gib: float) -> bool:
    return free_gib is None or te_gib + TEXT_ENCODER_MARGIN_GIB <= free_gib


def split_blocks(num_blocks: int, rooms: Sequence[float], block_gib: float) -> tuple[int, ...] | None:
    """Consecutive blocks per card, in proportion to each card's room (GiB) and never more than fits there;
    None when the rooms cannot hold every block."""
    if block_gib <= 0:
        return None
    caps = [max(0, math.floor(r / block_gib)) for r in rooms]
    if sum(caps) < num_blocks or any(c < MIN_BLOCKS_PER_CARD for c in caps):
        return None
    total = sum(rooms)
    counts = [min(cap, max(MIN_BLOCKS_PER_CARD, round(num_blocks * r / total))) for cap, r in zip(caps, rooms,
                                                                                                  strict=True)]
    while sum(counts) > num_blocks:  # take from the fullest card (relative to its cap)
        i = max(range(len(counts)), key=lambda k: (counts[k] / caps[k], counts[k]))
        counts[i] -= 1
    while sum(counts) < num_blocks:  # give to the card with the most spare room
        i = max(range(len(counts)), key=lambda k: caps[k] - counts[k])
        counts[i] += 1
    return tuple(counts)


def plan_placement(weights: mm.WeightSizes, cards: Sequence[Card], num_blocks: int, *,
                   family: str = mm.DEFAULT_FAMILY, dtype: object = "bf16") -> PlacementDecision:
    """The ``auto`` placement for these weights (GiB per component in the run dtype) and free-VRAM readings;
    ``cards[0]`` is the main card (the loader's device). See the module docstring for the order."""
    if not cards:
        return PlacementDecision(Placement(("cpu",)), "no CUDA card: everything on the CPU")
    main = cards[0]
    single = Placement((main.device,))
    fam = mm.family_model(family)
    ref = fam.reference_pixels
    side = f"{math.isqrt(ref)}x{math.isqrt(ref)}" if math.isqrt(ref) ** 2 == ref else f"{ref / 1e6:.2f} MP"
    te, transformer = _part(weights, "text_encoder"), _part(weights, "transformer")
    if len(cards) < 2 or not te or not transformer:
        return PlacementDecision(single, f"one card ({main.device}): "
                                 + ("only one CUDA card" if len(cards) < 2 else "no per-component sizes"))

    def gpu_window(placement: Placement) -> int:
        held = main_card_weights(placement, weights, num_blocks)
        return mm.window_pixels("gpu", main.free_gib, weights=held, family=family, dtype=dtype)

    if gpu_window(single) >= ref:
        return PlacementDecision(single, f"one card: the model and a {side} image fit on {main.device}")
    others = sorted(cards[1:], key=lambda c: -c.free_gib)
    te_card = next((c for c in others if text_encoder_fits(c.free_gib, te)), None)
    if te_card is not None:
        moved = Placement((main.device,), te_card.device)
        if gpu_window(moved) >= ref:
            return PlacementDecision(moved, f"text encoder ({te:.1f} GiB) on {te_card.device}: the transformer "
                                     f"and a {side} image then fit on {main.device}")
    split = _split_plan(weights, cards, num_blocks, te_card, family=family, dtype=dtype)
    if split is not None:
        return PlacementDecision(split, f"transformer blocks split across {', '.join(split.transformer)} "
                                 f"({'+'.join(map(str, split.block_split))} of {num_blocks}), all resident, "
                                 f"text encoder on {split.text_encoder_device}: a {side} image fits every card")
    if te_card is not None:
        return PlacementDecision(Placement((main.device,), te_card.device),
                                 f"text encoder ({te:.1f} GiB) on {te_card.device}; the transformer's memory "
                                 f"mode on {main.device} is chosen without it")
    return PlacementDecision(single, f"one card: no other card has {te + TEXT_ENCODER_MARGIN_GIB:.1f} GiB free "
                             "for the text encoder, nor room for a split")


def _split_plan(weights: mm.WeightSizes, cards: Sequence[Card], num_blocks: int, te_card: Card | None, *,
                family: str, dtype: object) -> Placement | None:
    """The fewest cards that hold the transformer resident, blocks in proportion to each card's room at the
    reference size; the text encoder on ``te_card`` when it is one of them and fits, else on the main card."""
    main, others = cards[0], sorted(cards[1:], key=lambda c: -c.free_gib)
    for count in range(2, len(cards) + 1):
        chosen = [main, *sorted(others[:count - 1], key=lambda c: _index(c.device))]
        te_options = [c.device for c in chosen[1:] if te_card is not None and c.device == te_card.device]
        for te_device in [*te_options, main.device]:
            counts = _split_counts(weights, chosen, num_blocks, te_device, family=family, dtype=dtype)
            if counts is not None:
                te_placed = None if te_device == main.device else te_device
                return Placement(tuple(c.device for c in chosen), te_placed, counts)
    return None


def _split_counts(weights: mm.WeightSizes, cards: Sequence[Card], num_blocks: int, te_device: str, *,
                  family: str, dtype: object) -> tuple[int, ...] | None:
    fam = mm.family_model(family)
    ref_mp = fam.reference_pixels / 1e6
    transformer, te = _part(weights, "transformer"), _part(weights, "text_encoder")
    gpu, act = fam.entry("gpu", dtype), fam.entry("activations", dtype)
    main_parts = {k: v for k, v in weights.parts if k not in ("transformer", "text_encoder")}
    if te_device == cards[0].device:
        main_parts["text_encoder"] = te
    rooms = [cards[0].free_gib - gpu.need_gib(fam.reference_pixels,
                                               fam.base_gib("gpu", dtype, mm.WeightSizes.of(main_parts)))]
    for card in cards[1:]:
        held = te if card.device == te_device else 0.0
        rooms.append(card.free_gib - (act.base_gib + held + act.gib_per_mpix * ref_mp + gpu.headroom_gib))
    return split_blocks(num_blocks, rooms, transformer / num_blocks)


def _index(device: str) -> int:
    return int(device.partition(":")[2] or 0)
