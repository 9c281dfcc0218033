"""Exception types shared by the whole library.

Each error says what failed, why, and what to do. ``InvalidInputError`` names the offending field so a
node can show it against the right widget.
"""

from __future__ import annotations


class QwenError(Exception):
    """Base class of every error qwen_core raises on purpose."""

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        self.fix = fix
        super().__init__(f"{message} Fix: {fix}" if fix else message)


class InvalidInputError(QwenError, ValueError):
    """A user-supplied value is out of range or malformed; raised before any compute."""

    def __init__(self, field: str, message: str, *, fix: str | None = None) -> None:
        self.field = field
        super().__init__(f"`{field}`: {message}", fix=fix)


class ModelFolderError(QwenError):
    """A model folder is incomplete, corrupt, or holds unsafe (pickled) weights."""


class ModelLoadError(QwenError):
    """Weights could not be loaded even after retries and fallbacks."""


class OutOfMemoryError(QwenError):
    """The device ran out of memory; our own memory was released before this was raised."""


class GenerationCancelled(QwenError):
    """The caller asked to stop; the VAE decode was skipped and the generator stays usable."""


class DownloadError(QwenError):
    """A download failed for a reason retries cannot fix (auth, not found, disk full, bad data)."""

    def __init__(self, message: str, *, fix: str | None = None, exit_code: int = 1) -> None:
        self.exit_code = exit_code
        super().__init__(message, fix=fix)


class DownloadCancelled(QwenError):
    """The caller asked to stop a download; partial files are kept for resume."""


class PresetError(QwenError, ValueError):
    """The presets YAML is missing, malformed, or has an invalid value (names file and key)."""
