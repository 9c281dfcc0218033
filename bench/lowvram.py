"""Low-VRAM sections of bench/gpu_bench.py: our streamed engine in memory caps, the governor check, and
diffusers' group offload for comparison."""

from __future__ import annotations

import math
import time
from typing import Any

import common as C
import torch
from sections import (
    STEPS,
    Context,
    fwd_batched,
    fwd_single,
    make_inputs,
    make_prompt,
    rel_err,
    run_pipeline,
    time_batched,
)

from qwen_core.cfg_batch import disable_cfg_batching, enable_cfg_batching
from qwen_core.streaming import PIN_STATS, enable_streamed_offload, streaming_handle

# Added to every memory-model entry: the CUDA context and cuBLAS/cuDNN workspaces outside the caching
# allocator's count on a real card (~0.5 GiB measured on H100 with torch 2.11), plus allocator slack.
HEADROOM_GIB = 1.0
GOV_FACTORS = (1.0, 1.08, 1.18)  # governor's choice must fit; 1.18x (= 1/0.85) must not, else >15% left


class _Stop(Exception):
    """Ends a forward after a few blocks: the peak of a streamed forward is set per block, not by depth."""


def _cap(ctx: Context, cap: float) -> float | None:
    return cap if C.cuda() else None


def _budget(ctx: Context, cap: float) -> float:
    return cap if C.cuda() else 1e-4  # CPU dry run: stream everything


def section_streamed(ctx: Context) -> None:
    a = ctx.args
    C.empty_host_cache()
    caps = [float(c) for c in a.caps.split(",") if c]
    hs, (ec, eu), shapes = make_inputs(ctx, a.size, [a.text_tokens, a.text_tokens])
    configs = [(c, False) for c in caps] + ([(caps[0], True)] if C.cuda() else [])
    for cap, fp8 in configs:
        if ctx.R.left() < 60:
            ctx.R.set("skipped", f"streamed_cap{cap:g}_{'fp8' if fp8 else 'bf16'}", "time budget")
            continue
        _streamed_point(ctx, cap, fp8, hs, ec, eu, shapes, extras=(cap == caps[0] and not fp8))


def _streamed_point(ctx: Context, cap: float, fp8: bool, hs: Any, ec: Any, eu: Any, shapes: Any, *,
                    extras: bool) -> None:
    a, R = ctx.args, ctx.R
    key = f"cap{cap:g}_{'fp8' if fp8 else 'bf16'}"
    t0 = time.perf_counter()
    h = enable_streamed_offload(ctx.pipe, ctx.dev, budget_gib=_budget(ctx, cap), max_pixels=a.size**2,
                                fp8=fp8, act_gib_per_mpix=ctx.act.get("gib_per_mpix"))
    C.sync()
    R.set("streamed", f"{key}_plan", {
        "summary": h.plan.summary(), "resident": len(h.plan.resident), "streamed": len(h.plan.streamed),
        "enable_s": round(time.perf_counter() - t0, 1), "vae_tiling": h.vae_tiling,
        "device_gib_after_enable": C.allocated_gib(), "notes": list(h.plan.notes),
        "pinning": dict(PIN_STATS)})
    try:
        with C.memory_cap(_cap(ctx, cap)):
            C.reset_peak()
            r = C.time_fn(lambda: fwd_batched(ctx, hs, [ec, eu], shapes), reps=a.reps)
            out = fwd_batched(ctx, hs, [ec, eu], shapes)
            full = ctx.numbers.get("ours_step_ms")
            r.update(peak_gib=C.peak_gib(), reserved_gib=C.reserved_gib(),
                     per_image_s=round(r["median_ms"] * STEPS / 1e3, 2),
                     ratio_vs_ours_full_vram=round(r["median_ms"] / full, 3) if full else None,
                     rel_err_vs_full_vram=rel_err(out.float().cpu(), ctx.ref_out) if ctx.ref_out is not None
                     else None, loads=h.transformer.stats["loads"], sync_loads=h.transformer.stats["sync_loads"])
            R.set("streamed", key, r)
            ctx.numbers[f"streamed_{key}"] = r
            if extras:
                _streamed_extras(ctx, key, hs, ec, shapes)
    except Exception as err:  # noqa: BLE001
        if not C.is_oom(err):
            raise
        R.set("streamed", key, {"oom": True, "error": str(err)[:400]})
    finally:
        t1 = time.perf_counter()
        h.disable(restore_device=ctx.dev)
        C.reset_peak()
        R.set("streamed", f"{key}_disable_s", round(time.perf_counter() - t1, 1))


def _streamed_extras(ctx: Context, key: str, hs: Any, ec: Any, shapes: Any) -> None:
    """Inside the cap: masked batch, text encoder, VAE decode, and the real pipeline end to end."""
    a, R, pipe = ctx.args, ctx.R, ctx.pipe
    _, (_, en), _ = make_inputs(ctx, a.size, [a.text_tokens, a.neg_tokens], seed=1)
    R.set("streamed", f"{key}_split", C.time_fn(lambda: fwd_batched(ctx, hs, [ec, en], shapes), reps=a.reps))
    R.set("streamed", f"{key}_unbatched_step", C.time_fn(
        lambda: (fwd_single(ctx, hs, ec, shapes), fwd_single(ctx, hs, en, shapes)), warmup=0, reps=1))
    prompt, neg = make_prompt(pipe, a.text_tokens), make_prompt(pipe, a.neg_tokens)
    C.reset_peak()
    r = C.time_fn(lambda: pipe.encode_prompt(prompt=prompt, device=ctx.dev), reps=a.reps)
    R.set("streamed", f"{key}_text_encoder", {**r, "peak_gib": C.peak_gib()})
    ctx.numbers["streamed_te_ms"] = r["median_ms"]
    z = torch.randn(1, pipe.vae.config.z_dim, 1, a.size // 8, a.size // 8, device=ctx.dev, dtype=ctx.dtype)
    C.reset_peak()
    with torch.no_grad():
        r = C.time_fn(lambda: pipe.vae.decode(z, return_dict=False)[0], warmup=1, reps=1)
    R.set("streamed", f"{key}_vae_decode", {**r, "peak_gib": C.peak_gib(), "tiled": pipe.vae.use_tiling})
    ctx.numbers["streamed_vae_ms"] = r["median_ms"]
    enable_cfg_batching(pipe)
    try:
        r = run_pipeline(ctx, prompt, neg, steps=2)
    finally:
        disable_cfg_batching(pipe)
    R.set("streamed", f"{key}_e2e_2_steps", r)
    ctx.numbers["streamed_e2e"] = r


# ---- governor ----------------------------------------------------------------------------------------
def _truncated_peak(ctx: Context, size: int, n_blocks: int = 2) -> float | None:
    """Absolute peak (GiB) of a batched forward stopped after ``n_blocks`` blocks; None on OOM."""
    hs, embeds, shapes = make_inputs(ctx, size, [ctx.args.text_tokens] * 2)
    hook = ctx.t.transformer_blocks[n_blocks - 1].register_forward_hook(_raise_stop)
    torch.cuda.reset_peak_memory_stats() if C.cuda() else None
    try:
        fwd_batched(ctx, hs, embeds, shapes)
    except _Stop:
        pass
    except Exception as err:  # noqa: BLE001
        if not C.is_oom(err):
            raise
        return None
    finally:
        hook.remove()
        del hs, embeds
    C.sync()
    return C.peak_gib() if C.cuda() else 0.0


def _raise_stop(*_: Any) -> None:
    raise _Stop


def section_governor(ctx: Context) -> None:
    """Fit the streamed working set vs pixels, then check the governor's choice in each cap."""
    from qwen_core import memory_model

    a, R = ctx.args, ctx.R
    C.empty_host_cache()
    h = enable_streamed_offload(ctx.pipe, ctx.dev, budget_gib=0.01, max_pixels=a.size**2,
                                act_gib_per_mpix=ctx.act.get("gib_per_mpix"))
    try:
        R.set("governor", "minimal_plan", h.plan.summary())
        pts = []
        for size in ctx.sizes([1024, 1664, 2304], [32, 64, 96]):
            C.reset_peak()
            pts.append((size * size / 1e6, _truncated_peak(ctx, size)))
        R.set("governor", "streamed_points", pts)
    finally:
        h.disable(restore_device=ctx.dev)
        C.reset_peak()
    if not C.cuda():
        return
    fit = C.cover_fit(pts)
    ctx.mm["streamed/bf16"] = {"base_gib": round(fit["intercept_gib"], 3), "gib_per_mpix": fit["gib_per_mpix"],
                               "headroom_gib": HEADROOM_GIB, "measured": "truncated batched forward, 0 resident"}
    from report import write_memory_model

    path = write_memory_model(ctx)
    for cap in [float(c) for c in a.caps.split(",") if c]:
        if R.left() < 40:
            R.set("skipped", f"governor_cap{cap:g}", "time budget")
            continue
        # The memory bound with the cap as the engine's whole budget (the loader hands it free VRAM x 0.9).
        pixels = memory_model.family_model(path=path).entry("streamed", "bf16").max_pixels(cap)
        R.set("governor", f"cap{cap:g}", _check_cap(ctx, cap, pixels))


def _check_cap(ctx: Context, cap: float, pixels: int) -> dict[str, Any]:
    side = int(math.sqrt(pixels)) // 16 * 16
    out: dict[str, Any] = {"governor_max_pixels": pixels, "side": side}
    h = enable_streamed_offload(ctx.pipe, ctx.dev, budget_gib=cap, max_pixels=side * side,
                                act_gib_per_mpix=ctx.act.get("gib_per_mpix"))
    out["plan"] = h.plan.summary()
    try:
        with C.memory_cap(cap):
            C.reset_peak()
            prompt = make_prompt(ctx.pipe, ctx.args.text_tokens)
            try:
                ctx.pipe.encode_prompt(prompt=prompt, device=ctx.dev)
                out["text_encoder_peak_gib"] = C.peak_gib()
            except Exception as err:  # noqa: BLE001
                if not C.is_oom(err):
                    raise
                out["text_encoder_oom"] = True
            for f in GOV_FACTORS:
                s = int(math.sqrt(side * side * f)) // 16 * 16
                peak = _truncated_peak(ctx, s)
                out[f"x{f:g}"] = {"side": s, "fits": peak is not None, "peak_gib": peak}
    finally:
        h.disable(restore_device=ctx.dev)
        C.reset_peak()
    out["never_oom"] = out["x1"]["fits"] and not out.get("text_encoder_oom", False)
    out["within_15pct"] = not out[f"x{GOV_FACTORS[-1]:g}"]["fits"]
    return out


# ---- diffusers group offload -------------------------------------------------------------------------
def section_group_offload(ctx: Context) -> None:
    """diffusers' own low-VRAM answer in the first cap: block-level group offload with a CUDA stream."""
    a, R, t = ctx.args, ctx.R, ctx.t
    cap = float(a.caps.split(",")[0])
    C.empty_host_cache()  # give back the pinned buffers our engine cached, so host RAM holds diffusers' copies
    # Last section: drop the text encoder (host RAM must hold diffusers' pageable + pinned copies of 38 GiB).
    ctx.pipe.text_encoder.to_empty(device="meta")
    t.to("cpu")
    C.reset_peak()
    t0 = time.perf_counter()
    t.enable_group_offload(onload_device=ctx.dev, offload_device=torch.device("cpu"),
                           offload_type="block_level", num_blocks_per_group=1, use_stream=C.cuda())
    R.set("group_offload", "enable_s", round(time.perf_counter() - t0, 1))
    hs, (ec, eu), shapes = make_inputs(ctx, a.size, [a.text_tokens, a.text_tokens])
    try:
        with C.memory_cap(_cap(ctx, cap)):
            C.reset_peak()
            one = C.time_fn(lambda: fwd_single(ctx, hs, ec, shapes), warmup=1, reps=2)
            R.set("group_offload", f"cap{cap:g}_b1", {**one, "peak_gib": C.peak_gib(),
                                                      "per_image_s": round(2 * one["median_ms"] * STEPS / 1e3, 2)})
            two = C.time_fn(lambda: fwd_batched(ctx, hs, [ec, eu], shapes), warmup=1, reps=2)
            R.set("group_offload", f"cap{cap:g}_b2", {**two, "peak_gib": C.peak_gib()})
            ctx.numbers["group_offload_step_ms"] = 2 * one["median_ms"]
    except Exception as err:  # noqa: BLE001
        if not C.is_oom(err):
            raise
        R.set("group_offload", f"cap{cap:g}", {"oom": True, "error": str(err)[:400]})


def section_streamed_compiled(ctx: Context) -> None:
    """The streamed engine with compiled blocks (hooks outside the graph) in the first cap."""
    a, R = ctx.args, ctx.R
    cap = float(a.caps.split(",")[0])
    hs, (ec, eu), shapes = make_inputs(ctx, a.size, [a.text_tokens, a.text_tokens])
    plan_budget = max(_budget(ctx, cap) - a.stream_margin_gib, 1e-4)
    h = enable_streamed_offload(ctx.pipe, ctx.dev, budget_gib=plan_budget, max_pixels=a.size**2,
                                act_gib_per_mpix=ctx.act.get("gib_per_mpix"))
    R.set("streamed_compiled", "planned_budget_gib", plan_budget)
    C.compile_blocks(ctx.t)
    try:
        with C.memory_cap(_cap(ctx, cap)):
            C.reset_peak()
            first, r, out = time_batched(ctx, hs, [ec, eu], shapes)
            comp, eager = ctx.numbers.get("compiled_step_ms"), ctx.numbers.get("ours_step_ms")
            r.update(first_call_s=round(first, 1), peak_gib=C.peak_gib(), plan=h.plan.summary(),
                     per_image_s=round(r["median_ms"] * STEPS / 1e3, 2),
                     ratio_vs_ours_compiled_full_vram=round(r["median_ms"] / comp, 3) if comp else None,
                     ratio_vs_ours_eager_full_vram=round(r["median_ms"] / eager, 3) if eager else None,
                     rel_err_vs_full_vram=rel_err(out.float().cpu(), ctx.ref_out) if ctx.ref_out is not None
                     else None, sync_loads=h.transformer.stats["sync_loads"])
            R.set("streamed_compiled", f"cap{cap:g}_bf16", r)
            ctx.numbers[f"streamed_compiled_cap{cap:g}"] = r
    except Exception as err:  # noqa: BLE001
        if not C.is_oom(err):
            raise
        R.set("streamed_compiled", f"cap{cap:g}_bf16", {"oom": True, "error": str(err)[:400]})
    finally:
        C.uncompile_blocks(ctx.t)
        torch._dynamo.reset()
        h.disable(restore_device=ctx.dev)
        C.reset_peak()


def section_replan(ctx: Context) -> None:
    """The real pipeline in the first cap at a size above the engine's plan: it must re-plan, not OOM."""
    a, R = ctx.args, ctx.R
    cap = float(a.caps.split(",")[0])
    size = 1664 if C.cuda() else 96
    h = enable_streamed_offload(ctx.pipe, ctx.dev, budget_gib=_budget(ctx, cap), max_pixels=a.size**2)
    R.set("replan", "plan_before", h.plan.summary())
    prompt, neg = make_prompt(ctx.pipe, a.text_tokens), make_prompt(ctx.pipe, a.neg_tokens)
    try:
        with C.memory_cap(_cap(ctx, cap)):
            saved, a.size = a.size, size
            try:
                r = run_pipeline(ctx, prompt, neg, steps=2)
            finally:
                a.size = saved
        now = streaming_handle(ctx.pipe)
        r.update(size=size, replans=getattr(now, "replans", 0), plan_after=now.plan.summary())
        R.set("replan", f"cap{cap:g}_{size}", r)
    except Exception as err:  # noqa: BLE001
        if not C.is_oom(err):
            raise
        R.set("replan", f"cap{cap:g}_{size}", {"oom": True, "error": str(err)[:400]})
    finally:
        handle = streaming_handle(ctx.pipe)
        if handle is not None:
            handle.disable(restore_device=ctx.dev)
        C.reset_peak()
