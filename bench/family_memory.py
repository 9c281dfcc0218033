"""A family's memory model measured on the GPU, in presets/memory_model.json's shape (``family_bench.py --parts
memory``). The run's governor checks then read the measured numbers (``use_memory_model``), and the entry is
merged into the committed file by hand, as bench/gpu_bench.py's Qwen-Image entry was.

Each point is a 2-step text-to-image call at an output size (the second of two, see ``_phase_peaks``), with true
CFG on (two branches: the larger case), batched as our path batches it:
- everything resident (the ``gpu`` mode): the peak over the weights while the text encoder and the denoising
  steps run ("activations"), and while the VAE decodes untiled ("vae");
- the streamed engine with nothing resident (a budget below its working set streams every block) and the VAE
  tiled, as in a small card: the whole peak ("streamed").
Each fit covers every point (``common.cover_fit``). The composed entries follow bench/report.py's for Qwen-Image:
gpu = the weights + max(activations, vae); model_offload = that without the text encoder; fp16 = bf16's bytes;
fp32 = twice them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import common as C
import torch

from qwen_core import family_call, memory_model
from qwen_core.cfg_batch import disable_cfg_batching, enable_cfg_batching
from qwen_core.families import ModelFamily
from qwen_core.streaming import disable_streamed_offload, enable_streamed_offload

SIZES = (512, 1024, 1536, 2048)  # multiples of 32: every family's pipeline keeps them as they are
TINY_SIZES = (64, 96, 128)
HEADROOM_GIB = 1.0  # the CUDA context and allocator slack, as in the Qwen-Image entry
STARVED_BUDGET_GIB = 0.5  # below any streaming working set: the planner keeps no block resident
PROMPT = ("a watercolor fox in a snowy forest at dawn, soft light, fine detail, ") * 6  # ~64 tokens


def _call(pipe: Any, family: ModelFamily, size: int, **extra: Any) -> None:
    kwargs = family_call.call_kwargs(family, [], width=size, height=size, layers=family.default_layers)
    pipe(prompt=PROMPT, negative_prompt=" ", true_cfg_scale=4.0, num_inference_steps=2, output_type="pt",
         generator=torch.Generator("cpu").manual_seed(0), **kwargs, **extra)
    C.sync()


def _phase_peaks(pipe: Any, family: ModelFamily, size: int) -> tuple[float, float]:
    """GiB over what was allocated before the call: the peak up to the last step, and the peak of the decode.
    The second call at a size is measured, so a first call's one-time work (kernel selection, lazily made
    buffers) stays out of the model; on the H200 both calls measured the same."""
    _call(pipe, family, size)
    phase: dict[str, float] = {}
    C.reset_peak()
    base = C.allocated_gib() or 0.0

    def at_step(p: Any, i: int, t: Any, kw: dict[str, Any]) -> dict[str, Any]:
        if i == 1:  # the last of 2 steps: what follows is the decode
            C.sync()
            phase["steps"] = (C.peak_gib() or 0.0) - base
            if C.cuda():
                torch.cuda.reset_peak_memory_stats()
        return {}

    _call(pipe, family, size, callback_on_step_end=at_step)
    return phase["steps"], (C.peak_gib() or 0.0) - base


def _total_peak(pipe: Any, family: ModelFamily, size: int) -> float:
    _call(pipe, family, size)  # see _phase_peaks: the second call is measured
    C.reset_peak()
    _call(pipe, family, size)
    return C.peak_gib() or 0.0


def at_least_slope(fit: dict[str, float], points: list[tuple[float, float]], slope: float) -> dict[str, float]:
    """``fit`` with its slope raised to ``slope``, its base lowered only as far as still covers every point.

    The streamed peak is the larger of two phases: the text encoder's fixed working set below ~2 MP, the
    transformer's activations above. A line through both understates the growth past the largest size measured,
    where the governor's streamed window lies (~17 MP in 16 GiB); there the activations' slope holds."""
    if fit["gib_per_mpix"] >= slope:
        return fit
    base = max(y - slope * x for x, y in points)
    return {"intercept_gib": round(base, 4), "gib_per_mpix": round(slope, 4), "max_residual_gib": 0.0}


def _entry(fit: dict[str, float], headroom: float, measured: str, *, base: float | None = None) -> dict[str, Any]:
    return {"base_gib": round(fit["intercept_gib"] if base is None else base, 3), "gib_per_mpix": fit["gib_per_mpix"],
            "headroom_gib": headroom, "measured": measured}


def compose_entries(weights_gib: dict[str, float], static_gib: float, act: dict[str, float], vae: dict[str, float],
                    streamed: dict[str, float] | None) -> dict[str, Any]:
    """Memory model entries from the fits: every mode and dtype the governor and the streaming planner read."""
    entries: dict[str, Any] = {
        "activations/bf16": _entry(act, 0.0, "text encoder + 2 true-CFG steps as our path runs them (batched CFG "
                                   "where the family has it), extra over the resident weights"),
        "vae/bf16": _entry(vae, 0.0, "untiled VAE decode, extra over the resident weights"),
    }
    slope = {"gib_per_mpix": max(act["gib_per_mpix"], vae["gib_per_mpix"])}
    icpt = max(act["intercept_gib"], vae["intercept_gib"])
    entries["gpu/bf16"] = _entry(slope, HEADROOM_GIB, "all weights + max(steps, VAE)", base=static_gib + icpt)
    offload = weights_gib.get("transformer", 0.0) + weights_gib.get("vae", 0.0)
    entries["model_offload/bf16"] = _entry(slope, HEADROOM_GIB, "derived: gpu/bf16 without the text encoder's weights",
                                           base=offload + icpt)
    if streamed:
        entries["streamed/bf16"] = _entry(streamed, HEADROOM_GIB, "streamed engine, nothing resident, tiled VAE; "
                                          "slope at least the activations' (family_memory.at_least_slope)")
        # The offload modes keep no block resident either; the untiled decode is their larger slope.
        go = {"gib_per_mpix": max(streamed["gib_per_mpix"], vae["gib_per_mpix"])}
        for mode in ("group_offload", "sequential"):
            entries[f"{mode}/bf16"] = _entry(go, HEADROOM_GIB, "derived: the streamed base with the untiled VAE "
                                             "slope (this mode does not tile)", base=streamed["intercept_gib"])
    for key in [k for k in entries if k.endswith("/bf16")]:
        entries[key.replace("/bf16", "/fp16")] = {**entries[key], "measured": f"same bytes as {key}"}
        e = entries[key]
        entries[key.replace("/bf16", "/fp32")] = {"base_gib": round(2 * e["base_gib"], 3),
                                                  "gib_per_mpix": round(2 * e["gib_per_mpix"], 4),
                                                  "headroom_gib": e["headroom_gib"],
                                                  "measured": f"derived: 2x {key} (4-byte elements)"}
    return entries


def measure(R: C.Results, pipe: Any, family: ModelFamily, dev: torch.device, *, tiny: bool) -> dict[str, Any]:
    """The family's memory model entry (presets/memory_model.json's ``families.<key>``), measured on ``dev``."""
    if family_call.is_layered(family):
        raise ValueError("Layered's memory model is Qwen-Image's with its frames counted; measure qwen-image.")
    sizes = TINY_SIZES if tiny else SIZES
    weights_gib = {name: round(sum(p.numel() * p.element_size() for p in module.parameters()) / C.GIB, 2)
                   for name in family.weighted_components if (module := getattr(pipe, name, None)) is not None}
    pipe.to(dev)
    C.reset_peak()
    static = C.allocated_gib() or 0.0
    steps, decode = [], []
    # Our path's forward: one batched cond+uncond forward where the family batches CFG (the streamed engine's
    # re-plan counts rows the same way).
    batched = enable_cfg_batching(pipe) is not None if family.cfg_batching else False
    try:
        for size in sizes:
            s, d = _phase_peaks(pipe, family, size)
            mpix = size * size / 1e6
            steps.append((mpix, s))
            decode.append((mpix, d))
            R.set("memory", f"gpu_{size}", {"mpix": mpix, "steps_gib": round(s, 4), "decode_gib": round(d, 4),
                                              "batched_cfg": batched})
    finally:
        disable_cfg_batching(pipe)
    act, vae = C.cover_fit(steps), C.cover_fit(decode)
    R.set("memory", "fits", {"static_gib": round(static, 3), "activations": act, "vae": vae})
    pipe.to("cpu")
    C.reset_peak()
    streamed_points = []
    enable_streamed_offload(pipe, dev, budget_gib=STARVED_BUDGET_GIB, max_pixels=sizes[0] ** 2, vae_tiling=True,
                            family=family.memory_model_key, cfg_batching=family.cfg_batching)
    try:
        for size in sizes:
            peak = _total_peak(pipe, family, size)
            mpix = size * size / 1e6
            streamed_points.append((mpix, peak))
            R.set("memory", f"streamed_{size}", {"mpix": mpix, "peak_gib": round(peak, 4)})
    finally:
        disable_streamed_offload(pipe, restore_device="cpu")
    streamed = at_least_slope(C.cover_fit(streamed_points), streamed_points, act["gib_per_mpix"])
    R.set("memory", "streamed_fit", streamed)
    v = C.versions()
    return {"card": v.get("card"), "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "versions": {k: v.get(k) for k in ("torch", "diffusers", "transformers", "cuda")},
            "command": R.data.get("run", {}).get("command"),
            "note": "peak = base_gib + gib_per_mpix * megapixels (+ headroom_gib); bf16, ~64 text tokens, true CFG "
                    "(batched where the family batches it); the second call at each size; full-size random-weight "
                    "models (bench/family_memory.py, bench/RESULTS.md)",
            "reference_pixels": family.default_width * family.default_height, "weights_dtype": "bf16",
            "weights_gib": weights_gib, "entries": compose_entries(weights_gib, static, act, vae, streamed)}


def merged_model(family_key: str, entry: dict[str, Any], out: Path) -> Path:
    """The committed memory model with ``family_key`` replaced by ``entry`` (its step-time figures kept), at OUT."""
    doc = json.loads(memory_model.DEFAULT_MEMORY_MODEL_PATH.read_text(encoding="utf-8"))
    old = doc["families"].get(family_key, {})
    doc["families"][family_key] = {**entry, **({"step_time": old["step_time"]} if "step_time" in old else {})}
    out.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return out


def use_memory_model(path: Path) -> None:
    """Point the governor, the loader and the streaming planner at ``path`` for the rest of this process."""
    memory_model.DEFAULT_MEMORY_MODEL_PATH = path
