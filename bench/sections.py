"""The measurement sections of bench/gpu_bench.py (one function each; all write through ctx.R)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import common as C
import torch
from common import rel_err

from qwen_core.cfg_batch import (
    disable_cfg_batching,
    enable_cfg_batching,
    install_split_attention,
    pad_and_stack,
    text_lengths,
)
from qwen_core.streaming import disable_streamed_offload

BACKENDS = ("native", "_native_cudnn", "_native_flash", "_native_efficient", "flash", "_flash_3")
MASK_BACKENDS = ("native", "_native_cudnn", "_native_efficient")
STEPS = 50


@dataclass
class Context:
    args: Any
    pipe: Any
    dev: torch.device
    dtype: torch.dtype
    R: Any
    best_backend: str = "native"
    best_mask_backend: str = "native"  # real prompts differ in length: the batch carries a mask
    ref_out: torch.Tensor | None = None
    act: dict[str, float] = field(default_factory=dict)  # activation fit of the batched forward
    numbers: dict[str, Any] = field(default_factory=dict)
    mm: dict[str, Any] = field(default_factory=dict)  # memory model entries

    @property
    def t(self) -> Any:
        return self.pipe.transformer

    def sizes(self, full: list[int], tiny: list[int]) -> list[int]:
        return tiny if self.args.tiny else full


# ---- inputs and forwards ---------------------------------------------------------------------------
def make_inputs(ctx: Context, size: int, lens: list[int], seed: int = 0) -> tuple[Any, list[Any], list[Any]]:
    cfg = ctx.t.config
    side = size // 16
    g = torch.Generator(device=ctx.dev).manual_seed(seed)
    hs = torch.randn(1, side * side, cfg.in_channels, generator=g, device=ctx.dev, dtype=ctx.dtype)
    embeds = [torch.randn(1, n, cfg.joint_attention_dim, generator=g, device=ctx.dev, dtype=ctx.dtype)
              for n in lens]
    return hs, embeds, [[(1, side, side)]]


def fwd_single(ctx: Context, hs: Any, e: Any, shapes: Any) -> torch.Tensor:
    ts = torch.full((1,), 0.5, device=ctx.dev, dtype=ctx.dtype)
    with torch.no_grad():
        return ctx.t(hidden_states=hs, encoder_hidden_states=e, encoder_hidden_states_mask=None, timestep=ts,
                     img_shapes=shapes, return_dict=False)[0]


def fwd_batched(ctx: Context, hs: Any, embeds: list[Any], shapes: Any, *, split: bool = True) -> torch.Tensor:
    """cond+uncond in one forward exactly as qwen_core.cfg_batch issues it: padded, and when lengths differ
    either split attention per length (``split``, the default path) or a padding mask in SDPA."""
    items = [(x, None) for x in embeds]
    e, m = pad_and_stack(items)
    ts = torch.full((len(embeds),), 0.5, device=ctx.dev, dtype=ctx.dtype)
    state = install_split_attention(ctx.t)
    lengths = text_lengths(items) if split and m is not None else None
    with torch.no_grad(), state.active(lengths):
        return ctx.t(hidden_states=torch.cat([hs] * len(embeds)), encoder_hidden_states=e,
                     encoder_hidden_states_mask=m, timestep=ts, img_shapes=shapes * len(embeds),
                     attention_kwargs={"text_lengths": lengths} if lengths else None, return_dict=False)[0]


def time_batched(ctx: Context, hs: Any, embeds: list[Any], shapes: Any) -> tuple[float, dict[str, Any], torch.Tensor]:
    """First call (compile + run) in seconds, then the timed batched forwards, then one output for numerics."""
    C.sync()
    t0 = time.perf_counter()
    fwd_batched(ctx, hs, embeds, shapes)
    C.sync()
    first = time.perf_counter() - t0
    r = C.time_fn(lambda: fwd_batched(ctx, hs, embeds, shapes), reps=ctx.args.reps)
    return first, r, fwd_batched(ctx, hs, embeds, shapes)


def make_prompt(pipe: Any, n_tokens: int) -> str:
    """A prompt whose embedding after the pipeline's template drop has exactly ``n_tokens`` tokens."""
    tok, tpl, drop = pipe.tokenizer, pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx
    words = ["a", "red", "fox", "jumps", "over", "the", "lazy", "dog", "near", "a", "river", "under", "the", "blue", "sky", "at", "dawn", "with", "soft", "light"]
    text, i = "", 0
    while len(tok(tpl.format(text)).input_ids) - drop < n_tokens and i < 4000:
        text = (text + " " + words[i % len(words)]).strip()
        i += 1
    return text


def recover(ctx: Context) -> None:
    """After a failed section: no cap, no streaming, no wrapper, everything back on the device."""
    if C.cuda():
        torch.cuda.set_per_process_memory_fraction(1.0)
    try:
        disable_streamed_offload(ctx.pipe, restore_device=ctx.dev)
    finally:
        disable_cfg_batching(ctx.pipe)
        C.reset_peak()


def _set_backend(ctx: Context, name: str) -> None:
    ctx.t.set_attention_backend(name)


# ---- sections ----------------------------------------------------------------------------------------
def section_env(ctx: Context) -> None:
    if not C.cuda():
        return
    n = 1 << 30
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    host.random_(0, 255)
    devbuf = torch.empty(n, dtype=torch.uint8, device=ctx.dev)
    h2d = C.time_fn(lambda: devbuf.copy_(host, non_blocking=True), warmup=1, reps=5)
    d2h = C.time_fn(lambda: host.copy_(devbuf, non_blocking=True), warmup=1, reps=5)
    ctx.R.set("env", "pinned_h2d_GBps", round(n / h2d["median_ms"] / 1e6, 1))
    ctx.R.set("env", "pinned_d2h_GBps", round(n / d2h["median_ms"] / 1e6, 1))
    a = torch.randn(8192, 8192, device=ctx.dev, dtype=torch.bfloat16)
    mm = C.time_fn(lambda: a @ a, warmup=2, reps=5)
    ctx.R.set("env", "bf16_matmul_TFLOPs", round(2 * 8192**3 / mm["median_ms"] / 1e9, 1))
    ctx.numbers["h2d_GBps"] = n / h2d["median_ms"] / 1e6


def section_te_vae(ctx: Context) -> None:
    pipe, R, a = ctx.pipe, ctx.R, ctx.args
    prompt = make_prompt(pipe, a.text_tokens)
    emb, _ = pipe.encode_prompt(prompt=prompt, device=ctx.dev)
    C.reset_peak()
    base = C.allocated_gib()
    r = C.time_fn(lambda: pipe.encode_prompt(prompt=prompt, device=ctx.dev), reps=a.reps)
    r.update(tokens=int(emb.shape[1]), peak_extra_gib=_minus(C.peak_gib(), base))
    R.set("te_vae", "text_encoder_encode", r)
    ctx.numbers["te_ms"] = r["median_ms"]
    for size in ctx.sizes([512, 1024, 1328, 2048], [32, 64, 128]):
        for tiled in (False, True):
            _vae_point(ctx, size, tiled)
    pipe.vae.disable_tiling()


def _vae_point(ctx: Context, size: int, tiled: bool) -> None:
    vae = ctx.pipe.vae
    vae.enable_tiling() if tiled else vae.disable_tiling()
    z = torch.randn(1, vae.config.z_dim, 1, size // 8, size // 8, device=ctx.dev, dtype=ctx.dtype)
    key = f"vae_decode_{size}{'_tiled' if tiled else ''}"
    try:
        C.reset_peak()
        base = C.allocated_gib()
        with torch.no_grad():
            r = C.time_fn(lambda: vae.decode(z, return_dict=False)[0], warmup=1, reps=2)
        r.update(size=size, mpix=size * size / 1e6, peak_extra_gib=_minus(C.peak_gib(), base))
    except Exception as err:  # noqa: BLE001
        if not C.is_oom(err):
            raise
        r = {"oom": True, "size": size}
    ctx.R.set("te_vae", key, r)
    if size == ctx.args.size or (ctx.args.tiny and size == 128):
        ctx.numbers["vae_tiled_ms" if tiled else "vae_ms"] = r.get("median_ms")
    ctx.numbers.setdefault("vae_points", []).append((tiled, r))


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 3)


def section_full(ctx: Context) -> None:
    a, R = ctx.args, ctx.R
    hs, (ec, eu), shapes = make_inputs(ctx, a.size, [a.text_tokens, a.text_tokens])
    _, (_, en), _ = make_inputs(ctx, a.size, [a.text_tokens, a.neg_tokens], seed=1)
    results: dict[str, Any] = {}
    wanted = [b for b in a.backends.split(",") if b] or list(BACKENDS)
    for b in wanted:
        try:
            _set_backend(ctx, b)
            one = C.time_fn(lambda: fwd_single(ctx, hs, ec, shapes), reps=a.reps)
            two = C.time_fn(lambda: fwd_batched(ctx, hs, [ec, eu], shapes), reps=a.reps)
            results[b] = {"b1_ms": one["median_ms"], "b2_ms": two["median_ms"], "b1": one, "b2": two}
            R.set("full", f"backend_{b}", results[b])
        except Exception as err:  # noqa: BLE001 - a backend missing on this card is a result
            R.set("full", f"backend_{b}", {"error": f"{type(err).__name__}: {str(err)[:300]}"})
    ok = {b: r for b, r in results.items() if "b2_ms" in r}
    ctx.best_backend = min(ok, key=lambda b: ok[b]["b2_ms"])
    R.set("full", "best_backend", ctx.best_backend)
    plain = results["native"]["b1_ms"]
    ours = ok[ctx.best_backend]["b2_ms"]
    ctx.numbers.update(diffusers_fwd_ms=plain, ours_step_ms=ours, diffusers_step_ms=2 * plain)
    R.set("full", "diffusers_per_image_s", round(2 * plain * STEPS / 1e3, 2))
    R.set("full", "ours_eager_per_image_s", round(ours * STEPS / 1e3, 2))
    _masked(ctx, hs, ec, en, shapes)
    _set_backend(ctx, ctx.best_backend)
    _correctness(ctx, hs, ec, eu, en, shapes)


def _masked(ctx: Context, hs: Any, ec: Any, en: Any, shapes: Any) -> None:
    """Prompts of different lengths: the padded + masked batch vs diffusers' two unmasked forwards."""
    a = ctx.args
    _set_backend(ctx, "native")
    plain = C.time_fn(lambda: (fwd_single(ctx, hs, ec, shapes), fwd_single(ctx, hs, en, shapes)), reps=a.reps)
    ctx.R.set("full", "masked_diffusers_step", plain)
    best, best_name = None, "native"
    for b in MASK_BACKENDS:
        try:
            _set_backend(ctx, b)
            r = C.time_fn(lambda: fwd_batched(ctx, hs, [ec, en], shapes, split=False), reps=a.reps)
            ctx.R.set("full", f"masked_batched_{b}", r)
            if best is None or r["median_ms"] < best:
                best, best_name = r["median_ms"], b
        except Exception as err:  # noqa: BLE001
            ctx.R.set("full", f"masked_batched_{b}", {"error": f"{type(err).__name__}: {str(err)[:300]}"})
    ctx.best_mask_backend = best_name
    ctx.R.set("full", "best_mask_backend", best_name)
    _set_backend(ctx, ctx.best_backend)
    split = C.time_fn(lambda: fwd_batched(ctx, hs, [ec, en], shapes, split=True), reps=a.reps)
    ctx.R.set("full", f"split_batched_{ctx.best_backend}", split)
    ctx.numbers.update(masked_diffusers_step_ms=plain["median_ms"], masked_ours_step_ms=best,
                       split_ours_step_ms=split["median_ms"])


def _correctness(ctx: Context, hs: Any, ec: Any, eu: Any, en: Any, shapes: Any) -> None:
    both = fwd_batched(ctx, hs, [ec, eu], shapes)
    c1, u1 = fwd_single(ctx, hs, ec, shapes), fwd_single(ctx, hs, eu, shapes)
    _set_backend(ctx, ctx.best_mask_backend)  # flash SDPA cannot take the mask
    masked = fwd_batched(ctx, hs, [ec, en], shapes, split=False)
    _set_backend(ctx, ctx.best_backend)
    split = fwd_batched(ctx, hs, [ec, en], shapes, split=True)
    n1 = fwd_single(ctx, hs, en, shapes)
    errs = {"equal_len_cond": rel_err(both[:1], c1), "equal_len_uncond": rel_err(both[1:], u1),
            "masked_cond": rel_err(masked[:1], c1), "masked_uncond": rel_err(masked[1:], n1),
            "split_cond": rel_err(split[:1], c1), "split_uncond": rel_err(split[1:], n1),
            "finite": bool(torch.isfinite(both).all()), "out_std": float(both.float().std())}
    # bf16 noise floor of this random 60-layer model: the same forward through other SDPA kernels.
    for b in ("_native_cudnn", "_native_flash", "_native_efficient"):
        try:
            _set_backend(ctx, b)
            errs[f"floor_{ctx.best_backend}_vs_{b}"] = rel_err(fwd_single(ctx, hs, ec, shapes), c1)
        except Exception as err:  # noqa: BLE001
            errs[f"floor_vs_{b}"] = f"{type(err).__name__}"
    _set_backend(ctx, ctx.best_backend)
    ctx.R.set("full", "batched_vs_two_forwards_rel_err", errs)
    ctx.ref_out = both.float().cpu()


def section_memory(ctx: Context) -> None:
    """Peak of the batched forward vs pixels (all weights resident): the activation slope."""
    _set_backend(ctx, ctx.best_backend)
    pts = []
    for size in ctx.sizes([512, 1024, 1328, 1664, 2048], [32, 64, 96, 128]):
        hs, embeds, shapes = make_inputs(ctx, size, [ctx.args.text_tokens] * 2)
        C.reset_peak()
        base = C.allocated_gib()
        fwd_batched(ctx, hs, embeds, shapes)
        C.sync()
        extra = _minus(C.peak_gib(), base)
        pts.append((size * size / 1e6, extra))
        ctx.R.set("memory", f"batched_{size}", {"mpix": size * size / 1e6, "act_peak_gib": extra,
                                                "static_gib": base})
    if pts[0][1] is None:
        return
    fit = C.cover_fit(pts)
    ctx.act = fit
    ctx.R.set("memory", "activation_fit", fit)
    ctx.numbers["static_gpu_gib"] = C.allocated_gib()


def section_e2e(ctx: Context) -> None:
    """The real QwenImagePipeline end to end (3 steps), diffusers as-is vs ours (batched CFG + best backend)."""
    a, pipe = ctx.args, ctx.pipe
    prompt, neg = make_prompt(pipe, a.text_tokens), make_prompt(pipe, a.neg_tokens)
    for label in ("diffusers", "ours"):
        if label == "ours":
            enable_cfg_batching(pipe)  # different prompt lengths: split attention, no mask
            _set_backend(ctx, ctx.best_backend)
        else:
            _set_backend(ctx, "native")
        try:
            r = run_pipeline(ctx, prompt, neg, steps=3)
            ctx.R.set("e2e", f"{label}_3_steps", r)
            ctx.numbers[f"e2e_{label}"] = r
        finally:
            disable_cfg_batching(pipe)


def run_pipeline(ctx: Context, prompt: str, neg: str, steps: int) -> dict[str, Any]:
    size = ctx.args.size
    marks: list[float] = []

    def cb(p: Any, i: int, t: Any, kw: dict[str, Any]) -> dict[str, Any]:
        C.sync()
        marks.append(time.perf_counter())
        return {}

    kw = dict(prompt=prompt, negative_prompt=neg, true_cfg_scale=4.0, height=size, width=size,
              num_inference_steps=steps, output_type="pt", callback_on_step_end=cb)
    ctx.pipe(**{**kw, "num_inference_steps": 1})  # warm-up (kernels, RoPE cache)
    marks.clear()
    C.reset_peak()
    C.sync()
    t0 = time.perf_counter()
    img = ctx.pipe(**kw).images
    C.sync()
    wall = time.perf_counter() - t0
    step = [(b - a) * 1e3 for a, b in zip(marks, marks[1:], strict=False)]
    return {"wall_s": round(wall, 3), "steps": steps, "step_ms": [round(s, 1) for s in step],
            "before_first_step_end_s": round(marks[0] - t0, 3), "after_last_step_s": round(t0 + wall - marks[-1], 3),
            "peak_gib": C.peak_gib(), "image_finite": bool(torch.isfinite(img).all()), "shape": list(img.shape)}


def section_compile(ctx: Context) -> None:
    """Regional compilation (diffusers' compile_repeated_blocks): compile time and compiled forwards."""
    a, R = ctx.args, ctx.R
    _set_backend(ctx, ctx.best_backend)
    hs, (ec, eu), shapes = make_inputs(ctx, a.size, [a.text_tokens, a.text_tokens])
    ctx.t.compile_repeated_blocks(fullgraph=True)
    try:
        first, r, out = time_batched(ctx, hs, [ec, eu], shapes)
        eager = ctx.numbers.get("ours_step_ms") or 0.0
        r.update(first_call_s=round(first, 1), compile_s=round(first - eager / 1e3, 1),
                 per_image_s=round(r["median_ms"] * STEPS / 1e3, 2),
                 rel_err_vs_eager=rel_err(out.float().cpu(), ctx.ref_out) if ctx.ref_out is not None else None)
        R.set("compile", "batched", r)
        ctx.numbers["compiled_step_ms"] = r["median_ms"]
        if a.profile and C.cuda():
            R.set("compile", "profile_batched", profile_forward(lambda: fwd_batched(ctx, hs, [ec, eu], shapes)))
        if R.left() > 140:  # different prompt lengths: split attention under compile (one more graph)
            _, (_, en), _ = make_inputs(ctx, a.size, [a.text_tokens, a.neg_tokens], seed=1)
            t0 = time.perf_counter()
            fwd_batched(ctx, hs, [ec, en], shapes)
            C.sync()
            first = time.perf_counter() - t0
            rs = C.time_fn(lambda: fwd_batched(ctx, hs, [ec, en], shapes), reps=a.reps)
            rs.update(first_call_s=round(first, 1), per_image_s=round(rs["median_ms"] * STEPS / 1e3, 2))
            R.set("compile", "split_batched", rs)
            ctx.numbers["compiled_split_step_ms"] = rs["median_ms"]
        if R.left() > 100:
            t0 = time.perf_counter()
            fwd_single(ctx, hs, ec, shapes)
            C.sync()
            first = time.perf_counter() - t0
            r1 = C.time_fn(lambda: fwd_single(ctx, hs, ec, shapes), reps=a.reps)
            r1.update(first_call_s=round(first, 1), per_image_s=round(2 * r1["median_ms"] * STEPS / 1e3, 2))
            R.set("compile", "b1_diffusers_regional", r1)
            ctx.numbers["compiled_b1_ms"] = r1["median_ms"]
    finally:
        _undo_regional_compile(ctx)


def _undo_regional_compile(ctx: Context) -> None:
    """Back to eager blocks after ``compile_repeated_blocks`` (which compiles each block's ``__call__``)."""
    torch._dynamo.reset()
    for block in ctx.t.transformer_blocks:
        block._compiled_call_impl = None


def section_fp8(ctx: Context) -> None:
    """Optional fp8 compute (qwen_core.fp8_compute): speed and deviation from the bf16 output, eager and
    compiled. Runs after every section that needs the text encoder, which it drops to make room."""
    from qwen_core.fp8_compute import enable_fp8_compute, fp8_supported

    a, R = ctx.args, ctx.R
    if not fp8_supported(ctx.dev):
        R.set("fp8", "skipped", f"no fp8 matmul on {ctx.dev}")
        return
    if C.cuda():
        ctx.pipe.text_encoder.to_empty(device="meta")
    _set_backend(ctx, ctx.best_backend)
    hs, (ec, eu), shapes = make_inputs(ctx, a.size, [a.text_tokens, a.text_tokens])
    t0 = time.perf_counter()
    h = enable_fp8_compute(ctx.t, keep_original=True)
    C.sync()
    R.set("fp8", "converted", {"layers": h.converted, "seconds": round(time.perf_counter() - t0, 1)})
    try:
        C.reset_peak()
        r = C.time_fn(lambda: fwd_batched(ctx, hs, [ec, eu], shapes), reps=a.reps)
        out = fwd_batched(ctx, hs, [ec, eu], shapes)
        r.update(per_image_s=round(r["median_ms"] * STEPS / 1e3, 2), peak_gib=C.peak_gib(),
                 rel_err_vs_bf16=rel_err(out.float().cpu(), ctx.ref_out) if ctx.ref_out is not None else None)
        R.set("fp8", "eager_batched", r)
        ctx.numbers["fp8_step_ms"] = r["median_ms"]
        if R.left() > 80:
            mode = a.fp8_compile_mode
            ctx.t.compile_repeated_blocks(fullgraph=True, **({"mode": mode} if mode else {}))
            first, rc, out = time_batched(ctx, hs, [ec, eu], shapes)
            rc.update(first_call_s=round(first, 1), per_image_s=round(rc["median_ms"] * STEPS / 1e3, 2),
                      rel_err_vs_bf16=rel_err(out.float().cpu(), ctx.ref_out) if ctx.ref_out is not None
                      else None)
            rc["mode"] = mode or "default"
            R.set("fp8", "compiled_batched", rc)
            if a.profile and C.cuda():
                R.set("fp8", "profile_batched", profile_forward(lambda: fwd_batched(ctx, hs, [ec, eu], shapes)))
            ctx.numbers["fp8_compiled_step_ms"] = rc["median_ms"]
    finally:
        _undo_regional_compile(ctx)
        h.disable()


_CATEGORIES = (("attention", ("flash", "fmha", "attention", "cudnn", "sdpa")),
               ("gemm", ("gemm", "xmma", "cutlass", "nvjet", "matmul", "_mm_", "scaled_mm", "wgmma", "sm90")),
               ("fused_elementwise_triton", ("triton",)))


def profile_forward(fn: Any) -> dict[str, Any]:
    """GPU kernel time of one call by category, the busy fraction (launch gaps) and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    C.sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fn()
        C.sync()
        wall = (time.perf_counter() - t0) * 1e3
    cats: dict[str, float] = {}
    kernels: dict[str, float] = {}
    for ev in prof.events():
        if ev.device_type.name != "CUDA":
            continue
        ms = ev.device_time / 1e3 if hasattr(ev, "device_time") else ev.cuda_time / 1e3
        name = ev.name.lower()
        cat = next((c for c, keys in _CATEGORIES if any(k in name for k in keys)), "other")
        cats[cat] = cats.get(cat, 0.0) + ms
        kernels[ev.name[:90]] = kernels.get(ev.name[:90], 0.0) + ms
    busy = sum(cats.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:12]
    return {"wall_ms": round(wall, 1), "kernel_ms": round(busy, 1), "busy_fraction": round(busy / wall, 3),
            "by_category_ms": {k: round(v, 1) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
            "top_kernels_ms": [(k, round(v, 1)) for k, v in top]}
