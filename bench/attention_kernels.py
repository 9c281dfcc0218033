"""The attention kernels on this machine at the Qwen-Image family's shapes: speed and error, one process.

    python bench/attention_kernels.py --out $OUT/attention.json        # GPU: ~1-2 min (flash-attn 4 JIT included)
    python bench/attention_kernels.py --tiny --out /tmp/attention.json # CPU dry run (SDPA math only)

Kernels: PyTorch SDPA as diffusers' "native" backend calls it (the default dispatch), SDPA forced to cuDNN and to
PyTorch's own flash kernel, and flash-attn 4 through our custom op (``qwen_core.speed.attention``) when it imports.
Shapes (non-causal, bf16, [B, S, H, D] as the transformers issue them): Qwen-Image 1328x1328 with 64 text tokens
and batched CFG (B=2, S=6889+64, 24 heads of 128), and Qwen-Image 2.1 1024x1024 (B=1, S=4096+64, its heads).
Per kernel: median of --reps timed calls after a warm-up, TFLOP/s (4*B*H*S*S*D FLOP), and the relative L2 error
against an fp32 SDPA reference on the same inputs (the first 2048 queries, to bound the reference's memory).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common as C  # noqa: E402

from qwen_core.speed import attention  # noqa: E402

SHAPES = {  # name -> (batch, sequence, heads, head dim)
    "qwen-image-1328-cfg2": (2, 6889 + 64, 24, 128),
    "qwen-image-2.1-1024": (1, 4096 + 64, 32, 128),
}
TINY_SHAPES = {"tiny": (2, 96, 2, 32)}


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _forced(backend: SDPBackend) -> Any:
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel([backend]):
            return _sdpa(q, k, v)

    return run


def kernels(tiny: bool) -> dict[str, Any]:
    found: dict[str, Any] = {"sdpa_default": _sdpa}
    if tiny or not C.cuda():
        return found
    found["sdpa_cudnn"] = _forced(SDPBackend.CUDNN_ATTENTION)
    found["sdpa_flash"] = _forced(SDPBackend.FLASH_ATTENTION)
    if not attention.status()[1]:
        found["flash4"] = attention.flash4_attention
    return found


def measure(name: str, fn: Any, shape: tuple[int, int, int, int], dev: torch.device, dtype: torch.dtype,
            reps: int) -> dict[str, Any]:
    b, s, h, d = shape
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, generator=g, device=dev, dtype=dtype) for _ in range(3))
    t0 = time.perf_counter()
    out = fn(q, k, v)
    C.sync()
    first_s = time.perf_counter() - t0
    timed = C.time_fn(lambda: fn(q, k, v), warmup=1, reps=reps)
    n = min(s, 2048)
    ref = _sdpa(q[:, :n].float(), k.float(), v.float())
    err = float((out[:, :n].float() - ref).norm() / ref.norm())
    flop = 4 * b * h * s * s * d
    return {"kernel": name, "shape": list(shape), "first_call_s": round(first_s, 2),
            "median_ms": round(timed["median_ms"], 3), "tflops": round(flop / timed["median_ms"] / 1e9, 1),
            "rel_err_vs_fp32": round(err, 5), "finite": bool(torch.isfinite(out).all())}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="JSON file for the results")
    p.add_argument("--tiny", action="store_true", help="scaled-down shapes, SDPA only (CPU dry run)")
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args(argv)
    dev = torch.device("cuda" if C.cuda() else "cpu")
    dtype = torch.bfloat16 if C.cuda() else torch.float32
    R = C.Results(args.out, budget_s=float("inf"))  # rewritten after every row: a killed run still reports
    R.set("run", "versions", C.versions())
    version, problem = attention.status()
    R.set("flash4", "status", {"version": version, "problem": problem})
    if not problem and C.cuda():
        R.set("flash4", "probe", attention.probe(str(dev), dtype) or "passed")
    for shape_name, shape in (TINY_SHAPES if args.tiny else SHAPES).items():
        for name, fn in kernels(args.tiny).items():
            try:
                R.set("rows", f"{shape_name}/{name}", measure(name, fn, shape, dev, dtype, args.reps))
            except Exception as err:  # noqa: BLE001 - a kernel that fails is a result, not the end of the run
                R.set("errors", f"{shape_name}/{name}", f"{type(err).__name__}: {err}"[:1000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
