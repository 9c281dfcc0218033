"""The in-process parts of bench/speed.py (one function each, in PARTS order; all write through ctx.R)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import common as C
import fullsize
import torch
from common import rel_err
from sections import fwd_batched, fwd_single, make_inputs, make_prompt

from qwen_core import devices
from qwen_core.speed.apply import apply_attention_kernel
from qwen_core.speed.compile import compile_blocks, uncompile_blocks
from qwen_core.speed.rope import install_real_rope, remove_real_rope, set_fused_kernels
from qwen_core.streaming import enable_streamed_offload

STEPS = 50
STREAM_MARGIN_GIB = 2.0  # the streamed plan's budget is the cap minus this (as bench/RESULTS.md run 3)


@dataclass
class Ctx:
    args: Any
    R: Any
    pipe: Any
    dev: torch.device
    dtype: torch.dtype
    inputs: Any = None  # (hs, [ec, eu], shapes), equal lengths
    neg: Any = None  # a shorter negative embedding (split attention case)
    ref: torch.Tensor | None = None  # diffusers eager output [cond; uncond], float32 on the CPU
    n: dict[str, float] = field(default_factory=dict)  # headline numbers
    backend: str = "native"  # what our loader's attention policy picks on this machine

    @property
    def t(self) -> Any:
        return self.pipe.transformer

    def extras_ms(self) -> float:
        return 2 * self.n.get("te_ms", 0.0) + self.n.get("vae_ms", 0.0)

    def record(self, part: str, key: str, r: dict[str, Any], *, per_step_ms: float, out: Any = None) -> None:
        r.update(ms_per_step=round(per_step_ms, 1),
                 transformer_s_per_image=round(per_step_ms * STEPS / 1e3, 2),
                 e2e_s_per_image_est=round((per_step_ms * STEPS + self.extras_ms()) / 1e3, 2))
        if out is not None and self.ref is not None:
            r["rel_err_vs_diffusers"] = rel_err(out.float().cpu(), self.ref)
        self.R.set(part, key, r)


def build(args: Any, R: Any) -> Ctx:
    dev = torch.device("cuda" if C.cuda() else "cpu")
    dtype = torch.bfloat16 if C.cuda() else torch.float32
    # The parts below compile the same block code for several variants (split lengths, fp8, complex RoPE):
    # more than dynamo's default 8 graphs per code object would silently fall back to eager.
    torch._dynamo.config.cache_size_limit = 64
    t0 = time.perf_counter()
    pipe = fullsize.build_pipeline(dev, dtype, tiny=args.tiny)
    pipe.set_progress_bar_config(disable=True)
    C.sync()
    R.set("build", "seconds", round(time.perf_counter() - t0, 1))
    ctx = Ctx(args, R, pipe, dev, dtype)
    hs, embeds, shapes = make_inputs(ctx, args.size, [args.text_tokens, args.text_tokens])
    ctx.inputs = (hs, embeds, shapes)
    ctx.neg = make_inputs(ctx, args.size, [args.neg_tokens], seed=1)[1][0]
    _te_vae(ctx)
    ctx.backend = devices.get_attention_implementation(str(dev), dtype)[0] if C.cuda() else "native"
    R.set("build", "attention_policy", devices.get_attention_implementation(str(dev), dtype))
    return ctx


def _te_vae(ctx: Ctx) -> None:
    pipe, a = ctx.pipe, ctx.args
    prompt = make_prompt(pipe, a.text_tokens)
    r = C.time_fn(lambda: pipe.encode_prompt(prompt=prompt, device=ctx.dev), reps=a.reps)
    ctx.R.set("build", "text_encoder_ms", r)
    z = torch.randn(1, pipe.vae.config.z_dim, 1, a.size // 8, a.size // 8, device=ctx.dev, dtype=ctx.dtype)
    pipe.vae.disable_tiling()
    with torch.no_grad():
        v = C.time_fn(lambda: pipe.vae.decode(z, return_dict=False)[0], warmup=1, reps=2)
    ctx.R.set("build", "vae_decode_ms", v)
    ctx.n.update(te_ms=r["median_ms"], vae_ms=v["median_ms"])


def recover(ctx: Ctx) -> None:
    if C.cuda():
        torch.cuda.set_per_process_memory_fraction(1.0)
    from qwen_core.streaming import disable_streamed_offload

    disable_streamed_offload(ctx.pipe, restore_device=ctx.dev)
    C.reset_peak()


def _batched(ctx: Ctx, neg: bool = False) -> torch.Tensor:
    hs, (ec, eu), shapes = ctx.inputs
    return fwd_batched(ctx, hs, [ec, ctx.neg if neg else eu], shapes)


def _first_and_timed(ctx: Ctx, fn: Any) -> tuple[float, dict[str, Any], torch.Tensor]:
    C.sync()
    t0 = time.perf_counter()
    fn()
    C.sync()
    first = time.perf_counter() - t0
    r = C.time_fn(fn, reps=ctx.args.reps)
    return first, r, fn()


# ---- parts ---------------------------------------------------------------------------------------------------
def diffusers_as_is(ctx: Ctx) -> None:
    """diffusers 0.42.1 unchanged: its complex-RoPE processor, native SDPA, two batch-1 forwards per step."""
    remove_real_rope(ctx.t)
    ctx.t.set_attention_backend("native")
    hs, (ec, eu), shapes = ctx.inputs
    r = C.time_fn(lambda: (fwd_single(ctx, hs, ec, shapes), fwd_single(ctx, hs, eu, shapes)), reps=ctx.args.reps)
    ctx.ref = torch.cat([fwd_single(ctx, hs, ec, shapes), fwd_single(ctx, hs, eu, shapes)]).float().cpu()
    ctx.n["diffusers_ms"] = r["median_ms"]
    ctx.record("speed", "diffusers_as_is", r, per_step_ms=r["median_ms"])
    try:  # bf16 noise floor: the same forward through another SDPA kernel
        ctx.t.set_attention_backend("_native_flash" if C.cuda() else "_native_math")
        floor = rel_err(fwd_single(ctx, hs, ec, shapes).float().cpu(), ctx.ref[:1])
        ctx.R.set("numerics", "floor_sdpa_kernel_swap", floor)
    except Exception as err:  # noqa: BLE001 - a kernel missing on this card is a result
        ctx.R.set("numerics", "floor_sdpa_kernel_swap", f"{type(err).__name__}: {str(err)[:200]}")
    finally:
        ctx.t.set_attention_backend("native")


def ours_eager(ctx: Ctx) -> None:
    """Batched CFG + real-valued RoPE, eager (the default path with compile off)."""
    install_real_rope(ctx.t)
    r = C.time_fn(lambda: _batched(ctx), reps=ctx.args.reps)
    ctx.n["eager_ms"] = r["median_ms"]
    ctx.record("speed", "ours_eager_real_rope", r, per_step_ms=r["median_ms"], out=_batched(ctx))


def ours_compiled(ctx: Ctx) -> None:
    """The default path's transformer: real RoPE + regional compile (dynamic sequence lengths) + the attention
    our policy picks on this machine; the compile cache is the one the children filled."""
    install_real_rope(ctx.t)
    set_fused_kernels(ctx.t, True)  # as apply_speed does (QWEN_FUSED_KERNELS unset)
    apply_attention_kernel(ctx.t, ctx.backend)
    handle = compile_blocks(ctx.t, dynamic="seq", notify=lambda m: ctx.R.set("speed", "compile_message", m))
    first, r, out = _first_and_timed(ctx, lambda: _batched(ctx))
    r.update(first_call_s=round(first, 1), attention=ctx.backend, cache=handle.cache.describe() if handle.cache else None)
    ctx.n["compiled_ms"] = r["median_ms"]
    ctx.record("speed", "ours_compiled", r, per_step_ms=r["median_ms"], out=out)
    # Different prompt lengths: split attention, a second graph (compiled once for every length pair).
    first, r2, _ = _first_and_timed(ctx, lambda: _batched(ctx, neg=True))
    r2.update(first_call_s=round(first, 1), lengths=[ctx.args.text_tokens, ctx.args.neg_tokens])
    ctx.record("speed", "ours_compiled_split_lengths", r2, per_step_ms=r2["median_ms"])


def attention_kernels(ctx: Ctx) -> None:
    """Compiled path with each attention kernel that is present (flash-attn 4 only when carried)."""
    from qwen_core.speed import attention

    version, problem = attention.status()
    ctx.R.set("attention", "flash4_status", {"version": version, "problem": problem})
    kernels = ["native"] + (["flash4"] if not problem and C.cuda() else [])
    for name in kernels:
        if name == "flash4":
            failure = attention.probe(str(ctx.dev), ctx.dtype)
            ctx.R.set("attention", "flash4_probe", failure or "passed")
            if failure:
                continue
        apply_attention_kernel(ctx.t, name)
        first, r, out = _first_and_timed(ctx, lambda: _batched(ctx))
        r["first_call_s"] = round(first, 1)
        ctx.n[f"attn_{name}_ms"] = r["median_ms"]
        ctx.record("attention", f"compiled_{name}", r, per_step_ms=r["median_ms"], out=out)
    apply_attention_kernel(ctx.t, ctx.backend)


def fp8_compute(ctx: Ctx) -> None:
    """compute=fp8 (fp8 e4m3 matmuls, per-row weight and per-token activation scales), compiled."""
    from qwen_core.fp8_compute import enable_fp8_compute, fp8_supported

    if not (C.cuda() and fp8_supported(ctx.dev)):
        ctx.R.set("fp8", "skipped", f"no fp8 matmul on {ctx.dev}")
        return
    h = enable_fp8_compute(ctx.t, keep_original=True)
    try:
        first, r, out = _first_and_timed(ctx, lambda: _batched(ctx))
        r.update(first_call_s=round(first, 1), layers=h.converted)
        ctx.n["fp8_ms"] = r["median_ms"]
        ctx.record("fp8", "compiled", r, per_step_ms=r["median_ms"], out=out)
    finally:
        h.disable()


def streamed(ctx: Ctx) -> None:
    """Our streamed engine in a --cap GiB card with the same speed-ups (real RoPE, compiled blocks, attention)."""
    for fp8 in _fp8_storage_options():
        if ctx.R.left() < 50:
            ctx.R.set("skipped", f"streamed_fp8_{fp8}", "time budget")
            continue
        key = _streamed_key(ctx, fp8)
        try:
            with _streamed_in_cap(ctx, fp8) as h:
                C.reset_peak()
                first, r, out = _first_and_timed(ctx, lambda: _batched(ctx))
                comp = ctx.n.get("compiled_ms")
                r.update(first_call_s=round(first, 1), plan=h.plan.summary(), peak_gib=C.peak_gib(),
                         ratio_vs_ours_compiled_full_vram=round(r["median_ms"] / comp, 3) if comp else None,
                         sync_loads=h.transformer.stats["sync_loads"])
                ctx.n[f"streamed_{key}_ms"] = r["median_ms"]
                ctx.record("streamed", key, r, per_step_ms=r["median_ms"], out=out)
        except Exception as err:  # noqa: BLE001
            if not C.is_oom(err):
                raise
            ctx.R.set("streamed", key, {"oom": True, "error": str(err)[:400]})


def _fp8_storage_options() -> tuple[bool, ...]:
    return (False, True) if C.cuda() else (False,)  # fp8 storage needs CUDA


def _streamed_key(ctx: Ctx, fp8: bool) -> str:
    return f"cap{ctx.args.cap:g}_{'fp8_storage' if fp8 else 'bf16'}"


@contextmanager
def _streamed_in_cap(ctx: Ctx, fp8: bool) -> Iterator[Any]:
    """Our streamed engine planned for a --cap GiB card (the cap minus STREAM_MARGIN_GIB), run inside that cap;
    back on the full card after."""
    cap = ctx.args.cap
    budget = max(cap - STREAM_MARGIN_GIB, 1e-4) if C.cuda() else 1e-4
    h = enable_streamed_offload(ctx.pipe, ctx.dev, budget_gib=budget, max_pixels=ctx.args.size**2, fp8=fp8,
                                cfg_batching=False)
    try:
        with C.memory_cap(cap if C.cuda() else None):
            yield h
    finally:
        h.disable(restore_device=ctx.dev)
        C.reset_peak()


def compiled_complex_rope(ctx: Ctx) -> None:
    """Attribution: the compiled path with diffusers' complex RoPE (what QWEN_COMPILE=1 compiled before)."""
    remove_real_rope(ctx.t)
    try:
        first, r, out = _first_and_timed(ctx, lambda: _batched(ctx))
        r["first_call_s"] = round(first, 1)
        ctx.n["compiled_complex_ms"] = r["median_ms"]
        ctx.record("attribution", "compiled_complex_rope", r, per_step_ms=r["median_ms"], out=out)
    finally:
        install_real_rope(ctx.t)


def compiled_static(ctx: Ctx) -> None:
    """Attribution: static shapes instead of dynamic sequence lengths (the cost of one graph for all sizes)."""
    uncompile_blocks(ctx.t)
    torch._dynamo.reset()
    # use_cache=False: with the dynamo cache a new compile in the process takes up the first trace whatever its
    # settings (neither ``dynamic`` nor inductor's settings are guarded; on the H200 the variants below then
    # "compiled" in 0.7 s and ran the default graph).
    compile_blocks(ctx.t, dynamic="static", notify=lambda m: None, use_cache=False)
    try:
        first, r, out = _first_and_timed(ctx, lambda: _batched(ctx))
        r["first_call_s"] = round(first, 1)
        ctx.n["compiled_static_ms"] = r["median_ms"]
        ctx.record("attribution", "compiled_static_shapes", r, per_step_ms=r["median_ms"], out=out)
    finally:
        uncompile_blocks(ctx.t)


# Inductor settings the default path does not use: name -> (torch.compile mode, inductor config overrides).
# "default_recompiled" is the control: the default settings compiled again after the reset, as the others are
# (on the H200, with a compiled wrapper per block, a graph compiled after a reset deviated 0.076 from diffusers
# where the process's first one did 0.0215; with one shared compiled forward both deviate 0.0215, bench/RESULTS.md).
COMPILE_VARIANTS: dict[str, tuple[str | None, dict[str, Any]]] = {
    "default_recompiled": (None, {}),
    "multi_kernel": (None, {"triton.multi_kernel": 1}),  # persistent and looped reductions, picked at run time
    "coordinate_descent": (None, {"coordinate_descent_tuning": True}),
    "max_autotune": ("max-autotune-no-cudagraphs", {}),
}
VARIANT_SECONDS = 90  # budget a variant needs: a fresh compile (max-autotune benchmarks GEMM templates) + timing


def compile_variants(ctx: Ctx) -> None:
    """Does another inductor setting pay? Each variant is a fresh compile of the default path's blocks (dynamic
    sequence lengths, the policy's attention), timed like ``ours_compiled``; the default is restored after."""
    import torch._inductor.config as inductor_config

    if not ctx.args.skip_children:
        # ours_compiled then loaded the children's saved traces, and dynamo keeps a loaded trace on the forward's
        # code past torch._dynamo.reset(): every variant below ran it in 0.5 s whatever its settings (H200, a
        # sixth session; bench/RESULTS.md). Compiled in this process from nothing, they compile for real.
        ctx.R.set("skipped", "compile_variants", "needs --skip-children (a trace loaded from the compile cache "
                  "would be taken up by every variant)")
        return
    base = ctx.n.get("compiled_ms")
    try:
        for name, (mode, overrides) in COMPILE_VARIANTS.items():
            if ctx.R.left() < VARIANT_SECONDS:
                ctx.R.set("skipped", f"compile_variant_{name}", f"only {ctx.R.left():.0f} s of the budget left")
                continue
            with inductor_config.patch(overrides):  # the compile runs at the first call, inside the patch
                _record_fresh_compile(ctx, "compile_variants", name, f"variant_{name}", base, mode=mode,
                                      inductor=overrides)
    finally:
        uncompile_blocks(ctx.t)
        torch._dynamo.reset()
        compile_blocks(ctx.t, dynamic="seq", notify=lambda m: None)


def _record_fresh_compile(ctx: Ctx, part: str, key: str, headline: str, base: float | None, mode: str | None = None,
                          **about: Any) -> None:
    """Compile the blocks anew without our cache (a reset first), time them like ``ours_compiled`` and record the
    row with ``about`` and its ratio to ``base``."""
    uncompile_blocks(ctx.t)
    torch._dynamo.reset()
    compile_blocks(ctx.t, dynamic="seq", mode=mode, notify=lambda m: None, use_cache=False)
    first, r, out = _first_and_timed(ctx, lambda: _batched(ctx))
    r.update(first_call_s=round(first, 1), **({"mode": mode} if mode else {}), **about,
             ratio_vs_default=round(r["median_ms"] / base, 3) if base else None)
    ctx.n[f"{headline}_ms"] = r["median_ms"]
    ctx.record(part, key, r, per_step_ms=r["median_ms"], out=out)


# Which of our fused kernels each variant keeps (the default, ``ours_compiled``, has both).
FUSED_VARIANTS = {"none": (False, False), "qk_norm_rope_only": (True, False), "linear_gelu_only": (False, True)}


def fused_kernels(ctx: Ctx) -> None:
    """What each fused kernel buys in the compiled step: the default path recompiled with neither, or one of them
    (``qwen_core.speed.qk_rope``, ``qwen_core.speed.linear_gelu``); the default is restored after."""
    from qwen_core.speed.linear_gelu import install_linear_gelu, remove_linear_gelu

    base = ctx.n.get("compiled_ms")
    try:
        for name, (qk, gelu) in FUSED_VARIANTS.items():
            if ctx.R.left() < 40:
                ctx.R.set("skipped", f"fused_{name}", f"only {ctx.R.left():.0f} s of the budget left")
                continue
            set_fused_kernels(ctx.t, qk)
            (install_linear_gelu if gelu else remove_linear_gelu)(ctx.t)
            _record_fresh_compile(ctx, "fused_kernels", name, f"fused_{name}", base, qk_norm_rope=qk,
                                  linear_gelu=gelu)
    finally:
        uncompile_blocks(ctx.t)
        torch._dynamo.reset()
        set_fused_kernels(ctx.t, True)
        compile_blocks(ctx.t, dynamic="seq", notify=lambda m: None)


def _kernel_kind(name: str) -> str:
    low = name.lower()
    if "memcpy" in low or "memset" in low:
        return "copy"
    if any(k in low for k in ("flash", "fmha", "attn", "attention", "cudnn")):
        return "attention"
    if any(k in low for k in ("gemm", "nvjet", "cutlass", "xmma", "cublas", "matmul")):
        return "matmul"
    if "triton" in low or "norm_rope" in low:  # norm_rope_*: our q/k kernel (qwen_core.speed.qk_rope)
        return "triton (fused elementwise, norms)"
    return "other"


def profile_step(fn: Any) -> dict[str, Any]:
    """One profiled call of ``fn`` (after a warm one): wall time, device time per kernel kind (copies run on the
    copy engines, beside the compute) and the top kernels, so a bound is named by measurement. ``compute_busy`` is
    the compute kernels' summed time over the wall: kernels of two streams (the streamed engine's dequantisation
    beside the blocks) can overlap, so it is an upper bound on how busy the SMs were."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    C.sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if C.cuda() else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        fn()
        C.sync()
        wall_ms = (time.perf_counter() - t0) * 1e3
    kinds: dict[str, float] = {}
    kernels: list[tuple[float, str, int]] = []
    for event in prof.key_averages():
        if C.cuda() and event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        ms = getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)) / 1e3
        if not C.cuda():
            ms = event.self_cpu_time_total / 1e3
        if ms <= 0:
            continue
        kind = _kernel_kind(event.key)
        kinds[kind] = kinds.get(kind, 0.0) + ms
        kernels.append((ms, event.key[:120], event.count))
    compute_ms = sum(v for k, v in kinds.items() if k != "copy")
    return {"wall_ms": round(wall_ms, 1), "compute_kernels_ms": round(compute_ms, 1),
            "compute_busy": round(compute_ms / wall_ms, 3) if wall_ms else None,
            "by_kind_ms": {k: round(v, 1) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top": [{"ms": round(ms, 2), "calls": n, "kernel": name} for ms, name, n in sorted(kernels)[::-1][:15]]}


def profiles(ctx: Ctx) -> None:
    """Where a step goes: the compiled default path on the full card, then the streamed engine in the --cap
    (bf16, and fp8 storage on CUDA) with the same speed-ups."""
    ctx.R.set("profile", "full_card_compiled", profile_step(lambda: _batched(ctx)))
    for fp8 in _fp8_storage_options():
        with _streamed_in_cap(ctx, fp8) as h:
            result = {**profile_step(lambda: _batched(ctx)), "plan": h.plan.summary()}
        ctx.R.set("profile", f"streamed_{_streamed_key(ctx, fp8)}", result)


PARTS = (diffusers_as_is, ours_eager, ours_compiled, fused_kernels, streamed, fp8_compute, attention_kernels,
         compiled_complex_rope, compiled_static, profiles, compile_variants)
PART_NAMES = tuple(part.__name__ for part in PARTS)
MIN_SECONDS = {"ours_compiled": 40, "streamed": 60, "fp8_compute": 50, "attention_kernels": 30,
               "compiled_complex_rope": 45, "compiled_static": 50, "compile_variants": VARIANT_SECONDS,
               "profiles": 60, "fused_kernels": 40}


def summary(ctx: Ctx) -> None:
    n, R = ctx.n, ctx.R
    ch = R.data.get("children", {})
    cold = ch.get("cold", {})
    rows = [("diffusers as-is", n.get("diffusers_ms")), ("ours eager (batched, real RoPE)", n.get("eager_ms")),
            ("ours compiled (default path)", n.get("compiled_ms")), ("fp8 compute, compiled", n.get("fp8_ms")),
            ("compiled, complex RoPE", n.get("compiled_complex_ms")),
            ("compiled, static shapes", n.get("compiled_static_ms"))]
    rows += [(f"streamed {k[9:-3]}", v) for k, v in n.items() if k.startswith("streamed_")]
    rows += [(f"compiled, {k[8:-3].replace('_', ' ')}", v) for k, v in n.items() if k.startswith("variant_")]
    rows += [(f"compiled, fused kernels: {k[6:-3].replace('_', ' ')}", v) for k, v in n.items() if k.startswith("fused_")]
    lines = [f"{'config':38s} {'ms/step':>8s} {'s/image est':>11s}"]
    for name, ms in rows:
        if ms:
            lines.append(f"{name:38s} {ms:8.1f} {(ms * STEPS + ctx.extras_ms()) / 1e3:11.2f}")
    imgs = cold.get("images") or []
    if imgs:
        lines.append(f"cold process, warm cache: first image {imgs[0]['wall_s']:.2f} s, second "
                     f"{imgs[-1]['wall_s']:.2f} s ({cold.get('first_over_warm')}x), {imgs[0]['steps']} steps")
    fill = ch.get("fill", {})
    if fill:
        lines.append(f"first compile (empty cache): {fill.get('compile_first_calls_s')}")
    R.set("summary", "table", lines)
    print("\n".join(lines), flush=True)
