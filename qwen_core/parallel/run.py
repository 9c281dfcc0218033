"""One context-parallel generation session per process, as torchrun starts them.

``parallel_session`` is what each of the N processes runs: join the process group, load the model resident on
this process's card (``cuda:<local rank>``, or the CPU with gloo) through our own ``PipelineLoader``, turn on
diffusers' context parallelism (``qwen_core.parallel.context``), yield the generator; the process group is torn
down on every exit path. Every process then makes the same ``generate`` call: the same seed gives the same
noise on every process, each transformer forward is split N ways and gathered, so every process ends with the
same image, and rank 0 writes it.

Compile is off under context parallelism: diffusers' "Ulysses anything" attention reads every process's
sequence length on the host (``.item()`` after an ``all_gather``), which a full-graph compiled block cannot hold
(bench/multigpu.py measures the eager single-card time beside it, so the scaling is like for like).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from qwen_core.errors import InvalidInputError
from qwen_core.options import MemoryMode
from qwen_core.parallel.context import (
    ContextParallelHandle,
    destroy_process_group,
    enable_context_parallel,
    init_process_group,
    process_device,
)
from qwen_core.parallel.settings import ContextParallelSettings, DistributedEnv, distributed_env


@dataclass
class ParallelSession:
    generator: Any  # qwen_core.generator.QwenImageGenerator
    handle: ContextParallelHandle
    env: DistributedEnv
    device: str
    backend: str

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes files and prints; the others compute the same image silently."""
        return self.env.rank == 0


def _loader_kwargs(loader_kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(loader_kwargs)
    mode = MemoryMode.parse(kwargs.pop("memory_mode", "auto") or "auto", "memory_mode")
    if mode not in (MemoryMode.AUTO, MemoryMode.GPU):
        raise InvalidInputError("memory_mode", f"{mode.value}: context parallelism runs the whole model resident "
                                "on every card.", fix="Use memory_mode gpu (or auto).")
    placement = kwargs.pop("placement", "single") or "single"
    if str(placement).strip().lower() != "single":
        raise InvalidInputError("devices", "context parallelism puts one whole copy of the model on each card; it "
                                "does not combine with devices.", fix="Leave devices at single.")
    kwargs.pop("compile", None)
    return {**kwargs, "memory_mode": "gpu", "compile": "off"}


@contextlib.contextmanager
def parallel_session(model: Any, settings: ContextParallelSettings, *, env: DistributedEnv | None = None,
                     device: str | None = None, **loader_kwargs: Any) -> Iterator[ParallelSession]:
    """Join the group, load ``model`` (a folder, a ``ModelSource`` or a ``PipelineLoader``'s model argument),
    enable context parallelism; yield the session. ``device`` None: this process's card (or the CPU)."""
    from qwen_core.generator import QwenImageGenerator
    from qwen_core.loading import PipelineLoader

    env = env or distributed_env()
    if env.world_size != settings.degree:
        raise InvalidInputError("context_parallel", f"{settings.degree} differs from the {env.world_size} processes "
                                "torchrun started.", fix="Give torchrun --nproc-per-node the same number.")
    kwargs = _loader_kwargs(loader_kwargs)  # checked before any process waits on the others
    device = device or process_device(env)
    backend = init_process_group(env, device)
    try:
        loader = model if isinstance(model, PipelineLoader) else PipelineLoader(model, device=device, **kwargs)
        generator = QwenImageGenerator(loader)
        handle = enable_context_parallel(generator.load(), settings)
        yield ParallelSession(generator, handle, env, device, backend)
    finally:
        destroy_process_group()

