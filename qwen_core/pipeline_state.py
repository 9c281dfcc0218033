"""``PipelineState``: what qwen_core knows about one loaded diffusers pipeline, in one typed place.

The loader, the streamed engine and the batched-CFG wrapper each need to remember something about a pipeline
they set up (the load plan and placement, the attention backend, the streaming handle, the CFG wrapper). That
state is ours, so it lives in our dataclass, found through ``state_of(pipe)``: nothing is stuck on the
diffusers objects themselves. The registry holds pipelines weakly, so a dropped pipeline takes its state
with it, and ``discard_state`` drops it at release (a pipeline shell that lives on keeps nothing of ours).

A rule for every value stored here: it must not reference its pipeline strongly (hold it through
``weakref``). A weak-key entry whose value reaches its own key pins both forever; on a GPU that was a whole
transformer's VRAM per released model (bench/comfy_cooperation.py found it; tests/test_memory.py guards it).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Any


@dataclass
class PipelineState:
    """Typed state of one pipeline. ``load_plan`` is a ``load_policy.LoadPlan``, ``streaming`` a
    ``streaming.StreamingHandle``, ``cfg_batcher`` a ``cfg_batch.CfgBatcher``, ``loras`` a
    ``lora.fuse.LoraState``, ``devices`` a ``placement.hooks.PlacementHandle`` (components on several devices),
    ``context_parallel`` a ``parallel.context.ContextParallelHandle`` (typed ``Any`` here so this leaf module
    imports none of them)."""

    load_plan: Any = None
    placement: str = ""
    attention_backend: str = ""
    streaming: Any = None
    cfg_batcher: Any = None
    loras: Any = None
    devices: Any = None
    context_parallel: Any = None


_states: weakref.WeakKeyDictionary[Any, PipelineState] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def state_of(pipe: Any) -> PipelineState:
    """The state of ``pipe``, created empty on first use."""
    with _lock:
        state = _states.get(pipe)
        if state is None:
            state = _states[pipe] = PipelineState()
        return state


def discard_state(pipe: Any) -> PipelineState | None:
    """Forget ``pipe``'s state (its release detaches what the state describes); returns what was there."""
    with _lock:
        return _states.pop(pipe, None)


def peek_state(pipe: Any) -> PipelineState | None:
    """The state of ``pipe`` if anything was recorded for it, else None (creates nothing)."""
    with _lock:
        return _states.get(pipe)
