"""State shared by the workers of one download, and the small types the file engine passes around."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from qwen_core.download.layout import Placement
from qwen_core.download.transport import HubClient
from qwen_core.download.types import CLI_WORDS, EXIT_NETWORK, HttpConfig, Words
from qwen_core.errors import DownloadCancelled


@dataclass
class Job:
    """One download_repo call's shared state; workers only touch it through ``add``, ``cancel`` and ``log``.

    ``placement`` says where each file goes; without one, every file goes under ``root`` (the diffusers layout)."""

    root: Path
    client: HubClient
    repo_id: str
    commit: str
    log: Callable[[str], None]
    verify: bool = False  # re-hash present files instead of trusting their records
    words: Words = CLI_WORDS
    cancel: threading.Event = field(default_factory=threading.Event)
    done_bytes: int = 0  # bytes that count toward the progress bar (resumed + fetched + present)
    fetched_bytes: int = 0  # bytes received over the network in this run
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _warned: set[str] = field(default_factory=set)
    placement: Placement | None = None

    @property
    def where(self) -> Placement:
        """Where each file and its bookkeeping go."""
        return self.placement if self.placement is not None else Placement.tree(self.root)

    @property
    def config(self) -> HttpConfig:
        return self.client.config

    @property
    def host(self) -> str:
        return self.client.endpoint.host

    def add(self, done: int, fetched: int = 0) -> None:
        with self._lock:
            self.done_bytes += done
            self.fetched_bytes += fetched

    def warn_once(self, key: str, message: str) -> None:
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        self.log(f"warning: {message}")

    def url(self, path: str) -> str:
        endpoint = self.client.endpoint.url.rstrip("/")
        return f"{endpoint}/{self.repo_id}/resolve/{quote(self.commit, safe='')}/{quote(path)}"

    def check_cancel(self) -> None:
        if self.cancel.is_set():
            raise DownloadCancelled("Download cancelled; partial files are kept and the next run resumes them.")


@dataclass
class PartState:
    """What the ``.part`` holds: ``offset`` bytes, all of them seen by ``hasher``."""

    offset: int
    hasher: hashlib._Hash | None


class Retryable(Exception):
    """One attempt failed in a way another attempt may not (a dropped connection, a 503, a wrong body).

    ``exit_code`` and ``fix`` are what the user gets when the attempts run out."""

    def __init__(self, reason: str, *, exit_code: int = EXIT_NETWORK, fix: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.exit_code = exit_code
        self.fix = fix
        self.retry_after = retry_after
