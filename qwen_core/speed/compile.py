"""Regional compilation of the Qwen-Image transformer: each block's ``forward`` through ``torch.compile``.

Why ``forward`` and not diffusers' ``compile_repeated_blocks`` (which compiles each block's ``__call__``):
module hooks then stay outside the graph, so the streamed engine's stream/event hooks (``qwen_core.streaming``)
and our own hooks below keep running eagerly. One compiled function per block class is bound to each of its blocks
(``_SharedForward``): the 60 blocks share one graph and one entry in dynamo's cache. With a compiled wrapper per
block, dynamo's saved cache held 60 copies of the same trace, and a new process loaded all 60 (21 s on an H200,
against ~2 s for one; bench/RESULTS.md).

Dynamic shapes (``SpeedOptions.dynamic``): ``"seq"`` (default) compiles with ``dynamic=True``, so the image
and text sequence lengths are symbols: one graph serves every image size and every prompt length (prompts
change length with every edit, and split CFG attention runs each length separately), so a user never waits
for a recompile after the first. Padding to shape buckets was the alternative; it is not exact here (image
tokens carry RoPE positions, and a text padding mask takes the flash kernels away, bench/RESULTS.md), and the
large matrix products are cuBLAS calls that do not care whether the row count is symbolic. ``"static"``
specialises on sizes (each new size or prompt length compiles again; cached on disk like the rest).

Two guards torch would otherwise add, each costing a second compile of the same block: block 0 receives views
(``hidden_states`` is a reshaped projection), the other blocks fresh tensors; and diffusers' text RoPE table is
a row slice of a larger table (a symbolic storage offset). A pre-hook hands block inputs over as fresh tensors
(one copy for block 0 only) and ``qwen_core.speed.rope`` hands the tables over as fresh real tensors.

The dynamo cache (``compile_cache.precompile_wanted``, on by default): dynamo's switch is on only inside our
compile and our blocks' calls (``compile_cache.precompiling``). A first compile that fails only because dynamo
cannot store the graph (e.g. a user's attention processor class defined inside a function) is retried once as a
plain compile, and the blocks stay on plain compiles in this process (said through ``notify``).

Progress: the first call per batch size in a process is timed and reported through ``notify`` (the session
log by default): "compiling ... (first time on this machine)" or "loading ... from the compile cache", then
the seconds it took. A first compile marks the cache folder warm (``compile_cache.mark_warm``).
"""

from __future__ import annotations

import time
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qwen_core.speed import compile_cache

Notify = Callable[[str], None]


def _default_notify(message: str) -> None:
    from qwen_core.session_log import get_session_log

    get_session_log().info(message)


@dataclass
class CompileHandle:
    """What ``compile_blocks`` installed on one transformer; ``remove()`` undoes it. Stored in ``_HANDLES``, a
    table keyed weakly by the transformer, so it holds the transformer weakly too: a weak-key entry whose value
    reaches its key would pin the released model's weights forever."""

    transformer_ref: weakref.ref
    dynamic: str
    cache: compile_cache.CacheInfo | None
    notify: Notify
    hooks: list[Any] = field(default_factory=list)
    forwards: list[_SharedForward] = field(default_factory=list)  # the compiled function of each block class
    seen: set[int] = field(default_factory=set)  # batch sizes whose first call has run
    first_calls: dict[int, float] = field(default_factory=dict)  # batch size -> seconds of its first call
    _started: float | None = None

    @property
    def transformer(self) -> nn.Module | None:
        return self.transformer_ref()

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []
        transformer = self.transformer
        if transformer is None:
            return
        for block in transformer.transformer_blocks:
            block.__dict__.pop("forward", None)
        _HANDLES.pop(transformer, None)

    # -- progress ------------------------------------------------------------------------------------
    def _before_first_block(self, batch: int) -> None:
        if batch in self.seen:
            return
        warm = self.cache is not None and self.cache.warm
        where = f" ({self.cache.describe()})" if self.cache is not None else ""
        verb = "loading the compiled transformer blocks" if warm else "compiling the transformer blocks"
        hint = "" if warm else " - first time on this machine, ~15-60 s; later runs load it from the cache"
        self.notify(f"compile: {verb} for batch {batch}{hint}{where}")
        self._started = time.perf_counter()

    def _after_last_block(self, batch: int) -> None:
        if batch in self.seen or self._started is None:
            return
        transformer = self.transformer
        out_device = next(transformer.parameters()).device if transformer is not None else torch.device("cpu")
        if out_device.type == "cuda":
            torch.cuda.synchronize(out_device)
        seconds = time.perf_counter() - self._started
        self.seen.add(batch)
        self.first_calls[batch] = seconds
        self._started = None
        self.notify(f"compile: first forward at batch {batch} took {seconds:.1f} s (compile included)")
        if self.cache is not None and not self.cache.warm:
            compile_cache.mark_warm(self.cache, seconds, f"transformer blocks, batch {batch}")
        if self.cache is not None and any(f.precompile for f in self.forwards):
            try:  # this batch size's traced blocks too (the dynamo cache: compile_cache.PRECOMPILE_ENV)
                with compile_cache.precompiling():
                    compile_cache.save_artifacts(self.cache)
            except Exception as err:  # noqa: BLE001 - a cache that cannot be written must not fail the image
                self.notify(f"compile: could not save the compile cache artifacts ({type(err).__name__}: {err})")


class _SharedForward:
    """The compiled ``forward`` of one block class, bound to each of its blocks with ``types.MethodType``."""

    # A bound method is saved by name (``getattr(block, "forward")``): dynamo's saved guards on the block need it.
    __name__ = "forward"

    def __init__(self, cls: type, options: dict[str, Any], precompile: bool, notify: Notify) -> None:
        self.cls, self.options, self.notify = cls, options, notify
        self.precompile = precompile
        self.succeeded = False  # a call has run: later errors are the model's, not the cache's
        with compile_cache.precompiling(precompile):
            self.compiled = torch.compile(cls.forward, **options)

    def __call__(self, block: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if not self.precompile:
            return self.compiled(block, *args, **kwargs)
        try:
            with compile_cache.precompiling():
                out = self.compiled(block, *args, **kwargs)
        except Exception as err:
            if self.succeeded or not _cannot_store(err):
                raise
            self.notify(f"compile: the first compile with the dynamo compile cache failed ({_short(err)}); "
                        "compiling without it: a new process traces the blocks again")
            self.precompile = False
            self.compiled = torch.compile(self.cls.forward, **self.options)
            return self.compiled(block, *args, **kwargs)
        self.succeeded = True
        return out


def _cannot_store(err: BaseException) -> bool:
    """A compile that failed for the dynamo cache's sake: dynamo's own error, not a failure of the model's math
    (an out-of-memory error is raised as itself or chained under dynamo's). Also torch's assertion that a saved
    trace has its guards: a guard dynamo cannot store (a class identity check in the traced code, say) drops the
    trace from the cache, and torch 2.11-2.14 then assert (in dynamo's code) instead of compiling without it."""
    from torch._dynamo.exc import TorchDynamoException

    chain, seen = err, set()
    while chain is not None and id(chain) not in seen:
        if isinstance(chain, torch.OutOfMemoryError):
            return False
        seen.add(id(chain))
        chain = chain.__cause__ or chain.__context__
    return isinstance(err, TorchDynamoException) or (isinstance(err, AssertionError) and _raised_in_dynamo(err))


def _raised_in_dynamo(err: BaseException) -> bool:
    """The innermost frame is dynamo's (torch 2.11's ``assert check_fn.guards_state is not None`` has no message)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and "torch/_dynamo/" in tb.tb_frame.f_code.co_filename.replace("\\", "/")


def _short(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"


# Our state about a transformer, held weakly: a released model takes its handle with it.
_HANDLES: weakref.WeakKeyDictionary[nn.Module, CompileHandle] = weakref.WeakKeyDictionary()


def compile_handle(transformer: nn.Module) -> CompileHandle | None:
    return _HANDLES.get(transformer)


def _fresh(x: Any) -> Any:
    return x.clone() if isinstance(x, torch.Tensor) and x._base is not None else x


def _fresh_inputs(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return tuple(_fresh(a) for a in args), {k: _fresh(v) for k, v in kwargs.items()}


def compile_blocks(transformer: nn.Module, *, dynamic: str = "seq", mode: str | None = None,
                   notify: Notify | None = None, use_cache: bool = True) -> CompileHandle:
    """Compile every block's ``forward`` (idempotent; see the module docstring). ``use_cache``: point torch's
    caches at our keyed folder (``compile_cache.activate``) first and keep dynamo's traces there; False: a plain
    compile, which also takes up no trace saved earlier in the process (benchmarks of other compile settings)."""
    existing = compile_handle(transformer)
    if existing is not None:
        return existing
    blocks = list(getattr(transformer, "transformer_blocks", []))
    if not blocks:
        raise ValueError("`transformer` has no transformer_blocks to compile")
    device = next(transformer.parameters()).device
    cache = compile_cache.activate(device) if use_cache else None
    handle = CompileHandle(weakref.ref(transformer), dynamic, cache, notify or _default_notify)
    options: dict[str, Any] = {"fullgraph": True, "dynamic": dynamic == "seq"}
    if mode:
        options["mode"] = mode
    precompile = cache is not None and compile_cache.precompile_wanted()
    shared: dict[type, _SharedForward] = {}  # one compiled function per block class, shared by its blocks
    for block in blocks:
        if "forward" not in block.__dict__:
            cls = type(block)
            if cls not in shared:
                shared[cls] = _SharedForward(cls, options, precompile, handle.notify)
                handle.forwards.append(shared[cls])
            block.forward = types.MethodType(shared[cls], block)
        handle.hooks.append(block.register_forward_pre_hook(_fresh_inputs, with_kwargs=True))

    def first(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        hs = kwargs.get("hidden_states", args[0] if args else None)
        if isinstance(hs, torch.Tensor):
            handle._before_first_block(hs.shape[0])

    def last(_m: nn.Module, args: tuple, kwargs: dict, _out: Any) -> None:
        hs = kwargs.get("hidden_states", args[0] if args else None)
        if isinstance(hs, torch.Tensor):
            handle._after_last_block(hs.shape[0])

    handle.hooks.append(blocks[0].register_forward_pre_hook(first, with_kwargs=True))
    handle.hooks.append(blocks[-1].register_forward_hook(last, with_kwargs=True))
    _HANDLES[transformer] = handle
    return handle


def uncompile_blocks(transformer: nn.Module) -> None:
    """Back to eager blocks (no-op when not compiled)."""
    handle = compile_handle(transformer)
    if handle is not None:
        handle.remove()
