"""Where the downloader keeps its bookkeeping inside a model folder, and how it writes it.

Layout under the download root (the model folder)::

    <root>/<path>                          the verified file (a real file, never a symlink)
    <root>/.qwen_download/plan.json        the last listing (repo, revision, commit, files): offline checks
    <root>/.qwen_download/<path>.part      bytes received so far
    <root>/.qwen_download/<path>.part.json sidecar: url, size, sha256/etag, commit of what the .part holds
    <root>/.qwen_download/<path>.lock      inter-process lock (see file_lock.py)
    <root>/.qwen_download/<path>.ok        verified record: size, hash, mtime of the final file
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from qwen_core.paths import safe_join

STAGING_DIR = ".qwen_download"
PLAN_FILE = "plan.json"


def plan_path(root: Path) -> Path:
    return root / STAGING_DIR / PLAN_FILE


@dataclass(frozen=True)
class Staging:
    part: Path
    sidecar: Path
    lock: Path
    record: Path

    @classmethod
    def for_file(cls, root: Path, path: str) -> Staging:
        base = safe_join(root / STAGING_DIR, path)
        return cls(*(base.with_name(base.name + ext) for ext in (".part", ".part.json", ".lock", ".ok")))


def write_json_atomic(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)
