"""Count the bytes of the tensors a piece of CPU code allocates, and their peak: a CPU stand-in for
``torch.cuda.max_memory_allocated`` (tests of what the streamed engine must reserve).

A dispatch mode sees every aten op; a new storage among an op's outputs (not one of its inputs' storages, so
in-place ops and views are not counted) is added to the live total, and a finaliser on the storage takes it
off when it is freed. Tensors that existed before the mode (weights, slots, inputs) are never counted.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class AllocTracker(TorchDispatchMode):
    """``with AllocTracker() as t: ...`` then ``t.peak`` (bytes) and ``t.live`` (bytes still allocated)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._alive: dict[int, int] = {}

    def _freed(self, key: int, nbytes: int) -> None:
        if self._alive.pop(key, None) is not None:
            self.live -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type == "cpu"}
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in inputs or key in self._alive:
                continue
            self._alive[key] = nbytes
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, key, nbytes)
        return out
