"""One entry point for the loader: install the speed-ups a load asked for on a placed pipeline.

Order matters and is fixed here: the real-valued RoPE processors first (only when compiling: H200 run of
2026-12-02, compiled 479.1 ms/step with it vs 479.7 with diffusers' complex RoPE, but eager 660.7 vs diffusers'
609.2, because the fp32 rotation is not fused without compile), with our fused kernels (``set_fused_kernels``:
the q/k norm + RoPE kernel and the feed-forward's projection + GELU call; ``QWEN_FUSED_KERNELS=0`` turns them
off), then fp8 compute (swaps Linear layers, so before compiling), then regional compile (``compile_blocks``: block ``forward`` only,
so the streamed engine's hooks stay outside the graphs). The attention kernel is chosen separately
(``apply_attention_kernel``), because the generator's NaN fallback switches it on a loaded pipeline.
"""

from __future__ import annotations

from typing import Any

from qwen_core.options import ComputeChoice
from qwen_core.speed import attention
from qwen_core.speed.compile import Notify, compile_blocks
from qwen_core.speed.options import SpeedOptions
from qwen_core.speed.rope import install_real_rope, set_attention_kernel, set_fused_kernels


def apply_speed(pipe: Any, speed: SpeedOptions, *, streamed: bool = False, notify: Notify | None = None) -> str:
    """Install RoPE, fp8 compute and compile per ``speed`` on ``pipe.transformer``; returns a placement note."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is None or not hasattr(transformer, "transformer_blocks"):
        return ""  # not a Qwen-Image transformer: nothing of ours applies
    if speed.compile:
        install_real_rope(transformer)  # exact (0.0 in fp32) and fusible; unfused it is slower than diffusers'
        set_fused_kernels(transformer, speed.fused)
    notes = []
    if speed.compute is ComputeChoice.FP8:
        notes.append(_fp8(transformer, streamed))
    if speed.compile:
        compile_blocks(transformer, dynamic=speed.dynamic, notify=notify)
        notes.append("compiled blocks")
    return ", ".join(n for n in notes if n)


def _fp8(transformer: Any, streamed: bool) -> str:
    from qwen_core.fp8_compute import enable_fp8_compute, fp8_supported
    from qwen_core.session_log import get_session_log

    device = next(transformer.parameters()).device
    if streamed:
        # The streamed engine moves parameters; Fp8Linear keeps its weights in buffers. Its own fp8 option
        # (fp8 storage of the streamed blocks) is the low-VRAM counterpart.
        get_session_log().warning("compute fp8 is not available with memory mode streamed; using exact compute")
        return "fp8 compute n/a when streamed: exact"
    if not fp8_supported(device) or device.type != "cuda":
        get_session_log().warning(f"compute fp8 needs an sm_89+ GPU; {device} has none: using exact compute")
        return f"fp8 compute n/a on {device}: exact"
    handle = enable_fp8_compute(transformer)
    return f"fp8 compute ({handle.converted} layers)"


def apply_attention_kernel(transformer: Any, backend: str) -> bool:
    """Route the processors' unmasked attention through flash-attn 4 when ``backend`` is ours ("flash4"),
    else back through diffusers' dispatcher. Returns True when flash-attn 4 is in use."""
    if backend == attention.BACKEND:
        install_real_rope(transformer)
        set_attention_kernel(transformer, attention.BACKEND)
        return True
    set_attention_kernel(transformer, None)
    return False
