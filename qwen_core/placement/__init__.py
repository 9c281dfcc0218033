"""Placement (issue 16): which card runs which component of one pipeline, in one process.

``spec`` (the ``devices`` text and the ``Placement`` type, a leaf), ``plan`` (what each card holds, the ``auto``
planner; no torch) and ``hooks`` (moving the weights and the tensors that cross a device boundary; torch).
Context-parallel denoising of one image over several processes is ``qwen_core.parallel``.
"""

from qwen_core.placement.plan import (
    Card,
    CardLoad,
    PlacementDecision,
    card_loads,
    main_card_weights,
    plan_placement,
)
from qwen_core.placement.spec import AUTO, PRESETS, SINGLE, Placement, is_auto, parse_devices

__all__ = [
    "AUTO", "PRESETS", "SINGLE", "Card", "CardLoad", "Placement", "PlacementDecision", "card_loads", "is_auto",
    "main_card_weights", "parse_devices", "plan_placement",
]  # fmt: skip
