"""Context-parallel settings and the ``torchrun`` command line. A leaf: no torch, no diffusers.

Context parallelism (diffusers' ``ContextParallelConfig``) runs ONE image on N processes, one per GPU: every
process holds the whole model and the same latents, and each transformer forward splits the image and text
tokens N ways (``QwenImageTransformer2DModel._cp_plan``); attention exchanges keys and values between the
processes (Ulysses: all-to-all over heads; ring: key/value chunks passed round with log-sum-exp merging), and
``proj_out`` gathers the full output on every process. N processes need a launcher: ``torchrun``.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass
from enum import Enum

from qwen_core.errors import InvalidInputError
from qwen_core.validation import whole_number

MAX_DEGREE = 64
# torchrun sets these in every process it starts (torch.distributed's env:// rendezvous reads them).
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class CpAttention(str, Enum):
    """How attention spans the processes.

    ``ulysses``: an all-to-all gives each process every token for 1/N of the heads (diffusers' "Ulysses
    anything" variant: any token count and head count, so 1328x1328 = 6889 image tokens and any prompt length
    work). Runs with PyTorch SDPA, on CUDA (NCCL) and on the CPU (gloo).
    ``ring``: key/value chunks go round the ring and partial results merge through their log-sum-exp ("ring
    anything" variant). diffusers' SDPA backend returns no log-sum-exp, so ring needs cuDNN attention
    (``_native_cudnn``), flash-attn or SageAttention: CUDA only.
    """

    ULYSSES = "ulysses"
    RING = "ring"

    @classmethod
    def parse(cls, value: str | CpAttention, field: str = "cp_attention") -> CpAttention:
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            raise InvalidInputError(field, f"{value!r} is not one of: ulysses, ring.") from None


@dataclass(frozen=True)
class ContextParallelSettings:
    """``degree`` processes (one per GPU) denoise one image; ``attention`` says how attention spans them."""

    degree: int
    attention: CpAttention = CpAttention.ULYSSES

    @classmethod
    def parse(cls, degree: object, attention: str | CpAttention = "ulysses") -> ContextParallelSettings:
        n = whole_number("context_parallel", degree, 2, MAX_DEGREE, " (processes, one per GPU)")
        return cls(n, CpAttention.parse(attention))

    def describe(self) -> str:
        return f"context parallel x{self.degree} ({self.attention.value})"


def ulysses_splits(heads: int, degree: int) -> bool:
    """Whether Ulysses attention can split ``heads`` attention heads ``degree`` ways. diffusers' "anything"
    variant pads the heads to a multiple of the degree, but only by fewer than each process then holds
    (``_maybe_pad_qkv_head``): 24 heads (Qwen-Image) split 2, 3, 4, 5, 6, 8, 12 or 24 ways, not 7 or 16."""
    if heads % degree == 0:
        return True
    pad = degree - heads % degree
    return pad < (heads + pad) // degree


def ulysses_problem(heads: int, degree: int) -> str | None:
    """Why Ulysses cannot split ``heads`` heads ``degree`` ways (naming the degrees that work), or None."""
    if ulysses_splits(heads, degree):
        return None
    usable = [n for n in range(2, heads + 1) if ulysses_splits(heads, n)]
    return (f"Ulysses attention cannot split {heads} attention heads {degree} ways (degrees that work: "
            f"{', '.join(map(str, usable))}).")


@dataclass(frozen=True)
class DistributedEnv:
    """What torchrun told this process."""

    rank: int
    world_size: int
    local_rank: int


def under_torchrun(environ: dict[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return all(env.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def distributed_env(environ: dict[str, str] | None = None) -> DistributedEnv:
    env = os.environ if environ is None else environ
    if not under_torchrun(env):
        raise InvalidInputError("context_parallel", "this process was not started by torchrun (RANK, WORLD_SIZE "
                                "and LOCAL_RANK are not set).", fix="Run the command `generate --context-parallel N` "
                                "prints.")
    return DistributedEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]))


def torchrun_command(argv: list[str], degree: int, *, python: str | None = None) -> list[str]:
    """The command that runs ``python -m qwen_core <argv>`` as ``degree`` processes on this machine.

    ``python -m torch.distributed.run`` is ``torchrun`` without relying on PATH; ``--standalone`` starts the
    rendezvous on a free local port.
    """
    return [python or sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={degree}",
            "-m", "qwen_core", *argv]


def format_command(command: list[str]) -> str:
    return " ".join(shlex.quote(part) for part in command)
