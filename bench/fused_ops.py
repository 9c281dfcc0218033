"""Our fused kernels against what inductor makes of the same ops, alone, at Qwen-Image's 1328x1328 shapes.

    python bench/fused_ops.py --out $OUT          # GPU: ~1 min, OUT/fused_ops.json
    python bench/fused_ops.py --tiny --out /tmp/f  # CPU dry run (small shapes; no kernels, the fallbacks run)

Two ops of a block, batched CFG (2 x 6889 image tokens + 2 x 64 text tokens, 24 heads x 128, hidden 3072):
- q (or k): RMS norm + real RoPE + text/image concatenation. Unfused = the ops our processor ran before
  (``qk_rope.reference`` twice and ``torch.cat``) under ``torch.compile(dynamic=True)`` like the blocks; fused =
  ``qk_rope.norm_rope_cat`` (one Triton kernel per segment), eager and inside a compiled function.
- the feed-forward's up projection + tanh GELU: unfused = ``gelu(linear(x))`` compiled (a cuBLAS GEMM, then
  inductor's GELU kernel); fused = ``linear_gelu_tanh`` (cuBLASLt with a GELU epilogue).
Each: median of --reps timed calls (CUDA events around 10 calls), GB moved at the floor (each input read once,
each output written once) and the relative L2 error against a float32 computation of the same math.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common as C  # noqa: E402

from qwen_core.speed import qk_rope  # noqa: E402
from qwen_core.speed.linear_gelu import linear_gelu_tanh  # noqa: E402


def timed_ms(fn: Any, reps: int, inner: int = 10) -> float:
    """Median ms per call of ``fn`` over ``reps`` batches of ``inner`` calls (events on CUDA, clock on CPU)."""
    fn()
    C.sync()
    times = []
    for _ in range(reps):
        if C.cuda():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / inner)
        else:
            t = C.time_fn(fn, warmup=0, reps=1)["median_ms"]
            times.append(t)
    return sorted(times)[len(times) // 2]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def qk_case(dev: torch.device, dtype: torch.dtype, tokens: int, text: int, heads: int, reps: int) -> dict[str, Any]:
    dim = 128
    g = torch.Generator(device=dev).manual_seed(0)
    proj = torch.randn(2, tokens, heads * dim, generator=g, device=dev).to(dtype)  # a projection's output
    proj_txt = torch.randn(2, text, heads * dim, generator=g, device=dev).to(dtype)
    img, txt = proj.unflatten(-1, (heads, dim)), proj_txt.unflatten(-1, (heads, dim))
    w_img = (torch.rand(dim, generator=g, device=dev) + 0.5).to(dtype)
    w_txt = (torch.rand(dim, generator=g, device=dev) + 0.5).to(dtype)
    angles = torch.rand(tokens + text, dim // 2, generator=g, device=dev) * 6
    table = torch.stack((angles.cos(), angles.sin()), dim=-1)
    t_txt, t_img = table[:text].contiguous(), table[text:].contiguous()
    eps = 1e-6

    def unfused(txt: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        return torch.cat([qk_rope.reference(txt, w_txt, eps, t_txt), qk_rope.reference(img, w_img, eps, t_img)], 1)

    def fused(txt: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        return torch.ops.qwen_core.qk_norm_rope(txt, img, w_txt, w_img, eps, eps, t_txt, t_img)

    compiled_unfused = torch.compile(unfused, dynamic=True, fullgraph=True)
    compiled_fused = torch.compile(fused, dynamic=True, fullgraph=True)
    exact = torch.cat([qk_rope.reference(txt.float(), w_txt.float(), eps, t_txt),
                       qk_rope.reference(img.float(), w_img.float(), eps, t_img)], 1)
    moved_gb = (proj.numel() + proj_txt.numel()) * proj.element_size() * 2 / 1e9
    out: dict[str, Any] = {"shape": [2, tokens + text, heads, dim], "dtype": str(dtype), "floor_gb_moved": round(moved_gb, 3),
                           "probe": qk_rope.probe(dev, dtype) or "passed"}
    for name, fn in (("unfused_compiled", compiled_unfused), ("fused_eager", fused), ("fused_in_compiled", compiled_fused)):
        ms = timed_ms(lambda fn=fn: fn(txt, img), reps)
        result = fn(txt, img)
        out[name] = {"ms": round(ms, 4), "tb_per_s": round(moved_gb / ms, 2), "rel_err_vs_fp32": rel(result, exact)}
    out["fused_vs_unfused_bitwise_equal_share"] = float((fused(txt, img) == unfused(txt, img)).float().mean())
    return out


def gelu_case(dev: torch.device, dtype: torch.dtype, tokens: int, hidden: int, reps: int) -> dict[str, Any]:
    g = torch.Generator(device=dev).manual_seed(1)
    x = (torch.randn(2, tokens, hidden, generator=g, device=dev) * 0.5).to(dtype)
    w = (torch.randn(4 * hidden, hidden, generator=g, device=dev) / hidden**0.5).to(dtype)
    b = (torch.randn(4 * hidden, generator=g, device=dev) * 0.1).to(dtype)

    def unfused(x: torch.Tensor) -> torch.Tensor:
        return F.gelu(F.linear(x, w, b), approximate="tanh")

    def fused(x: torch.Tensor) -> torch.Tensor:
        return linear_gelu_tanh(x, w, b)

    exact = F.gelu(F.linear(x.float(), w.float(), b.float()), approximate="tanh")
    flop = 2 * 2 * tokens * hidden * 4 * hidden
    out: dict[str, Any] = {"shape": [2 * tokens, hidden, 4 * hidden], "dtype": str(dtype)}
    plain = timed_ms(lambda: F.linear(x, w, b), reps)
    out["linear_alone"] = {"ms": round(plain, 4), "tflop_per_s": round(flop / plain / 1e9, 1)}
    for name, fn in (("unfused_compiled", torch.compile(unfused, dynamic=True, fullgraph=True)), ("unfused_eager", unfused),
                     ("fused_eager", fused), ("fused_in_compiled", torch.compile(fused, dynamic=True, fullgraph=True))):
        ms = timed_ms(lambda fn=fn: fn(x), reps)
        out[name] = {"ms": round(ms, 4), "tflop_per_s": round(flop / ms / 1e9, 1), "rel_err_vs_fp32": rel(fn(x), exact)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tiny", action="store_true", help="small shapes (CPU dry run)")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    R = C.Results(args.out / "fused_ops.json", 600)
    R.set("run", "versions", C.versions())
    dev = torch.device("cuda" if C.cuda() else "cpu")
    dtype = torch.bfloat16 if C.cuda() else torch.float32
    tokens, text, heads, hidden = (6889, 64, 24, 3072) if not args.tiny else (64, 8, 2, 256)
    R.set("qk_norm_rope", "result", qk_case(dev, dtype, tokens, text, heads, args.reps))
    R.set("linear_gelu", "result", gelu_case(dev, dtype, tokens, hidden, args.reps))
    print(R.data, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
