"""Issue 13 in one run: plain diffusers vs our default path (cold process, warm compile cache), the best bf16
path, fp8 compute and the streamed engine with the same speed-ups, with relative errors. Full-size random weights.

    python bench/speed.py --out $OUT            # GPU: one command, ~8 min, OUT/speed.json (+ child logs)
    python bench/speed.py --tiny --out /tmp/s   # CPU dry run of the same code with scaled-down models

Order (each part time-boxed against --budget-s; a part that does not fit is recorded as skipped):
1. child "fill": a fresh process builds the model, runs our default path (PipelineLoader + QwenImageGenerator:
   batched CFG, real RoPE, compile on, best attention) for 2 steps: the compile fills an empty compile cache.
2. child "cold": another fresh process, same cache: the first image (real pipeline, true CFG, --first-steps
   steps, 50 by default) is timed from the generate call, compile-cache load included, then a second image in
   the same process: the ratio is the issue's "first image of a cold process <= 1.2x a warm one".
3. this process: transformer forwards at 1328x1328 (64 text tokens per branch, batched cond+uncond as our path
   issues them; diffusers as-is = two batch-1 forwards): a warm-up and --reps timed forwards, median. Per image
   = ms/step x 50 + 2 text encodes + 1 VAE decode, each measured here (extrapolated, stated as such).
   Relative errors are ||out - ref|| / ||ref|| of the transformer output against diffusers' eager output.
   ``compile_variants`` compiles the default path again under other inductor settings (does one pay?);
   ``profiles`` names where a step's GPU time goes (full card, and streamed in the cap).

``--only-children`` runs steps 1-2 alone (the cold-start measurement); ``--parts a,b`` picks the step-3 parts.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common as C  # noqa: E402
import fullsize  # noqa: E402
import speed_sections as SS  # noqa: E402

STEPS = 50
PROFILE_FIRST_ENV = "SPEED_PROFILE_FIRST_IMAGE"  # =cold, fill or all: that child cProfiles its first image


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="scaled-down models and sizes (CPU dry run)")
    p.add_argument("--out", type=Path, required=True, help="folder for speed.json and the child logs")
    p.add_argument("--budget-s", type=float, default=520.0, help="stop starting parts after this")
    p.add_argument("--size", type=int, default=1328)
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--neg-tokens", type=int, default=12)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--first-steps", type=int, default=STEPS, help="steps of the cold child's two images")
    p.add_argument("--cap", type=float, default=16.0, help="streamed: memory cap in GiB")
    p.add_argument("--skip-children", action="store_true", help="no cold/warm-cache child processes")
    p.add_argument("--only-children", action="store_true",
                   help="only the cold/warm-cache child processes (the cold-start measurement, ~2.5 min on a GPU)")
    p.add_argument("--parts", default="",
                   help="comma-separated in-process parts to run (default: all): " + ", ".join(SS.PART_NAMES))
    p.add_argument("--child", choices=("fill", "cold"), help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.skip_children and args.only_children:
        p.error("--skip-children and --only-children exclude each other")
    args.parts = {part.strip() for part in args.parts.split(",") if part.strip()}
    if args.parts - set(SS.PART_NAMES):
        p.error(f"--parts: {sorted(args.parts - set(SS.PART_NAMES))} is not a part; parts: {', '.join(SS.PART_NAMES)}")
    if args.tiny:
        args.size = min(args.size, 128)
        args.text_tokens, args.neg_tokens = min(args.text_tokens, 16), min(args.neg_tokens, 5)
        args.first_steps = min(args.first_steps, 3)
        args.reps = min(args.reps, 2)
    return args


# ---- children: the product path in fresh processes --------------------------------------------------------
def child_main(args: argparse.Namespace) -> int:
    """Build the model, run our default path; write a small JSON to --child-out."""
    t_start = time.perf_counter()
    from in_memory import in_memory_loader
    from sections import make_prompt

    from qwen_core.generator import QwenImageGenerator
    from qwen_core.speed.compile import compile_handle

    dev = torch.device("cuda" if C.cuda() else "cpu")
    dtype = torch.bfloat16 if C.cuda() else torch.float32
    out: dict[str, Any] = {"role": args.child, "import_s": round(time.perf_counter() - t_start, 1)}
    t0 = time.perf_counter()
    pipe = fullsize.build_pipeline(dev, dtype, tiny=args.tiny)
    pipe.set_progress_bar_config(disable=True)
    C.sync()
    out["build_s"] = round(time.perf_counter() - t0, 1)
    loader = in_memory_loader(pipe, name=f"child-{args.child}", memory_mode="gpu", device=str(dev))
    gen = QwenImageGenerator(loader)
    prompt, neg = make_prompt(pipe, args.text_tokens), make_prompt(pipe, args.neg_tokens)
    steps = 2 if args.child == "fill" else args.first_steps
    images = []
    for i in range(1 if args.child == "fill" else 2):
        C.sync()
        t0 = time.perf_counter()
        profiler = cProfile.Profile() if i == 0 and os.environ.get(PROFILE_FIRST_ENV) in ("all", args.child) else None
        if profiler is not None:
            profiler.enable()
        result = gen.generate(prompt, neg, width=args.size, height=args.size, steps=steps, true_cfg_scale=4.0, seed=0)
        C.sync()
        wall = time.perf_counter() - t0
        if profiler is not None:  # where a cold process's first image spends its time, by Python function
            profiler.disable()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(60)
            (args.out / f"child_{args.child}_first_image_profile.txt").write_text(text.getvalue())
        images.append({"wall_s": round(wall, 3), "steps": steps, "profiled": profiler is not None,
                       "timings": {k: round(v, 3) for k, v in result.timings.items() if isinstance(v, float)},
                       "finite": bool(torch.isfinite(result.images).all())})
        if i == 0:
            handle = compile_handle(pipe.transformer)
            out["compile_first_calls_s"] = dict(handle.first_calls) if handle else None
            out["cache"] = handle.cache.describe() if handle and handle.cache else None
    out.update(images=images, placement=loader.placement, attention=loader.attention_backend,
               speed=loader.speed.describe())
    if len(images) == 2:
        out["first_over_warm"] = round(images[0]["wall_s"] / images[1]["wall_s"], 3)
    args.child_out.write_text(json.dumps(out, indent=1, default=str))
    return 0


def run_child(args: argparse.Namespace, role: str, cache: Path, R: C.Results, limit_s: float) -> dict[str, Any]:
    out = args.out / f"child_{role}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", role, "--child-out", str(out), "--out",
           str(args.out), "--size", str(args.size), "--text-tokens", str(args.text_tokens), "--neg-tokens",
           str(args.neg_tokens), "--first-steps", str(args.first_steps)] + (["--tiny"] if args.tiny else [])
    env = dict(os.environ, QWEN_COMPILE_CACHE=str(cache), PYTHONUNBUFFERED="1")
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    if not C.cuda():
        env["QWEN_COMPILE"] = "1"  # the CPU dry run exercises the same compile path
    t0 = time.perf_counter()
    with open(args.out / f"child_{role}.log", "w") as log:
        try:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=limit_s).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    result = json.loads(out.read_text()) if out.is_file() else {}
    result.update(rc=rc, process_wall_s=round(time.perf_counter() - t0, 1))
    R.set("children", role, result)
    return result


# ---- main ----------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    args.out.mkdir(parents=True, exist_ok=True)
    R = C.Results(args.out / "speed.json", args.budget_s)
    R.set("run", "command", " ".join(sys.argv))
    R.set("run", "versions", C.versions())
    cache = Path(tempfile.mkdtemp(prefix="qwen-compile-cache-"))
    os.environ["QWEN_COMPILE_CACHE"] = str(cache)  # this process shares the children's (warm) cache
    os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    R.set("run", "compile_cache", str(cache))
    if not args.skip_children:
        cold_need = 60 + args.first_steps * 1.2 if C.cuda() else 400
        reserve = 0 if args.only_children else 200  # the in-process parts' share of the budget
        run_child(args, "fill", cache, R, limit_s=max(60.0, min(240.0, R.left() - cold_need - reserve)))
        run_child(args, "cold", cache, R, limit_s=max(60.0, min(200.0, R.left() - reserve)))
    if args.only_children:
        return 0
    ctx = SS.build(args, R)
    for part in SS.PARTS:
        if args.parts and part.__name__ not in args.parts:
            continue
        need = SS.MIN_SECONDS.get(part.__name__, 20) * (0.25 if args.tiny else 1)
        if R.left() < need:
            R.set("skipped", part.__name__, f"only {R.left():.0f} s of the budget left (needs ~{need:.0f})")
            continue
        try:
            part(ctx)
        except Exception as err:  # noqa: BLE001 - record and go on: one broken part must not lose the rest
            import traceback

            R.set("errors", part.__name__, f"{type(err).__name__}: {err}"[:2000])
            traceback.print_exc()
            SS.recover(ctx)
    SS.summary(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
