"""``QwenImageGenerator``: validated, governed, cancellable generation for every Qwen-Image family.

``generate()`` checks every input before any compute (naming the field), including the reference images
against the loaded family's rule (``images=``: none for text-to-image, 1 for Edit and Layered, 1-3 for
Edit-2509/2511, 0-10 for 2.1), lets the governor pick the final size (counting the tokens the references add),
loads the weights on first use (``PipelineLoader``), runs the family's real diffusers pipeline with a step
callback that reports progress, honours cancel, and watches the latents for NaN/Inf. Images come back as
ComfyUI's IMAGE layout: float32 [B, H, W, C] in 0..1 on the CPU; C = 4 (RGBA) for the families whose VAE
decodes alpha (Layered: ``layers`` images per input; 2.1).

Failure behaviour:
- cancel: ``should_cancel()`` is polled after every step; ``GenerationCancelled`` is raised from inside the
  step callback, which aborts the pipeline before the VAE decode. Offload hooks are reset in ``finally``.
- NaN/Inf latents (the "black image" bug of some attention kernels): the run stops at that step, SDPA is
  set for this pipeline and for the rest of the process, and the generation is retried once.
- out of memory: our own memory is released, then ``OutOfMemoryError`` with a concrete tip is raised; the
  generator stays usable. An OOM in the VAE decode after the last step decodes the final latents again in
  tiles instead.
- finite latents but NaN/Inf pixels (an fp16 VAE overflow): decoded again with the VAE in float32.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qwen_core import family_call, governor, reference_images
from qwen_core.errors import GenerationCancelled, InvalidInputError, OutOfMemoryError, QwenError
from qwen_core.families import DEFAULT_FAMILY, ModelFamily
from qwen_core.loading import LIGHTER_MODE, SDPA, PipelineLoader, free_memory, is_oom
from qwen_core.lora.fuse import lora_memory
from qwen_core.session_log import get_session_log
from qwen_core.validation import whole_number

MAX_STEPS = 200  # 50 is the model card's default; beyond ~150 flow-matching output no longer changes
MAX_BATCH = 16
CFG_RANGE = (0.0, 20.0)  # <= 1 turns true CFG off; the model card uses 4.0; above ~10 images burn out
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed accepts the full unsigned 64-bit range
# The pipeline reads at most 512 prompt tokens (max_sequence_length); a BPE token of this vocabulary rarely
# spans more than 16 characters, so 8192 characters hold every token the model can see. Longer prompts
# (a pasted 1 MB file) are cut here with a warning instead of costing seconds of tokenising.
PROMPT_CHAR_LIMIT = 8192
DEFAULT_NEGATIVE = " "  # the model card's "no negative prompt" value when true CFG is on

StepCallback = Callable[[int, int, float], None]


@dataclass
class GenerationRequest:
    """A validated request (after truncation); sizes are the governor's decision."""

    prompt: str
    negative_prompt: str
    steps: int
    true_cfg_scale: float
    seed: int
    batch_size: int
    decision: governor.SizeDecision
    warnings: list[str] = field(default_factory=list)
    preset: str = ""  # the quality preset that set steps/CFG/scheduler, if any
    scheduler: Any = None  # the preset's scheduler for this run (None: the model's own)
    images: list[Any] = field(default_factory=list)  # PIL references, converted for the family
    layers: int = 0  # Layered: RGBA layers per image
    resolution: int | None = None  # Layered: the resolution bucket the pipeline is called with


@dataclass
class GenerationResult:
    images: torch.Tensor  # float32 [B, H, W, C] in 0..1, CPU
    decision: governor.SizeDecision
    seed: int
    steps: int
    true_cfg_scale: float
    timings: dict[str, float]
    attention_backend: str
    retried_with_sdpa: bool = False
    warnings: list[str] = field(default_factory=list)
    loras: tuple[str, ...] = ()  # "name @ strength" of each LoRA applied, in stack order
    preset: str = ""

    @property
    def width(self) -> int:
        return int(self.images.shape[2])

    @property
    def height(self) -> int:
        return int(self.images.shape[1])


class _NonFiniteLatents(Exception):
    """Raised inside the step callback to stop a run whose latents went NaN/Inf (no decode)."""

    def __init__(self, step: int) -> None:
        super().__init__(f"latents became NaN/Inf at step {step}")
        self.step = step


def _text_field(name: str, value: object, *, required: bool, warnings: list[str]) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise InvalidInputError(name, f"must be text, got {type(value).__name__}.")
    if "\x00" in value:
        raise InvalidInputError(name, "contains a NUL character.")
    if required and not value.strip():
        raise InvalidInputError(name, "is empty; describe the image to generate.")
    if len(value) > PROMPT_CHAR_LIMIT:
        warnings.append(
            f"{name} was {len(value):,} characters; kept the first {PROMPT_CHAR_LIMIT:,} (the model reads at most "
            "512 tokens)."
        )
        value = value[:PROMPT_CHAR_LIMIT]
    return value


def min_steps_for(scheduler: Any) -> int:
    """Fewest steps the scheduler can run. Qwen-Image's FlowMatch config sets ``shift_terminal``; with one step
    diffusers stretches the sigmas by 0/0, so every latent is NaN and the image is black."""
    return 2 if getattr(getattr(scheduler, "config", None), "shift_terminal", None) else 1


GovernorInputs = Callable[..., dict[str, Any]]


def validate_request(
    prompt: object,
    negative_prompt: object,
    *,
    width: object,
    height: object,
    steps: object,
    true_cfg_scale: object,
    seed: object,
    batch_size: object,
    governor_kwargs: dict[str, Any] | GovernorInputs | None = None,
    min_steps: int = 1,
    family: ModelFamily = DEFAULT_FAMILY,
    images: Any = None,
    layers: object = None,
    size_multiple: int = 16,
    where: str = "",
) -> GenerationRequest:
    """Check every input (raising InvalidInputError naming the field, QwenError for a wrong image count) and
    decide the size; no compute. ``width``/``height`` None: the family's default (for an edit model, its
    default area at the last reference's aspect). ``governor_kwargs``: for ``governor.clamp_image_size``, or a
    callable taking ``extra_pixels=``, ``pixel_cost=`` and ``cfg_branches=`` (``PipelineLoader.governor_inputs``)."""
    warnings: list[str] = []
    prompt = _text_field("prompt", prompt, required=True, warnings=warnings)
    negative = _text_field("negative_prompt", negative_prompt, required=False, warnings=warnings)
    refs = reference_images.prepare(images, family, where=where)
    steps = whole_number("steps", steps, min_steps, MAX_STEPS,
                       " (this model's scheduler needs at least 2)" if min_steps > 1 else "")
    seed = whole_number("seed", seed, 0, SEED_MAX)
    max_batch = min(MAX_BATCH, family.max_batch_size)
    batch_size = whole_number("batch_size", batch_size, 1, max_batch, " (images per run; more costs VRAM)" if max_batch > 1
                              else f" ({family.display_name} makes one image, as {family.default_layers} layers, per run)")
    low, high = CFG_RANGE
    cfg = true_cfg_scale
    if isinstance(cfg, bool) or not isinstance(cfg, numbers.Real) or not math.isfinite(cfg) or not low <= cfg <= high:
        raise InvalidInputError(
            "true_cfg_scale", f"{cfg!r} is not a number in {low:g}..{high:g} (<= 1 turns true CFG off; 4.0 is typical)."
        )
    if family.guidance_distilled and cfg > 1:
        warnings.append(f"{family.display_name} is distilled to run without CFG: true_cfg_scale {cfg:g} doubles the "
                        "work per step and usually makes the image worse (use 1).")
    layers = _layers(family, layers)
    request = GenerationRequest(prompt, negative, steps, float(cfg), seed, batch_size, None, warnings,  # type: ignore[arg-type]
                                images=refs, layers=layers)
    decide_size(request, family, width, height, governor_kwargs, size_multiple)
    return request


def _layers(family: ModelFamily, layers: object) -> int:
    if not family_call.is_layered(family):
        if layers is not None:
            raise InvalidInputError("layers", f"only Qwen-Image-Layered makes layers; {family.display_name} does not.")
        return 0
    if layers is None:
        return family.default_layers
    return whole_number("layers", layers, 1, family_call.MAX_LAYERS, " (RGBA layers the image is split into)")


def decide_size(request: GenerationRequest, family: ModelFamily, width: object, height: object,
                governor_kwargs: dict[str, Any] | GovernorInputs | None, size_multiple: int) -> None:
    """Set ``request.decision`` (and Layered's ``resolution``): the governor's size, with the sequence tokens the
    references and Layered's frames add counted, then rounded as the family's pipeline will round it."""
    if width is None or height is None:
        auto_w, auto_h = family_call.auto_size(family, request.images)
        width, height = auto_w if width is None else width, auto_h if height is None else height
    extra, cost = family.extra_pixels(len(request.images)), family.sequence_frames(request.layers)
    branches = 2 if request.true_cfg_scale > 1 else 1
    if callable(governor_kwargs):
        kwargs = governor_kwargs(extra_pixels=extra, pixel_cost=cost, cfg_branches=branches)
    else:
        kwargs = dict(governor_kwargs or {})
        if kwargs.get("max_pixels") is None:  # an explicit limit already accounts for everything
            kwargs.update(extra_pixels=extra, pixel_cost=cost, cfg_branches=branches)
    decision = governor.clamp_image_size(width, height, **kwargs)
    if family_call.is_layered(family):
        size = family_call.layered_size(family, decision.pixels, request.images[0], size_multiple)
        note = (f"Qwen-Image-Layered: resolution {size.resolution} at the input's aspect -> "
                f"{size.width}x{size.height} ({request.layers} layers)")
        decision = dataclasses.replace(decision, width=size.width, height=size.height, reason=f"{note}; {decision.reason}")
        request.resolution = size.resolution
    elif size_multiple > governor.ALIGN and (decision.width % size_multiple or decision.height % size_multiple):
        w, h = (max(size_multiple, side // size_multiple * size_multiple) for side in (decision.width, decision.height))
        note = f"rounded down to multiples of {size_multiple} as this model needs ({decision.width}x{decision.height} -> {w}x{h})"
        decision = dataclasses.replace(decision, width=w, height=h, reason=f"{decision.reason}; {note}",
                                       message=f"{decision.message}; {note}" if decision.message else note.capitalize())
    request.decision = decision
    if decision.message:
        request.warnings.append(decision.message)


class _StepWatch:
    """The pipeline's ``callback_on_step_end``: NaN watch, progress with ETA, cancel. Returns a dict."""

    def __init__(self, total: int, on_step: StepCallback | None, should_cancel: Callable[[], bool] | None) -> None:
        self.total, self.on_step, self.should_cancel = total, on_step, should_cancel
        self.start = time.perf_counter()
        self.step_ends: list[float] = []
        self.latents: torch.Tensor | None = None  # the newest latents: what a failed decode can start from

    def __call__(self, pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        latents = kwargs.get("latents")
        # One reduction per step; it also syncs the device, which makes the step timings below honest.
        if latents is not None and not bool(torch.isfinite(latents).all()):
            raise _NonFiniteLatents(step + 1)
        self.latents = latents
        now = time.perf_counter()
        self.step_ends.append(now)
        done = step + 1
        if self.on_step is not None:
            self.on_step(done, self.total, self.per_step_s(now) * (self.total - done))
        if self.should_cancel is not None and self.should_cancel():
            raise GenerationCancelled(f"generation cancelled after step {done} of {self.total}; nothing was decoded.")
        return {}

    def per_step_s(self, now: float) -> float:
        """Seconds per step. The first step also carries the text encoding, so the mean is taken over the later
        steps when there are any; else the time since the start (``now`` when no step has finished)."""
        ends = self.step_ends
        if len(ends) > 1:
            return (ends[-1] - ends[0]) / (len(ends) - 1)
        return (ends[-1] if ends else now) - self.start


def _to_comfy(images: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] in 0..1 (diffusers "pt") -> ComfyUI IMAGE: float32 [B, H, W, C] on the CPU."""
    return images.permute(0, 2, 3, 1).to(device="cpu", dtype=torch.float32).clamp(0, 1).contiguous()


class QwenImageGenerator:
    """Text-to-image over one model at a time. Build from a folder path or an existing ``PipelineLoader``."""

    def __init__(self, model: str | Path | PipelineLoader, **loader_kwargs: Any) -> None:
        self.loader = model if isinstance(model, PipelineLoader) else PipelineLoader(model, **loader_kwargs)

    # -- lifecycle --
    def load(self) -> Any:
        return self.loader.load()

    def unload(self) -> None:
        self.loader.unload()

    def set_loras(self, loras: Any) -> None:
        """The LoRA stack for the next runs (see ``PipelineLoader.set_loras``): checked now, fused on the next
        generate, without reloading the model."""
        self.loader.set_loras(loras)

    def switch_to_model(self, path: str | Path, *, load: bool = True, **loader_kwargs: Any) -> Any:
        """Release the current model's weights and switch to the model at ``path``.

        The new folder is validated (and its tokenizer built) before anything is released, so a bad path
        leaves the current model as it was. With ``load`` the new weights load now, inside
        ``memory.safe_model_switch``: a failed load leaves nothing half-loaded and raises; this generator
        then keeps its old model (which reloads on next use). Returns the ``memory.SwitchReport``
        (readings before, after the release, and after loading)."""
        from qwen_core.memory import switch_model

        kwargs = {
            "dtype": self.loader.dtype_choice, "memory_mode": self.loader.memory_mode_choice,
            "attention": self.loader.attention_choice, "device": self.loader.device_config.device,
            "loras": self.loader.loras,
            "compile": self.loader.compile_choice, "compute": self.loader.compute_choice,
            "placement": self.loader.placement_choice,
        } | loader_kwargs  # fmt: skip
        new_loader = PipelineLoader(path, **kwargs)
        old_key = self.loader.residency_key
        report = switch_model(old_key if old_key != new_loader.residency_key else None,
                              new_loader.load if load else None)
        self.loader = new_loader
        get_session_log().info(f"switch: -> {new_loader.path}: {report.summary()}")
        return report

    # -- generation --
    def generate(
        self,
        prompt: str,
        negative_prompt: str = "",
        *,
        images: Any = None,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        true_cfg_scale: float | None = None,
        seed: int = 0,
        batch_size: int = 1,
        layers: int | None = None,
        on_step: StepCallback | None = None,
        should_cancel: Callable[[], bool] | None = None,
        preset: str | None = None,
    ) -> GenerationResult:
        """Generate ``batch_size`` images (Layered: ``layers`` RGBA layers of one image). Same seed, inputs and
        device -> the same images.

        ``images``: reference images (ComfyUI IMAGE tensors [1, H, W, C] in 0..1, arrays or PIL images; ``None``
        entries are skipped), as many as the loaded family takes. ``width``/``height``/``steps``/
        ``true_cfg_scale`` left out: the family's model-card defaults (an edit model's output follows the last
        reference's aspect). ``preset`` (a quality preset name) replaces ``steps`` and ``true_cfg_scale`` with the
        preset's and runs with its scheduler settings; a Lightning preset is refused unless the LoRA stack has a
        Lightning LoRA or the model is a pre-fused Lightning model (``lora.lightning.resolve_quality_preset``)."""
        from qwen_core.lora.lightning import resolve_quality_preset, scheduler_for

        started = time.perf_counter()
        quality = resolve_quality_preset(preset, self.loader.loras, self.loader.path) if preset else None
        if quality is not None:
            steps, true_cfg_scale = quality.steps, quality.true_cfg_scale
        scheduler = scheduler_for(quality, self.loader.scheduler)
        request = self.plan(prompt, negative_prompt, images=images, width=width, height=height, steps=steps,
                            true_cfg_scale=true_cfg_scale, seed=seed, batch_size=batch_size, layers=layers,
                            scheduler=scheduler)  # fmt: skip
        request.preset, request.scheduler = (quality.name if quality else ""), scheduler
        self._check_callables(on_step, should_cancel)
        log = get_session_log()
        for warning in request.warnings:
            log.warning(f"generate: {warning}")
        if should_cancel is not None and should_cancel():
            raise GenerationCancelled("generation cancelled before it started.")
        was_loaded, plan = self.loader.is_loaded, self.loader.plan
        pipe = self.loader.load()
        timings = {"load_s": 0.0 if was_loaded else time.perf_counter() - started}
        self._after_load(pipe, request, width, height, fell_back=self.loader.plan != plan)
        result, run_timings, retried = self._run_with_sdpa_retry(pipe, request, on_step, should_cancel)
        timings.update(run_timings)
        timings["total_s"] = time.perf_counter() - started
        d = request.decision
        refs = f", {len(request.images)} reference image(s)" if request.images else ""
        loras = tuple(spec.describe() for spec in self.loader.loras)
        extras = (f", preset {request.preset}" if request.preset else "") + (f", {lora_memory(pipe).summary()}" if loras else "")
        log.info(
            f"generate: {self.loader.family.display_name} {d.width}x{d.height} x{request.batch_size}{refs}, "
            f"{request.steps} steps, cfg {request.true_cfg_scale:g}, seed {request.seed}, attention "
            f"{self.loader.attention_backend}{extras}: {timings['total_s']:.2f} s"
        )
        return GenerationResult(
            images=result, decision=d, seed=request.seed, steps=request.steps,
            true_cfg_scale=request.true_cfg_scale, timings=timings, attention_backend=self.loader.attention_backend,
            retried_with_sdpa=retried, warnings=request.warnings, loras=loras, preset=request.preset,
        )  # fmt: skip

    def plan(self, prompt: object, negative_prompt: object = "", *, images: Any = None, width: object = None,
             height: object = None, steps: object = None, true_cfg_scale: object = None, seed: object = 0,
             batch_size: object = 1, layers: object = None, scheduler: Any = None) -> GenerationRequest:
        """What ``generate`` would run (inputs checked, references converted, the governor's size), without
        loading or computing anything. ``scheduler``: a preset's scheduler for this run (None: the model's own)."""
        family = self.loader.family
        return validate_request(
            prompt, negative_prompt, width=width, height=height,
            steps=family.default_steps if steps is None else steps,
            true_cfg_scale=family.default_true_cfg_scale if true_cfg_scale is None else true_cfg_scale,
            seed=seed, batch_size=batch_size, governor_kwargs=self.loader.governor_inputs,
            min_steps=min_steps_for(scheduler or self.loader.scheduler), family=family, images=images, layers=layers,
            size_multiple=family_call.size_multiple(family, self.loader.configs), where=str(self.loader.path),
        )  # fmt: skip

    def _after_load(self, pipe: Any, request: GenerationRequest, width: object, height: object, *,
                    fell_back: bool) -> None:
        """What is known only with the pipeline loaded: a smaller window after an OOM fallback, the checkpoint's
        own step count (2.1 Turbo's sigma grid)."""
        family, log = self.loader.family, get_session_log()
        if fell_back:  # the load fell back (OOM): the governor gets the smaller window now
            before = len(request.warnings)
            decide_size(request, family, width, height, self.loader.governor_inputs,
                        family_call.size_multiple(family, self.loader.configs))
            for message in request.warnings[before:]:
                log.warning(f"generate: {message}")
        fixed = family_call.fixed_steps(pipe)
        if fixed is not None and fixed != request.steps:
            message = (f"{family.display_name} runs the {fixed}-step sigma grid of its checkpoint; steps "
                       f"{request.steps} was not used.")
            request.steps = fixed
            request.warnings.append(message)
            log.warning(f"generate: {message}")

    def _run_with_sdpa_retry(
        self, pipe: Any, request: GenerationRequest, on_step: StepCallback | None, should_cancel: Callable[[], bool] | None
    ) -> tuple[torch.Tensor, dict[str, float], bool]:
        """``_run``; on NaN/Inf latents switch to SDPA (for the process) and run once more."""
        try:
            return (*self._run(pipe, request, on_step, should_cancel), False)
        except _NonFiniteLatents as err:
            backend = self.loader.attention_backend
            if backend == SDPA:
                raise self._nan_error(err) from None
            get_session_log().warning(f"generate: {err} with attention '{backend}'; retrying once with SDPA")
            self.loader.switch_to_sdpa(f"'{backend}' produced NaN/Inf latents")
        try:
            return (*self._run(pipe, request, on_step, should_cancel), True)
        except _NonFiniteLatents as again:
            raise self._nan_error(again) from None

    def _check_callables(self, on_step: object, should_cancel: object) -> None:
        for name, fn in (("on_step", on_step), ("should_cancel", should_cancel)):
            if fn is not None and not callable(fn):
                raise InvalidInputError(name, f"must be a function or None, got {type(fn).__name__}.")

    def _run(
        self, pipe: Any, request: GenerationRequest, on_step: StepCallback | None, should_cancel: Callable[[], bool] | None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """One pipeline call. Memory is released on every exit path that is not a success."""
        watch = _StepWatch(request.steps, on_step, should_cancel)
        device = pipe._execution_device
        # The generator lives on the execution device: CUDA and CPU draw different noise for one seed.
        generator = torch.Generator(device=device).manual_seed(request.seed)
        cfg_on = request.true_cfg_scale > 1
        pipe.set_progress_bar_config(disable=True)  # progress goes through on_step
        d = request.decision
        family_kwargs = family_call.call_kwargs(self.loader.family, request.images, width=d.width, height=d.height,
                                                layers=request.layers, resolution=request.resolution)  # fmt: skip
        ok = False
        model_scheduler = pipe.scheduler
        if request.scheduler is not None:  # the preset's scheduler for this run only
            pipe.scheduler = request.scheduler
        try:
            # The pipeline runs under no_grad itself. Not inference_mode: tensors an offload/streaming engine
            # allocates during the call would become inference tensors and break later in-place copies.
            output = pipe(
                prompt=request.prompt,
                negative_prompt=(request.negative_prompt or DEFAULT_NEGATIVE) if cfg_on else None,
                true_cfg_scale=request.true_cfg_scale,
                num_inference_steps=request.steps,
                num_images_per_prompt=request.batch_size,
                generator=generator,
                output_type="pt",
                callback_on_step_end=watch,
                **family_kwargs,
            )
            images = _to_comfy(family_call.output_images(output.images))
            ok = True
        except BaseException as err:
            # The finished pipeline frames in the traceback hold latents, embeddings and (for an OOM) the
            # activations that did fit: drop their locals so a stored exception (ComfyUI keeps the last
            # one) pins no device memory. File/line information stays. BaseException: a host's cancel may
            # be one (ComfyUI >= 0.33 raises InterruptProcessingException(BaseException) from on_step).
            traceback.clear_frames(err.__traceback__)
            if not isinstance(err, Exception) or not is_oom(err):
                raise
            if len(watch.step_ends) < request.steps or watch.latents is None:
                raise self._oom_error(request, err) from err
            # Every step finished and the VAE decode ran out of memory (the classic OOM at 99%): decode the
            # final latents again in tiles instead of throwing the whole run away.
            images = self._decode_in_tiles(pipe, watch.latents, request, err)
            ok = True
        finally:
            pipe.scheduler = model_scheduler
            if not ok:
                # A run aborted mid-way (cancel, NaN, OOM, ComfyUI interrupt) skipped the pipeline's own
                # maybe_free_model_hooks(): offload hooks would keep a model on the GPU.
                pipe.maybe_free_model_hooks()
                free_memory()
        if not bool(torch.isfinite(images).all()) and watch.latents is not None:
            images = self._decode_nonfinite(pipe, watch.latents, request)  # would be a black image
        done = time.perf_counter()
        last_step = watch.step_ends[-1] if watch.step_ends else done
        timings = {
            "denoise_s": last_step - watch.start,  # text encoding + all steps
            "decode_s": done - last_step,
            "per_step_s": watch.per_step_s(done),
        }
        return images, timings

    def _decode_again(
        self, pipe: Any, latents: torch.Tensor, request: GenerationRequest, *, tiles: bool = False, fp32: bool = False
    ) -> torch.Tensor:
        """The pipeline's own decode steps (unpack, de-normalise, vae.decode, postprocess) once more, in tiles
        and/or with the VAE in float32. The VAE's settings are restored afterwards, so the next run takes the
        fast path first and stays reproducible."""
        d, vae = request.decision, pipe.vae
        was_tiling, dtype = bool(getattr(vae, "use_tiling", False)), vae.dtype
        free_memory()
        try:
            if tiles:
                vae.enable_tiling()
            if fp32:
                vae.to(dtype=torch.float32)
            image = family_call.decode_latents(pipe, self.loader.family, latents, d.width, d.height, request.layers)
        except Exception as again:
            traceback.clear_frames(again.__traceback__)
            if is_oom(again):
                raise self._oom_error(request, again) from again
            raise
        finally:
            if tiles and not was_tiling:
                vae.disable_tiling()
            if fp32:
                vae.to(dtype=dtype)
            pipe.maybe_free_model_hooks()
        return _to_comfy(image)

    def _decode_in_tiles(self, pipe: Any, latents: torch.Tensor, request: GenerationRequest, err: BaseException) -> torch.Tensor:
        d = request.decision
        get_session_log().warning(f"generate: VAE decode out of memory at {d.width}x{d.height} ({err}); decoding in tiles")
        images = self._decode_again(pipe, latents, request, tiles=True)
        request.warnings.append("The VAE decode ran out of memory; the image was decoded in tiles instead (slower).")
        return images

    def _decode_nonfinite(self, pipe: Any, latents: torch.Tensor, request: GenerationRequest) -> torch.Tensor:
        """Finite latents, NaN/Inf pixels: the VAE overflowed (fp16). Decode again with the VAE in float32."""
        get_session_log().warning("generate: the VAE turned finite latents into NaN/Inf; decoding again in float32")
        images = self._decode_again(pipe, latents, request, fp32=True)
        if not bool(torch.isfinite(images).all()):
            fix = "Use dtype bf16 or fp32; report the model and card if it persists."
            get_session_log().error("generate: the VAE produced NaN/Inf even in float32", fix=fix)
            raise QwenError("the VAE produced NaN/Inf (a black image) even in float32.", fix=fix)
        request.warnings.append("The VAE produced NaN/Inf in its dtype; the image was decoded again in float32.")
        return images

    def _oom_error(self, request: GenerationRequest, err: BaseException) -> OutOfMemoryError:
        free_memory()
        d = request.decision
        smaller = governor.clamp_image_size(d.width, d.height, max_pixels=int(d.pixels * 0.6), min_side=64)
        mode = self.loader.plan.memory_mode
        lighter = LIGHTER_MODE.get(mode)
        tips = [f"a smaller size (e.g. {smaller.width}x{smaller.height})"]
        if request.batch_size > 1:
            tips.append("batch_size 1")
        if len(request.images) > max(1, self.loader.family.image_inputs.minimum):
            tips.append(f"fewer reference images (each adds ~{self.loader.family.tokens_per_reference_image:,} tokens)")
        if request.layers > 1:
            tips.append("fewer layers")
        if lighter is not None:
            tips.append(f"memory_mode '{lighter.value}' (now '{mode.value}')")
        fix = "Try " + ", or ".join(tips) + ". Our memory was released; the next run can go ahead."
        get_session_log().error(f"generate: out of memory at {d.width}x{d.height} x{request.batch_size}: {err}", fix=fix)
        return OutOfMemoryError(f"out of memory while generating {d.width}x{d.height} x{request.batch_size}.", fix=fix)

    def _nan_error(self, err: _NonFiniteLatents) -> QwenError:
        fix = ("Use bf16 or fp32 (Qwen-Image overflows in fp16)." if self.loader.plan.dtype == torch.float16
               else "Try dtype fp32, or another seed; report the model and card if it persists.")  # fmt: skip
        get_session_log().error(f"generate: {err} with SDPA", fix=fix)
        return QwenError(f"the model produced NaN/Inf ({err}) even with SDPA attention.", fix=fix)
