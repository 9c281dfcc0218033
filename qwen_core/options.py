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
    FLASH4 = "flash4"  # flash-attn 4 (CuTe DSL, Hopper/Blackwell): qwen_core.speed.attention


class CompileChoice(_Choice):
    """torch.compile of the transformer blocks (``qwen_core.speed.compile``)."""

    AUTO = "auto"  # on for CUDA unless QWEN_COMPILE=0; off elsewhere
    ON = "on"
    OFF = "off"


class ComputeChoice(_Choice):
    """The arithmetic of the transformer's large matrix products (not the storage dtype)."""

    AUTO = "auto"  # the model dtype (bf16/fp16): exact, the default; QWEN_COMPUTE=fp8 changes it
    EXACT = "exact"
    FP8 = "fp8"  # fp8 e4m3 matmuls (sm_89+): faster, ~0.09 relative deviation (README "fp8 compute")
