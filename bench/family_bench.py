"""Every Qwen-Image family at full size with random weights, one GPU call per group of families.

    python bench/family_bench.py --group qwen-image --out $OUT   # Qwen-Image, Edit, Edit-2509 (1 and 3 images), 2511
    python bench/family_bench.py --group layered --out $OUT      # Layered (its own 20B transformer)
    python bench/family_bench.py --group 2.1 --out $OUT          # 2.1 (t2i and 1 condition image), 2.1 Turbo
    python bench/family_bench.py --tiny --group all --out /tmp/b # CPU dry run of the same code, scaled down

Parts (``--parts``, default ``full,governor,streamed``), per case at the model card's default size (Qwen-Image
1328x1328, Edit 1024x1024, Layered 640 bucket with 4 layers, 2.1 1024x1024) and its CFG (4; 2.1: 1):
- ``full``: plain diffusers ("as-is": the pipeline on the GPU, two forwards per CFG step) vs our ``gpu`` path
  (``in_memory_loader`` + ``QwenImageGenerator``: batched CFG where the family supports it), on the full card.
  Timings: a 2-step warm-up, then ``--steps`` steps timed by the step callback (median step), with the model card's
  step count extrapolated as text encoding + steps x median + decode.
- ``governor``: our ``gpu`` path in a cap where the memory bound lands at a few megapixels (80 GiB for the 20 B
  families, an H100 80GB's size; 40 GiB for 2.1), eager: asked for 8192x8192, the size the governor picks (the
  case's references counted) must run without OOM, and 1.15x its area (Layered: the next resolution bucket) should
  not fit (the bound is within 15% of the largest size that fits; a probe that fits leaves it not shown).
  ``--probe-ladder N`` then tries up to N larger probes, each ``--ladder-area`` (1.15) times the last one's area,
  until one fails: the largest size that ran and the first that failed bracket the largest size that fits.
- ``streamed``: our ``streamed`` path in a 16 GiB cap (allocator cap + the VRAM the loader/governor see, as
  bench/product.py does); ``streamed-governor`` adds the same governor check there (slow: the streamed bound is
  ~20 MP for Qwen-Image, minutes of compute per family).
- ``memory``: the group's memory model measured first (bench/family_memory.py; not Layered, whose model is
  Qwen-Image's), written to OUT/memory_model.json (the committed model with that family replaced) and read by the
  rest of the run.

Results go to OUT/results.json after every measurement (a run stopped at its limit still reports) and a
markdown table to OUT/rows.md for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common as C  # noqa: E402
import family_memory  # noqa: E402
import fullsize_families as FF  # noqa: E402
from in_memory import in_memory_loader  # noqa: E402

from qwen_core import family_call, memory_model, reference_images  # noqa: E402
from qwen_core.errors import QwenError  # noqa: E402
from qwen_core.families import FAMILIES, ModelFamily  # noqa: E402
from qwen_core.generator import QwenImageGenerator  # noqa: E402
from qwen_core.memory import get_residency_manager  # noqa: E402
from qwen_core.streaming import disable_streamed_offload  # noqa: E402

CASES = {  # group -> (family key, reference images)
    "qwen-image": [("qwen-image", 0), ("qwen-image-edit", 1), ("qwen-image-edit-2509", 1),
                   ("qwen-image-edit-2509", 3), ("qwen-image-edit-2511", 3)],
    "layered": [("qwen-image-layered", 1)],
    "2.1": [("qwen-image-2.1", 0), ("qwen-image-2.1", 1), ("qwen-image-2.1-turbo", 0)],
}  # fmt: skip
CAP_GIB = 16.0
# memory model key -> the cap of the governor check in the gpu mode: its bound lands at a few MP there
GOVERNOR_CAP_GIB = {"qwen-image": 80.0, "qwen-image-2.1": 40.0}
GOVERNOR_REQUEST = (8192, 8192)  # larger than any window: the governor must choose
PROBE_AREA = 1.15  # the probe past the governor's size: where it fits too, "within 15%" is not shown
# memory model key -> budget one more ladder probe needs (two steps and the decode past the governor's size)
LADDER_PROBE_S = {"qwen-image": 75.0, "qwen-image-2.1": 30.0}
PARTS = ("memory", "full", "governor", "streamed", "streamed-governor")
PROMPT_WORDS = ("a watercolor fox in a snowy forest at dawn, soft light, fine detail, ") * 6  # ~64 tokens


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--group", choices=[*CASES, "all"], required=True, help="families to build and measure")
    p.add_argument("--out", type=Path, required=True, help="folder for results.json and rows.md")
    p.add_argument("--tiny", action="store_true", help="scaled-down models and sizes (CPU dry run)")
    p.add_argument("--steps", type=int, default=4, help="timed denoising steps per run (2 with --tiny)")
    p.add_argument("--budget-s", type=float, default=560.0, help="stop starting cases after this")
    p.add_argument("--parts", default="full,governor,streamed",
                   help=f"comma-separated parts to run, of {', '.join(PARTS)} (see above)")
    p.add_argument("--probe-ladder", type=int, default=0, metavar="N",
                   help="governor: where the 1.15x probe fits, up to N more probes, 1.15x larger each, until one "
                        "fails (brackets the largest size that fits)")
    p.add_argument("--no-probe", action="store_true",
                   help="governor: run the governor's size only (no probe past it; when time is short)")
    p.add_argument("--ladder-area", type=float, default=PROBE_AREA, metavar="X",
                   help="area factor between ladder probes (smaller: a finer bracket, more probes)")
    p.add_argument("--cases", default="",
                   help="comma-separated family keys of the group to run, or one case as key[images] (default: all)")
    args = p.parse_args(argv)
    if args.tiny:
        args.steps = min(args.steps, 2)
    args.parts = {part.strip() for part in args.parts.split(",") if part.strip()}
    if not args.parts or args.parts - set(PARTS):
        p.error(f"--parts: {sorted(args.parts - set(PARTS)) or 'nothing'} is not a part; parts: {', '.join(PARTS)}")
    args.cases = {c.strip() for c in args.cases.split(",") if c.strip()}
    known = {name for group in CASES.values() for key, n in group for name in (key, f"{key}[{n}]")}
    if args.cases - known:
        p.error(f"--cases: unknown {sorted(args.cases - known)}; known: {sorted(known)}")
    return args


def _refs(n: int, tiny: bool) -> list[torch.Tensor]:
    """n ComfyUI IMAGEs of a typical photo size (the pipelines resize them to ~1 MP anyway)."""
    h, w = (48, 64) if tiny else (768, 1024)
    g = torch.Generator().manual_seed(7)
    return [torch.rand(1, h, w, 3, generator=g) for _ in range(n)]


def _size(family: ModelFamily, tiny: bool) -> tuple[int, int]:
    if tiny and not family_call.is_layered(family):
        return 64, 64
    return family.default_width, family.default_height


def _timed_step_ms(marks: list[float]) -> float | None:
    steps = sorted((b - a) * 1e3 for a, b in zip(marks, marks[1:], strict=False))
    return round(steps[len(steps) // 2], 1) if steps else None


def _estimate(family: ModelFamily, wall: float, marks: list[float], steps: int, t0: float) -> dict[str, Any]:
    """Seconds per image at the model card's step count: before the first step + steps x median + after the last."""
    median = _timed_step_ms(marks)
    if median is None or not marks:
        return {}
    head, tail = marks[0] - t0 - median / 1e3, t0 + wall - marks[-1]
    return {"est_s_per_image": round(head + family.default_steps * median / 1e3 + tail, 2),
            "est_steps": family.default_steps, "text_encoder_and_first_step_s": round(marks[0] - t0, 3),
            "decode_s": round(tail, 3)}  # fmt: skip


def run_diffusers(pipe: Any, family: ModelFamily, refs: list[Any], size: tuple[int, int], steps: int) -> dict[str, Any]:
    """The pipeline as diffusers ships it: on the device, no wrapper of ours."""
    images = reference_images.prepare(refs, family)
    layered = family_call.is_layered(family)
    kwargs = family_call.call_kwargs(family, images, width=size[0], height=size[1], layers=family.default_layers,
                                     resolution=family.default_width if layered else None)  # fmt: skip
    cfg = family.default_true_cfg_scale
    kwargs.update(prompt=PROMPT_WORDS, true_cfg_scale=cfg, negative_prompt=" " if cfg > 1 else None, output_type="pt")
    marks: list[float] = []

    def mark(p: Any, i: int, t: Any, kw: dict[str, Any]) -> dict[str, Any]:
        C.sync()
        marks.append(time.perf_counter())
        return {}

    pipe(**kwargs, num_inference_steps=2, generator=torch.Generator(pipe.device).manual_seed(0))  # warm-up
    marks.clear()
    C.reset_peak()
    t0 = time.perf_counter()
    out = pipe(**kwargs, num_inference_steps=steps, callback_on_step_end=mark,
               generator=torch.Generator(pipe.device).manual_seed(0)).images
    C.sync()
    wall = time.perf_counter() - t0
    img = family_call.output_images(out)
    return {"wall_s": round(wall, 3), "steps": len(marks), "median_step_ms": _timed_step_ms(marks),
            "peak_gib": C.peak_gib(), "shape": list(img.shape), "finite": bool(torch.isfinite(img).all()),
            **_estimate(family, wall, marks, len(marks), t0)}  # fmt: skip


def run_ours(gen: QwenImageGenerator, refs: list[Any], size: tuple[int, int], steps: int) -> dict[str, Any]:
    family = gen.loader.family
    marks: list[float] = []
    kw = dict(images=refs, width=size[0], height=size[1], seed=0)
    gen.generate(PROMPT_WORDS, steps=2, **kw)  # warm-up (and the load/placement); 2: the min for shift_terminal
    C.reset_peak()
    t0 = time.perf_counter()
    result = gen.generate(PROMPT_WORDS, steps=steps, on_step=lambda i, n, eta: (C.sync(), marks.append(time.perf_counter())),
                          **kw)  # fmt: skip
    C.sync()
    wall = time.perf_counter() - t0
    return {"wall_s": round(wall, 3), "steps": result.steps, "median_step_ms": _timed_step_ms(marks),
            "peak_gib": C.peak_gib(), "shape": list(result.images.shape), "placement": gen.loader.placement,
            "size": [result.decision.width, result.decision.height], "governor": result.decision.reason[:300],
            "finite": bool(torch.isfinite(result.images).all()), "warnings": result.warnings,
            **_estimate(family, wall, marks, result.steps, t0)}  # fmt: skip


def _fits(gen: QwenImageGenerator, refs: list[Any], size: tuple[int, int], **governor: Any) -> dict[str, Any]:
    """Two steps (the fewest Qwen-Image's scheduler runs) at ``size`` through the governor (or past it, with a
    ``governor`` override of its inputs); OOM -> fits False."""
    loader, real = gen.loader, gen.loader.governor_inputs
    if governor:  # a probe past the governor: its window is lifted for this call
        loader.governor_inputs = lambda **kw: governor  # type: ignore[method-assign]
    w, h = size
    C.reset_peak()
    try:
        result = gen.generate(PROMPT_WORDS, images=refs, width=w, height=h, steps=2, seed=0)
        # The generator decodes again in tiles when the untiled decode runs out of memory: the image is made,
        # but past the bound the memory model draws for the resident modes (an untiled decode).
        tiled = any("decoded in tiles" in warning for warning in result.warnings)
        return {"fits": True, "tiled_fallback": tiled, "size": [result.decision.width, result.decision.height],
                "peak_gib": C.peak_gib()}
    except (QwenError, torch.OutOfMemoryError) as err:
        if "out of memory" not in str(err).lower():
            raise
        return {"fits": False, "size": [w, h], "error": str(err)[:200]}
    finally:
        loader.governor_inputs = real  # type: ignore[method-assign]
        C.reset_peak()


@dataclasses.dataclass(frozen=True)
class Probes:
    """What the governor check tries past the governor's size (``--no-probe``, ``--probe-ladder``,
    ``--ladder-area``); ``time_left`` is the run's budget, which the ladder stops at."""

    probe: bool = True
    ladder: int = 0
    ladder_area: float = PROBE_AREA
    time_left: Callable[[], float] = lambda: math.inf


def governor_check(gen: QwenImageGenerator, refs: list[Any], request: tuple[int, int],
                   probes: Probes | None = None) -> dict[str, Any]:
    """``request`` larger than fits: the governor picks the size (``_fits`` without a window override); then the
    1.15x probe and, with ``probes.ladder``, larger ones while the probes fit (``probe_ladder``)."""
    probes = probes or Probes()
    family = gen.loader.family
    chosen = _fits(gen, refs, request)
    out: dict[str, Any] = {"chosen": chosen, "never_oom": chosen["fits"] and not chosen["tiled_fallback"]}
    if not chosen["fits"] or not probes.probe:
        return out
    w, h = chosen["size"]
    if family_call.is_layered(family):
        # The chosen bucket: the output holds resolution^2 pixels at the input's aspect, rounded down.
        buckets = sorted(family.resolution_buckets)
        current = next((b for b in buckets if b * b >= w * h), buckets[-1])
        bigger = [b for b in buckets if b > current]
        if not bigger:
            out["within_15pct"] = True  # already the largest bucket: no larger size can be asked for
            out["note"] = f"bucket {current} is the largest"
            return out
        over_size = (bigger[0], bigger[0])
    else:
        over_size = probe_size(w, h)
    over = _fits(gen, refs, over_size, max_pixels=10**9)
    out.update(probe=over, within_15pct=not over["fits"] or over["tiled_fallback"])
    if probes.ladder and over["fits"] and not over["tiled_fallback"]:
        out["ladder"] = probe_ladder(gen, refs, over_size, probes.ladder, probes.time_left, probes.ladder_area)
        largest = max([chosen, over, *out["ladder"]["probes"]],
                      key=lambda r: r["size"][0] * r["size"][1] if r["fits"] and not r["tiled_fallback"] else 0)
        out["largest_fitting"] = {"size": largest["size"], "area_over_chosen": round(
            largest["size"][0] * largest["size"][1] / (w * h), 3), "bracketed": out["ladder"]["bracketed"]}
    return out


def probe_ladder(gen: QwenImageGenerator, refs: list[Any], start: tuple[int, int], steps: int,
                 time_left: Callable[[], float], area_step: float = PROBE_AREA) -> dict[str, Any]:
    """Where the first probe fits: up to ``steps`` more, each ``area_step`` times the last one's area, until one
    fails (out of memory or the tiled fallback): the largest size that fits lies between the last two, which
    says how far the memory model's bound is from it. Each probe needs ~60 s on the 20 B models."""
    probes: list[dict[str, Any]] = []
    size = start
    for _ in range(steps):
        if time_left() < LADDER_PROBE_S.get(gen.loader.family.memory_model_key, 75.0):
            return {"probes": probes, "bracketed": False, "stopped": f"{time_left():.0f} s of the budget left"}
        size = probe_size(*size, area_factor=area_step)
        result = _fits(gen, refs, size, max_pixels=10**9)
        probes.append(result)
        if not result["fits"] or result["tiled_fallback"]:
            return {"probes": probes, "bracketed": True}
    return {"probes": probes, "bracketed": False}


def probe_size(width: int, height: int, area_factor: float = PROBE_AREA) -> tuple[int, int]:
    """The governor check's probe: sides on the 32 px grid, rounded up so the area is at least ``area_factor``
    times the chosen one (rounded down it was 1.13x, too small to show "within 15%")."""
    scale = area_factor**0.5
    return math.ceil(width * scale / 32) * 32, math.ceil(height * scale / 32) * 32


def governor_case(pipe: Any, family: ModelFamily, refs: list[Any], dev: torch.device, name: str,
                  request: tuple[int, int], probes: Probes) -> dict[str, Any]:
    """The governor check of our eager ``gpu`` path in GOVERNOR_CAP_GIB, loaded from the host as the product does
    (the loader's VRAM reading then sees the capped, empty card)."""
    from qwen_core.cfg_batch import disable_cfg_batching

    cap = GOVERNOR_CAP_GIB.get(family.memory_model_key)
    if cap is None:
        return {"skipped": f"no governor cap for memory model {family.memory_model_key!r}"}
    pipe.to("cpu")
    C.reset_peak()
    with C.memory_cap(cap):
        gen = QwenImageGenerator(in_memory_loader(pipe, name=f"{name}-governor", memory_mode="gpu", device=str(dev),
                                                  family=family, compile="off"))  # fmt: skip
        try:
            return {"cap_gib": cap, **governor_check(gen, refs, request, probes)}
        finally:
            disable_cfg_batching(pipe)


def streamed_case(pipe: Any, family: ModelFamily, refs: list[Any], size: tuple[int, int], args: argparse.Namespace,
                  dev: torch.device, name: str) -> dict[str, Any]:
    pipe.to("cpu")  # as the product loads it: from the host, so the capped VRAM reading at load sees an empty card
    C.reset_peak()
    loader = in_memory_loader(pipe, name=f"{name}-streamed", memory_mode="streamed", device=str(dev), family=family)
    # What a 16 GiB card reports (the allocator cap below makes it real for the allocations).
    loader.device_config = dataclasses.replace(loader.device_config, vram_total_gb=CAP_GIB, vram_free_gb=CAP_GIB - 0.5)
    gen = QwenImageGenerator(loader)
    try:
        with C.memory_cap(CAP_GIB):
            out = {"streamed_cap16": run_ours(gen, refs, size, args.steps)}
            if "streamed-governor" in args.parts:
                out["governor_cap16"] = governor_check(gen, refs, (256, 256) if args.tiny else GOVERNOR_REQUEST)
        return out
    finally:
        disable_streamed_offload(pipe, restore_device="cpu")  # back to the host: the next case packs its own plan


def run_case(R: C.Results, pipes: dict[str, Any], key: str, n_refs: int, args: argparse.Namespace,
             dev: torch.device, *, streamed: bool) -> None:
    from qwen_core.cfg_batch import disable_cfg_batching

    family, pipe = FAMILIES[key], pipes[key]
    name = f"{key}[{n_refs} image{'s' if n_refs != 1 else ''}]"
    refs, size = _refs(n_refs, args.tiny), _size(family, args.tiny)
    FF.match_variant(pipe, family)  # rows measured before this line existed ran 2509's transformer as 2511
    if streamed:
        if C.cuda() or args.tiny:  # on a CPU (--tiny) the same code runs; the placement is resident there
            for section, value in streamed_case(pipe, family, refs, size, args, dev, name).items():
                R.set(name, section, value)
        return
    if "full" in args.parts:
        pipe.to(dev)
        R.set(name, "diffusers_as_is", run_diffusers(pipe, family, refs, size, args.steps))
        gen = QwenImageGenerator(in_memory_loader(pipe, name=f"{name}-gpu", memory_mode="gpu", device=str(dev),
                                                  family=family))  # fmt: skip
        R.set(name, "ours_gpu", run_ours(gen, refs, size, args.steps))
        disable_cfg_batching(pipe)  # the next case's "as-is" run must meet the plain transformer
    if "governor" in args.parts and (C.cuda() or args.tiny):
        request = (256, 256) if args.tiny else GOVERNOR_REQUEST
        probes = Probes(not args.no_probe, args.probe_ladder, args.ladder_area, R.left)
        R.set(name, "governor_gpu", governor_case(pipe, family, refs, dev, name, request, probes))


def measure_memory(R: C.Results, group: str, pipes: dict[str, Any], args: argparse.Namespace,
                   dev: torch.device) -> None:
    """``--parts memory``: the group's memory model, then used by the rest of this run."""
    key = next((k for k in FF.GROUPS[group] if FAMILIES[k].memory_model_key == k), None)
    if key is None or family_call.is_layered(FAMILIES[key]):
        R.set("memory", f"skipped:{group}", "no family of this group owns a memory model of its own")
        return
    entry = family_memory.measure(R, pipes[key], FAMILIES[key], dev, tiny=args.tiny)
    R.set("memory", "entry", entry)
    path = family_memory.merged_model(key, entry, args.out / "memory_model.json")
    if not C.cuda():  # a CPU (--tiny) has no allocator peaks: its entry is all zeros, the code path is what it checks
        return
    try:
        memory_model.load_memory_model(path)  # the loader's own checks: a bad fit must not fail every case after it
    except QwenError as err:
        R.set("memory", "not_used", str(err))
        return
    family_memory.use_memory_model(path)


def _small_references_for_tiny() -> None:
    """--tiny on a CPU: the edit pipelines' fixed ~1 MP reference size, shrunk (as tests/test_family_generation)."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

    plus.VAE_IMAGE_SIZE, plus.CONDITION_IMAGE_SIZE = 128 * 128, 64 * 64
    real = edit.calculate_dimensions
    edit.calculate_dimensions = lambda area, ratio: real(min(area, 128 * 128), ratio)


def main(argv: list[str] | None = None) -> int:
    import report_families

    args = parse_args(argv)
    dev = torch.device("cuda" if C.cuda() else "cpu")
    dtype = torch.bfloat16 if C.cuda() else torch.float32
    if args.tiny:
        _small_references_for_tiny()
    R = C.Results(args.out / "results.json", args.budget_s)
    R.set("run", "command", " ".join(sys.argv))
    R.set("run", "versions", {**C.versions(), "torchvision": FF.has_torchvision()})
    get_residency_manager().set_max_resident(64)  # the loaders share modules: eviction would detach them
    for group in (CASES if args.group == "all" else [args.group]):
        t0 = time.perf_counter()
        pipes = FF.build_group(group, dev, dtype, args.tiny)
        C.sync()
        R.set(f"build:{group}", "seconds", round(time.perf_counter() - t0, 1))
        if "memory" in args.parts:
            measure_memory(R, group, pipes, args, dev)
        on_card, in_cap = {"full", "governor"}, {"streamed", "streamed-governor"}
        passes = [streamed for streamed, parts in ((False, on_card), (True, in_cap)) if args.parts & parts]
        for streamed in passes:
            if streamed:
                next(iter(pipes.values())).to("cpu")  # shared modules: every weight to the host before the cap
                C.reset_peak()
            for key, n_refs in CASES[group]:
                if args.cases and not {key, f"{key}[{n_refs}]"} & args.cases:
                    continue
                if R.left() < (90 if streamed else 40):
                    R.set("skipped", f"{key}[{n_refs}]{':streamed' if streamed else ''}", f"{R.left():.0f} s left")
                    continue
                try:
                    run_case(R, pipes, key, n_refs, args, dev, streamed=streamed)
                except Exception as err:  # noqa: BLE001 - one broken case must not lose the others
                    import traceback

                    traceback.print_exc()
                    R.set("errors", f"{key}[{n_refs}]{':streamed' if streamed else ''}", f"{type(err).__name__}: {err}"[:2000])
        del pipes
        get_residency_manager().release_all()
        C.reset_peak()
    report_families.write_rows(R.data, args.out / "rows.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
