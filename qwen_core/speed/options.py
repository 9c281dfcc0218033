"""``SpeedOptions``: the resolved speed choices of one load (compile, compute, dynamic shapes), and how the UI
strings and the environment become them. A leaf module: it imports nothing else of ``qwen_core.speed``.

- compile: ``CompileChoice``; ``auto`` = on for a CUDA device unless ``QWEN_COMPILE=0`` (``QWEN_COMPILE=1``
  also turns it on for ``auto`` on other devices, for tests). The Loader node's ``compile`` widget sets it.
- compute: ``ComputeChoice``; ``auto`` = the model dtype unless ``QWEN_COMPUTE=fp8``.
- fused: our fused kernels in compiled blocks (``qwen_core.speed.qk_rope``: the q/k norm + RoPE + concatenation;
  ``qwen_core.speed.linear_gelu``: the feed-forward's projection + GELU); on unless ``QWEN_FUSED_KERNELS=0``.
- dynamic: how compiled graphs treat sizes (``qwen_core.speed.compile``): ``"seq"`` (the default) marks the
  image and text sequence lengths symbolic so one graph serves every image size and prompt length;
  ``"static"`` specialises on each size (one compile per size and prompt length; for comparison in bench).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from qwen_core.errors import InvalidInputError
from qwen_core.options import CompileChoice, ComputeChoice

DYNAMIC_POLICIES = ("seq", "static")


@dataclass(frozen=True)
class SpeedOptions:
    compile: bool = False
    compute: ComputeChoice = ComputeChoice.EXACT
    dynamic: str = "seq"
    reason: str = ""
    fused: bool = True

    def describe(self) -> str:
        parts = ["compiled" if self.compile else "eager"]
        if self.compute is ComputeChoice.FP8:
            parts.append("fp8 compute")
        return ", ".join(parts)


def _env_flag(name: str) -> bool | None:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return None
    if value in ("1", "on", "true", "yes"):
        return True
    if value in ("0", "off", "false", "no"):
        return False
    raise InvalidInputError(name, f"{value!r} is not one of: 0, 1 (also on/off, true/false).")


def resolve_speed(compile_choice: str | CompileChoice = "auto", compute_choice: str | ComputeChoice = "auto", *,
                  device: str = "cpu", dynamic: str | None = None) -> SpeedOptions:
    """The speed options of a load on ``device`` (see the module docstring for the rules)."""
    choice = CompileChoice.parse(compile_choice or "auto", "compile")
    compute = ComputeChoice.parse(compute_choice or "auto", "compute")
    if compute is ComputeChoice.AUTO:
        env = os.environ.get("QWEN_COMPUTE", "").strip().lower()
        compute = ComputeChoice.parse(env, "QWEN_COMPUTE") if env else ComputeChoice.EXACT
        compute = ComputeChoice.EXACT if compute is ComputeChoice.AUTO else compute
    policy = (dynamic or os.environ.get("QWEN_COMPILE_DYNAMIC", "").strip() or "seq").lower()
    if policy not in DYNAMIC_POLICIES:
        raise InvalidInputError("QWEN_COMPILE_DYNAMIC", f"{policy!r} is not one of: {', '.join(DYNAMIC_POLICIES)}.")
    if choice is CompileChoice.AUTO:
        env = _env_flag("QWEN_COMPILE")
        if env is not None:
            on, reason = env, f"QWEN_COMPILE={os.environ['QWEN_COMPILE'].strip()}"
        else:
            on = device.startswith("cuda")
            reason = "auto: on for CUDA" if on else f"auto: off on {device}"
    else:
        on, reason = choice is CompileChoice.ON, f"compile {choice.value} as requested"
    fused = _env_flag("QWEN_FUSED_KERNELS") is not False
    return SpeedOptions(compile=on, compute=compute, dynamic=policy, reason=reason, fused=fused)
