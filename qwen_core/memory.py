"""Memory readings, leak-free pipeline release, and the residency registry (which models stay loaded).

qwen_core, not ComfyUI's output cache, decides what stays in memory: a node's output (the light QWEN_PIPE
handle) may be cached by ComfyUI for ever, so the handle must not own the 40 GB pipeline. The pipeline
lives in a ``ResidencyManager`` under a key; at most ``max_resident`` (default 1) pipelines are resident,
and loading another first releases the least recently used one. Consumers keep the key and a factory and
call ``acquire`` each time they need the pipeline; they never keep the pipeline between calls.

API
- ``memory_readings() -> MemoryReadings``: process RSS, CUDA allocated/reserved/peak (None without CUDA;
  0 while CUDA is not initialised: reading it must not create a CUDA context), a timestamp.
- ``release_pipeline(pipe, *, settle_s=0.2, free_weights=False)``: remove accelerate offload hooks
  (``remove_all_hooks`` + per module) and diffusers hooks (group offloading and others), detach every
  component from the pipeline object (so a stale reference to the shell pins nothing), optionally free the
  modules' storage at once (``free_weights``), then ``collect_garbage(settle_s)``. A component gc could not
  collect (something still references it) has its storage freed anyway, with a warning naming what held it:
  a release always frees the memory, and a leak shows in the log rather than as an OOM at the next load.
  ``pipe`` may be a DiffusionPipeline, a torch module, None, or an object with an ``unload()`` method
  (``PipelineLoader``, ``QwenImageGenerator``), which is called instead.
- ``collect_garbage(settle_s=0.2)``: gc.collect, CUDA synchronize + empty_cache + ipc_collect, glibc
  malloc_trim (so freed CPU weights go back to the OS and RSS really drops), then sleep ``settle_s``.
- ``safe_model_switch(old=None, *, settle_s=0.2) -> SwitchReport`` (context manager): releases ``old``
  (as ``release_pipeline`` does), yields the report, the caller loads the next model in the body::

      with safe_model_switch(self.loader) as report:
          self.loader = new_loader          # or: new_pipe = load(...)
      log(report.summary())

  On error in the body, garbage is collected (no half-loaded model survives) and the error propagates. The report holds readings
  ``before`` (old resident), ``released`` (after releasing), ``after`` (after the body) and ``error``.
- ``ResidencyManager(max_resident=1, *, settle_s=0.2, release=release_pipeline)``:
  ``acquire(key, factory) -> obj`` (resident -> returned at once; else evicts down to max_resident - 1
  via ``safe_model_switch``, then calls ``factory()``; a failing factory leaves nothing of it resident and
  raises: QwenError subclasses unchanged (they already say what to do), anything else as ModelLoadError
  naming the key), ``get(key)``, ``release(key) -> bool``, ``release_all()``, ``resident_keys()``,
  ``set_max_resident(n)``, ``switch(release, load) -> SwitchReport`` (the one switch sequence: readings,
  release, load inside ``safe_model_switch``; ``acquire`` uses it), ``last_switch`` (the SwitchReport of the
  last load). Thread-safe; a key is any
  hashable (e.g. ``(str(model_dir), dtype, memory_mode)``). Put only heavy objects (pipelines) in the
  process-wide manager: a light object (generator, handle) there counts as a resident model, so loading
  its own weights would evict it, and the next use would evict the weights again. Cache light objects in
  their own ``ResidencyManager(n, release=lambda obj, settle_s: None)``.
- ``switch_model(old_key, load) -> SwitchReport``: release one resident model and load the next through the
  process-wide manager's ``switch`` (the generator's ``switch_to_model`` and the SwitchModel node call it).
- ``get_residency_manager()``: the process-wide manager the generator and the ComfyUI nodes share;
  ``QWEN_MAX_RESIDENT`` sets its size (default 1).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import sys
import threading
import time
import traceback
import types
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import psutil

from qwen_core.errors import InvalidInputError, ModelLoadError, QwenError
from qwen_core.pipeline_state import discard_state

logger = logging.getLogger(__name__)
T = TypeVar("T")
GIB = 1024**3
DEFAULT_SETTLE_S = 0.2


@dataclass(frozen=True)
class MemoryReadings:
    """One snapshot. GiB throughout; CUDA fields are None when CUDA is not available."""

    timestamp: float
    rss_gib: float
    ram_available_gib: float
    cuda_allocated_gib: float | None = None
    cuda_reserved_gib: float | None = None
    cuda_peak_gib: float | None = None

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)

    def summary(self) -> str:
        text = f"RSS {self.rss_gib:.2f} GiB"
        if self.cuda_allocated_gib is not None:
            text += (
                f", CUDA allocated {self.cuda_allocated_gib:.2f} / reserved {self.cuda_reserved_gib:.2f} GiB"
            )
        return text


def memory_readings() -> MemoryReadings:
    """Process RSS, available RAM and (if CUDA is up) CUDA allocator figures, now."""
    vm = psutil.virtual_memory()
    allocated = reserved = peak = None
    torch = sys.modules.get("torch")  # a process that never imported torch holds no tensors
    if torch is not None and torch.cuda.is_available():
        allocated = reserved = peak = 0.0
        if torch.cuda.is_initialized():
            allocated = torch.cuda.memory_allocated() / GIB
            reserved = torch.cuda.memory_reserved() / GIB
            peak = torch.cuda.max_memory_allocated() / GIB
    return MemoryReadings(
        timestamp=time.time(),
        rss_gib=psutil.Process().memory_info().rss / GIB,
        ram_available_gib=vm.available / GIB,
        cuda_allocated_gib=allocated,
        cuda_reserved_gib=reserved,
        cuda_peak_gib=peak,
    )


def _trim_process_heap() -> None:
    """Give freed heap pages back to the OS (glibc only).

    glibc raises its mmap threshold after large frees, so later weight-sized buffers come from the heap
    and stay counted in RSS after they are freed; malloc_trim returns them. A no-op elsewhere.
    """
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):  # musl or another libc: nothing to trim with
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def collect_garbage(settle_s: float = DEFAULT_SETTLE_S) -> None:
    """gc, CUDA cache release, heap trim, then wait ``settle_s`` so drivers and the allocator catch up."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()
    _trim_process_heap()
    if settle_s > 0:
        time.sleep(settle_s)


def _remove_hooks(module: Any) -> None:
    """Strip accelerate (model/sequential offload) and diffusers (group offload, caches) hooks."""
    from accelerate.hooks import remove_hook_from_module

    remove_hook_from_module(module, recurse=True)
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        if registry is None:
            continue
        for name in list(registry.hooks):
            registry.remove_hook(name, recurse=False)
        del sub._diffusers_hook


def release_pipeline(pipe: Any, *, settle_s: float = DEFAULT_SETTLE_S, free_weights: bool = False) -> None:
    """Release a pipeline (or module) so its memory can be reclaimed; the object is unusable afterwards."""
    if pipe is None:
        return
    unload = getattr(pipe, "unload", None)
    if callable(unload) and not hasattr(pipe, "components"):
        unload()  # a loader / generator: it releases its own weights (through the residency registry)
        collect_garbage(settle_s)
        return
    detached = _detach(pipe, free_weights)
    gc.collect()
    try:
        _free_survivors(detached)
    except Exception as err:  # noqa: BLE001 - the guard must never fail the release it checks
        logger.warning("could not check the released pipeline for leaks: %s: %s", type(err).__name__, err)
    collect_garbage(settle_s)


@dataclass
class Detached:
    """Weak references to a released component and its tensors: gc should collect them all."""

    name: str
    module: weakref.ref
    tensors: list[weakref.ref]


def _detach(pipe: Any, free_weights: bool) -> list[Detached]:
    """Unhook and detach the components (a function of its own so its locals are gone before gc); returns
    weak references to what was detached, to check that gc collected it."""
    import torch

    from qwen_core.cfg_batch import disable_cfg_batching

    # Our batched-CFG wrapper sits on the pipeline object itself (its encode_prompt): a shell that lives on (a
    # model source keeps it) would reach the transformer through it (H200: 38 GiB kept per release).
    disable_cfg_batching(pipe)
    discard_state(pipe)  # what it describes (hooks, wrappers, handles) is detached below
    components = getattr(pipe, "components", None)
    modules: dict[str, Any] = dict(components) if isinstance(components, dict) else {"": pipe}
    if hasattr(pipe, "remove_all_hooks"):
        pipe.remove_all_hooks()  # also drops the pipeline's own list of offload hooks
    detached = []
    for name, component in modules.items():
        if isinstance(component, torch.nn.Module):
            _remove_hooks(component)
            if free_weights:
                _drop_weights(component)
            elif name:  # a bare module released by the caller is the caller's to keep
                tensors = [weakref.ref(t) for t in [*component.parameters(), *component.buffers()]]
                detached.append(Detached(name, weakref.ref(component), tensors))
        if name:
            setattr(pipe, name, None)  # DiffusionPipeline.__setattr__ also clears the config entry
    return detached


def _drop_weights(module: Any) -> None:
    _free_storage([*module.parameters(), *module.buffers()])


def _free_storage(tensors: list[Any]) -> None:
    """Free each tensor's storage in place (as FSDP frees sharded parameters): whoever still holds the
    module, the tensor or a view of it holds no memory. A storage that cannot be resized (memory-mapped
    from a file) is swapped for an empty one instead."""
    import torch

    with torch.no_grad():
        for tensor in tensors:
            try:
                tensor.untyped_storage().resize_(0)
            except RuntimeError:
                try:
                    tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
                except RuntimeError:  # a tensor subclass without storage of its own: left to gc
                    logger.debug("could not free a %s of a released pipeline", type(tensor).__name__)


def _holds_memory(tensor: Any) -> bool:
    try:
        return tensor.device.type != "meta" and tensor.untyped_storage().nbytes() > 0
    except (RuntimeError, NotImplementedError):  # a wrapper tensor subclass has no storage to read
        return False


def _free_survivors(detached: list[Detached]) -> None:
    """Components (or tensors of them) gc could not collect after their release: something outside the
    pipeline still references them. Free their storage anyway (the memory is what a release promises) and
    say what held them, so the leak can be found and fixed."""
    for item in detached:
        alive = [t for ref in item.tensors if (t := ref()) is not None and _holds_memory(t)]
        if alive:
            size = sum(t.untyped_storage().nbytes() for t in alive) / 1024**3
            module = item.module()
            held = describe_referrers(module if module is not None else alive[0])
            _log_warning(f"released pipeline's {item.name} ({len(alive)} tensors, {size:.2f} GiB) is still "
                         f"referenced by {held}; its memory was freed anyway")
            _free_storage(alive)
        del alive


_FOLLOWED = (dict, list, tuple, set, frozenset, types.MethodType, types.CellType)  # holders, not owners


def describe_referrers(obj: Any, depth: int = 4, limit: int = 6, max_scans: int = 24) -> str:
    """What keeps ``obj`` alive, as short chains towards an owner (``dict <- CfgBatcher``), for a log line.
    Containers, cells and bound methods are followed up to ``depth`` steps; frames (calls in progress) and
    this function's own lists are left out. Each step scans the whole heap (``gc.get_referrers``), so at most
    ``max_scans`` are made: a warning must not stall a release in a large process."""
    import inspect

    keep: list[Any] = []  # our own lists stay alive, so their ids are not reused while we exclude them
    ours = {id(keep)}
    scans = 0

    def held_by(target: Any) -> list[Any]:
        nonlocal scans
        scans += 1
        found = [r for r in gc.get_referrers(target) if id(r) not in ours and not inspect.isframe(r)]
        keep.append(found)
        ours.add(id(found))
        return found

    def label(node: Any) -> str:
        name = getattr(node, "__qualname__", None) if callable(node) and not isinstance(node, type) else None
        return f"{type(node).__name__} {name}" if name else type(node).__name__

    nodes, chains = held_by(obj), []
    labels = [label(node) for node in nodes]
    keep += [labels, chains]
    ours.update((id(labels), id(chains)))
    for _ in range(depth - 1):
        next_nodes: list[Any] = []
        next_labels: list[str] = []
        keep += [next_nodes, next_labels]
        ours.update((id(next_nodes), id(next_labels)))
        for node, text in zip(nodes, labels, strict=True):
            follow = isinstance(node, _FOLLOWED) and scans < max_scans
            parents = held_by(node)[:limit] if follow else []
            if not parents:
                chains.append(text)
            next_nodes += parents
            next_labels += [f"{text} <- {label(parent)}" for parent in parents]
        nodes, labels = next_nodes, next_labels
    chains += labels
    unique = list(dict.fromkeys(chains))
    if not unique:
        return "nothing gc can see (a C extension or a native handle)"
    more = f" (+{len(unique) - limit} more)" if len(unique) > limit else ""
    return "; ".join(unique[:limit]) + more


@dataclass
class SwitchReport:
    """Readings around a model switch: ``before`` -> ``released`` (old gone) -> ``after`` (body done)."""

    before: MemoryReadings
    released: MemoryReadings | None = None
    after: MemoryReadings | None = None
    error: str | None = None
    released_keys: list[Hashable] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"before {self.before.summary()}"]
        parts += [
            f"{name} {r.summary()}" for name, r in (("released", self.released), ("after", self.after)) if r
        ]
        return "; ".join(parts) + (f"; failed: {self.error}" if self.error else "")


def _clear_exception_frames(err: BaseException | None) -> None:
    seen: set[int] = set()
    while err is not None and id(err) not in seen:  # the error and what it was raised from
        seen.add(id(err))
        traceback.clear_frames(err.__traceback__)
        err = err.__cause__ or err.__context__


@contextmanager
def safe_model_switch(old: Any = None, *, settle_s: float = DEFAULT_SETTLE_S) -> Iterator[SwitchReport]:
    """Release ``old`` (if given), then run the body that loads the next model; see the module docstring."""
    report = SwitchReport(before=memory_readings())
    release_pipeline(old, settle_s=settle_s)
    del old
    report.released = memory_readings()
    try:
        yield report
    except BaseException as err:
        report.error = f"{type(err).__name__}: {err}"
        # The traceback keeps the failed load's finished frames, and so its half-built modules, alive:
        # clear their locals (file/line info stays for the message) before collecting.
        _clear_exception_frames(err)
        collect_garbage(settle_s)
        raise
    finally:
        report.after = memory_readings()


class ResidencyManager:
    """Which pipelines stay loaded: at most ``max_resident``, least recently used evicted first."""

    def __init__(
        self,
        max_resident: int = 1,
        *,
        settle_s: float = DEFAULT_SETTLE_S,
        release: Callable[..., None] = release_pipeline,
    ) -> None:
        self._check_size(max_resident)
        self.max_resident = max_resident
        self.settle_s = settle_s
        self._release = release
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        # Re-entrant: a factory may ask for another (already resident) key, e.g. a shared text encoder.
        self._lock = threading.RLock()
        self.last_switch: SwitchReport | None = None

    @staticmethod
    def _check_size(max_resident: int) -> None:
        if isinstance(max_resident, bool) or not isinstance(max_resident, int) or max_resident < 1:
            raise InvalidInputError("max_resident", f"must be an integer >= 1, got {max_resident!r}.")

    def acquire(self, key: Hashable, factory: Callable[[], T]) -> T:
        """The resident object for ``key``, loading it with ``factory()`` after evicting if needed."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
            loaded: list[T] = []
            report = self.switch(lambda: self._evict_down_to(self.max_resident - 1),
                                 lambda: loaded.append(self._load_entry(key, factory)))
            _log_info(f"resident: {key!r} ({report.summary()})")
            return loaded[0]

    def switch(self, release: Callable[[], list[Hashable]], load: Callable[[], Any] | None = None) -> SwitchReport:
        """The one model-switch sequence: readings, ``release()`` (returns the keys it released), then ``load()``
        inside ``safe_model_switch`` (a failed load leaves nothing half-loaded and raises). Used by ``acquire``
        and by ``switch_model``."""
        with self._lock:
            before = memory_readings()
            released = release()
            with safe_model_switch(None, settle_s=self.settle_s) as report:
                report.before, report.released_keys = before, released
                self.last_switch = report
                if load is not None:
                    load()
            return report

    def _load_entry(self, key: Hashable, factory: Callable[[], T]) -> T:
        try:
            obj = factory()
        except QwenError as err:
            _log_error(f"loading {key!r} failed: {err}", getattr(err, "fix", None))
            raise
        except Exception as err:
            fix = (
                "Check the model folder (re-download damaged files with the Downloader) and the session log. "
                "The previous model was released first, so no model is loaded now."
            )
            _log_error(f"loading {key!r} failed: {type(err).__name__}: {err}", fix)
            raise ModelLoadError(f"Loading model {key!r} failed: {type(err).__name__}: {err}.", fix=fix) from err
        if obj is None:
            raise ModelLoadError(f"The loader for {key!r} returned nothing.", fix="Report this as a bug.")
        self._entries[key] = obj
        return obj

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            return self._entries.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def resident_keys(self) -> list[Hashable]:
        """Keys in eviction order (least recently used first)."""
        with self._lock:
            return list(self._entries)

    def release(self, key: Hashable) -> bool:
        """Release one resident object; False if ``key`` was not resident."""
        with self._lock:
            if key not in self._entries:
                return False
            self._release_entry(key)
            return True

    def release_all(self) -> list[Hashable]:
        with self._lock:
            return self._evict_down_to(0)

    def set_max_resident(self, max_resident: int) -> None:
        """Resize; shrinking evicts at once."""
        self._check_size(max_resident)
        with self._lock:
            self.max_resident = max_resident
            self._evict_down_to(max_resident)

    def _evict_down_to(self, count: int) -> list[Hashable]:
        evicted = []
        while len(self._entries) > max(count, 0):
            key = next(iter(self._entries))
            self._release_entry(key)
            evicted.append(key)
        return evicted

    def _release_entry(self, key: Hashable) -> None:
        obj = self._entries.pop(key)
        before = memory_readings()
        try:
            self._release(obj, settle_s=self.settle_s)
        finally:
            del obj
        _log_info(f"released {key!r}: {before.summary()} -> {memory_readings().summary()}")


_manager: ResidencyManager | None = None
_manager_lock = threading.Lock()


def get_residency_manager() -> ResidencyManager:
    """The process-wide manager (``QWEN_MAX_RESIDENT`` resident models, default 1)."""
    global _manager
    with _manager_lock:
        if _manager is None:
            raw = os.environ.get("QWEN_MAX_RESIDENT", "1")
            try:
                size = int(raw)
            except ValueError:
                raise InvalidInputError(
                    "QWEN_MAX_RESIDENT", f"must be an integer >= 1, got {raw!r}."
                ) from None
            _manager = ResidencyManager(size)
        return _manager


def switch_model(old_key: Hashable | None, load: Callable[[], Any] | None = None) -> SwitchReport:
    """Release the model resident under ``old_key`` (None: release nothing), then run ``load`` (e.g. the next
    loader's ``load``), through the process-wide manager's one switch sequence. Returns the readings before,
    after the release and after the load; on a failed load nothing of it stays and the error propagates."""
    manager = get_residency_manager()

    def release() -> list[Hashable]:
        return [old_key] if old_key is not None and manager.release(old_key) else []

    return manager.switch(release, load)


def _log_info(message: str) -> None:
    from qwen_core.session_log import get_session_log

    logger.info(message)
    get_session_log().info(message)


def _log_warning(message: str) -> None:
    from qwen_core.session_log import get_session_log

    logger.warning(message)
    get_session_log().warning(message)


def _log_error(message: str, fix: str | None) -> None:
    from qwen_core.session_log import get_session_log

    logger.warning(message)
    get_session_log().error(message, fix=fix)
