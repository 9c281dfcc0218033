"""Low-VRAM engine: keep what fits resident, stream the rest from pinned host memory, overlapped with compute.

Why not diffusers' group offload: it moves every block every forward and leaves most of the budget unused
(peak 2.6 GiB in a 16 GiB cap, 2.4x diffusers' full-VRAM step time on an H100; bench/RESULTS.md). Here a plan keeps as many transformer
blocks resident as the budget allows and streams only the rest. Streamed blocks live in one pinned host
buffer; a side CUDA stream copies block *j+K* into a free slot while block *j* computes, and CUDA events
order the two streams (slot loaded -> compute may start; compute done -> slot may be overwritten). Streamed
blocks are spread evenly between resident ones so the copy engine always has work. With the batched-CFG
path (``qwen_core.cfg_batch``) one forward serves both CFG branches, so weights cross PCIe once per step.
Optional fp8 (e4m3, per-row scale) storage halves the bytes of the streamed part; it is lossy and off by
default.

The text encoder is streamed the same way with no resident layers (it runs once per prompt) and its slots
are freed after each forward, so its working set does not stay allocated while the transformer runs. The
VAE stays resident (0.25 GiB) with tiling switched on when the budget is short.

The plan counts stored bytes (an fp8 file's blocks are half a bf16 block, GGUF blocks their quantised size),
slots as the streamer lays them out, and, beside the measured activations of the dense model, the working memory
the largest layer allocates inside its own forward (``qwen_core.layer_memory``: fp8 upcast, fp8-matmul input
copies, GGUF dequantisation).

On a CPU device the same bookkeeping runs with plain copies and no streams, which is what the tests use to
check that streamed == unstreamed.

API: ``enable_streamed_offload(pipe, device=..., budget_gib=...) -> StreamingHandle``,
``disable_streamed_offload(pipe)``, ``ModuleStreamer`` (the engine over any ordered list of modules),
``plan_resident(...)``.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qwen_core import memory_model
from qwen_core.cfg_batch import disable_cfg_batching, enable_cfg_batching, supports_cfg_batching
from qwen_core.errors import InvalidInputError
from qwen_core.fp8_compute import dequantize_rows_into, quantize_rows
from qwen_core.layer_memory import transient_bytes
from qwen_core.pipeline_state import peek_state, state_of

GIB = 1024**3
_ALIGN = 256  # bytes; keeps every view aligned for any dtype and for fast copies
_FP8 = getattr(torch, "float8_e4m3fn", None)
_FP8_MIN_NUMEL = 1 << 16  # only large matrices are worth quantising; norms and biases stay exact
# Allocator slack (reserved but unallocated: 0.75 GiB measured in a 16 GiB cap on H100), VAE weights, small
# tensors. The CUDA context itself (~0.5 GiB) is outside a torch memory cap but inside a real card: callers
# pass a budget below the card's size (the loader uses free memory x a fraction).
FIXED_OVERHEAD_GIB = 1.5
_TE_ROWS = 2048  # prompt tokens of the text encoder's largest call (only fp8-matmul layers depend on it)


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclass
class _Entry:
    """Where one parameter of a streamed module lives in the host buffer and in a device slot."""

    param: nn.Parameter
    shape: torch.Size
    dtype: torch.dtype
    host_off: int  # byte offset in the host buffer (from the module's base)
    nbytes: int  # bytes stored (fp8 payload for quantised entries)
    fp8: bool = False
    scale_off: int = 0  # byte offset of the fp32 per-row scales (fp8 only)
    deq_off: int = 0  # element offset in the slot's dequant buffer (fp8 only)


@dataclass
class _ModuleLayout:
    entries: list[_Entry]
    host_base: int = 0
    raw_bytes: int = 0
    deq_numel: int = 0


@dataclass
class _Slot:
    staging: torch.Tensor
    dequant: torch.Tensor | None
    loaded: Any = None  # torch.cuda.Event
    free: Any = None  # torch.cuda.Event
    holds: int = -1  # module index currently (being) loaded


def _pinned_host_buffer(nbytes: int) -> torch.Tensor:
    """Page-locked host memory of exactly ``nbytes``.

    ``pin_memory=True`` goes through torch's caching host allocator, which rounds to a power of two: 38 GiB
    of streamed weights would lock 64 GiB of RAM. Registering an ordinary allocation locks only what is used.
    """
    buf = torch.empty(nbytes, dtype=torch.uint8)
    try:
        rc = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, 0)
        if int(getattr(rc, "value", rc)) == 0:
            _REGISTERED[buf.data_ptr()] = nbytes
            PIN_STATS["registered"] += 1
            return buf
    except (AttributeError, RuntimeError, TypeError):
        pass
    PIN_STATS["pin_memory"] += 1
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def _unpin(buf: torch.Tensor | None) -> None:
    if buf is not None and _REGISTERED.pop(buf.data_ptr(), None) is not None:
        torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())


_REGISTERED: dict[int, int] = {}
PIN_STATS = {"registered": 0, "pin_memory": 0}  # how host buffers were page-locked (bench reports it)


def module_bytes(module: nn.Module) -> int:
    """Stored bytes of ``module``'s parameters (fp8 payloads, GGUF blocks and scales included as stored)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def module_layout(module: nn.Module, fp8: bool) -> _ModuleLayout:
    """Where each parameter of a streamed ``module`` goes in the host buffer and in a device slot. With ``fp8``
    (fp8 storage), large bf16/fp16 matrices are quantised with per-row scales and dequantised into the slot;
    everything else (an fp8 file's payload, GGUF blocks) travels and sits in the slot as stored."""
    entries, off, deq = [], 0, 0
    for p in module.parameters():
        quant = fp8 and p.ndim == 2 and p.numel() >= _FP8_MIN_NUMEL and p.dtype in (torch.bfloat16, torch.float16)
        nbytes = p.numel() * (1 if quant else p.element_size())
        e = _Entry(p, p.shape, p.dtype, off, nbytes, fp8=quant)
        off = _align(off + nbytes)
        if quant:
            e.scale_off, e.deq_off = off, deq
            off = _align(off + p.shape[0] * 4)
            deq += p.numel()
        entries.append(e)
    return _ModuleLayout(entries, raw_bytes=off, deq_numel=deq)


def slot_bytes(layout: _ModuleLayout) -> int:
    """Device bytes of one slot holding ``layout``: its raw bytes plus the dequantised copies (fp8 storage)."""
    deq_dtype = next((e.dtype for e in layout.entries if e.fp8), torch.bfloat16)
    return layout.raw_bytes + layout.deq_numel * torch.empty((), dtype=deq_dtype, device="meta").element_size()


def spread_streamed(num_modules: int, num_streamed: int) -> list[int]:
    """Indices of ``num_streamed`` modules spread evenly over ``num_modules`` (the rest stay resident)."""
    if num_streamed <= 0:
        return []
    if num_streamed >= num_modules:
        return list(range(num_modules))
    return sorted({min(num_modules - 1, int((k + 0.5) * num_modules / num_streamed)) for k in range(num_streamed)})


class ModuleStreamer:
    """Runs an ordered list of modules with ``resident`` ones kept on ``device`` and the others streamed.

    The modules must be called in list order each pass (a transformer's blocks are); an out-of-order call is
    still correct, it just loads synchronously and re-primes the prefetch.
    """

    def __init__(self, modules: Sequence[nn.Module], device: str | torch.device, resident: Sequence[int], *,
                 num_slots: int = 2, fp8: bool = False, release_slots: bool = False) -> None:
        self.modules = list(modules)
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.fp8 = bool(fp8)
        if self.fp8 and (_FP8 is None or not self.cuda):
            raise InvalidInputError("fp8", "fp8 streaming needs a CUDA device and torch.float8_e4m3fn.",
                                    fix="Use fp8=False on this device.")
        resident_set = set(resident)
        self.resident = sorted(resident_set)
        self.order = [i for i in range(len(self.modules)) if i not in resident_set]
        self.num_slots = max(1, min(num_slots, len(self.order))) if self.order else 0
        self.release_slots = release_slots
        self._pos = {m: j for j, m in enumerate(self.order)}
        self._hooks: list[Any] = []
        self.copy_stream = torch.cuda.Stream(device=self.device) if self.cuda else None
        self._layouts: dict[int, _ModuleLayout] = {}
        self._slot_of: dict[int, int] = {}
        self.host: torch.Tensor | None = None
        self.slots: list[_Slot] = []
        self.stats = {"loads": 0, "sync_loads": 0}
        self._entry_of: dict[int, tuple[int, _Entry]] = {}  # id(param) -> (module, entry), built on first use
        self._setup()

    # ---- setup -------------------------------------------------------------------------------------
    def _setup(self) -> None:
        for i, m in enumerate(self.modules):
            if i in self._pos:
                continue
            m.to(self.device)
        total = 0
        for i in self.order:
            lay = module_layout(self.modules[i], self.fp8)
            lay.host_base = total
            total += lay.raw_bytes
            self._layouts[i] = lay
        if not self.order:
            return
        self.host = _pinned_host_buffer(total) if self.cuda else torch.empty(total, dtype=torch.uint8)
        for i in self.order:
            self._pack(i)
        self.prime()
        for j in range(self.num_slots):
            self._bind(self.order[j], j)  # shapes/devices valid from the start; data arrives with the load
        self._install_hooks()

    @torch.no_grad()
    def _pack(self, i: int) -> None:
        """Copy module i's parameters into the host buffer (quantising if fp8) and drop their old storage."""
        lay = self._layouts[i]
        for e in lay.entries:
            base = lay.host_base
            dst = self.host[base + e.host_off: base + e.host_off + e.nbytes]
            src = e.param.data
            if e.fp8:
                q, scale = quantize_rows(src.to(self.device))
                dst.copy_(q.view(torch.uint8).reshape(-1))
                sdst = self.host[base + e.scale_off: base + e.scale_off + e.shape[0] * 4]
                sdst.copy_(scale.view(torch.uint8))
            else:
                dst.copy_(src.reshape(-1).view(torch.uint8))
            # Free the original storage now (a placeholder keeps the Parameter object and its dtype).
            e.param.data = torch.empty(0, dtype=e.dtype, device=self.device)

    def _alloc_slots(self) -> None:
        raw = max(self._layouts[i].raw_bytes for i in self.order)
        deq = max(self._layouts[i].deq_numel for i in self.order)
        dtype = next((e.dtype for i in self.order for e in self._layouts[i].entries if e.fp8), torch.bfloat16)
        self.slots = []
        for _ in range(self.num_slots):
            slot = _Slot(torch.empty(raw, dtype=torch.uint8, device=self.device),
                         torch.empty(deq, dtype=dtype, device=self.device) if deq else None)
            if self.cuda:
                slot.loaded, slot.free = torch.cuda.Event(), torch.cuda.Event()
            self.slots.append(slot)

    # ---- loading -----------------------------------------------------------------------------------
    @torch.no_grad()
    def _load(self, i: int, s: int) -> None:
        """Copy module i from host into slot s (async on the copy stream when on CUDA)."""
        slot, lay = self.slots[s], self._layouts[i]
        src = self.host[lay.host_base: lay.host_base + lay.raw_bytes]
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(slot.free)
                slot.staging[: lay.raw_bytes].copy_(src, non_blocking=True)
                self._dequant(slot, lay)
                slot.loaded.record(self.copy_stream)
        else:
            slot.staging[: lay.raw_bytes].copy_(src)
        slot.holds = i
        self._slot_of[i] = s
        self.stats["loads"] += 1

    def _dequant(self, slot: _Slot, lay: _ModuleLayout) -> None:
        for e in lay.entries:
            if not e.fp8:
                continue
            q = slot.staging[e.host_off: e.host_off + e.nbytes].view(_FP8).view(e.shape)
            scale = slot.staging[e.scale_off: e.scale_off + e.shape[0] * 4].view(torch.float32)
            out = slot.dequant[e.deq_off: e.deq_off + q.numel()].view(e.shape)
            # In place, no full-size temporaries: blocks freed on the copy stream stay in that stream's pool.
            dequantize_rows_into(q, scale, out)

    def _bind(self, i: int, s: int) -> None:
        slot, lay = self.slots[s], self._layouts[i]
        for e in lay.entries:
            if e.fp8:
                e.param.data = slot.dequant[e.deq_off: e.deq_off + e.shape.numel()].view(e.shape)
            else:
                e.param.data = slot.staging[e.host_off: e.host_off + e.nbytes].view(e.dtype).view(e.shape)

    def host_tensor(self, param: torch.Tensor) -> tuple[int, torch.Tensor, bool, torch.Size] | None:
        """(module index, the host bytes of ``param``, stored as fp8?, its shape) for a streamed parameter
        (whose own ``data`` is a placeholder or a slot view), else None.

        Writing new values into those bytes and then calling ``reload`` changes what every later pass
        computes with (how LoRAs are fused into streamed blocks)."""
        if not self._entry_of:
            self._entry_of = {id(e.param): (i, e) for i in self.order for e in self._layouts[i].entries}
        found = self._entry_of.get(id(param))
        if found is None or self.host is None:
            return None
        i, e = found
        start = self._layouts[i].host_base + e.host_off
        return i, self.host[start: start + e.nbytes], e.fp8, e.shape

    def reload(self, indices: set[int]) -> None:
        """Copy modules ``indices`` from the host buffer again into the device slots that hold them."""
        for s, slot in enumerate(self.slots):
            if slot.holds in indices:
                self._load(slot.holds, s)

    def prime(self, start: int = 0) -> None:
        """Load the streamed modules order[start:start+K] into the K slots (the next ones to run)."""
        if not self.order:
            return
        if not self.slots:
            self._alloc_slots()
        for k in range(self.num_slots):
            self._load(self.order[(start + k) % len(self.order)], k)

    # ---- hooks -------------------------------------------------------------------------------------
    def _slot_holding(self, i: int) -> int | None:
        s = self._slot_of.get(i)
        return s if s is not None and s < len(self.slots) and self.slots[s].holds == i else None

    def _pre(self, i: int) -> None:
        s = self._slot_holding(i)
        if s is None:  # out of order (an aborted pass) or slots released: load now, re-prime from here
            self.stats["sync_loads"] += 1
            self.prime(self._pos[i])
            s = self._slot_holding(i)
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.slots[s].loaded)
        self._bind(i, s)

    def _post(self, i: int) -> None:
        j, s = self._pos[i], self._slot_of[i]
        if self.cuda:
            self.slots[s].free.record(torch.cuda.current_stream(self.device))
        n = len(self.order)
        if n > self.num_slots:
            # The slot just freed takes the module K places later (cyclic: the next pass's first ones).
            nxt = (j + self.num_slots) % n
            if not (self.release_slots and nxt < j):
                self._load(self.order[nxt], s)
        if self.release_slots and j == n - 1:
            self.release()

    def release(self) -> None:
        """Free the device slots (text encoder between prompts); the next pass reallocates them."""
        if self.cuda and self.slots:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
        for i in self.order:
            for e in self._layouts[i].entries:
                e.param.data = torch.empty(0, dtype=e.dtype, device=self.device)
        self.slots = []

    def _install_hooks(self) -> None:
        for i in self.order:
            m = self.modules[i]
            self._hooks.append(m.register_forward_pre_hook(lambda _m, _a, i=i: self._pre(i)))
            self._hooks.append(m.register_forward_hook(lambda _m, _a, _o, i=i: self._post(i)))

    # ---- teardown ----------------------------------------------------------------------------------
    def __del__(self) -> None:
        # Registered (page-locked) memory must be unregistered before it is freed.
        _unpin(getattr(self, "host", None))

    @torch.no_grad()
    def remove(self, target: torch.device | None = None) -> None:
        """Remove the hooks and give every streamed module real parameters on ``target`` (default: the
        device); restoring to the CPU never needs the streamed part to fit on the GPU."""
        target = self.device if target is None else torch.device(target)
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self.cuda:
            torch.cuda.synchronize(self.device)
        for i in self.order:
            lay = self._layouts[i]
            for e in lay.entries:
                base = lay.host_base
                raw = self.host[base + e.host_off: base + e.host_off + e.nbytes].to(target)
                if e.fp8:
                    scale = self.host[base + e.scale_off: base + e.scale_off + e.shape[0] * 4].to(target)
                    w = raw.view(_FP8).view(e.shape).to(e.dtype) * scale.view(torch.float32).to(e.dtype)[:, None]
                else:
                    w = raw.view(e.dtype).view(e.shape).clone()
                e.param.data = w
        self.slots = []
        _unpin(self.host)
        self.host = None


# ---- planning ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StreamingPlan:
    """How the transformer is split between resident and streamed blocks."""

    num_blocks: int
    resident: tuple[int, ...]
    streamed: tuple[int, ...]
    block_gib: float
    nonblock_gib: float
    slot_gib: float
    reserve_gib: float
    budget_gib: float
    fp8: bool
    notes: tuple[str, ...] = field(default_factory=tuple)
    transient_gib: float = 0.0  # part of reserve_gib: the largest layer's own working memory (layer_memory)

    def summary(self) -> str:
        layer = f" (incl. {self.transient_gib:.2f} GiB inside one layer)" if self.transient_gib > 0 else ""
        return (f"{len(self.resident)}/{self.num_blocks} blocks resident, {len(self.streamed)} streamed "
                f"({len(self.streamed) * self.block_gib / (2 if self.fp8 else 1):.1f} GiB over PCIe per "
                f"forward{', fp8' if self.fp8 else ''}); budget {self.budget_gib:.1f} GiB, activations "
                f"reserve {self.reserve_gib:.1f} GiB{layer}")


def activation_gib_per_mpix(dtype: object = "bf16", family: str = memory_model.DEFAULT_FAMILY) -> float:
    """Measured activation slope of the batched transformer forward, from the memory model (PresetError naming
    the file and key when it has no entry for this family/dtype)."""
    return memory_model.family_model(family).activation_gib_per_mpix(dtype)


def plan_resident(num_blocks: int, block_bytes: int, nonblock_bytes: int, budget_gib: float, *,
                  max_pixels: int = 1328 * 1328, num_slots: int = 2, fp8: bool = False,
                  act_gib_per_mpix: float | None = None, extra_gib: float = 0.0, transient_gib: float = 0.0,
                  slot_bytes: int | None = None) -> StreamingPlan:
    """Choose how many blocks stay resident so weights + slots + activations fit ``budget_gib``.

    ``block_bytes``/``nonblock_bytes`` are stored bytes (an fp8 or GGUF block counts what it holds);
    ``transient_gib`` is what the largest layer allocates inside its forward (``qwen_core.layer_memory``: an
    upcast fp8 weight, a dequantised GGUF one), reserved beside the activations; ``slot_bytes`` is one slot's
    size when known from the layout (default: the block, x1.5 with fp8 storage of a bf16 block)."""
    if not budget_gib > 0:
        raise InvalidInputError("budget_gib", f"must be > 0 GiB, got {budget_gib!r}.")
    per_mpix = act_gib_per_mpix if act_gib_per_mpix is not None else activation_gib_per_mpix()
    reserve = per_mpix * max_pixels / 1e6 + transient_gib + FIXED_OVERHEAD_GIB + extra_gib
    block_gib, nonblock_gib = block_bytes / GIB, nonblock_bytes / GIB
    # fp8 storage of a bf16 block: staging (half) + dequantised copy (full)
    slot_gib = slot_bytes / GIB if slot_bytes is not None else block_gib * (1.5 if fp8 else 1.0)
    room = budget_gib - nonblock_gib - reserve - num_slots * slot_gib
    n_res = max(0, min(num_blocks, math.floor(room / block_gib))) if block_gib > 0 else num_blocks
    notes: list[str] = []
    if n_res >= num_blocks - num_slots:
        # Streaming a couple of blocks through as many slots buys nothing: keep everything resident.
        n_res = num_blocks
    if room < 0:
        notes.append(f"budget {budget_gib:.1f} GiB is below the minimal streaming working set; expect OOM "
                     f"at {max_pixels / 1e6:.2f} MP")
    streamed = spread_streamed(num_blocks, num_blocks - n_res)
    resident = tuple(i for i in range(num_blocks) if i not in set(streamed))
    return StreamingPlan(num_blocks, resident, tuple(streamed), block_gib, nonblock_gib,
                         slot_gib if streamed else 0.0, reserve, budget_gib, fp8 and bool(streamed),
                         tuple(notes), transient_gib)


def plan_transformer(transformer: nn.Module, budget_gib: float, *, max_pixels: int = 1328 * 1328,
                     num_slots: int = 2, fp8: bool = False, act_gib_per_mpix: float | None = None,
                     family: str = memory_model.DEFAULT_FAMILY, other_phase_gib: float = 0.0,
                     resident_gib: float = 0.0) -> StreamingPlan:
    """``plan_resident`` for a Qwen-Image transformer as it is (any device, the meta device included): stored
    bytes of its blocks, the slots its layout needs, and the working memory of its largest layer at
    ``max_pixels`` (batched CFG: 2 rows per 16x16 pixels). ``other_phase_gib``: the text encoder's working
    set, which runs at another time and needs the reserve to be at least that large. ``resident_gib``: what
    else stays on the device all the time (the vision tower of families that show images to the text encoder)."""
    blocks = list(transformer.transformer_blocks)
    dtype = _compute_dtype(transformer)
    per_mpix = act_gib_per_mpix if act_gib_per_mpix is not None else activation_gib_per_mpix(
        memory_model.dtype_key(dtype), family)
    transient = transient_bytes(transformer, dtype, rows=2 * max(1, max_pixels // 256)) / GIB
    # A slot is what ModuleStreamer allocates: the largest layout (aligned), plus the dequantised copies of fp8
    # storage, which re-quantises only bf16/fp16 matrices (an fp8 or GGUF file's blocks stay as stored).
    layouts = [module_layout(b, fp8) for b in blocks]
    slot = max(lay.raw_bytes for lay in layouts) + max(slot_bytes(lay) - lay.raw_bytes for lay in layouts)
    block_bytes = [module_bytes(b) for b in blocks]
    return plan_resident(len(blocks), max(block_bytes), module_bytes(transformer) - sum(block_bytes), budget_gib,
                         max_pixels=max_pixels, num_slots=num_slots, fp8=fp8, act_gib_per_mpix=per_mpix,
                         transient_gib=transient, slot_bytes=slot,
                         extra_gib=max(0.0, other_phase_gib - per_mpix * max_pixels / 1e6 - transient) + resident_gib)


def _compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the layers compute in: the model's ``dtype`` (diffusers/transformers: the first floating-point
    parameter), else the first floating-point parameter that is not an fp8 payload."""
    fp8 = {d for d in (_FP8, getattr(torch, "float8_e5m2", None)) if d is not None}
    dtype = getattr(module, "dtype", None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point and dtype not in fp8:
        return dtype
    return next((p.dtype for p in module.parameters() if p.is_floating_point() and p.dtype not in fp8),
                torch.float32)


# ---- pipeline level ----------------------------------------------------------------------------------
@dataclass
class StreamingHandle:
    """What ``enable_streamed_offload`` set up; ``disable()`` undoes it. Held in the pipeline's state, so it
    holds the pipeline weakly (``pipeline_state``'s rule)."""

    pipe_ref: weakref.ref
    device: torch.device
    plan: StreamingPlan
    transformer: ModuleStreamer
    text_encoder: ModuleStreamer | None
    vae_tiling: bool
    cfg_batcher: Any = None
    max_pixels: int = 1328 * 1328
    options: dict[str, Any] = field(default_factory=dict)
    hook: Any = None
    replans: int = 0  # how many times this pipeline's engine was re-planned for a larger image
    vae_tiled_before: bool = False  # the VAE's tiling before the engine set its own: disable() restores it
    # How the family's activation slope was measured: one batched cond+uncond forward (2 rows) per output pixel
    # where the family batches CFG, else one row; and its reference cache per pixel, in units of that slope.
    measured_rows: int = 2
    reference_cache_ratio: float = 0.0

    @property
    def pipe(self) -> Any:
        pipe = self.pipe_ref()
        if pipe is None:
            raise ReferenceError("the pipeline of this streamed engine was released")
        return pipe

    def disable(self, restore_device: str | torch.device | None = None) -> None:
        target = torch.device(restore_device) if restore_device is not None else self.device
        pipe = self.pipe_ref()  # None: the pipeline is gone; only our own hooks and streamers are left to undo
        if self.hook is not None:
            self.hook.remove()
            self.hook = None
        if self.cfg_batcher is not None and pipe is not None:
            disable_cfg_batching(pipe)
        self.cfg_batcher = None
        for streamer in (self.transformer, self.text_encoder):
            if streamer is not None:
                streamer.remove(target if target.type == "cpu" else None)
        if pipe is None:
            return
        vae = getattr(pipe, "vae", None)
        if vae is not None and hasattr(vae, "enable_tiling"):  # a later resident run must decode as before
            if self.vae_tiled_before:
                vae.enable_tiling()
            else:
                vae.disable_tiling()
        if target != self.device:
            for name in ("transformer", "text_encoder", "vae"):
                if name in self.options.get("placed_elsewhere", ()):
                    continue  # qwen_core.placement put it on its own card
                comp = getattr(pipe, name, None)
                if isinstance(comp, nn.Module):
                    comp.to(target)
        state = peek_state(pipe)
        if state is not None and state.streaming is self:
            state.streaming = None

    def replan(self, max_pixels: int) -> StreamingHandle:
        """Re-plan for a larger image: fewer resident blocks, a bigger activation reserve (seconds, once).

        Everything goes back to the host first, so the re-plan never needs more device memory than the plan.
        The batched-CFG wrapper stays installed (a pipeline call in flight keeps batching).
        """
        batcher, self.cfg_batcher = self.cfg_batcher, None
        self.disable(restore_device="cpu")
        new = enable_streamed_offload(self.pipe, self.device, max_pixels=max_pixels,
                                      **{**self.options, "cfg_batching": False})
        new.cfg_batcher = batcher
        new.replans = self.replans + 1
        return new

    def _check_capacity(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook: an image larger than planned would not fit beside the resident blocks."""
        hs = kwargs.get("hidden_states", args[0] if args else None)
        if not isinstance(hs, torch.Tensor) or hs.ndim != 3 or not self.plan.resident:
            return
        # The reserve was planned with the family's activation slope, measured per output pixel as our path runs
        # the forward (``measured_rows``). A batcher that will double this call counts twice; 256 image pixels per
        # token in every family (Qwen-Image: VAE /8, patch 2; 2.1: VAE /16, unpatched).
        batcher = state_of(self.pipe).cfg_batcher
        rows = hs.shape[0] * (2 if batcher is not None and batcher.would_batch(kwargs) else 1)
        pixels = rows * hs.shape[1] * 256 // self.measured_rows + self._held_reference_pixels(hs, kwargs)
        if pixels > self.max_pixels:
            self.replan(pixels)

    def _held_reference_pixels(self, hs: torch.Tensor, kwargs: dict) -> int:
        """The reference tokens' key/value cache, as pixels of the activation reserve, in a family whose pipeline
        keeps one beside the activations for every step (``reference_cache_ratio``; 2.1, whose ``img_shapes``
        list the condition images first and the target last). Both CFG branches are counted: the first forward
        cannot tell whether a negative one follows."""
        shapes = kwargs.get("img_shapes")
        if not self.reference_cache_ratio or not shapes or not shapes[0]:
            return 0
        references = max(hs.shape[1] - math.prod(shapes[0][-1]), 0)
        return int(references * 256 * 2 * self.reference_cache_ratio)


def _move_except(root: nn.Module, exclude: Sequence[nn.Module], device: torch.device) -> None:
    """Move the parameters and buffers of ``root`` to ``device``, skipping the subtrees in ``exclude``."""
    skip = {id(m) for m in exclude}

    def visit(m: nn.Module) -> None:
        if id(m) in skip:
            return
        for name, p in list(m._parameters.items()):
            if p is not None and p.device != device:
                p.data = p.data.to(device)
                m._parameters[name] = p
        for name, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[name] = b.to(device)
        for child in m.children():
            visit(child)

    visit(root)


def _text_encoder_modules(te: nn.Module, *, vision: bool = False) -> tuple[list[nn.Module], list[nn.Module]]:
    """(streamed modules in call order, subtrees left on the host) of a Qwen2.5-VL / Qwen3-VL text encoder.

    ``vision``: the pipeline feeds images to the encoder (edit models, Layered's caption, 2.1 with condition
    images): its vision tower then goes to the device with the other non-streamed parts (Qwen2.5-VL-7B's is
    1.3 GiB, Qwen3-VL-8B's 1.1 GiB in bf16), else it stays on the host."""
    layers = next((m for name, m in te.named_modules() if name.endswith("language_model.layers")
                   or name.endswith("model.layers")), None)
    if layers is None:
        raise InvalidInputError("text_encoder", "no decoder `layers` found to stream.",
                                fix="Use memory mode model_offload for this text encoder.")
    streamed = [te.get_input_embeddings(), *layers]
    head = te.get_output_embeddings()
    if head is not None:
        streamed.append(head)
    # The vision tower is not used for text-to-image prompts: it stays on the host.
    left = [] if vision else [m for name, m in te.named_modules() if name.endswith("visual")][:1]
    return streamed, left


def pipeline_sees_images(pipe: Any) -> bool:
    """True when ``pipe``'s family passes images through its text encoder (``ModelFamily.takes_images``)."""
    from qwen_core.families import FAMILIES

    return any(f.takes_images for f in FAMILIES.values() if f.pipeline_class == type(pipe).__name__)


def _default_budget(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / GIB - FIXED_OVERHEAD_GIB
    import psutil

    return psutil.virtual_memory().available / GIB


def enable_streamed_offload(pipe: Any, device: str | torch.device = "cuda", budget_gib: float | None = None, *,
                            fp8: bool = False, max_pixels: int = 1328 * 1328, num_slots: int = 2,
                            vae_tiling: bool | None = None, stream_text_encoder: bool = True,
                            act_gib_per_mpix: float | None = None, cfg_batching: bool = True,
                            family: str = memory_model.DEFAULT_FAMILY,
                            placed_elsewhere: Sequence[str] = ()) -> StreamingHandle:
    """Run ``pipe`` (a diffusers Qwen-Image pipeline) within ``budget_gib`` of device memory.

    ``max_pixels`` sizes the activation reserve (the largest image you will ask for; a larger one triggers a
    one-time re-plan with fewer resident blocks, see ``StreamingHandle.replan``). ``fp8`` stores the
    streamed blocks in float8 (lossy, half the PCIe bytes). ``vae_tiling=None`` decides from the budget.
    ``act_gib_per_mpix`` overrides the memory model's activation slope for the transformer's dtype (the bench
    passes its fresh measurement); ``family`` is the memory model's family key. ``placed_elsewhere``: components
    ``qwen_core.placement`` runs on another device ("text_encoder"): left where they are, outside the budget.
    ``cfg_batching`` (default on) installs ``qwen_core.cfg_batch`` so both CFG branches share one pass of
    the weights over PCIe (H100, 16 GiB cap: 656 ms per step batched vs 1044 ms as two forwards).
    """
    dev = torch.device(device)
    budget = float(budget_gib) if budget_gib is not None else _default_budget(dev)
    old = state_of(pipe).streaming
    if old is not None:
        old.disable()
    transformer = pipe.transformer
    blocks = list(transformer.transformer_blocks)
    _move_except(transformer, [transformer.transformer_blocks], dev)
    te_streamed, te_left = ([], [])
    vision_gib = 0.0
    text_encoder = None if "text_encoder" in placed_elsewhere else getattr(pipe, "text_encoder", None)
    if stream_text_encoder and text_encoder is not None:
        te_streamed, te_left = _text_encoder_modules(text_encoder, vision=pipeline_sees_images(pipe))
        if not te_left:  # the vision tower stays on the device beside the transformer's resident blocks
            vision_gib = sum(module_bytes(m) for n, m in text_encoder.named_modules() if n.endswith("visual")) / GIB
    # One slot for the text encoder: its biggest modules are the 1 GiB embedding and LM head, it runs once per
    # prompt, and its compute (~40 ms) could not hide a second slot's copy anyway. A second 1 GiB slot made
    # the text-encoder phase the peak in a 16 GiB cap (H100 run 4: OOM at 1664x1664).
    te_slots = 1
    te_ws_gib = te_slots * max((module_bytes(m) for m in te_streamed), default=0) / GIB
    if te_streamed:  # an fp8 text encoder upcasts its largest matrix while that layer runs
        te_ws_gib += max(transient_bytes(m, _compute_dtype(text_encoder), rows=_TE_ROWS)
                         for m in te_streamed) / GIB
    plan = plan_transformer(transformer, budget, max_pixels=max_pixels, num_slots=num_slots, fp8=fp8,
                            act_gib_per_mpix=act_gib_per_mpix, family=family, other_phase_gib=te_ws_gib,
                            resident_gib=vision_gib)
    t_streamer = ModuleStreamer(blocks, dev, plan.resident, num_slots=num_slots, fp8=fp8)
    te_streamer = None
    if te_streamed:
        _move_except(text_encoder, te_streamed + te_left, dev)
        for m in te_left:  # the unused vision tower must not sit in the budget
            m.to("cpu")
        te_streamer = ModuleStreamer(te_streamed, dev, [], num_slots=te_slots, release_slots=True)
        te_streamer.release()  # nothing of it stays on the device between prompts
    elif text_encoder is not None:
        text_encoder.to(dev)
    dtype = memory_model.dtype_key(_compute_dtype(transformer))
    fam = memory_model.family_model(family)
    vae_per_mpix = fam.vae_gib_per_mpix(dtype) if vae_tiling is None else 0.0
    tiled_before = bool(getattr(getattr(pipe, "vae", None), "use_tiling", False))
    tiling = _vae_placement(pipe, dev, plan, max_pixels, vae_tiling, vae_per_mpix)
    if dev.type == "cuda":
        torch.cuda.empty_cache()  # hand back the segments the streamed weights occupied
    handle = StreamingHandle(weakref.ref(pipe), dev, plan, t_streamer, te_streamer, tiling, max_pixels=max_pixels,
                             options=dict(budget_gib=budget, fp8=fp8, num_slots=num_slots, vae_tiling=vae_tiling,
                                          stream_text_encoder=stream_text_encoder,
                                          act_gib_per_mpix=act_gib_per_mpix, family=family,
                                          placed_elsewhere=tuple(placed_elsewhere)),
                             vae_tiled_before=tiled_before, measured_rows=2 if supports_cfg_batching(pipe) else 1,
                             reference_cache_ratio=fam.reference_cache_gib_per_mpix(dtype) / fam.activation_gib_per_mpix(dtype))
    handle.hook = transformer.register_forward_pre_hook(handle._check_capacity, with_kwargs=True)
    if cfg_batching:
        handle.cfg_batcher = enable_cfg_batching(pipe)
    state_of(pipe).streaming = handle
    return handle


def _vae_placement(pipe: Any, dev: torch.device, plan: StreamingPlan, max_pixels: int,
                   vae_tiling: bool | None, per_mpix: float) -> bool:
    """Put the VAE on the device; tile its decode when the untiled working memory (``per_mpix``, the memory
    model's "vae/<dtype>") would not fit in the activation reserve."""
    vae = getattr(pipe, "vae", None)
    if vae is None:
        return False
    vae.to(dev)
    if vae_tiling is None:
        # During the decode the activation reserve is free again; tile when the decode would not fit in it.
        vae_tiling = per_mpix * max_pixels / 1e6 > plan.reserve_gib
    if vae_tiling and hasattr(vae, "enable_tiling"):
        vae.enable_tiling()
    elif hasattr(vae, "disable_tiling"):
        vae.disable_tiling()
    return bool(vae_tiling)


def disable_streamed_offload(pipe: Any, restore_device: str | torch.device | None = None) -> None:
    """Undo ``enable_streamed_offload`` (no-op when it was not enabled)."""
    handle = streaming_handle(pipe)
    if handle is not None:
        handle.disable(restore_device)


def streaming_handle(pipe: Any) -> StreamingHandle | None:
    """The streamed engine running ``pipe``, or None."""
    state = peek_state(pipe)
    return state.streaming if state is not None else None
