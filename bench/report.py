"""Turn a bench run into presets/memory_model.json entries and a short printed summary."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import common as C
from lowvram import HEADROOM_GIB
from sections import STEPS, Context


def _vae_fit(ctx: Context, tiled: bool) -> dict[str, float] | None:
    pts = [(r["mpix"], r["peak_extra_gib"]) for t, r in ctx.numbers.get("vae_points", [])
           if t == tiled and r.get("peak_extra_gib") is not None]
    return C.cover_fit(pts) if len(pts) >= 2 else None


def memory_model_entries(ctx: Context) -> dict[str, Any]:
    """Entries "<mode>/<dtype>" -> {base_gib, gib_per_mpix, headroom_gib}: peak = base + slope * MP."""
    entries: dict[str, Any] = dict(ctx.mm)
    act, static = ctx.act, ctx.numbers.get("static_gpu_gib")
    if not act or static is None:
        return entries
    gib = ctx.R.data.get("build", {}).get("gib", {})
    entries["activations/bf16"] = {"base_gib": act["intercept_gib"], "gib_per_mpix": act["gib_per_mpix"],
                                   "headroom_gib": 0.0, "measured": "batched cond+uncond forward, extra over weights"}
    vae = _vae_fit(ctx, tiled=False)
    if vae:
        entries["vae/bf16"] = {"base_gib": vae["intercept_gib"], "gib_per_mpix": vae["gib_per_mpix"],
                               "headroom_gib": 0.0, "measured": "untiled VAE decode, extra over weights"}
    # Whole pipeline resident: the transformer phase or the (untiled) VAE decode, whichever is larger.
    slope = max(act["gib_per_mpix"], vae["gib_per_mpix"] if vae else 0.0)
    icpt = max(act["intercept_gib"], vae["intercept_gib"] if vae else 0.0)
    entries["gpu/bf16"] = {"base_gib": round(static + icpt, 3), "gib_per_mpix": round(slope, 4),
                           "headroom_gib": HEADROOM_GIB, "measured": "all weights + max(batched forward, VAE)"}
    off = gib.get("transformer", 0) + gib.get("vae", 0)
    entries["model_offload/bf16"] = {"base_gib": round(off + icpt, 3), "gib_per_mpix": round(slope, 4),
                                     "headroom_gib": HEADROOM_GIB,
                                     "measured": "derived: gpu/bf16 without the text encoder's weights"}
    for key in [k for k in entries if k.endswith("/bf16") and not k.startswith("activations")]:
        entries[key.replace("/bf16", "/fp16")] = {**entries[key], "measured": f"same bytes as {key}"}
    return entries


def write_memory_model(ctx: Context) -> Path:
    """The measured entries in presets/memory_model.json's shape (one family, "qwen-image"); merge them into the
    committed file by hand (it also holds derived entries and the step-time figures)."""
    v = ctx.R.data.get("run", {}).get("versions", {})
    gib = ctx.R.data.get("build", {}).get("gib", {})
    family = {"card": v.get("card"), "date": time.strftime("%Y-%m-%d", time.gmtime()),
              "versions": {k: v.get(k) for k in ("torch", "diffusers", "transformers", "cuda")},
              "command": ctx.R.data.get("run", {}).get("command"),
              "note": "peak = base_gib + gib_per_mpix * megapixels (+ headroom_gib); bf16, 64 text tokens, "
                      "batched true CFG; full-size random-weight models, see bench/RESULTS.md",
              "reference_pixels": 1328 * 1328, "weights_dtype": "bf16",
              "weights_gib": {k: gib[k] for k in ("transformer", "text_encoder", "vae") if k in gib},
              "entries": memory_model_entries(ctx)}
    doc = {"version": 2, "families": {"qwen-image": family}}
    path = ctx.args.out / "memory_model.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def _fmt(x: Any, unit: str = "") -> str:
    return "-" if x is None else f"{x:.1f}{unit}" if isinstance(x, float) else f"{x}{unit}"


def print_summary(ctx: Context) -> None:
    n = ctx.numbers
    te, vae = n.get("te_ms") or 0.0, n.get("vae_ms") or n.get("vae_tiled_ms") or 0.0
    rows = [("diffusers eager, 2 forwards/step", n.get("diffusers_step_ms")),
            (f"ours eager batched ({ctx.best_backend})", n.get("ours_step_ms")),
            ("diffusers regional compile (b1 x2)", 2 * n["compiled_b1_ms"] if n.get("compiled_b1_ms") else None),
            ("ours compiled batched", n.get("compiled_step_ms")),
            ("neg shorter: diffusers (2 forwards)", n.get("masked_diffusers_step_ms")),
            ("neg shorter: ours batched + SDPA mask", n.get("masked_ours_step_ms")),
            ("neg shorter: ours batched + split attn", n.get("split_ours_step_ms")),
            ("neg shorter: ours compiled split", n.get("compiled_split_step_ms")),
            ("fp8 compute eager batched", n.get("fp8_step_ms")),
            ("fp8 compute compiled batched", n.get("fp8_compiled_step_ms")),
            ("diffusers group offload (cap)", n.get("group_offload_step_ms"))]
    rows += [(f"ours streamed {k[9:]}", v["median_ms"]) for k, v in n.items()
             if k.startswith("streamed_cap") and isinstance(v, dict) and "median_ms" in v]
    rows += [(f"ours streamed+compiled {k[18:]}", v["median_ms"]) for k, v in n.items()
             if k.startswith("streamed_compiled_") and isinstance(v, dict) and "median_ms" in v]
    print("\n=== summary (ms per denoising step = cond+uncond; s/image = x50 transformer only) ===")
    for name, ms in rows:
        print(f"{name:42s} {_fmt(ms, ' ms'):>12s} {_fmt(ms * STEPS / 1e3 if ms else None, ' s'):>10s}")
    print(f"text encoder {te:.1f} ms/prompt, VAE decode {vae:.1f} ms; results: {ctx.R.path}")
    ctx.R.set("summary", "rows", rows)
    ctx.R.set("summary", "elapsed_s", round(ctx.R.elapsed(), 1))
    C.sync()
