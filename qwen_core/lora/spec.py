"""The plain LoRA types every other LoRA module imports: ``LoraSpec``, ``LoraError``, the name rules.

A leaf module: no torch, no diffusers (the nodes and the CLI parse specs without paying for them).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from qwen_core.errors import InvalidInputError, QwenError

# ComfyUI's own LoraLoader allows -100..100; beyond +-10 every LoRA we know of burns the image out.
STRENGTH_RANGE = (-10.0, 10.0)
# A Lightning (few-step distilled) LoRA or model is recognised by name: lightx2v's releases are all called
# "Qwen-Image-Lightning-<N>steps-...", and ComfyUI's templates keep those names.
LIGHTNING_MARKER = "lightning"


class LoraError(QwenError):
    """A LoRA file is unsafe (pickled), unreadable, of an unknown format, or does not fit the model."""


def check_strength(value: object, field: str = "strength") -> float:
    """A finite number in ``STRENGTH_RANGE``; raises InvalidInputError naming ``field`` otherwise."""
    low, high = STRENGTH_RANGE
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidInputError(field, f"must be a number in {low:g}..{high:g}, got {value!r}.")
    number = float(value)
    if not math.isfinite(number) or not low <= number <= high:
        raise InvalidInputError(field, f"must be a finite number in {low:g}..{high:g}, got {value!r}.")
    return number


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA to apply: a ``.safetensors`` file and its strength (0 = off, 1 = as trained)."""

    path: Path
    strength: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path).expanduser())
        object.__setattr__(self, "strength", check_strength(self.strength))

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def is_lightning(self) -> bool:
        """A Lightning LoRA that is switched on (a negative or zero strength does not distil anything)."""
        return is_lightning_name(self.name) and self.strength > 0

    def describe(self) -> str:
        return f"{self.name} @ {self.strength:g}"


def is_lightning_name(name: str | Path) -> bool:
    return LIGHTNING_MARKER in Path(name).name.lower()


def parse_lora_arg(text: str) -> LoraSpec:
    """``FILE[:STRENGTH]`` (the CLI's ``--lora``). A trailing ``:number`` is the strength; anything else
    (a Windows drive, a colon in a name) stays part of the path."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidInputError("lora", f"expected FILE[:STRENGTH], got {text!r}.")
    path, strength = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            strength = float(tail)
        except ValueError:
            pass
        else:
            path = head
    return LoraSpec(Path(path), check_strength(strength, "lora"))


def as_specs(loras: Iterable[LoraSpec | tuple[str | Path, float] | str | Path] | None) -> tuple[LoraSpec, ...]:
    """Specs from specs, ``(path, strength)`` pairs or ``FILE[:STRENGTH]`` strings, in stacking order."""
    specs = []
    for item in loras or ():
        if isinstance(item, LoraSpec):
            specs.append(item)
        elif isinstance(item, tuple) and len(item) == 2:
            specs.append(LoraSpec(Path(item[0]), item[1]))
        elif isinstance(item, (str, Path)):
            specs.append(parse_lora_arg(str(item)))
        else:
            raise InvalidInputError("loras", f"each LoRA must be a LoraSpec, (path, strength) or 'FILE[:STRENGTH]'; "
                                             f"got {item!r}.")
    return tuple(specs)
