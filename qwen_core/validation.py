"""Checks of user-supplied numbers, shared by every entry point (nodes, CLI, library).

NaN slips past range checks (every comparison with it is false) and ``True`` is an ``int``: both are refused
explicitly. Errors name the field and the allowed range.
"""

from __future__ import annotations

import math
import numbers

from qwen_core.errors import InvalidInputError


def whole_number(field: str, value: object, low: int, high: int, why: str = "") -> int:
    """``value`` as an int in [low, high], or InvalidInputError naming ``field`` and the allowed range."""
    allowed = f"allowed: whole numbers {low}..{high}{why}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidInputError(field, f"{value!r} is not a number; {allowed}.")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidInputError(field, f"{value!r} is not a finite number; {allowed}.")
    if int(value) != value:
        raise InvalidInputError(field, f"{value!r} is not a whole number; {allowed}.")
    if not low <= int(value) <= high:
        raise InvalidInputError(field, f"{int(value)} is out of range; {allowed}.")
    return int(value)
