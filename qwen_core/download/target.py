"""The target folder before a download writes into it: writable, names that fit, enough free space.

Only a download that has something to fetch gets here: a complete model is reported complete without any of
these writes (so a rerun on a full disk succeeds).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from qwen_core.download.layout import STAGING_DIR, fs_error
from qwen_core.download.plan import DownloadPlan
from qwen_core.download.types import EXIT_DISK, DiskFullError, Words, fmt_bytes
from qwen_core.errors import DownloadError
from qwen_core.paths import safe_join


def prepare_target(root: Path, plan: DownloadPlan, words: Words) -> None:
    """Create the folder, prove it is writable, and check names and free space against what is missing."""
    try:
        (root / STAGING_DIR).mkdir(parents=True, exist_ok=True)
        # Unique per call: two downloads in one process (two ComfyUI nodes) must not delete each other's probe.
        probe = root / STAGING_DIR / f".probe.{os.getpid()}.{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        mapped = fs_error(err, root, words)
        if type(mapped) is DownloadError:  # not a full disk / size limit: say which folder, in the old words
            mapped = DownloadError(f"The target folder {root} cannot be written ({err.strerror or err}).",
                                   fix=f"Choose a writable {words.target}, or fix the folder's permissions.",
                                   exit_code=EXIT_DISK)
        raise mapped from err
    check_name_lengths(root, plan, words)
    need = plan.missing_bytes(root)
    free = shutil.disk_usage(root).free
    if need > free:
        raise DownloadError(
            f"Not enough disk space in {root}: {fmt_bytes(need)} still to download, {fmt_bytes(free)} free.",
            fix=f"Free at least {fmt_bytes(need - free)} or choose another {words.target}; what is already "
            f"downloaded is kept.", exit_code=EXIT_DISK)


def check_name_lengths(root: Path, plan: DownloadPlan, words: Words) -> None:
    """Refuse up front the files whose names this file system cannot hold, instead of failing half-way."""
    name_max, path_max = _limit(root, "PC_NAME_MAX", 255), _limit(root, "PC_PATH_MAX", 4096)
    too_long = []
    for f in plan.files:
        final = safe_join(root, f.path)
        if any(len(part.encode("utf-8", "surrogateescape")) > name_max for part in f.path.split("/")) or \
                len(os.fsencode(final)) >= path_max:
            too_long.append(f.path)
    if too_long:
        shown = ", ".join(repr(p if len(p) <= 80 else p[:77] + "...") for p in too_long[:3])
        raise DownloadError(
            f"{len(too_long)} file name(s) of {plan.repo_id} are too long for the file system of {root} (at most "
            f"{name_max} bytes per name, {path_max} per path): {shown}.",
            fix=f"Skip them with {words.ignore}, or choose {words.target} on a file system that allows longer names.",
            exit_code=EXIT_DISK)


def _limit(root: Path, name: str, default: int) -> int:
    try:
        return int(os.pathconf(root, name))
    except (OSError, ValueError, AttributeError):  # not on this OS / this file system: the common limit
        return default


def explain_disk_full(err: DiskFullError, plan: DownloadPlan, root: Path, done_bytes: int,
                      words: Words) -> DownloadError:
    """A full disk during the download: how much is still needed and free, never "free at least 0 B"."""
    need = max(plan.total_bytes - done_bytes, 0)
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        free = 0
    if need > free:
        fix = (f"Free at least {fmt_bytes(need - free)} (or move {words.target}) and {words.rerun}: it resumes.")
    else:
        fix = (f"Something else filled the disk while we wrote (now {fmt_bytes(free)} free), or a quota applies: "
               f"free some space and {words.rerun}: it resumes.")
    return DownloadError(
        f"Disk full while downloading {plan.repo_id} into {root}: {fmt_bytes(need)} still needed, "
        f"{fmt_bytes(free)} free. Partial files are kept. ({str(err).split(' Fix: ')[0]})", fix=fix,
        exit_code=EXIT_DISK)
