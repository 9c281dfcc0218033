"""Put a pipeline's components on their devices and move tensors across the device boundaries.

The diffusers pipeline itself is unchanged. It computes on its execution device (``_execution_device``: latents,
timesteps, the seeded noise, the prompt embeddings), which must be the main card. Left to itself it would not
always be: without hooks it is ``DiffusionPipeline.device``, the first non-CPU component in ALPHABETICAL order,
i.e. the text encoder's card when that is a GPU. So the VAE (the first component the pipeline looks at) gets
accelerate's ``AlignDevicesHook`` with ``execution_device`` = the main card, which ``_execution_device`` reads
first: the mechanism diffusers' own ``device_map="balanced"`` relies on. ``apply_placement`` checks the result.
What crosses a boundary:

- the text encoder (its own card, or the CPU): a forward pre-hook moves its inputs (token ids on the execution
  device) to its card, and a forward hook moves its outputs back to where the inputs came from. The pipeline then
  makes the prompt embeddings from them on the execution device, as it does on one card;
- the transformer: a pre-hook moves its inputs (latents, prompt embeddings and mask, timestep) to the main
  card and a hook moves its output back to the caller's device: a no-op when the pipeline already computes on
  the main card, a guarantee when it does not;
- a split transformer: each block on another card gets its inputs moved there by a pre-hook (the hidden states
  come from the previous block; the time embedding, RoPE tables and mask come from the main card), and
  ``norm_out`` gets the last block's output moved back to the main card.

Module hooks run outside ``forward``, so the compiled block ``forward`` (``qwen_core.speed.compile``), the
batched-CFG wrapper and the streamed engine's hooks are untouched. Moves go through ``Mover`` (accelerate's
``send_to_device``: tensors inside tuples, dicts and model outputs); tests pass a recording one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qwen_core.errors import QwenError
from qwen_core.placement.spec import Placement

Mover = Callable[[Any, torch.device], Any]


def send(obj: Any, device: torch.device) -> Any:
    """Every tensor inside ``obj`` (tuples, lists, dicts, model outputs) on ``device``."""
    from accelerate.utils import send_to_device

    return send_to_device(obj, device)


def first_device(args: tuple, kwargs: dict) -> torch.device | None:
    """The device of the first tensor among the call's arguments (where the caller computes)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    return None


@dataclass
class PlacementHandle:
    """What ``apply_placement`` installed on one pipeline; ``remove()`` takes the hooks off."""

    placement: Placement
    block_counts: tuple[int, ...]
    mover: Mover
    hooks: list[Any] = field(default_factory=list)
    pinned: nn.Module | None = None  # the module whose accelerate hook names the execution device

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
        if self.pinned is not None:
            from accelerate.hooks import remove_hook_from_module

            remove_hook_from_module(self.pinned)
            self.pinned = None

    def describe(self) -> str:
        return self.placement.describe(sum(self.block_counts))


def _move_module(module: nn.Module, device: torch.device, skip: nn.Module | None = None) -> None:
    """``module`` to ``device`` except the subtree ``skip``, one tensor at a time: a split transformer's blocks go
    from the host straight to their own card, never all through the main card."""
    for child in module.children():
        if child is not skip:
            child.to(device)
    for param in module._parameters.values():
        if param is not None:
            param.data = param.data.to(device)
    for name, buf in list(module._buffers.items()):
        if buf is not None:
            module._buffers[name] = buf.to(device)


def place_weights(pipe: Any, placement: Placement, *, transformer: bool = True) -> tuple[int, ...]:
    """Move the components' weights where ``placement`` says; returns the blocks per transformer device.
    ``transformer`` False: the transformer and VAE are someone else's (the streamed engine's)."""
    main = torch.device(placement.main)
    te = getattr(pipe, "text_encoder", None)
    if isinstance(te, nn.Module):
        te.to(torch.device(placement.text_encoder_device))
    model = pipe.transformer
    blocks = list(getattr(model, "transformer_blocks", []))
    counts = placement.blocks_per_device(len(blocks)) if placement.is_split else (len(blocks),)
    if not transformer:
        return counts
    if placement.is_split:
        _move_module(model, main, skip=model.transformer_blocks)
        start = 0
        for device, count in zip(placement.transformer, counts, strict=True):
            for block in blocks[start:start + count]:
                block.to(torch.device(device))
            start += count
    else:
        model.to(main)
    vae = getattr(pipe, "vae", None)
    if isinstance(vae, nn.Module):
        vae.to(main)
    return counts


def _boundary(handle: PlacementHandle, module: nn.Module, device: torch.device, *, back: bool) -> None:
    """Pre-hook: the call's tensors to ``device``. With ``back``: a hook returns the output to the caller's device."""
    callers: list[torch.device | None] = []

    def pre(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if back:
            callers.append(first_device(args, kwargs))
        return handle.mover(args, device), handle.mover(kwargs, device)

    handle.hooks.append(module.register_forward_pre_hook(pre, with_kwargs=True))
    if not back:
        return

    def post(_m: nn.Module, _args: tuple, _kwargs: dict, output: Any) -> Any:
        caller = callers.pop() if callers else None
        return output if caller is None else handle.mover(output, caller)

    handle.hooks.append(module.register_forward_hook(post, with_kwargs=True))


def pin_execution_device(pipe: Any, handle: PlacementHandle, device: torch.device) -> None:
    """Make the pipeline compute on ``device`` (module docstring), or raise if diffusers would not."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    vae = getattr(pipe, "vae", None)
    if not isinstance(vae, nn.Module):
        return
    add_hook_to_module(vae, AlignDevicesHook(execution_device=device, io_same_device=True))
    handle.pinned = vae
    actual = pipe._execution_device
    if torch.device(actual) != device:
        handle.remove()
        raise QwenError(f"the pipeline would compute on {actual}, not on the main card {device}.",
                        fix="This diffusers version chooses its execution device differently; use devices single "
                            "and report the diffusers version.")


def apply_placement(pipe: Any, placement: Placement, *, mover: Mover = send, transformer: bool = True) -> PlacementHandle:
    """Place ``pipe``'s weights (``place_weights``), pin its execution device to the main card and install the
    boundary hooks (module docstring). ``transformer`` False: only the text encoder is placed (the streamed
    engine owns the transformer and the VAE); the hooks are the same."""
    counts = place_weights(pipe, placement, transformer=transformer)
    handle = PlacementHandle(placement, counts, mover)
    pin_execution_device(pipe, handle, torch.device(placement.main))
    te = getattr(pipe, "text_encoder", None)
    if placement.text_encoder is not None and isinstance(te, nn.Module):
        _boundary(handle, te, torch.device(placement.text_encoder), back=True)
    model = pipe.transformer
    main = torch.device(placement.main)
    _boundary(handle, model, main, back=True)
    if transformer and placement.is_split:
        blocks = list(model.transformer_blocks)
        start = 0
        for device, count in zip(placement.transformer, counts, strict=True):
            if torch.device(device) != main or start > 0:
                for block in blocks[start:start + count]:
                    _boundary(handle, block, torch.device(device), back=False)
            start += count
        _boundary(handle, model.norm_out, main, back=False)
    return handle


def remove_placement(handle: PlacementHandle | None) -> None:
    if handle is not None:
        handle.remove()
