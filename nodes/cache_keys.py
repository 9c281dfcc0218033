"""What the nodes' IS_CHANGED return: a fingerprint of the files a node's result depends on.

ComfyUI re-runs a node (and everything after it) when its IS_CHANGED value differs from the last run's;
an unchanged value lets the whole graph come from its cache. So the value must change when something that
matters changed (a file added, removed or resized in the model folder, a different disk verdict) and stay
equal otherwise (free VRAM wobbling is no reason to re-check everything).

A folder our own node writes (the Downloader's target) would change under its own run: the first re-queue
after a download would run the whole graph again. ``FolderKeys`` remembers, per folder, the key the run
started with and the fingerprint the run left behind; while the folder still looks as our run left it,
IS_CHANGED returns the run's starting key, so ComfyUI's cache matches.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

BOOKKEEPING = ".qwen_download"  # the downloader's partials and records: they change without the model changing


def folder_fingerprint(folder: Path | str | None) -> str:
    """A short hash of every file below ``folder`` (relative path, size, mtime); "absent" if it is not a
    folder. Hidden folders (the download bookkeeping, .cache) are skipped."""
    if folder is None or not Path(folder).is_dir():
        return "absent"
    digest = hashlib.sha256()
    root = str(folder)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            try:
                stat = os.stat(path)
            except OSError:
                continue
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


class FolderKeys:
    """IS_CHANGED keys for folders a node itself changes (see the module docstring). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started: dict[str, str] = {}  # folder -> key IS_CHANGED returned for the run now queued
        self._settled: dict[str, tuple[str, str]] = {}  # folder -> (key of our last run, fingerprint after it)

    def key(self, folder: Path | str) -> str:
        """The IS_CHANGED value: the last run's key while the folder is as that run left it."""
        name = str(folder)
        now = folder_fingerprint(folder)
        with self._lock:
            settled = self._settled.get(name)
            key = settled[0] if settled is not None and settled[1] == now else now
            self._started[name] = key
            return key

    def settle(self, folder: Path | str) -> None:
        """After a successful run that may have written into ``folder``."""
        name = str(folder)
        after = folder_fingerprint(folder)
        with self._lock:
            started = self._started.get(name)
            if started is not None:
                self._settled[name] = (started, after)
