"""Writing a file so that a reader sees the old content or the whole new one, never half of it: the bytes go to
a temp file beside the target, which is then renamed over it. The one place for this policy (download records,
demo images, the compile cache's marker and artifacts)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (its folder is created); the file gets the usual permissions (0666 less the
    umask, not mkstemp's 0600). On any error the temp file is removed and the error raised."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it: set, then put back at once
    os.umask(mask)
    return mask
