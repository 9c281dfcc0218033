"""One-call GPU benchmark of Qwen-Image: plain diffusers vs our fast path, the streamed engine in memory caps,
the measured memory model and the governor check. Full-size random-weight models (bench/fullsize.py).

    python bench/gpu_bench.py --out $OUT            # on the GPU machine (one complete measurement set)
    python bench/gpu_bench.py --tiny --out /tmp/b   # CPU dry run of the same code with scaled-down models

Method: transformer timings are a warm-up plus 3 timed forwards per config (median, CUDA-synchronised);
s/image = per-step time x 50 (+ text encoder x2 and VAE decode, measured once each), stated as such.
Memory caps emulate smaller cards with torch.cuda.set_per_process_memory_fraction (the CUDA context, ~0.5
GiB on a real card, is outside the cap). Results go to OUT/results.json after every measurement, so a run
stopped at its time limit still reports what it finished.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common as C  # noqa: E402
import fullsize  # noqa: E402
import lowvram  # noqa: E402
import product  # noqa: E402
import report  # noqa: E402
import sections as S  # noqa: E402

# fp8 (on a GPU) and group_offload drop the text encoder to make room: they come after every section that
# runs it (replan and product run the whole pipeline), and group_offload, which leaves the transformer
# offloaded, comes last.
ALL = ("env", "te_vae", "full", "memory", "e2e", "streamed", "compile", "governor", "streamed_compiled", "replan",
       "product", "fp8", "group_offload")
SECTIONS = {name: next(getattr(m, f"section_{name}") for m in (S, lowvram, product) if hasattr(m, f"section_{name}"))
            for name in ALL}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="scaled-down models and sizes (CPU dry run)")
    p.add_argument("--out", type=Path, required=True, help="folder for results.json")
    p.add_argument("--budget-s", type=float, default=560.0, help="stop starting sections after this")
    p.add_argument("--sections", default=",".join(ALL), help=f"comma list of {ALL}")
    p.add_argument("--size", type=int, default=1328, help="square image side for the timings")
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--neg-tokens", type=int, default=12, help="negative prompt length of the masked case")
    p.add_argument("--caps", default="16,24,12", help="memory caps (GiB) for the streamed engine")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--backends", default="", help="comma list limiting the attention backends tried")
    p.add_argument("--profile", action="store_true", help="kernel-time breakdown of the compiled forward")
    p.add_argument("--fp8-compile-mode", default=None, help="torch.compile mode for the fp8 path")
    p.add_argument("--stream-margin-gib", type=float, default=2.0,
                   help="streamed+compiled: plan for cap minus this (compiled graphs keep workspaces)")
    args = p.parse_args(argv)
    if args.tiny:
        args.size = min(args.size, 128)
        args.text_tokens, args.neg_tokens = min(args.text_tokens, 16), min(args.neg_tokens, 5)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = C.cuda()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    R = C.Results(args.out / "results.json", args.budget_s)
    R.set("run", "command", " ".join(sys.argv))
    R.set("run", "versions", C.versions())
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    t0 = time.perf_counter()
    pipe = fullsize.build_pipeline(dev, dtype, tiny=args.tiny)
    C.sync()
    pipe.set_progress_bar_config(disable=True)
    R.set("build", "seconds", round(time.perf_counter() - t0, 1))
    R.set("build", "gib", {n: round(sum(p.numel() * p.element_size() for p in getattr(pipe, n).parameters())
                                    / C.GIB, 3) for n in ("transformer", "text_encoder", "vae")})
    R.set("build", "allocated_gib", C.allocated_gib())
    ctx = S.Context(args=args, pipe=pipe, dev=dev, dtype=dtype, R=R)
    minimum = {"compile": 120, "fp8": 60, "group_offload": 70, "governor": 60, "streamed": 60,
               "streamed_compiled": 70, "product": 90}
    for name in wanted:
        if R.left() < minimum.get(name, 20):
            R.set("skipped", name, f"only {R.left():.0f} s left of the time budget")
            continue
        try:
            SECTIONS[name](ctx)
        except Exception as err:  # noqa: BLE001 - record and go on: one broken section must not lose the rest
            import traceback

            R.set("errors", name, f"{type(err).__name__}: {err}"[:2000])
            traceback.print_exc()
            S.recover(ctx)
    report.write_memory_model(ctx)
    report.print_summary(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
