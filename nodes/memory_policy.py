"""When ComfyUI needs memory, does our resident model go? Pure decisions: no ComfyUI, no torch import.

``comfy_bridge`` wraps ComfyUI's memory functions and asks the functions here; the tests call them with
plain numbers. The rule is one sentence: **ours is released only when releasing it is what frees the
memory.** In detail:

- ComfyUI first frees what it would free anyway (its own models, its cached outputs); only a request that
  is still short afterwards concerns us.
- With dynamic VRAM (ComfyUI >= 0.33, ``free_memory(..., for_dynamic=True)``) ComfyUI keeps its dynamic
  models loaded on purpose and pages them out on demand: the VRAM they hold counts as available, exactly
  as ComfyUI's own ``free_memory`` counts it. A low plain free-VRAM reading is then no reason to drop a
  40 GB model that the next Generate would load again.
- Ours must hold memory on the device in question: weights in CPU RAM free no VRAM, and the reverse.
- A targeted unload (``unload_model_and_clones``: one model and its copies, e.g. multi-GPU clones or a
  ControlNet) is never about ours.
- Under RAM pressure (0.33's RAM-pressure cache) ours goes only at the last tier, when ComfyUI is already
  evicting the running workflow's own cached data and RAM is still short.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

HUGE_REQUEST = 1e29  # ComfyUI asks for 1e30 bytes to mean "unload everything" (unload_all_models & co)


def device_key(device: Any) -> tuple[str, int | None] | None:
    """``("cuda", 0)``, ``("cpu", None)``... from a torch.device, a string like "cuda:1", or None."""
    if device is None:
        return None
    kind = getattr(device, "type", None)
    index = getattr(device, "index", None)
    if kind is None:
        text = str(device)
        kind, _, number = text.partition(":")
        index = int(number) if number.isdigit() else None
    if kind not in ("cpu", "mps", "meta") and index is None:
        index = 0  # "cuda" means the current device; ComfyUI and parameters name it cuda:0 on one GPU
    return (str(kind), index)


@dataclass(frozen=True)
class DeviceRequest:
    """One ``free_memory(required, device, ...)`` call, read after ComfyUI's own part ran (bytes)."""

    required: float
    free_after: float  # what ComfyUI's get_free_memory(device) reports after it freed its own models
    reclaimable: float = 0.0  # VRAM its dynamic models hold and give back on demand (for_dynamic only)
    ours_on_device: int = 0  # bytes of our resident model on this device
    targeted: bool = False  # inside unload_model_and_clones: one ComfyUI model and its clones

    @property
    def shortfall(self) -> float:
        return self.required - self.free_after - self.reclaimable


def release_for_device(request: DeviceRequest) -> bool:
    """True when dropping our model is what would give ComfyUI the memory it still lacks."""
    return not request.targeted and request.ours_on_device > 0 and request.shortfall > 0


def release_for_ram(target: float, available: float, *, free_active: bool, min_entry_size: float,
                    ours_in_ram: int) -> bool:
    """The RAM-pressure cache asked for ``target`` bytes of available RAM and has evicted what it could.

    Its tiers, in order: inactive entries (free_active False), large active entries (min_entry_size > 0),
    pinned memory, then every active entry (free_active True, min_entry_size 0). Ours is evicted only
    after that last tier still leaves RAM short.
    """
    return free_active and not min_entry_size and available < target and ours_in_ram > 0
