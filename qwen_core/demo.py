"""`python -m qwen_core demo` and `python -m qwen_core generate`.

``demo`` proves the whole path offline on any machine: it builds (or reuses) the cached tiny random
pipeline of a family (``--family``, default Qwen-Image; ``--image`` gives the edit models their input), runs
preflight, asks the governor for the size, generates with the real diffusers pipeline, and writes a PNG
(Layered: one PNG per RGBA layer). The tiny model has random weights, so the picture is structured noise; what
the demo shows is that every stage runs, how long each took, and what was decided.

``generate`` runs the same path on a real model folder (e.g. a downloaded Qwen/Qwen-Image).

Default output: ``reports/demo.png`` (``reports/`` under the repo, or QWEN_REPORTS_DIR): the folder
that already holds the session log, is ignored by git, and is the same wherever the command is started.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path
from typing import Any

from qwen_core.atomic_io import write_bytes_atomic
from qwen_core.errors import InvalidInputError

DEMO_PROMPT = "a watercolor fox in a snowy forest at dawn"


def _add_sampling_args(parser: argparse.ArgumentParser, *, width: int | None, height: int | None,
                       steps: int | None) -> None:
    def default(value: int | None) -> str:
        return "the model card's" if value is None else str(value)

    parser.add_argument("--width", type=int, default=width,
                        help=f"image width in px, multiple of 16 (default {default(width)})")
    parser.add_argument("--height", type=int, default=height,
                        help=f"image height in px, multiple of 16 (default {default(height)})")
    parser.add_argument("--steps", type=int, default=steps, help=f"denoising steps (default {default(steps)})")
    parser.add_argument("--cfg", type=float, default=None,
                        help="true CFG scale; <= 1 turns it off (default: the model card's, 4.0; 2.1: 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed; same seed -> same image on the same device")
    parser.add_argument("--negative", default="", help="negative prompt (used when --cfg > 1)")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                        help="apply a .safetensors LoRA (strength default 1); repeat to stack several")
    parser.add_argument("--preset", default=None, metavar="NAME",
                        help="quality preset (presets/quality_presets.yaml) whose steps, CFG and scheduler replace "
                             "--steps/--cfg; lightning-8/lightning-4 need a Lightning --lora")  # fmt: skip


def _add_image_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", dest="images", action="append", type=Path, default=None, metavar="PNG",
                        help="reference image for edit models (repeat for Edit-2509/2511: up to 3)")  # fmt: skip
    parser.add_argument("--layers", type=int, default=None, help="Qwen-Image-Layered: RGBA layers to make (default 4)")


def configure_demo(parser: argparse.ArgumentParser) -> None:
    from qwen_core.families import DEFAULT_FAMILY, FAMILIES

    parser.add_argument("--out", type=Path, default=None, help="PNG to write (default reports/demo.png)")
    parser.add_argument("--family", default=DEFAULT_FAMILY.key, metavar="FAMILY",
                        help=f"which tiny model: {', '.join(f.short_name for f in FAMILIES.values())} "
                        f"(default {DEFAULT_FAMILY.key})")  # fmt: skip
    _add_image_args(parser)
    parser.add_argument("--prompt", default=DEMO_PROMPT, help="prompt (the tiny model ignores its meaning)")
    _add_sampling_args(parser, width=256, height=256, steps=8)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default 1 unless OMP_NUM_THREADS is set: the tiny model's ops are "
                             "too small to gain from threads, and on a busy machine threads cost 5-10x)")  # fmt: skip
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where the tiny pipeline is cached (default $QWEN_TINY_CACHE or ~/.cache/qwen_core)")  # fmt: skip


def configure_generate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None, help="local diffusers Qwen-Image folder")
    files = parser.add_argument_group("single files (instead of --model; e.g. ComfyUI's models/ files)")
    files.add_argument("--transformer-file", type=Path, default=None,
                       help="diffusion model .safetensors (bf16, fp8, fp8-scaled) or .gguf")
    files.add_argument("--text-encoder-file", type=Path, default=None,
                       help="text encoder .safetensors (default: found in ../text_encoders beside the diffusion model)")
    files.add_argument("--vae-file", type=Path, default=None, help="VAE .safetensors (default: found in ../vae)")
    files.add_argument("--configs", type=Path, default=None,
                       help="diffusers folder of the family with model_index.json, */config.json, tokenizer, scheduler")
    files.add_argument("--fp8-matmul", action="store_true",
                       help="fp8 files: matrix products on fp8 tensor cores (sm_89+; lossy, see README)")
    parser.add_argument("--prompt", required=True, help="what to draw")
    parser.add_argument("--out", required=True, type=Path, help="PNG to write (batch: NAME_1.png, NAME_2.png, ...)")
    # The model card's defaults per family: Qwen-Image 1328x1328/50 steps, Edit ~1 MP at the input's aspect, 2.1
    # 1024x1024/40 steps (qwen_core.families).
    _add_sampling_args(parser, width=None, height=None, steps=None)
    parser.add_argument("--batch", type=int, default=1, help="images per run (default 1)")
    parser.add_argument("--memory-mode", default="auto",
                        help="auto, gpu, streamed, model_offload, group_offload or sequential (default auto)")  # fmt: skip
    parser.add_argument("--dtype", default="auto", help="auto, bf16, fp16 or fp32 (default auto)")
    parser.add_argument("--attention", default="auto", help="auto, sdpa or flash (default auto)")
    parser.add_argument("--device", default=None, help="cuda, cuda:N, mps or cpu (default: best available)")
    _add_image_args(parser)
    cards = parser.add_argument_group("several GPUs (README 'Several GPUs')")
    cards.add_argument("--devices", default="single", metavar="SPEC",
                       help="which card runs which component, in this one process: single (default), auto, or pairs "
                            "like 'text_encoder=cuda:1', 'te=cpu', 'transformer=cuda:0,cuda:1' (blocks split)")
    cards.add_argument("--context-parallel", type=int, default=None, metavar="N",
                       help="denoise one image on N GPUs (one process each, diffusers' context parallelism): prints "
                            "the torchrun command to run (or runs it with --launch); under torchrun it generates")
    cards.add_argument("--cp-attention", default="ulysses", choices=("ulysses", "ring"),
                       help="how attention spans the processes (default ulysses; ring needs CUDA)")
    cards.add_argument("--launch", action="store_true",
                       help="with --context-parallel: start the torchrun command instead of printing it")


class _Progress:
    """A tqdm bar on a terminal; plain `step i/n` lines otherwise (logs, CI, pipes)."""

    def __init__(self, total: int, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="denoising", unit="step", file=self.stream)

    def __call__(self, step: int, total: int, eta_s: float) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(f"eta {eta_s:.1f}s")
        else:
            print(f"  step {step}/{total}  eta {eta_s:.1f} s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _check_out(out: Path) -> Path:
    out = Path(out).expanduser()
    if out.suffix.lower() != ".png":
        raise InvalidInputError("out", f"{out} must end in .png.")
    if out.is_dir():
        raise InvalidInputError("out", f"{out} is a folder; give a file name ending in .png.")
    return out


def save_png(image: Any, out: Path, metadata: dict[str, str] | None = None) -> Path:
    """Write one [H, W, C] float image in 0..1 as a PNG, atomically (temp file + rename)."""
    import numpy as np
    from PIL import Image, PngImagePlugin

    array = (image.detach().cpu().numpy() * 255.0).round().clip(0, 255).astype(np.uint8)  # [H, W, 3 or 4]
    info = PngImagePlugin.PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(key, value)
    png = io.BytesIO()
    Image.fromarray(array).save(png, format="PNG", pnginfo=info)  # RGB, or RGBA for layers with alpha
    write_bytes_atomic(out, png.getvalue())  # a reader never sees half a PNG
    return out


def _outputs(out: Path, count: int) -> list[Path]:
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(1, count + 1)]


def _generate_and_save(generator: Any, args: argparse.Namespace, out: Path, batch: int, model_name: str,
                       images: list[Any] | None = None, *, write: bool = True) -> list[Path]:
    """Generate, print the timings and write the PNGs. ``write`` False (context-parallel ranks other than 0):
    the same computation, silently."""
    from qwen_core.presets import load_presets

    steps = load_presets().quality(args.preset).steps if args.preset else args.steps
    progress = _Progress(steps) if write else None
    try:
        result = generator.generate(
            args.prompt, args.negative, images=images, width=args.width, height=args.height, steps=args.steps,
            true_cfg_scale=args.cfg, seed=args.seed, batch_size=batch, layers=args.layers, on_step=progress,
            preset=args.preset,
        )  # fmt: skip
    finally:
        if progress is not None:
            progress.close()
    if not write:
        return []
    for warning in result.warnings:
        print(f"  warning: {warning}")
    for name in result.loras:
        print(f"  LoRA {name}")
    t = result.timings
    print(f"  {result.width}x{result.height}, {result.steps} steps, seed {result.seed}, attention "
          f"{result.attention_backend}: load {t['load_s']:.2f} s, denoise {t['denoise_s']:.2f} s "
          f"({t['per_step_s'] * 1000:.0f} ms/step), decode {t['decode_s']:.2f} s, total {t['total_s']:.2f} s")  # fmt: skip
    meta = {"prompt": args.prompt, "negative_prompt": args.negative, "seed": str(result.seed),
            "steps": str(result.steps), "true_cfg_scale": f"{result.true_cfg_scale:g}", "model": model_name,
            "software": "qwen_core"}  # fmt: skip
    if result.loras:
        meta["loras"] = "; ".join(result.loras)
    if result.preset:
        meta["preset"] = result.preset
    written = []
    for image, path in zip(result.images, _outputs(out, len(result.images)), strict=True):
        written.append(save_png(image, path, meta))
        print(f"  wrote {path} ({image.shape[1]}x{image.shape[0]})")
    return written


def _print_preflight(model_dir: Path, device_config: Any) -> None:
    from qwen_core.preflight import perform_preflight_checks

    report = perform_preflight_checks(model=model_dir, device_config=device_config)
    p = report.profile
    print(f"  verdict {report.status}: device {p.device}, dtype {p.dtype}, memory mode {p.memory_mode}, "
          f"attention {p.attention_backend}, window {p.max_pixels / 1e6:.2f} MP")  # fmt: skip
    for check in report.checks:
        if check.status != "ok":
            print(f"  [{check.status}] {check.name}: {check.message}")


def run_demo(args: argparse.Namespace) -> int:
    from qwen_core import paths
    from qwen_core.families import get_family
    from qwen_core.generator import QwenImageGenerator
    from qwen_core.tiny import ensure_tiny_pipeline

    out = _check_out(args.out or paths.reports_dir() / "demo.png")
    family = get_family(args.family)
    images = _load_images(args.images, family)
    _quiet_library_progress_bars()
    _set_threads(args.threads)
    started = time.perf_counter()
    print(f"[1/4] tiny pipeline: {family.display_name} (random weights, built offline, cached)")
    model_dir = ensure_tiny_pipeline(args.cache_dir, family=family)
    print(f"  {model_dir} ({time.perf_counter() - started:.1f} s)")
    generator = QwenImageGenerator(model_dir, loras=args.lora)
    loader = generator.loader
    print(f"  loader: {loader.device_config.device}, {loader.dtype_name}, {loader.plan.memory_mode.value}; "
          "tokenizer/processor + scheduler ready, weights load on first use")  # fmt: skip
    print("[2/4] preflight")
    _print_preflight(model_dir, loader.device_config)
    print("[3/4] governor")
    d = generator.plan(args.prompt, args.negative, images=images, width=args.width, height=args.height,
                       steps=args.steps, true_cfg_scale=args.cfg, seed=args.seed, layers=args.layers).decision
    refs = f" with {len(images)} reference image(s)" if images else ""
    print(f"  {d.requested_width}x{d.requested_height}{refs} -> {d.width}x{d.height}: {d.message or d.reason}")
    print(f"[4/4] generate: {args.prompt!r}")
    _generate_and_save(generator, args, out, 1, f"tiny {family.key} (random weights)", images)
    print(f"done in {time.perf_counter() - started:.1f} s; session log: {_log_path()}")
    return 0


def _load_images(paths: list[Path] | None, family: Any, *, demo: bool = True) -> list[Any] | None:
    """The ``--image`` files as PIL images (the generator checks their number for the model). The demo gives an
    edit model that got none a generated test card, so ``demo --family edit`` runs as it stands."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in paths or []:
        try:
            with Image.open(Path(path).expanduser()) as image:
                images.append(image.copy())
        except (OSError, UnidentifiedImageError) as err:
            raise InvalidInputError("image", f"{path} cannot be read as an image ({err}).") from err
    if not images and demo and family.image_inputs.minimum:
        print(f"  no --image given: {family.display_name} edits a generated 256x192 test card")
        images = [_test_card()]
    return images or None


def _test_card() -> Any:
    """A 256x192 colour gradient with a dark square: an input with some structure for the edit demos."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:192, 0:256]
    card = np.stack([x / 255.0, y / 191.0, 1.0 - x / 255.0], axis=-1)
    card[60:132, 90:166] = 0.1
    return Image.fromarray((card * 255).astype(np.uint8))


def run_generate(args: argparse.Namespace) -> int:
    from qwen_core.generator import QwenImageGenerator

    out = _check_out(args.out)
    if args.context_parallel is not None:
        return _run_context_parallel(args, out)
    started = time.perf_counter()
    generator = QwenImageGenerator(
        _model_argument(args), dtype=args.dtype, memory_mode=args.memory_mode, attention=args.attention,
        device=args.device, loras=args.lora, placement=args.devices,
    )
    loader = generator.loader
    print(f"model {loader.path} ({loader.family.display_name}): {loader.device_config.device}, {loader.dtype_name}, "
          f"memory mode {loader.plan.memory_mode.value} ({loader.memory_mode_reason}), attention "
          f"{loader.device_config.attention_backend}")  # fmt: skip
    images = _load_images(args.images, loader.family, demo=False)
    _generate_and_save(generator, args, out, args.batch, str(loader.path), images)
    for attempt in loader.attempts:
        if attempt.outcome != "ok":
            print(f"  load {attempt.describe()}")
    print(f"done in {time.perf_counter() - started:.1f} s; session log: {_log_path()}")
    return 0


def _run_context_parallel(args: argparse.Namespace, out: Path) -> int:
    """Outside torchrun: print (or with --launch run) the torchrun command. Under torchrun: this process's part."""
    from qwen_core.parallel.settings import (
        ContextParallelSettings,
        format_command,
        torchrun_command,
        under_torchrun,
    )

    settings = ContextParallelSettings.parse(args.context_parallel, args.cp_attention)
    model = _model_argument(args)
    if not under_torchrun():
        command = torchrun_command(["generate", *_generate_argv(args)], settings.degree)
        if not args.launch:
            print("context parallelism runs one process per GPU; start them with:")
            print(f"  {format_command(command)}")
            return 0
        import subprocess

        return subprocess.run(command, check=False).returncode
    from qwen_core.parallel.run import parallel_session

    started = time.perf_counter()
    with parallel_session(model, settings, device=args.device, dtype=args.dtype, attention=args.attention,
                          loras=args.lora, memory_mode=args.memory_mode, placement=args.devices) as session:
        loader = session.generator.loader
        if session.is_writer:
            print(f"model {loader.path} ({loader.family.display_name}): {session.handle.describe()}, "
                  f"{loader.dtype_name}, process group {session.backend}")
        images = _load_images(args.images, loader.family, demo=False)
        _generate_and_save(session.generator, args, out, args.batch, str(loader.path), images,
                           write=session.is_writer)
    if session.is_writer:
        print(f"done in {time.perf_counter() - started:.1f} s; session log: {_log_path()}")
    return 0


def _generate_argv(args: argparse.Namespace) -> list[str]:
    """``generate``'s parsed arguments as a command line again (what each torchrun process receives)."""
    argv = ["--prompt", args.prompt, "--out", str(args.out), "--seed", str(args.seed), "--batch", str(args.batch),
            "--context-parallel", str(args.context_parallel), "--cp-attention", args.cp_attention]
    for flag, value in (("--width", args.width), ("--height", args.height), ("--steps", args.steps),
                        ("--cfg", args.cfg), ("--layers", args.layers)):
        if value is not None:
            argv += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    for image in args.images or []:
        argv += ["--image", str(image)]
    for flag, value in (("--model", args.model), ("--transformer-file", args.transformer_file),
                        ("--text-encoder-file", args.text_encoder_file), ("--vae-file", args.vae_file),
                        ("--configs", args.configs), ("--negative", args.negative), ("--dtype", args.dtype),
                        ("--memory-mode", args.memory_mode), ("--attention", args.attention),
                        ("--device", args.device), ("--preset", args.preset)):
        if value not in (None, "", "auto"):
            argv += [flag, str(value)]
    if args.devices not in (None, "", "single"):
        argv += ["--devices", args.devices]
    if args.fp8_matmul:
        argv.append("--fp8-matmul")
    for lora in args.lora:
        argv += ["--lora", lora]
    return argv


def _model_argument(args: argparse.Namespace) -> Any:
    """--model (a folder) or the single-file arguments as a ``SingleFilesSource``; exactly one of the two."""
    if (args.model is None) == (args.transformer_file is None):
        raise InvalidInputError("model", "give either --model (a diffusers folder) or --transformer-file (+ --configs).")
    if args.model is not None:
        return args.model
    if args.configs is None:
        raise InvalidInputError("configs", "--transformer-file needs --configs: a diffusers folder of the family "
                                "(configs only is enough, e.g. `download Qwen/Qwen-Image --allow model_index.json "
                                "--allow '*/config.json' --allow 'tokenizer/*' --allow 'scheduler/*'`).")
    from qwen_core.sources.comfy_files import SingleFilesSource

    return SingleFilesSource(args.transformer_file, args.text_encoder_file, args.vae_file, configs=args.configs,
                             fp8_matmul=args.fp8_matmul)


def _set_threads(threads: int | None) -> None:
    import torch

    if threads is not None and threads < 1:
        raise InvalidInputError("threads", f"{threads} must be >= 1.")
    if threads is None and os.environ.get("OMP_NUM_THREADS"):
        return
    torch.set_num_threads(threads or 1)


def _quiet_library_progress_bars() -> None:
    """The tiny model loads in a blink: diffusers'/transformers' loading bars would only clutter the demo."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def _log_path() -> Path:
    from qwen_core.session_log import get_session_log

    return get_session_log().path
