"""Typed user choices. Strings from the UI or the CLI become these enums at the boundary."""

from __future__ import annotations

from enum import Enum

from qwen_core.errors import InvalidInputError


class _Choice(str, Enum):
    @classmethod
    def parse(cls, value: str | _Choice, field: str) -> _Choice:
        """Turn a UI/CLI string into the enum, or raise naming the field and the allowed values."""
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            allowed = ", ".join(m.value for m in cls)
            raise InvalidInputError(field, f"{value!r} is not one of: {allowed}.") from None


class MemoryMode(_Choice):
    """Where the weights live while generating (lightest last)."""

    AUTO = "auto"
    GPU = "gpu"  # everything resident on the GPU
    STREAMED = "streamed"  # our low-VRAM engine: resident blocks + prefetched streaming
    MODEL_OFFLOAD = "model_offload"  # diffusers enable_model_cpu_offload
    GROUP_OFFLOAD = "group_offload"  # diffusers group offloading (block level, CUDA stream)
    SEQUENTIAL = "sequential"  # diffusers enable_sequential_cpu_offload


class DtypeChoice(_Choice):
    AUTO = "auto"
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"


class AttentionChoice(_Choice):
    AUTO = "auto"
    SDPA = "sdpa"
    FLASH = "flash"
