"""Shared helpers of the GPU benchmarks: timing, peak memory, memory caps, incremental JSON results.

Everything degrades to the CPU (perf_counter timing, no memory readings) so the scripts can be dry-run with
``--tiny`` on a machine without a GPU before any device time is spent.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

GIB = 1024**3


def cuda() -> bool:
    return torch.cuda.is_available()


def sync() -> None:
    if cuda():
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], Any], *, warmup: int = 1, reps: int = 3) -> dict[str, Any]:
    """Median and all times (ms) of ``fn``; device work is synchronised before each clock read."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    ordered = sorted(times)
    return {"median_ms": ordered[len(ordered) // 2], "min_ms": ordered[0], "times_ms": [round(t, 2) for t in times]}


def reset_peak() -> None:
    gc.collect()
    if cuda():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / GIB if cuda() else None


def allocated_gib() -> float | None:
    return torch.cuda.memory_allocated() / GIB if cuda() else None


def reserved_gib() -> float | None:
    return torch.cuda.memory_reserved() / GIB if cuda() else None


@contextmanager
def memory_cap(cap_gib: float | None) -> Iterator[None]:
    """Emulate a smaller card: the caching allocator may hold at most ``cap_gib`` (the CUDA context is extra).

    Cached-but-free blocks count against the cap, so the cache is emptied first.
    """
    if cap_gib is None or not cuda():
        yield
        return
    total = torch.cuda.get_device_properties(0).total_memory
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GIB / total))
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        gc.collect()
        torch.cuda.empty_cache()


def empty_host_cache() -> str | None:
    """Release cached pinned host blocks (the name of this private hook moved between torch versions)."""
    for name in ("_accelerator_emptyHostCache", "_host_emptyCache", "_cuda_hostEmptyCache"):
        fn = getattr(torch._C, name, None)
        if fn is not None and cuda():
            fn()
            return name
    return None


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def versions() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("diffusers", "transformers", "accelerate", "huggingface_hub"):
        try:
            info[name] = __import__(name).__version__
        except Exception as err:  # noqa: BLE001 - a report, not control flow
            info[name] = f"unavailable ({type(err).__name__})"
    if cuda():
        p = torch.cuda.get_device_properties(0)
        info.update(card=p.name, vram_gib=round(p.total_memory / GIB, 2), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), sm=f"{p.major}.{p.minor}")
    else:
        info["card"] = "cpu"
    return info


class Results:
    """A JSON document rewritten after every update, so a run killed at its time limit still reports."""

    def __init__(self, path: Path, budget_s: float) -> None:
        self.path = path
        self.t0 = time.monotonic()
        self.budget_s = budget_s
        self.data: dict[str, Any] = {"started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        path.parent.mkdir(parents=True, exist_ok=True)
        self.flush()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def set(self, section: str, key: str, value: Any) -> None:
        self.data.setdefault(section, {})[key] = value
        self.flush()
        print(f"[{self.elapsed():6.1f}s] {section}.{key} = {json.dumps(value, default=str)[:300]}", flush=True)

    def flush(self) -> None:
        self.data["elapsed_s"] = round(self.elapsed(), 1)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


def cover_fit(points: list[tuple[float, float]]) -> dict[str, float]:
    """Least-squares line through (megapixels, GiB) points, raised until it covers every point: a memory model
    entry must never predict less than was measured."""
    n = len(points)
    mx, my = sum(p[0] for p in points) / n, sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    slope = sum((p[0] - mx) * (p[1] - my) for p in points) / sxx
    icpt = my - slope * mx
    worst = max(p[1] - (icpt + slope * p[0]) for p in points)
    return {"intercept_gib": round(icpt + max(0.0, worst), 4), "gib_per_mpix": round(slope, 4),
            "max_residual_gib": round(worst, 4)}


def rel_err(a: torch.Tensor, b: Any) -> float:
    """||a - b|| / ||b|| in float32 (the numerics tables of bench/RESULTS.md)."""
    a, b = a.detach().float(), torch.as_tensor(b).detach().float().to(a.device)
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def compile_blocks(transformer: torch.nn.Module, *, fullgraph: bool = True, **kwargs: Any) -> None:
    """Regional compilation that leaves module hooks outside the graph: each block's ``forward`` is compiled,
    not its ``__call__`` (diffusers' ``compile_repeated_blocks`` compiles ``__call__``, which would pull the
    streaming engine's stream/event hooks into the graph). All blocks share one compiled code object."""
    for block in transformer.transformer_blocks:
        if "forward" not in block.__dict__:
            block.forward = torch.compile(block.forward, fullgraph=fullgraph, **kwargs)


def uncompile_blocks(transformer: torch.nn.Module) -> None:
    for block in transformer.transformer_blocks:
        block.__dict__.pop("forward", None)
