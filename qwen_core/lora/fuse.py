"""Applying a stack of LoRAs to a loaded pipeline, and taking them off again exactly.

Method (the same in every memory mode): for each layer a LoRA touches, an exact copy of the base weight is
kept in CPU RAM the first time the layer is touched, and the fused weight

    W = round_to_dtype( float32(W_base) + sum_i strength_i * scale_i * float32(B_i) @ float32(A_i) )

is computed on the execution device (one layer at a time, so the extra memory is one layer in float32) and
written *in place* into wherever that layer's weights really live:

- ``gpu`` / CPU / ``model_offload``: the parameter itself;
- ``streamed``: the streamed engine's host copy (pinned buffer) for streamed blocks, then the device slots
  that hold a stale copy are reloaded; resident blocks are plain parameters;
- ``sequential``: accelerate's offloaded weights map; ``group_offload``: diffusers' pinned CPU copies.

Taking a LoRA off, or changing the stack, recomputes touched layers from the kept base copy, and a layer no
LoRA touches any more gets its base copy written back: output is bit-identical to never having applied one.
A change of strength therefore costs one pass over the touched layers (a host->device copy of their base
and a rank-r product each), not a model reload. Writes are in place (same tensors, same addresses), so a
``torch.compile``d transformer keeps its compiled graphs: no recompilation for a strength change.

fp8 weights (``Fp8Linear`` of ``fp8_compute``, or the streamed engine's fp8 storage) are not fused: adding a
small delta and rounding to e4m3 again would lose most of it (a Lightning delta is often below one e4m3
step of the weight) and stack a second quantisation error. There the LoRA runs beside the fp8 product in
the activation dtype, ``y = fp8(x) + (x A^T) B^T`` (stacked LoRAs concatenated into one pair of matrices),
which keeps the delta exact at the cost of two thin matrix products per layer.

State lives in ``PipelineState.loras`` (a ``LoraState``), never on the diffusers objects.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qwen_core.families import ModelFamily
from qwen_core.lora.files import LoraFactors, LoraFile, file_stamp, load_file
from qwen_core.lora.spec import LoraError, LoraSpec
from qwen_core.lora.targets import check_fits, linear_shapes
from qwen_core.pipeline_state import peek_state, state_of

_MiB = 2**20


@dataclass(frozen=True)
class LoraMemory:
    """Bytes a LoRA stack holds: its factors, the exact base copies of touched layers (CPU), side paths."""

    factor_bytes: int = 0
    backup_bytes: int = 0
    side_bytes: int = 0
    layers: int = 0

    def summary(self) -> str:
        if not self.layers:
            return "no LoRA applied"
        return (f"LoRA: {self.layers} layers, factors {self.factor_bytes / _MiB:.1f} MiB, base copies "
                f"{self.backup_bytes / _MiB:.1f} MiB (CPU)"
                + (f", side paths {self.side_bytes / _MiB:.1f} MiB" if self.side_bytes else ""))


@dataclass
class LoraState:
    """What is applied to one pipeline now (``PipelineState.loras``)."""

    applied: tuple[tuple[str, tuple[int, int], float], ...] = ()  # (path, stamp, strength) in stack order
    files: dict[tuple[str, tuple[int, int]], LoraFile] = field(default_factory=dict)
    backups: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> exact base weight (CPU)
    recipes: dict[str, tuple] = field(default_factory=dict)  # layer -> the LoRAs it carries now (fused or side)
    side: dict[str, tuple[Any, int]] = field(default_factory=dict)  # fp8 layer -> (hook handle, bytes)

    def memory(self) -> LoraMemory:
        return LoraMemory(
            factor_bytes=sum(f.nbytes for f in self.files.values()),
            backup_bytes=sum(t.numel() * t.element_size() for t in self.backups.values()),
            side_bytes=sum(b for _, b in self.side.values()),
            layers=len(self.recipes),
        )


@dataclass(frozen=True)
class LoraReport:
    """What one ``apply_loras`` call did."""

    applied: tuple[str, ...]
    changed_layers: int
    restored_layers: int
    seconds: float
    memory: LoraMemory
    formats: tuple[str, ...] = ()

    def summary(self) -> str:
        stack = ", ".join(self.applied) or "none"
        return (f"LoRAs [{stack}]: {self.changed_layers} layers fused, {self.restored_layers} restored in "
                f"{self.seconds:.2f} s; {self.memory.summary()}")


# ---- where a layer's weight lives -------------------------------------------------------------------
class _WeightRef:
    """The authoritative storage of one layer's weight in the current memory mode."""

    def __init__(self, tensors: list[torch.Tensor], dtype: torch.dtype, shape: torch.Size, on_write: Any = None):
        self.tensors, self.dtype, self.shape, self.on_write = tensors, dtype, shape, on_write

    def read(self) -> torch.Tensor:
        return self.tensors[0].view(self.dtype).view(self.shape)

    @torch.no_grad()
    def write(self, value: torch.Tensor) -> None:
        for tensor in self.tensors:
            tensor.view(self.dtype).view(self.shape).copy_(value)
        if self.on_write is not None:
            self.on_write()


def _group_offload_copies(transformer: nn.Module) -> dict[int, torch.Tensor]:
    """id(param) -> the CPU copy diffusers' group offloading (with streams) onloads from."""
    copies: dict[int, torch.Tensor] = {}
    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        hook = registry.get_hook("group_offloading") if registry is not None else None
        group = getattr(hook, "group", None)
        for param, cpu in (getattr(group, "cpu_param_dict", None) or {}).items():
            copies[id(param)] = cpu
    return copies


def _accelerate_weight(module: nn.Module) -> torch.Tensor | None:
    """The offloaded weight accelerate's sequential CPU offload keeps for ``module`` (params on meta)."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        weights = getattr(h, "weights_map", None)
        if getattr(h, "offload", False) and weights is not None:
            try:
                return weights["weight"]
            except KeyError:
                return None
    return None


class _Locator:
    """Finds each layer's storage for the pipeline's current placement (see the module docstring)."""

    def __init__(self, pipe: Any) -> None:
        self.transformer = pipe.transformer
        handle = getattr(peek_state(pipe), "streaming", None)
        self.streamer = handle.transformer if handle is not None else None
        self.group_copies = _group_offload_copies(self.transformer)
        self.dirty: set[int] = set()

    def locate(self, name: str, module: nn.Module) -> _WeightRef | None:
        """None: the layer must take the side path (fp8 storage)."""
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return None
        if self.streamer is not None:
            found = self.streamer.host_tensor(weight)
            if found is not None:
                index, host, fp8, shape = found
                if fp8:
                    return None
                return _WeightRef([host], weight.dtype, shape, lambda i=index: self.dirty.add(i))
        if weight.device.type == "meta":
            offloaded = _accelerate_weight(module)
            if offloaded is None:
                raise LoraError(f"layer `{name}` has no weights in memory (meta device) and no offload copy.",
                                fix="Load the model again (memory mode gpu, streamed or model_offload).")
            return _WeightRef([offloaded], offloaded.dtype, offloaded.shape)
        tensors = [weight.data]
        cpu = self.group_copies.get(id(weight))
        if cpu is not None and cpu.data_ptr() != weight.data_ptr():
            tensors.append(cpu)
        return _WeightRef(tensors, weight.dtype, weight.shape)

    def finish(self) -> None:
        if self.streamer is not None and self.dirty:
            self.streamer.reload(self.dirty)
        self.dirty = set()


# ---- applying ---------------------------------------------------------------------------------------
def lora_state(pipe: Any) -> LoraState | None:
    state = peek_state(pipe)
    return state.loras if state is not None else None


def lora_memory(pipe: Any) -> LoraMemory:
    """The bytes the LoRA stack applied to ``pipe`` holds (zeros when none)."""
    state = lora_state(pipe)
    return state.memory() if state is not None else LoraMemory()


def _execution_device(pipe: Any) -> torch.device:
    try:
        return torch.device(pipe._execution_device)
    except (AttributeError, RuntimeError):
        return next(p.device for p in pipe.transformer.parameters() if p.device.type != "meta")


def _read_files(specs: Sequence[LoraSpec], state: LoraState, family: ModelFamily,
                shapes: dict[str, tuple[int, int]], model_name: str) -> list[tuple[LoraFile, float]]:
    """The stack's files (kept ones reused unless the file changed), each checked against the layers."""
    stack = []
    for spec in specs:
        key = (str(spec.path.resolve()), file_stamp(spec.path) if spec.path.is_file() else (0, 0))
        lora = state.files.get(key)
        if lora is None:
            lora = load_file(spec.path, family)
            check_fits(lora, shapes, model_name)
        stack.append((lora, spec.strength))
    return stack


def _recipes(stack: list[tuple[LoraFile, float]]) -> dict[str, list[tuple[LoraFactors, float, tuple]]]:
    """layer -> [(factors, strength x scale, identity)] for every LoRA with a non-zero strength."""
    per_layer: dict[str, list[tuple[LoraFactors, float, tuple]]] = {}
    for lora, strength in stack:
        if strength == 0:
            continue  # strength 0 is "off": the layer keeps its exact base weight
        for layer, factors in lora.layers.items():
            ident = (str(lora.path), lora.stamp, strength)
            per_layer.setdefault(layer, []).append((factors, strength * factors.scale, ident))
    return per_layer


@torch.no_grad()
def _fused(base: torch.Tensor, parts: list[tuple[LoraFactors, float, tuple]], device: torch.device) -> torch.Tensor:
    acc = base.to(device=device, dtype=torch.float32, copy=True)
    for factors, scale, _ in parts:
        up = factors.up.to(device=device, dtype=torch.float32)
        down = factors.down.to(device=device, dtype=torch.float32)
        acc.addmm_(up, down, alpha=scale)
    return acc.to(base.dtype)


def _side_hook(parts: list[tuple[LoraFactors, float, tuple]], device: torch.device, dtype: torch.dtype) -> tuple[Any, int]:
    down = torch.cat([f.down.to(device=device, dtype=torch.float32) * s for f, s, _ in parts]).to(dtype)
    up = torch.cat([f.up.to(device=device, dtype=torch.float32) for f, _, _ in parts], dim=1).to(dtype)

    def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        return output + nn.functional.linear(nn.functional.linear(x.to(dtype), down), up).to(output.dtype)

    return hook, (down.numel() + up.numel()) * down.element_size()


def apply_loras(pipe: Any, specs: Sequence[LoraSpec], family: ModelFamily, *, model_name: str = "") -> LoraReport:
    """Make ``pipe``'s transformer carry exactly the LoRA stack ``specs`` (empty: the base model)."""
    started = time.perf_counter()
    state = state_of(pipe)
    lora = state.loras if state.loras is not None else LoraState()
    wanted = tuple((str(s.path.resolve()), file_stamp(s.path) if s.path.is_file() else (0, 0), s.strength)
                   for s in specs)
    if wanted == lora.applied:
        return LoraReport(tuple(s.describe() for s in specs), 0, 0, 0.0, lora.memory())
    transformer = pipe.transformer
    modules = dict(transformer.named_modules())
    stack = _read_files(specs, lora, family, linear_shapes(transformer), model_name or family.display_name)
    per_layer = _recipes(stack)
    device = _execution_device(pipe)
    locator = _Locator(pipe)
    # Until the loop ends the layers are a mix of old and new: no stack is "applied" (a failed change is
    # redone on the next call; ``recipes`` stays true layer by layer).
    state.loras, lora.applied = lora, (("<changing>", (0, 0), 0.0),)
    changed = restored = 0
    for name in sorted(set(lora.recipes) | set(per_layer)):
        parts = per_layer.get(name, [])
        recipe = tuple(ident for _, _, ident in parts)
        if lora.recipes.get(name) == recipe:
            continue  # this layer already carries exactly these LoRAs at these strengths
        if _update_layer(name, modules[name], parts, lora, locator, device, transformer):
            changed += 1
            lora.recipes[name] = recipe
        else:
            restored += 1
            lora.recipes.pop(name, None)
    locator.finish()
    lora.applied = wanted
    lora.files = {(str(f.path.resolve()), f.stamp): f for f, _ in stack}
    state.loras = lora
    return LoraReport(tuple(s.describe() for s in specs), changed, restored, time.perf_counter() - started,
                      lora.memory(), tuple(sorted({f.format for f, _ in stack})))


def _update_layer(name: str, module: nn.Module, parts: list, lora: LoraState, locator: _Locator,
                  device: torch.device, transformer: nn.Module) -> bool:
    """Give one layer the LoRAs ``parts`` (fused, or a side path on fp8); no parts: back to its base weight.
    Returns True when the layer now carries LoRAs, False when it was restored."""
    side = lora.side.pop(name, None)
    if side is not None:
        side[0].remove()
    ref = locator.locate(name, module)
    if ref is None:  # fp8 storage: the LoRA runs beside the product; removing the hook restores the layer
        if parts:
            hook, nbytes = _side_hook(parts, device, _activation_dtype(transformer))
            lora.side[name] = (module.register_forward_hook(hook), nbytes)
        return bool(parts)
    if not parts:
        ref.write(lora.backups.pop(name))
        return False
    if name not in lora.backups:  # first touch: the stored weight is the base weight
        base = ref.read()
        lora.backups[name] = base.detach().to("cpu", copy=True)
    else:
        base = lora.backups[name]
    ref.write(_fused(base, parts, device))
    return True


def _activation_dtype(transformer: nn.Module) -> torch.dtype:
    return next((p.dtype for p in transformer.parameters() if p.dtype in (torch.bfloat16, torch.float16, torch.float32)),
                torch.bfloat16)
