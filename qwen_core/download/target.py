"""The target folder before a download writes into it: writable, names that fit, enough free space.

Only a download that has something to fetch gets here: a complete model is reported complete without any of
these writes (so a rerun on a full disk succeeds).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from qwen_core.download.layout import Placement, fs_error
from qwen_core.download.plan import DownloadPlan
from qwen_core.download.types import EXIT_DISK, EXIT_USAGE, DiskFullError, Words, fmt_bytes
from qwen_core.errors import DownloadError


def prepare_target(where: Placement, plan: DownloadPlan, words: Words) -> None:
    """Create the folders, prove they are writable, and check names and free space against what is missing.

    Every folder a file goes to is probed before the first byte is fetched: a read-only ``models/vae`` must
    fail now, not after 20 GB of ``diffusion_models``."""
    _probe(where.staging, where.root, words)
    for folder in where.target_folders(f.path for f in plan.files) if where.is_comfy else []:
        _probe(folder, folder, words)
    check_name_lengths(where, plan, words)
    for folder, need in _missing_by_disk(where, plan).items():
        free = shutil.disk_usage(folder).free
        if need > free:
            raise DownloadError(
                f"Not enough disk space in {folder}: {fmt_bytes(need)} still to download there, {fmt_bytes(free)} "
                f"free.", fix=f"Free at least {fmt_bytes(need - free)} or choose another {words.target}; what is "
                f"already downloaded is kept.", exit_code=EXIT_DISK)


def _probe(folder: Path, shown: Path, words: Words) -> None:
    """Create ``folder`` and write a file there; the error names ``shown`` (the user's folder, not ours)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # Unique per call: two downloads in one process (two ComfyUI nodes) must not delete each other's probe.
        probe = folder / f".probe.{os.getpid()}.{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        mapped = fs_error(err, shown, words)
        if type(mapped) is DownloadError:  # not a full disk / size limit: say which folder, in the old words
            mapped = DownloadError(f"The target folder {shown} cannot be written ({err.strerror or err}).",
                                   fix=f"Choose a writable {words.target}, or fix the folder's permissions.",
                                   exit_code=EXIT_DISK)
        raise mapped from err


def _missing_by_disk(where: Placement, plan: DownloadPlan) -> dict[Path, int]:
    """Bytes still to fetch per file system, keyed by the first folder on it (the ComfyUI layout may spread the
    files over several disks through extra_model_paths.yaml)."""
    by_device: dict[int, tuple[Path, int]] = {}
    for f in plan.files:
        folder = where.final(f.path).parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        device = os.stat(folder).st_dev
        first, total = by_device.get(device, (folder, 0))
        by_device[device] = (first, total + plan.missing_bytes(where, [f]))
    return dict(by_device.values())


def check_destinations(where: Placement, plan: DownloadPlan, words: Words) -> None:
    """Two repo files must never go to one local file (ComfyUI folders of two kinds may be one folder)."""
    seen: dict[Path, str] = {}
    for f in plan.files:
        final = where.final(f.path)
        if final in seen:
            raise DownloadError(f"{seen[final]} and {f.path} of {plan.repo_id} would both be written to {final}.",
                                fix=f"Download one of them at a time ({words.allow}).", exit_code=EXIT_USAGE)
        seen[final] = f.path


def check_name_lengths(where: Placement, plan: DownloadPlan, words: Words) -> None:
    """Refuse up front the files whose names this file system cannot hold, instead of failing half-way."""
    name_max, path_max = _limit(where.root, "PC_NAME_MAX", 255), _limit(where.root, "PC_PATH_MAX", 4096)
    too_long = []
    for f in plan.files:
        final = where.final(f.path)
        if any(len(part.encode("utf-8", "surrogateescape")) > name_max for part in where.local_name(f.path).split("/")) \
                or len(os.fsencode(final)) >= path_max:
            too_long.append(f.path)
    if too_long:
        shown = ", ".join(repr(p if len(p) <= 80 else p[:77] + "...") for p in too_long[:3])
        raise DownloadError(
            f"{len(too_long)} file name(s) of {plan.repo_id} are too long for the file system of {where.root} (at "
            f"most {name_max} bytes per name, {path_max} per path): {shown}.",
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
