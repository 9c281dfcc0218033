"""Several GPUs (issue 16): one image on N cards (diffusers' context parallelism) against one card, and the
components placed across cards, on the full-size Qwen-Image architecture with random weights.

    python bench/multigpu.py --out $OUT                     # H200 x2 / x4: every degree up to the cards seen
    python bench/multigpu.py --out $OUT --degrees 2,4 --ring --compiled
    python bench/multigpu.py --tiny --out /tmp/mg           # CPU dry run: gloo, scaled-down model, 2 processes

Rows, each in fresh processes (a row that would not fit the rest of --budget-s is recorded as skipped):

- ``single-eager``: one card, our product path (PipelineLoader + QwenImageGenerator, batched CFG) with compile
  off: the comparator of the context-parallel rows, which run eager (qwen_core/parallel/run.py says why);
- ``single-compiled`` (--compiled): the same with compile on, the best one-card time (warm-up compiles);
- ``cp<N>-ulysses`` / ``cp<N>-ring`` (--ring): ``torch.distributed.run`` starts N processes, each runs
  ``qwen_core.parallel.run.parallel_session`` on its card, rank 0 reports;
- ``placed-te``: one process, text encoder on the second card (gpu mode);
- ``placed-split``: one process, the transformer's blocks split over two cards, the text encoder on the second.

Each row: a 2-step warm-up image at the same size, then one timed image (text encodes + --steps steps + decode;
wall clock, devices synchronised), ms per step, peak allocated GiB per card, and ||image - single|| / ||single||.
Scaling: speedup = t(single-eager) / t(row); for the context-parallel rows efficiency = speedup / cards. NVLink multicast stays off in every
process (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1: the lent machines
require it). Output: OUT/multigpu.json, OUT/<row>.log, OUT/<row>.pt (images), and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common as C  # noqa: E402
import fullsize  # noqa: E402

STEPS = 50
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(NO_MULTICAST)  # before anything can start NCCL, here and in every child (they inherit it)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="scaled-down model, CPU + gloo (dry run)")
    p.add_argument("--out", type=Path, required=True, help="folder for multigpu.json, logs and images")
    p.add_argument("--budget-s", type=float, default=560.0, help="start no row after this")
    p.add_argument("--size", type=int, default=1328)
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--degrees", default="", help="context-parallel degrees, e.g. 2,4 (default: 2..cards seen)")
    p.add_argument("--ring", action="store_true", help="also ring attention rows (cuDNN attention)")
    p.add_argument("--compiled", action="store_true", help="also the compiled one-card row")
    p.add_argument("--no-placed", action="store_true", help="skip the placement rows")
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--neg-tokens", type=int, default=12)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        args.size, args.steps = min(args.size, 64), min(args.steps, 3)
        args.text_tokens, args.neg_tokens = min(args.text_tokens, 12), min(args.neg_tokens, 5)
    return args


# ---- one row, in its own process(es) -------------------------------------------------------------------------
def _placement(row: str, tiny: bool) -> Any:
    from qwen_core.placement.spec import Placement

    if row == "placed-te":
        return Placement(("cpu",), "cpu") if tiny else Placement(("cuda:0",), "cuda:1")
    if row == "placed-split":  # in tiny mode every device is the CPU: the same hooks and moves run
        return Placement(("cpu", "cpu"), "cpu") if tiny else Placement(("cuda:0", "cuda:1"), "cuda:1")
    return "single"


def _build(args: argparse.Namespace, device: str) -> Any:
    dtype = torch.float32 if args.tiny else torch.bfloat16
    te_device = "cuda:1" if args.worker.startswith("placed") and not args.tiny else None
    pipe = fullsize.build_pipeline(device, dtype, tiny=args.tiny, text_encoder_device=te_device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _timed_image(generator: Any, args: argparse.Namespace, prompt: str, neg: str, cards: list[str]) -> dict[str, Any]:
    """A 2-step warm-up, then one timed image; peaks on ``cards`` only (touching another card would give this
    process a CUDA context there)."""
    request = dict(width=args.size, height=args.size, true_cfg_scale=4.0, seed=0)
    cards = [c for c in cards if c.startswith("cuda")]
    generator.generate(prompt, neg, steps=2, **request)  # warm-up: kernels, cuDNN plans, allocator
    for card in cards:
        torch.cuda.synchronize(card)
        torch.cuda.reset_peak_memory_stats(card)
    t0 = time.perf_counter()
    result = generator.generate(prompt, neg, steps=args.steps, **request)
    for card in cards:
        torch.cuda.synchronize(card)
    wall = time.perf_counter() - t0
    return {"wall_s": round(wall, 3), "per_step_s": round(result.timings["per_step_s"], 4),
            "timings": {k: round(v, 3) for k, v in result.timings.items()},
            "peak_gib": {c: round(torch.cuda.max_memory_allocated(c) / C.GIB, 2) for c in cards},
            "finite": bool(torch.isfinite(result.images).all()), "images": result.images}


def worker_main(args: argparse.Namespace) -> int:
    """One row: build, load through our loader, (context parallel), warm-up, one timed image; rank 0 writes."""
    from in_memory import in_memory_loader
    from sections import make_prompt

    from qwen_core.generator import QwenImageGenerator

    row, started = args.worker, time.perf_counter()
    info: dict[str, Any] = {"row": row, "multicast_env": {k: os.environ.get(k) for k in NO_MULTICAST}}
    if row.startswith("cp"):
        from qwen_core.parallel.context import process_device
        from qwen_core.parallel.run import parallel_session
        from qwen_core.parallel.settings import ContextParallelSettings, distributed_env

        env = distributed_env()
        device = "cpu" if args.tiny else process_device(env)
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        settings = ContextParallelSettings.parse(env.world_size, row.split("-", 1)[1])
        pipe = _build(args, device)
        loader = in_memory_loader(pipe, name=row, device=device, memory_mode="gpu", compile="off")
        with parallel_session(loader, settings, env=env, device=device) as session:
            prompt, neg = make_prompt(pipe, args.text_tokens), make_prompt(pipe, args.neg_tokens)
            info.update(_timed_image(session.generator, args, prompt, neg, [device]), cards=env.world_size,
                        parallel=session.handle.describe(), process_group=session.backend)
            writer = session.is_writer
    else:
        device = "cpu" if args.tiny else "cuda:0"
        pipe = _build(args, device)
        compile_ = "on" if row == "single-compiled" else "off"
        loader = in_memory_loader(pipe, name=row, device=device, memory_mode="gpu", compile=compile_,
                                  placement=_placement(row, args.tiny))
        generator = QwenImageGenerator(loader)
        prompt, neg = make_prompt(pipe, args.text_tokens), make_prompt(pipe, args.neg_tokens)
        info.update(_timed_image(generator, args, prompt, neg, list(loader.devices.devices())),
                    placement=loader.placement,
                    cards=len(loader.devices.cuda_devices()) or 1)
        writer = True
    if writer:
        torch.save(info.pop("images").cpu(), args.out / f"{row}.pt")
        info["process_s"] = round(time.perf_counter() - started, 1)
        (args.out / f"{row}.json").write_text(json.dumps(info, indent=1, default=str))
    return 0


# ---- the orchestrator -----------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def row_command(args: argparse.Namespace, row: str, procs: int) -> list[str]:
    script = [str(Path(__file__).resolve()), "--worker", row, "--out", str(args.out), "--size", str(args.size),
              "--steps", str(args.steps), "--text-tokens", str(args.text_tokens), "--neg-tokens",
              str(args.neg_tokens)] + (["--tiny"] if args.tiny else [])
    if procs == 1:
        return [sys.executable, *script]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={procs}", "--master-addr=127.0.0.1",
            f"--master-port={_free_port()}", *script]


def plan_rows(args: argparse.Namespace, cards: int) -> list[tuple[str, int]]:
    """(row, processes) in the order they run."""
    rows = [("single-eager", 1)] + ([("single-compiled", 1)] if args.compiled else [])
    degrees = [int(d) for d in args.degrees.split(",") if d.strip()] or list(range(2, max(cards, 2 if args.tiny else 0) + 1))
    for n in degrees:
        rows.append((f"cp{n}-ulysses", n))
        if args.ring:
            rows.append((f"cp{n}-ring", n))
    if not args.no_placed and (args.tiny or cards >= 2):
        rows += [("placed-te", 1), ("placed-split", 1)]
    return rows


def run_row(args: argparse.Namespace, row: str, procs: int, limit_s: float) -> dict[str, Any]:
    log = args.out / f"{row}.log"
    t0 = time.perf_counter()
    with log.open("w") as sink:
        proc = subprocess.Popen(row_command(args, row, procs), stdout=sink, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        try:
            rc: Any = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            proc.kill()  # torchrun's agent takes its workers down with it
            proc.wait()
            rc = "timeout"
    out = args.out / f"{row}.json"
    result = json.loads(out.read_text()) if out.is_file() else {}
    result.update(rc=rc, processes=procs, row_wall_s=round(time.perf_counter() - t0, 1))
    if rc != 0:
        result["log_tail"] = log.read_text(errors="replace")[-3000:]
    return result


def summarise(rows: dict[str, dict[str, Any]], out: Path) -> list[dict[str, Any]]:
    """Speedup and efficiency against single-eager, and each image's relative error against it."""
    base = rows.get("single-eager", {})
    base_s = base.get("wall_s")
    base_img = torch.load(out / "single-eager.pt") if (out / "single-eager.pt").is_file() else None
    table = []
    for name, r in rows.items():
        entry = {"row": name, "cards": r.get("cards", r.get("processes")), "rc": r.get("rc"),
                 "wall_s": r.get("wall_s"), "per_step_s": r.get("per_step_s"), "peak_gib": r.get("peak_gib")}
        if base_s and r.get("wall_s"):
            speedup = base_s / r["wall_s"]
            entry["speedup"] = round(speedup, 3)
            if name.startswith("cp"):  # placement fits a model; it is not meant to be faster
                entry["efficiency"] = round(speedup / max(entry["cards"] or 1, 1), 3)
        if base_img is not None and (out / f"{name}.pt").is_file() and name != "single-eager":
            entry["rel_err"] = C.rel_err(torch.load(out / f"{name}.pt"), base_img)
        table.append(entry)
    return table


def markdown(table: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [f"| row | cards | s per image ({args.size}², {args.steps} steps) | ms/step | speedup | efficiency | "
             "rel. err vs single | peak GiB per card |", "|---|---|---|---|---|---|---|---|"]
    for e in table:
        if e.get("wall_s") is None:
            lines.append(f"| {e['row']} | {e['cards']} | failed ({e['rc']}) | | | | | |")
            continue
        rel = f"{e['rel_err']:.2e}" if "rel_err" in e else ""
        peaks = ", ".join(f"{k} {v}" for k, v in (e.get("peak_gib") or {}).items())
        lines.append(f"| {e['row']} | {e['cards']} | {e['wall_s']:.2f} | {e['per_step_s'] * 1e3:.0f} | "
                     f"{e.get('speedup', '')} | {e.get('efficiency', '')} | {rel} | {peaks} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.worker:
        return worker_main(args)
    R = C.Results(args.out / "multigpu.json", args.budget_s)
    R.set("run", "command", " ".join(sys.argv))
    R.set("run", "versions", C.versions())
    R.set("run", "multicast_env", {k: os.environ.get(k) for k in NO_MULTICAST})
    cards = torch.cuda.device_count() if C.cuda() else 0
    if not args.tiny and cards < 2:
        R.set("run", "note", f"{cards} CUDA card(s): only the one-card row can run")
    rows: dict[str, dict[str, Any]] = {}
    per_row = 240.0 if args.tiny else 420.0
    for row, procs in plan_rows(args, cards):
        if not args.tiny and procs > max(cards, 1):
            R.set("skipped", row, f"needs {procs} cards, {cards} visible")
            continue
        if R.left() < 30:
            R.set("skipped", row, f"only {R.left():.0f} s of the budget left")
            continue
        rows[row] = run_row(args, row, procs, min(per_row, R.left()))
        R.set("rows", row, rows[row])
    table = summarise(rows, args.out)
    R.set("summary", "table", table)
    print(markdown(table, args))
    return 0 if all(r.get("rc") == 0 for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
