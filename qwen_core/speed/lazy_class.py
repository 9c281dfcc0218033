"""A class built on first use under a module-level name: our subclasses of diffusers' classes.

diffusers is imported lazily, so a subclass of one of its classes is made by a factory on first use. Dynamo's
saved traces refer to classes by module and name and refuse one they could not import back, so the class is
given its module's name and the module serves it through ``__getattr__`` (``LazyClass.module_getattr``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class LazyClass:
    def __init__(self, factory: Callable[[], type], module: str) -> None:
        self.factory, self.module = factory, module
        self._cls: type | None = None

    def get(self) -> type:
        if self._cls is None:
            cls = self.factory()
            cls.__qualname__ = cls.__name__
            cls.__module__ = self.module
            self._cls = cls
        return self._cls

    def module_getattr(self, name: str) -> Any:
        """For the module's ``__getattr__``: the class by its name, else AttributeError."""
        cls = self.get()
        if name == cls.__name__:
            return cls
        raise AttributeError(f"module {self.module!r} has no attribute {name!r}")
