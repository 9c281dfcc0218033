"""diffusers' context parallelism on a loaded Qwen-Image pipeline, and the process group it needs.

We use diffusers' own machinery and nothing else: ``ModelMixin.enable_parallelism`` with a
``ContextParallelConfig`` installs the split/gather hooks of ``QwenImageTransformer2DModel._cp_plan`` and hands
the config to every attention processor, whose ``dispatch_attention_fn`` then runs the Ulysses or ring
attention (torch's functional collectives over the process group). Our part is to make the pipeline's state
fit it:

- batched CFG (``qwen_core.cfg_batch``) is switched off: its padded cond+uncond batch needs a text mask (ring
  attention applies one mask to every key/value chunk, which is wrong for a padded batch) and its per-length
  split attention (which computes attention itself, unaware of the other processes); two unmasked forwards
  per step are also faster than one masked batch (bench/RESULTS.md, H100: 639 vs 790 ms per step);
- flash-attn 4 through our processors is switched off (it bypasses diffusers' dispatcher); the real-valued
  RoPE processors stay (they pass the parallel config on);
- ring attention needs a kernel that returns the log-sum-exp: diffusers' SDPA backend ("native") raises
  "Native attention does not support return_lse=True", so ring runs cuDNN attention (``_native_cudnn``) or the
  flash-attn package when it was chosen; neither exists on the CPU.

What a CPU with gloo lacks, and what we do about it (diffusers 0.42.1):

- ``ModelMixin._resolve_parallel_config`` computes the process's device as ``rank %
  torch.accelerator.device_count()``, which divides by zero without an accelerator. On such a machine
  ``device_count`` reads 1 while ``enable_parallelism`` runs (``_accelerator_count_shim``): the device is then
  "cpu:0", the CPU.
- "Ulysses anything" gathers each process's sequence length on ``torch.accelerator.current_accelerator()``
  unless the process group's backend string names "cpu"; a CUDA build of torch on a machine without a GPU
  names CUDA there and fails ("Found no NVIDIA driver"). The CPU group is therefore "cpu:gloo" (and the CUDA
  one "cpu:gloo,cuda:nccl", which keeps those small gathers off the GPU, as diffusers suggests).
- ring attention needs a kernel that returns the log-sum-exp (above): none on the CPU.

The collectives themselves (all-to-all, all-gather through torch's functional collectives) run on gloo as they
do on NCCL.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from qwen_core.errors import InvalidInputError, QwenError
from qwen_core.parallel.settings import ContextParallelSettings, CpAttention, DistributedEnv, ulysses_problem
from qwen_core.pipeline_state import state_of
from qwen_core.session_log import get_session_log

# Attention backends whose diffusers implementation takes part in context parallelism, and those that also
# return the log-sum-exp ring attention merges with (diffusers.models.attention_dispatch, 0.42.1).
CP_BACKENDS = frozenset({"native", "flash", "_native_cudnn", "_native_flash", "sage"})
LSE_BACKENDS = frozenset({"flash", "_native_cudnn", "_native_flash", "sage"})
RING_CUDA_BACKEND = "_native_cudnn"
DEFAULT_TIMEOUT_S = 900.0


@dataclass
class ContextParallelHandle:
    """What ``enable_context_parallel`` did to one pipeline."""

    settings: ContextParallelSettings
    rank: int
    world_size: int
    attention_backend: str
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        extra = f"; {'; '.join(self.notes)}" if self.notes else ""
        return (f"{self.settings.describe()}, rank {self.rank} of {self.world_size}, attention "
                f"{self.attention_backend}{extra}")


def process_device(env: DistributedEnv) -> str:
    """This process's device: ``cuda:<local rank>`` when CUDA is there, else the CPU."""
    if torch.cuda.is_available():
        if env.local_rank >= torch.cuda.device_count():
            raise QwenError(f"local rank {env.local_rank} has no GPU ({torch.cuda.device_count()} visible).",
                            fix="Start at most as many processes as GPUs (--nproc-per-node).")
        return f"cuda:{env.local_rank}"
    return "cpu"


def init_process_group(env: DistributedEnv, device: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> str:
    """Join the process group torchrun set up (env://). CUDA: NCCL for tensors on the GPU and gloo for the few
    on the host (diffusers gathers sequence lengths there); CPU: gloo. Returns the backend string."""
    import torch.distributed as dist

    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "cpu:gloo"  # "cpu" in the name: diffusers then gathers sequence lengths on the host
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return backend


def destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def _accelerator_count_shim() -> Iterator[None]:
    """See the module docstring: diffusers divides by the accelerator count; a CPU-only machine has none."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is None or accelerator.device_count() > 0:
        yield
        return
    original = accelerator.device_count
    accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        accelerator.device_count = original


def _backend_for(settings: ContextParallelSettings, current: str, device: torch.device) -> str:
    if settings.attention is CpAttention.ULYSSES:
        return current if current in CP_BACKENDS else "native"
    if current in LSE_BACKENDS:
        return current
    if device.type != "cuda":
        raise InvalidInputError("cp_attention", "ring attention merges partial results through their log-sum-exp, "
                                "which diffusers' SDPA backend does not return; the kernels that do (cuDNN, "
                                f"flash-attn, SageAttention) need CUDA, and this process runs on {device}.",
                                fix="Use cp_attention ulysses.")
    return RING_CUDA_BACKEND


def check_transformer(transformer: Any, settings: ContextParallelSettings) -> None:
    """The transformer has a context-parallel plan, and Ulysses can split its heads ``settings.degree`` ways."""
    if getattr(transformer, "_cp_plan", None) is None:
        import diffusers

        raise InvalidInputError("context_parallel", f"{type(transformer).__name__} declares no context-parallel plan "
                                f"(`_cp_plan`) in diffusers {diffusers.__version__}.",
                                fix="Run this model on one card, or spread it over cards with devices.")
    heads = int(transformer.config.num_attention_heads)
    problem = ulysses_problem(heads, settings.degree) if settings.attention is CpAttention.ULYSSES else None
    if problem:
        raise InvalidInputError("context_parallel", problem, fix="Use one of those degrees, or cp_attention ring.")


def enable_context_parallel(pipe: Any, settings: ContextParallelSettings) -> ContextParallelHandle:
    """Turn on diffusers' context parallelism for ``pipe``'s transformer (see the module docstring). The process
    group must be up with ``settings.degree`` processes; call it on every process, after loading."""
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    from qwen_core.cfg_batch import disable_cfg_batching
    from qwen_core.speed.rope import set_attention_kernel, set_fused_kernels

    if not dist.is_initialized() or dist.get_world_size() != settings.degree:
        have = dist.get_world_size() if dist.is_initialized() else 0
        raise QwenError(f"context parallel x{settings.degree} needs {settings.degree} processes; this group has "
                        f"{have}.", fix="Launch with the torchrun command `generate --context-parallel N` prints.")
    transformer = pipe.transformer
    check_transformer(transformer, settings)
    state = state_of(pipe)
    if state.streaming is not None or state.devices is not None:
        raise InvalidInputError("memory_mode", "context parallelism runs the whole model resident on every card.",
                                fix="Use memory_mode gpu and devices single.")
    device = next(transformer.parameters()).device
    notes = []
    if state.cfg_batcher is not None:
        disable_cfg_batching(pipe)
        notes.append("batched CFG off (two unmasked forwards per step)")
    set_attention_kernel(transformer, None)  # flash-attn 4 through our processors bypasses the dispatcher
    set_fused_kernels(transformer, False)  # the q/k kernel takes whole-sequence tables; not run with sharded ones
    backend = _backend_for(settings, state.attention_backend or "native", device)
    _set_backend(transformer, backend)
    state.attention_backend = backend
    if settings.attention is CpAttention.ULYSSES:
        config = ContextParallelConfig(ulysses_degree=settings.degree, ulysses_anything=True)
    else:
        config = ContextParallelConfig(ring_degree=settings.degree, ring_anything=True)
    with _accelerator_count_shim(), _quiet_experimental():
        transformer.enable_parallelism(config=config)
    handle = ContextParallelHandle(settings, dist.get_rank(), dist.get_world_size(), backend, tuple(notes))
    state.context_parallel = handle
    get_session_log().info(f"parallel: {handle.describe()}")
    return handle


def _set_backend(transformer: Any, backend: str) -> None:
    with _quiet_experimental():
        transformer.set_attention_backend(backend)


@contextlib.contextmanager
def _quiet_experimental() -> Iterator[None]:
    """diffusers warns "experimental" on every call; our session log records what was set instead."""
    log = logging.getLogger("diffusers.models.modeling_utils")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)
