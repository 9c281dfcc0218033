"""One-call GPU benchmark of the single-file paths: fp8 (ComfyUI's files) and GGUF, against our bf16 path.

    python bench/files_bench.py --out $OUT            # GPU machine, one run (<= 9 min with the default budget)
    python bench/files_bench.py --out $OUT --points 'bf16_ours_cap*,fp8_*_cap*,Q8_0_cap*'   # the capped points only
    python bench/files_bench.py --tiny --out /tmp/f   # CPU dry run of the same code, scaled-down transformer

What runs: the full-size Qwen-Image transformer with random weights (bench/fullsize.py), converted in memory to
what loading a file produces (no 20 GB files needed):
- bf16: our path (batched CFG forward) and diffusers' (two forwards per step), full VRAM;
- fp8: the block Linear layers as ``Fp8WeightLinear`` with per-matrix scales (= an fp8-scaled file), upcast per
  layer and with fp8 tensor-core products (``fp8_matmul``), full VRAM and streamed in a 16 GiB cap;
- GGUF Q8_0 (quantised for real, on the GPU) and Q4_K (valid blocks with random payload: speed and memory
  only, gguf-py has no Q4_K quantiser), as diffusers' ``GGUFLinear``, full VRAM and streamed in 12 and 16 GiB.
Per point: ms per step (one batched cond+uncond forward at --size, 64 text tokens; s/image = x50), peak GiB,
weights GiB, and the relative error of the output against the bf16 model (rel_err, as in bench/RESULTS.md).
Results go to OUT/files_results.json after every measurement.

A capped ("streamed") point is set up as the product does it on a card of that size: the model is on the host
when the engine places it (the loader loads to the CPU), the cap holds while the engine plans and allocates, and
the engine plans for the cap less --stream-margin-gib (as bench/speed.py; the loader plans with 0.9 of a free
VRAM reading that already excludes the CUDA context). The 2026-12-02 run did neither: it streamed the model
the conversion had just filled on the GPU (its resident blocks stayed in segments full of the conversion's
freed temporaries: 4.4 GiB reserved but free in the 12 GiB Q8_0 point, over the cap before the first
activation) and planned for the whole cap.
"""

from __future__ import annotations

import argparse
import fnmatch
import gc
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common as C  # noqa: E402
import fullsize  # noqa: E402

from qwen_core.sources.fp8_weights import Fp8WeightLinear, set_fp8_matmul  # noqa: E402
from qwen_core.sources.types import FP8_KEPT_IN  # noqa: E402
from qwen_core.streaming import enable_streamed_offload  # noqa: E402

STEPS = 50
E4M3 = torch.float8_e4m3fn


class _Pipe:
    """The parts of a pipeline the streamed engine needs (transformer only: these timings are per step)."""

    def __init__(self, transformer: nn.Module) -> None:
        self.transformer, self.text_encoder, self.vae = transformer, None, None


# ---- conversions (what loading an fp8 / GGUF file produces) -------------------------------------------
def _block_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    out = []
    for name, module in model.named_modules():
        if type(module) is nn.Linear and FP8_KEPT_IN.search(name + "."):
            parent_name, _, attr = name.rpartition(".")
            out.append((model.get_submodule(parent_name), attr, module))
    return out


@torch.no_grad()
def to_fp8(model: nn.Module) -> int:
    """Block Linear layers -> Fp8WeightLinear with one fp32 scale per matrix (ComfyUI's scaled fp8)."""
    layers = _block_linears(model)
    for parent, attr, lin in layers:
        w = lin.weight.float()
        scale = w.abs().amax().clamp(min=1e-12) / 448.0
        q = (w / scale).to(E4M3)
        del w
        setattr(parent, attr, Fp8WeightLinear(q, scale, lin.bias.detach() if lin.bias is not None else None))
    return len(layers)


@torch.no_grad()
def q8_0_bytes(w: torch.Tensor) -> torch.Tensor:
    """GGML Q8_0 of a 2-D weight: per 32 values an fp16 scale (amax/127) and 32 int8, as uint8 rows."""
    rows, cols = w.shape
    blocks = w.float().reshape(rows, cols // 32, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127.0
    q = torch.where(d > 0, blocks / d, torch.zeros_like(blocks)).round().clamp(-127, 127).to(torch.int8)
    out = torch.cat([d.to(torch.float16).view(torch.uint8), q.view(torch.uint8)], dim=-1)  # 2 + 32 bytes
    return out.reshape(rows, -1).contiguous()


@torch.no_grad()
def q4_k_bytes(w: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Valid Q4_K blocks (144 bytes per 256 values: fp16 d and dmin, 12 bytes of 6-bit scales, 128 of nibbles)
    with a random payload: same bytes, same dequantisation work as a real file; the values are not w's."""
    rows, cols = w.shape
    n = rows * cols // 256
    raw = torch.randint(0, 256, (n, 144), dtype=torch.uint8, device=w.device, generator=gen)
    head = torch.tensor([0.0002, 0.00005], dtype=torch.float16, device=w.device).view(torch.uint8)
    raw[:, :4] = head  # small finite d / dmin: dequantised values stay O(0.1)
    return raw.reshape(rows, -1).contiguous()


@torch.no_grad()
def to_gguf(model: nn.Module, qtype: str, dtype: torch.dtype) -> int:
    """Block Linear layers -> diffusers' GGUFLinear holding GGUFParameter blocks (what a GGUF file loads as)."""
    import gguf
    from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter

    kind = gguf.GGMLQuantizationType[qtype]
    block = gguf.GGML_QUANT_SIZES[kind][0]
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    # As in a GGUF file: a matrix whose rows are not whole blocks stays dense (never in the full-size model).
    layers = [(p, a, lin) for p, a, lin in _block_linears(model) if lin.in_features % block == 0]
    for parent, attr, lin in layers:
        data = q8_0_bytes(lin.weight) if qtype == "Q8_0" else q4_k_bytes(lin.weight, gen)
        new = GGUFLinear(lin.in_features, lin.out_features, lin.bias is not None, compute_dtype=dtype, device="meta")
        new.weight = GGUFParameter(data, quant_type=kind)
        new.bias = lin.bias
        setattr(parent, attr, new)
    return len(layers)


# ---- measurement ----------------------------------------------------------------------------------------
def inputs(model: nn.Module, size: int, tokens: int, dev: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    cfg, side = model.config, size // 16
    g = torch.Generator(device=dev).manual_seed(0)
    hs = torch.randn(2, side * side, cfg.in_channels, generator=g, device=dev, dtype=dtype)
    e = torch.randn(2, tokens, cfg.joint_attention_dim, generator=g, device=dev, dtype=dtype)
    return {"hidden_states": hs, "encoder_hidden_states": e, "encoder_hidden_states_mask": None,
            "timestep": torch.full((2,), 0.5, device=dev, dtype=dtype), "img_shapes": [[(1, side, side)]] * 2,
            "return_dict": False}


def forward(model: nn.Module, kw: dict[str, Any], *, unbatched: bool = False) -> torch.Tensor:
    with torch.no_grad():
        if not unbatched:
            return model(**kw)[0]
        halves = [{k: (v[i:i + 1] if torch.is_tensor(v) and v.ndim and k != "timestep" else v) for k, v in kw.items()}
                  for i in (0, 1)]
        for h in halves:
            h["timestep"], h["img_shapes"] = kw["timestep"][:1], kw["img_shapes"][:1]
        return torch.cat([model(**h)[0] for h in halves])


def weights_gib(model: nn.Module) -> float:
    return round(sum(p.numel() * p.element_size() for p in model.parameters()) / C.GIB, 3)


def wanted(args: Any, *keys: str) -> bool:
    """Whether --points selects any of ``keys`` (comma-separated shell patterns; default: every point)."""
    patterns = [p.strip() for p in args.points.split(",") if p.strip()]
    return any(fnmatch.fnmatchcase(k, p) for k in keys for p in patterns)


def _stream(model: nn.Module, dev: torch.device, cap: float, args: Any) -> Any:
    """The streamed engine on ``model`` (on the host) as the product sets it up for a card of ``cap`` GiB."""
    budget = max(cap - args.stream_margin_gib, 1e-4) if C.cuda() else 1e-4  # CPU dry run: stream every block
    return enable_streamed_offload(_Pipe(model), dev, budget_gib=budget, max_pixels=args.size ** 2,
                                   cfg_batching=False)


def measure(R: C.Results, key: str, model: nn.Module, kw: dict[str, Any], ref: torch.Tensor | None, args: Any,
            *, cap: float | None = None, unbatched: bool = False) -> None:
    if not wanted(args, key):
        return
    if R.left() < 25:
        R.set("skipped", key, "time budget")
        return
    dev, handle = kw["hidden_states"].device, None
    try:
        if cap is not None:
            model.to("cpu")  # the engine places the blocks itself, into a clean heap (the loader loads to the CPU)
        with C.memory_cap(cap if C.cuda() else None):
            placed: dict[str, Any] = {}
            if cap is not None:
                handle = _stream(model, dev, cap, args)
                placed = {"plan": handle.plan.summary(), "budget_gib": handle.plan.budget_gib,
                          "allocated_after_enable_gib": C.allocated_gib(), "reserved_after_enable_gib": C.reserved_gib()}
            C.reset_peak()
            r = C.time_fn(lambda: forward(model, kw, unbatched=unbatched), reps=args.reps)
            out = forward(model, kw, unbatched=unbatched)
            r.update(peak_gib=C.peak_gib(), reserved_gib=C.reserved_gib(),
                     s_per_image=round(r["median_ms"] * STEPS / 1e3, 2),
                     rel_err_vs_bf16=C.rel_err(out.float().cpu(), ref) if ref is not None else None, **placed)
        R.set("points", key, r)
    except Exception as err:  # noqa: BLE001 - one failed point must not end the run
        R.set("points", key, {"oom": C.is_oom(err), "error": f"{type(err).__name__}: {str(err)[:400]}",
                              **({"plan": handle.plan.summary()} if handle is not None else {})})
    finally:
        if handle is not None:
            handle.disable(restore_device=dev)  # outside the cap: the whole model goes back to the device
        elif cap is not None:
            model.to(dev)
        C.reset_peak()


def fresh(args: Any, dev: torch.device, dtype: torch.dtype) -> nn.Module:
    gc.collect()
    C.reset_peak()
    overrides = fullsize.TINY_OVERRIDES["transformer"] if args.tiny else None
    return fullsize.build_transformer(dev, dtype, overrides=overrides, seed=0)


def run(args: Any) -> None:
    dev = torch.device("cuda" if C.cuda() else "cpu")
    dtype = torch.bfloat16 if C.cuda() else torch.float32
    R = C.Results(args.out / "files_results.json", args.budget_s)
    R.set("run", "command", " ".join(sys.argv))
    R.set("run", "versions", C.versions())
    caps = [float(c) for c in args.caps.split(",") if c]
    model = fresh(args, dev, dtype)
    kw = inputs(model, args.size, args.text_tokens, dev, dtype)
    ref = forward(model, kw).float().cpu()
    R.set("weights_gib", "bf16", weights_gib(model))
    measure(R, "bf16_ours_full", model, kw, None, args)
    measure(R, "bf16_diffusers_two_forwards_full", model, kw, ref, args, unbatched=True)
    measure(R, f"bf16_ours_cap{caps[-1]:g}", model, kw, ref, args, cap=caps[-1])  # the same run's control
    cap = f"cap{caps[-1]:g}"
    if wanted(args, *(f"fp8_{kind}_{where}" for kind in ("upcast", "matmul") for where in ("full", cap))):
        R.set("convert_s", "fp8", _timed(lambda m=model: to_fp8(m)))
        R.set("weights_gib", "fp8", weights_gib(model))
        measure(R, "fp8_upcast_full", model, kw, ref, args)
        measure(R, f"fp8_upcast_{cap}", model, kw, ref, args, cap=caps[-1])
        if set_fp8_matmul(model, True):
            measure(R, "fp8_matmul_full", model, kw, ref, args)
            measure(R, f"fp8_matmul_{cap}", model, kw, ref, args, cap=caps[-1])
    del model
    for qtype in ("Q8_0", "Q4_K"):
        if not wanted(args, f"{qtype}_full", *(f"{qtype}_cap{c:g}" for c in caps)):
            continue
        if R.left() < 60:
            R.set("skipped", qtype, "time budget")
            continue
        model = fresh(args, dev, dtype)
        R.set("convert_s", qtype, _timed(lambda m=model, q=qtype: to_gguf(m, q, dtype)))
        R.set("weights_gib", qtype, weights_gib(model))
        measure(R, f"{qtype}_full", model, kw, ref if qtype == "Q8_0" else None, args)
        for cap in caps:
            measure(R, f"{qtype}_cap{cap:g}", model, kw, ref if qtype == "Q8_0" else None, args, cap=cap)
        del model


def _timed(fn: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    count = fn()
    C.sync()
    return {"layers": count, "seconds": round(time.perf_counter() - t0, 1)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="scaled-down transformer on the CPU (dry run)")
    p.add_argument("--out", type=Path, required=True, help="folder for files_results.json")
    p.add_argument("--budget-s", type=float, default=520.0, help="stop starting measurements after this")
    p.add_argument("--size", type=int, default=1328)
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--caps", default="12,16", help="memory caps (GiB) for the streamed points; fp8 uses the last")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--points", default="*",
                   help="comma-separated shell patterns of the points to run, e.g. 'fp8_*_cap*,Q8_0_cap*' "
                        "(the bf16 reference output is always computed)")
    p.add_argument("--stream-margin-gib", type=float, default=2.0,
                   help="the streamed engine plans for the cap less this (CUDA context + allocator slack of a "
                        "real card, as bench/speed.py)")
    args = p.parse_args(argv)
    if args.tiny:
        args.size, args.text_tokens, args.reps = min(args.size, 128), min(args.text_tokens, 16), 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run(args)
    print(f"results: {args.out / 'files_results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

