"""LoRA and Lightning on the full-size random-weight model, through the product path (in-memory loader + generator).

    python bench/lora_bench.py --out $OUT              # GPU: one call, well under 10 minutes
    python bench/lora_bench.py --tiny --out /tmp/lb    # CPU dry run of the same code, scaled-down model

Measures (results in OUT/lora_results.json, rewritten after every measurement):
- ``base``: 8 steps at 1328x1328, true CFG off, no LoRA: per-step median (ms) and the whole image (s);
- ``fuse``: a Lightning-sized LoRA (rank 64 on every linear layer of the 60 blocks, lightx2v's key layout,
  bf16, written to a temp file) applied without a reload: first fuse (base copies to CPU + fuse), a strength
  change, and LoRA memory (factors, base copies);
- ``lora``: the same run with the LoRA fused: per-step median and the overhead vs ``base`` (target <= 3%);
- ``lightning``: the ``lightning-8`` preset end to end (text encoder, 8 steps, VAE decode; target <= 4 s),
  after one warm-up image;
- ``restore``: LoRA off, same seed: the image is bit-identical to ``base``'s;
- ``compiled`` (unless --no-compile): regional compile, the lightning image again, then a strength change and
  one more image, counting dynamo recompilations (expected 0: the fused weights are written in place).
"""

from __future__ import annotations

import argparse
import os
import statistics
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
from in_memory import in_memory_loader  # noqa: E402

from qwen_core.generator import QwenImageGenerator  # noqa: E402
from qwen_core.lora.fuse import lora_memory  # noqa: E402
from qwen_core.lora.spec import LoraSpec  # noqa: E402
from qwen_core.lora.targets import linear_shapes  # noqa: E402

PROMPT = "A coffee shop entrance with a chalkboard sign reading \"Qwen Coffee\", warm morning light, photorealistic"


def write_lightning_like_lora(transformer: Any, path: Path, rank: int, seed: int = 0) -> int:
    """A LoRA on every linear layer of the transformer blocks in lightx2v's layout (lora_down/lora_up/alpha)."""
    from safetensors.torch import save_file

    gen = torch.Generator(device="cpu").manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, (out_f, in_f) in linear_shapes(transformer).items():
        if not name.startswith("transformer_blocks."):
            continue
        tensors[f"{name}.lora_down.weight"] = (torch.randn(rank, in_f, generator=gen) * in_f**-0.5).to(torch.bfloat16)
        tensors[f"{name}.lora_up.weight"] = (torch.randn(out_f, rank, generator=gen) * 1e-3).to(torch.bfloat16)
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(path))
    return path.stat().st_size


def timed_generate(gen: QwenImageGenerator, size: int, steps: int, **kw: Any) -> dict[str, Any]:
    marks: list[float] = []
    C.sync()
    t0 = time.perf_counter()
    result = gen.generate(PROMPT, "", width=size, height=size, steps=steps, true_cfg_scale=1.0, seed=42,
                          on_step=lambda i, n, eta: marks.append(time.perf_counter()), **kw)
    C.sync()
    wall = time.perf_counter() - t0
    step_ms = [(b - a) * 1e3 for a, b in zip(marks, marks[1:], strict=False)]
    return {"wall_s": round(wall, 3), "steps": result.steps, "preset": result.preset,
            "median_step_ms": round(statistics.median(step_ms), 2) if step_ms else None,
            "step_ms": [round(s, 2) for s in step_ms],
            "timings": {k: round(v, 3) for k, v in result.timings.items()}, "images": result.images,
            "finite": bool(torch.isfinite(result.images).all())}


def _public(run: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in run.items() if k != "images"}


def _best_of(gen: QwenImageGenerator, size: int, steps: int, reps: int, **kw: Any) -> dict[str, Any]:
    runs = [timed_generate(gen, size, steps, **kw) for _ in range(reps)]
    best = min(runs, key=lambda r: r["wall_s"])
    best["all_wall_s"] = [r["wall_s"] for r in runs]
    best["all_median_step_ms"] = [r["median_step_ms"] for r in runs]
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="scaled-down model and size (CPU dry run)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--size", type=int, default=1328)
    p.add_argument("--rank", type=int, default=64, help="LoRA rank (lightx2v's Lightning LoRAs: 64)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--budget-s", type=float, default=560.0)
    a = p.parse_args(argv)
    if a.tiny:
        a.size, a.rank, a.reps = min(a.size, 128), min(a.rank, 4), min(a.reps, 2)
    cuda = C.cuda()
    dev, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    R = C.Results(a.out / "lora_results.json", a.budget_s)
    R.set("run", "command", " ".join(sys.argv))
    R.set("run", "versions", C.versions())
    t0 = time.perf_counter()
    pipe = fullsize.build_pipeline(dev, dtype, tiny=a.tiny)
    pipe.set_progress_bar_config(disable=True)
    C.sync()
    R.set("build", "seconds", round(time.perf_counter() - t0, 1))
    workdir = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    lora_path = workdir / f"bench-Qwen-Image-Lightning-8steps-rank{a.rank}.safetensors"
    t0 = time.perf_counter()
    R.set("lora_file", "bytes", write_lightning_like_lora(pipe.transformer, lora_path, a.rank))
    R.set("lora_file", "write_s", round(time.perf_counter() - t0, 1))

    gen = QwenImageGenerator(in_memory_loader(pipe, name="fullsize", memory_mode="gpu", device=str(dev)))
    timed_generate(gen, a.size, 2)  # load, placement, kernels warm
    base = _best_of(gen, a.size, 8, a.reps)
    R.set("base", "no_lora_8_steps", _public(base))

    t0 = time.perf_counter()
    gen.set_loras([LoraSpec(lora_path, 1.0)])
    R.set("fuse", "check_header_s", round(time.perf_counter() - t0, 3))
    C.reset_peak()
    t0 = time.perf_counter()
    gen.load()
    C.sync()
    R.set("fuse", "first_fuse_s", round(time.perf_counter() - t0, 2))
    R.set("fuse", "report", gen.loader.lora_report.summary())
    mem = lora_memory(gen.loader.pipeline)
    R.set("fuse", "memory", {"factor_mib": round(mem.factor_bytes / 2**20, 1), "backup_gib": round(mem.backup_bytes / C.GIB, 2),
                             "layers": mem.layers, "peak_gib": C.peak_gib()})
    gen.set_loras([LoraSpec(lora_path, 0.8)])
    t0 = time.perf_counter()
    gen.load()
    C.sync()
    R.set("fuse", "strength_change_s", round(time.perf_counter() - t0, 2))
    gen.set_loras([LoraSpec(lora_path, 1.0)])

    lora = _best_of(gen, a.size, 8, a.reps)
    overhead = (lora["median_step_ms"] / base["median_step_ms"] - 1) * 100 if base["median_step_ms"] else None
    R.set("lora", "fused_8_steps", _public(lora))
    R.set("lora", "overhead_pct_per_step", round(overhead, 2) if overhead is not None else None)

    timed_generate(gen, a.size, 8, preset="lightning-8")  # warm-up with the preset's scheduler
    light = _best_of(gen, a.size, 8, a.reps, preset="lightning-8")
    R.set("lightning", "e2e_8_steps", _public(light))
    R.set("lightning", "target_4s_met", light["wall_s"] <= 4.0)

    gen.set_loras([])
    again = timed_generate(gen, a.size, 8)
    R.set("restore", "report", gen.loader.lora_report.summary())
    R.set("restore", "bit_identical_to_base", bool(torch.equal(again["images"], base["images"])))
    R.set("restore", "max_abs_diff", float((again["images"] - base["images"]).abs().max()))

    if not a.no_compile and R.left() > 150:
        compiled(R, gen, pipe, lora_path, a)
    lora_path.unlink(missing_ok=True)
    print(f"lightning e2e {light['wall_s']} s, LoRA overhead {overhead:.2f}% per step" if overhead is not None else "done")
    return 0


def compiled(R: C.Results, gen: QwenImageGenerator, pipe: Any, lora_path: Path, a: argparse.Namespace) -> None:
    """Regional compile (as QWEN_COMPILE=1 does), the Lightning image, then a strength change: no recompile."""
    from torch._dynamo.utils import counters

    kw: dict[str, Any] = {"fullgraph": True} if C.cuda() else {"backend": "eager"}
    gen.set_loras([LoraSpec(lora_path, 1.0)])
    gen.load()
    t0 = time.perf_counter()
    pipe.transformer.compile_repeated_blocks(**kw)
    timed_generate(gen, a.size, 8, preset="lightning-8")  # compiles
    R.set("compiled", "first_image_with_compile_s", round(time.perf_counter() - t0, 1))
    light = _best_of(gen, a.size, 8, a.reps, preset="lightning-8")
    R.set("compiled", "lightning_e2e_8_steps", _public(light))
    R.set("compiled", "target_4s_met", light["wall_s"] <= 4.0)
    graphs = sum(counters["stats"].values()) if "stats" in counters else None
    frames = dict(counters.get("frames", {}))
    gen.set_loras([LoraSpec(lora_path, 0.5)])
    t0 = time.perf_counter()
    gen.load()
    C.sync()
    R.set("compiled", "strength_change_s", round(time.perf_counter() - t0, 2))
    after = timed_generate(gen, a.size, 8, preset="lightning-8")
    R.set("compiled", "after_strength_change", _public(after))
    R.set("compiled", "dynamo_frames_before_after", [frames, dict(counters.get("frames", {}))])
    R.set("compiled", "dynamo_stats_before_after", [graphs, sum(counters["stats"].values()) if "stats" in counters else None])


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    sys.exit(main())
