"""Our model beside ComfyUI's own, in one process: how often does ComfyUI's memory management cost us a reload?

A graph-like sequence, repeated ``--rounds`` times (default 2): our Generate (``QwenImageGenerator`` on the
full-size random-weight Qwen-Image, as the Generate node runs it) -> a native ComfyUI model on the result
(``--native upscaler``: ComfyUI's own UpscaleModelLoader + ImageUpscaleWithModel on a random RRDBNet/Compact
upscaler; ``--native blob``: a random ``--native-gib`` model wrapped in ComfyUI's CoreModelPatcher and loaded
through ``load_models_gpu``, as ComfyUI loads any checkpoint). Counted: our weight loads (the first one is not
a reload), ComfyUI's free_memory calls, peak CUDA memory and peak RSS, time per step of the sequence.

ComfyUI is set up in this process the way ``main.py`` sets itself up (its module is imported with the
``--comfy-args`` as its command line: dynamic VRAM, aimdo and the patcher class are chosen there), then the
pack is imported the way ComfyUI imports a custom node, which installs its memory hooks.
``--hooks legacy`` swaps in the pack's previous free_memory hook (release ours whenever plain free memory is
below the request after ComfyUI's own unloading) for the before/after comparison; ``--hooks none`` installs
no release hook at all.

GPU (the lead runs these; ~40 GiB of random weights are built once per load):
    COMFYUI_DIR=~/comfy033 python bench/comfy_cooperation.py --hooks new --json out_new.json
    COMFYUI_DIR=~/comfy033 python bench/comfy_cooperation.py --hooks legacy --json out_legacy.json
    ... --comfy-args="--disable-dynamic-vram"      # 0.33 with dynamic VRAM off
    ... --vram-cap-gib 48 --native blob --native-gib 12   # a smaller card, a bigger native model
    ... --vram-cap-gib 100 --native blob --native-gib 30 --second-native-gib 20   # two native models: the
        # second fits only if ComfyUI pages the first out (dynamic VRAM) or ours goes (what the legacy hook does)
CPU check of the script itself (seconds; what tests/test_comfyui_live.py runs):
    COMFYUI_DIR=~/comfy033 python bench/comfy_cooperation.py --tiny
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PACK_MODULE = "comfyui_qwen_image_bench"  # the name ComfyUI would give the pack's package


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfyui-dir", default=os.environ.get("COMFYUI_DIR"), help="ComfyUI checkout (or COMFYUI_DIR)")
    p.add_argument("--comfy-args", default="", help="ComfyUI command line, e.g. '--disable-dynamic-vram'")
    p.add_argument("--tiny", action="store_true", help="CPU: tiny random model, 64x64, 2 steps (tests the script)")
    p.add_argument("--hooks", choices=("new", "legacy", "none"), default="new")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--size", type=int, default=None, help="image side (default 1024; 64 with --tiny)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 4; 2 with --tiny)")
    p.add_argument("--memory-mode", default="auto", help="our loader's memory mode")
    p.add_argument("--native", choices=("upscaler", "blob"), default="upscaler")
    p.add_argument("--native-gib", type=float, default=None, help="size of --native blob (default 8; 0.05 with --tiny)")
    p.add_argument("--second-native-gib", type=float, default=None,
                   help="--native blob: a second native model of this size, loaded after the first each round "
                        "(with dynamic VRAM ComfyUI can page the first out for it, so ours need not go)")
    p.add_argument("--vram-cap-gib", type=float, default=None, help="simulate a smaller card (allocator cap + "
                   "the free VRAM ComfyUI and our loader read)")
    p.add_argument("--vbar-scale", type=float, default=None,
                   help="0.33 dynamic VRAM: reserve F x a model's size of address space for its pageable pool "
                        "instead of ComfyUI's 10x (aimdo caps it at the card). A diagnostic: on the H200 the ~140 "
                        "GiB reservation for a 30 GiB comfy.ops model was refused ('VBAR allocation failed')")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    if not args.comfyui_dir:
        p.error("set --comfyui-dir or COMFYUI_DIR")
    args.size = args.size or (64 if args.tiny else 1024)
    args.steps = args.steps or (2 if args.tiny else 4)
    args.native_gib = args.native_gib or (0.05 if args.tiny else 8.0)
    return args


def start_comfyui(comfy_dir: Path, comfy_args: list[str], work: Path) -> Any:
    """Import ComfyUI's main.py as a module: its top level parses the command line, initialises aimdo
    (dynamic VRAM), imports server/nodes/model_management and picks the patcher class, like a real start."""
    (work / "custom_nodes").mkdir(parents=True, exist_ok=True)  # empty: the pack is imported below, by path
    sys.argv = ["main.py", "--base-directory", str(work), *comfy_args]
    sys.path.insert(0, str(comfy_dir))
    os.chdir(comfy_dir)
    importlib.import_module("main")  # ComfyUI's own setup runs on import (the server does not start)
    return importlib.import_module("comfy.model_management")  # after main: it parses the command line first


def import_pack() -> Any:
    """Import this checkout as ComfyUI imports a custom node (a package named after its folder)."""
    spec = importlib.util.spec_from_file_location(PACK_MODULE, REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE] = module
    spec.loader.exec_module(module)
    return sys.modules[f"{PACK_MODULE}.nodes.comfy_bridge"]


def use_legacy_hooks(mm: Any, bridge: Any, release: Any) -> None:
    """The pack's free_memory hook before this change: after ComfyUI's own unloading, release ours whenever
    plain free memory is below the request (no dynamic-VRAM accounting, no device check, no targeted unloads)."""
    original = mm.free_memory.__wrapped__
    for name in ("unload_model_and_clones",):
        wrapped = getattr(mm, name, None)
        if wrapped is not None and hasattr(wrapped, "__wrapped__"):
            setattr(mm, name, wrapped.__wrapped__)
    cache = getattr(bridge.comfy_caching, "RAMPressureCache", None)
    if cache is not None and hasattr(cache.ram_release, "__wrapped__"):
        cache.ram_release = cache.ram_release.__wrapped__

    def free_memory(memory_required: float, device: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(memory_required, device, *args, **kwargs)
        if mm.get_free_memory(device) < memory_required:
            release()
        return result

    mm.free_memory = free_memory


def no_release_hooks(mm: Any) -> None:
    mm.free_memory = mm.free_memory.__wrapped__


def cap_vram(mm: Any, cap_gib: float) -> None:
    """A card of ``cap_gib``: the allocator refuses more, and ComfyUI's free-memory reading agrees."""
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 1024**3 / total))
    hidden = total - cap_gib * 1024**3
    real_free = mm.get_free_memory

    def get_free_memory(dev: Any = None, torch_free_too: bool = False) -> Any:
        value = real_free(dev, torch_free_too)
        if getattr(dev, "type", "cuda") == "cpu":
            return value
        if torch_free_too:
            return (max(0.0, value[0] - hidden), value[1])
        return max(0.0, value - hidden)

    mm.get_free_memory = get_free_memory


def scale_vbar(scale: float) -> None:
    """0.33's ModelPatcherDynamic asks aimdo for a pool of ``model_size() * 10`` (model_patcher.py, _vbar_get);
    this asks for ``model_size() * scale`` instead. The factor 10 is ComfyUI's, read from its source."""
    import comfy_aimdo.model_vbar as model_vbar

    original = model_vbar.ModelVBAR.__init__

    def init(self: Any, size: int, *args: Any, **kwargs: Any) -> None:
        original(self, int(size / 10 * scale), *args, **kwargs)

    model_vbar.ModelVBAR.__init__ = init


class Counter:
    """Counts ComfyUI's free_memory calls (wrapped outermost, so every caller is seen)."""

    def __init__(self, mm: Any) -> None:
        self.calls: list[dict[str, Any]] = []
        inner = mm.free_memory

        def free_memory(memory_required: float, device: Any, *args: Any, **kwargs: Any) -> Any:
            self.calls.append({"required_gib": round(float(memory_required) / 1024**3, 3), "device": str(device),
                               "for_dynamic": bool(kwargs.get("for_dynamic", False))})
            return inner(memory_required, device, *args, **kwargs)

        free_memory.__wrapped__ = getattr(inner, "__wrapped__", inner)  # type: ignore[attr-defined]
        mm.free_memory = free_memory


def make_upscaler(folder: Path, tiny: bool) -> str:
    """A random ESRGAN 4x (RRDBNet, 23 blocks, the common RealESRGAN_x4plus shape) or, tiny, a 2x Compact."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    if tiny:
        from spandrel.architectures.Compact import Compact

        model, name = Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=2), "tiny-compact-x2"
    else:
        from spandrel.architectures.ESRGAN import ESRGAN

        model, name = ESRGAN(in_nc=3, out_nc=3, num_filters=64, num_blocks=23, scale=4), "random-rrdb-x4"
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / f"{name}.safetensors"))
    return f"{name}.safetensors"


def run_upscaler(model_name: str, images: Any) -> Any:
    from comfy_extras.nodes_upscale_model import ImageUpscaleWithModel, UpscaleModelLoader

    (model,) = UpscaleModelLoader.execute(model_name).args
    (upscaled,) = ImageUpscaleWithModel.execute(model, images).args
    return upscaled


class NativeBlob:
    """A native model of ``gib`` GiB loaded like any ComfyUI checkpoint (CoreModelPatcher, load_models_gpu).
    Built once, in bf16 on the host (ComfyUI's offload device), and loaded again each round, as ComfyUI's
    cache keeps a loaded model's patcher across prompts."""

    def __init__(self, mm: Any, gib: float) -> None:
        import comfy.model_patcher
        import comfy.ops
        import torch

        self.mm, self.width = mm, 4096
        layers = max(1, int(gib * 1024**3 / (self.width * self.width * 2)))
        # comfy.ops layers, as ComfyUI's own models are built: 0.33's dynamic VRAM pages only those out on demand
        # (plain torch layers it force-loads onto the card, outside the pageable pool)
        linear = comfy.ops.disable_weight_init.Linear
        with torch.no_grad():  # built on meta, then host memory: Linear's own init would take minutes on a CPU
            self.module = torch.nn.Sequential(*[linear(self.width, self.width, bias=False, dtype=torch.bfloat16,
                                                       device="meta") for _ in range(layers)]).to_empty(device="cpu")
            for p in self.module.parameters():
                p.fill_(1.0 / self.width)  # the values don't matter
        # 0.33 names its plain patcher CoreModelPatcher (swapped for the dynamic one when dynamic VRAM is on);
        # 0.3.64 has ModelPatcher only
        patcher_class = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
        self.patcher = patcher_class(self.module, load_device=mm.get_torch_device(),
                                     offload_device=mm.unet_offload_device())

    def run(self, images: Any) -> Any:
        import torch

        self.mm.load_models_gpu([self.patcher], memory_required=256 * 1024**2)
        x = torch.randn(16, self.width, dtype=torch.bfloat16, device=self.mm.get_torch_device())
        with torch.no_grad():
            self.module(x)
        return images


def build_generator(args: argparse.Namespace, bridge: Any) -> tuple[Any, dict[str, int]]:
    """Our generator on a full-size random-weight pipeline; a release makes the next Generate build it again
    (what a reload from disk is for a real model), counted in ``loads``."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import fullsize
    from in_memory import InMemorySource

    from qwen_core.devices import dtype_name
    from qwen_core.generator import QwenImageGenerator
    from qwen_core.loading import PipelineLoader

    loads = {"count": 0}
    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    build_on = "cuda" if not args.tiny and args.memory_mode in ("auto", "gpu") else "cpu"

    class ReloadingSource(InMemorySource):
        """A released pipeline (its components detached by the residency manager) is built again: what a reload
        from disk is for a real model, counted in ``loads``."""

        sizes: dict[str, int] | None = None

        def weight_bytes(self, dtype: Any) -> dict[str, int]:
            # what a folder's files say: the same before and after a release (the released shell has no modules,
            # and a size of 0 would let the before-load hook ask ComfyUI for nothing)
            if self.sizes is None:
                self.sizes = super().weight_bytes(dtype)
            return self.sizes

        def build(self, dtype: Any, light_components: dict[str, Any]) -> Any:
            loads["count"] += 1  # every load of our weights through the residency manager
            if getattr(self.pipe, "transformer", None) is None:
                self.pipe = fullsize.build_pipeline(build_on, dtype, tiny=args.tiny)
            return super().build(dtype, light_components)

    source = ReloadingSource(fullsize.build_pipeline(build_on, dtype, tiny=args.tiny), name="fullsize-random")
    loader = PipelineLoader(source, dtype=dtype_name(dtype), memory_mode=args.memory_mode, device=device)
    return QwenImageGenerator(loader), loads


def peaks() -> dict[str, float | None]:
    import psutil
    import torch

    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return {"cuda_peak_gib": round(torch.cuda.max_memory_allocated() / 1024**3, 2) if cuda else None,
            "rss_gib": round(psutil.Process().memory_info().rss / 1024**3, 2)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    comfy_args = shlex.split(args.comfy_args) + (["--cpu"] if args.tiny else [])
    work = Path(tempfile.mkdtemp(prefix="qwen-coop-"))
    os.environ.setdefault("QWEN_REPORTS_DIR", str(work / "reports"))
    mm = start_comfyui(Path(args.comfyui_dir).resolve(), comfy_args, work)
    bridge = import_pack()
    from qwen_core.memory import get_residency_manager

    release = get_residency_manager().release_all
    if args.hooks == "legacy":
        use_legacy_hooks(mm, bridge, release)
    elif args.hooks == "none":
        no_release_hooks(mm)
    if args.vram_cap_gib:
        cap_vram(mm, args.vram_cap_gib)
    if args.vbar_scale:
        scale_vbar(args.vbar_scale)
    counter = Counter(mm)
    upscaler = make_upscaler(work / "models" / "upscale_models", args.tiny) if args.native == "upscaler" else None
    gen, loads = build_generator(args, bridge)
    blobs = [NativeBlob(mm, gib) for gib in (args.native_gib, args.second_native_gib) if gib] \
        if args.native == "blob" else []
    import torch

    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "comfy_args": comfy_args,
                               "dynamic_vram": bool(getattr(bridge.memory_management, "aimdo_enabled", False)),
                               "rounds": []}
    for number in range(1, args.rounds + 1):
        row: dict[str, Any] = {"round": number}
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        row["ours_resident_before"] = gen.loader.is_loaded
        t0 = time.perf_counter()
        out = gen.generate("a lighthouse at dusk", "", width=args.size, height=args.size, steps=args.steps,
                           true_cfg_scale=1.0, seed=number)
        row["generate_s"] = round(time.perf_counter() - t0, 2)
        calls_before = len(counter.calls)
        t0 = time.perf_counter()
        native = run_upscaler(upscaler, out.images) if upscaler else out.images
        for blob in blobs:
            native = blob.run(native)
        row["native_s"] = round(time.perf_counter() - t0, 2)
        row["native_output_shape"] = list(native.shape)
        row["comfy_free_memory_calls"] = counter.calls[calls_before:]
        row["ours_resident_after_native"] = gen.loader.is_loaded
        row.update(peaks())
        results["rounds"].append(row)
        print(json.dumps(row), flush=True)
    results["our_loads"] = loads["count"]
    results["our_reloads"] = max(0, loads["count"] - 1)
    results["our_bytes_resident_at_end"] = {"cpu": bridge_footprint("cpu")}
    print(json.dumps({k: v for k, v in results.items() if k != "rounds"}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


def bridge_footprint(device: str) -> int:
    common = sys.modules.get(f"{PACK_MODULE}.nodes.common")
    return int(common.resident_bytes(device)) if common is not None else -1


if __name__ == "__main__":
    main()
