"""The product path on the full-size model: our Loader + QwenImageGenerator, as the nodes and CLI run them.

The other sections time the engines in isolation; this one goes through ``in_memory.in_memory_loader`` (memory
mode, attention choice, batched CFG, residency) and ``QwenImageGenerator.generate`` (validation, governor,
per-step NaN check and progress callback, VAE decode), next to plain diffusers with the same prompts, size and
step count in the same run. A 16 GiB card is emulated by the allocator cap plus the VRAM readings the loader
and governor see.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import common as C
import torch
from in_memory import in_memory_loader
from sections import Context, make_prompt, run_pipeline

from qwen_core.generator import QwenImageGenerator
from qwen_core.memory import get_residency_manager


def _generate(ctx: Context, gen: QwenImageGenerator, prompt: str, neg: str, steps: int) -> dict[str, Any]:
    size = ctx.args.size
    step_marks: list[float] = []
    gen.generate(prompt, neg, width=size, height=size, steps=2, true_cfg_scale=4.0, seed=0)  # warm-up + load
    C.reset_peak()
    C.sync()
    t0 = time.perf_counter()
    result = gen.generate(prompt, neg, width=size, height=size, steps=steps, true_cfg_scale=4.0, seed=0,
                          on_step=lambda i, n, eta: step_marks.append(time.perf_counter()))
    C.sync()
    wall = time.perf_counter() - t0
    step_ms = [(b - a) * 1e3 for a, b in zip(step_marks, step_marks[1:], strict=False)]
    return {"wall_s": round(wall, 3), "steps": steps, "size": [result.decision.width, result.decision.height],
            "governor": result.decision.reason, "step_ms": [round(s, 1) for s in step_ms],
            "median_step_ms": round(sorted(step_ms)[len(step_ms) // 2], 1) if step_ms else None,
            "timings": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.timings.items()},
            "placement": gen.loader.placement, "attention": result.attention_backend, "peak_gib": C.peak_gib(),
            "image_finite": bool(torch.isfinite(result.images).all())}


def section_product(ctx: Context) -> None:
    a, R, pipe = ctx.args, ctx.R, ctx.pipe
    steps = 3 if a.tiny else 8
    prompt, neg = make_prompt(pipe, a.text_tokens), make_prompt(pipe, a.neg_tokens)
    R.set("product", "diffusers_as_is", run_pipeline(ctx, prompt, neg, steps=steps))
    # Both loaders wrap the same pipeline object: keep both resident (eviction would release it).
    get_residency_manager().set_max_resident(2)
    gpu = QwenImageGenerator(in_memory_loader(pipe, name="fullsize-gpu", memory_mode="gpu", device=str(ctx.dev)))
    R.set("product", "ours_gpu", _generate(ctx, gpu, prompt, neg, steps))
    if not C.cuda():
        return
    cap = 16.0
    streamed_loader = in_memory_loader(pipe, name="fullsize-streamed", memory_mode="streamed", device=str(ctx.dev))
    # What a 16 GiB card reports (the allocator cap below makes it real for the allocations).
    streamed_loader.device_config = dataclasses.replace(streamed_loader.device_config, vram_total_gb=cap,
                                                        vram_free_gb=cap - 0.5)
    with C.memory_cap(cap):
        R.set("product", f"ours_streamed_cap{cap:g}",
              _generate(ctx, QwenImageGenerator(streamed_loader), prompt, neg, steps))
