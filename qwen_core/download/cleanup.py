"""``--cleanup``: delete abandoned partial downloads and report the bytes freed.

Ours: ``<target>/.qwen_download/**/*.part`` (+ sidecar) whose per-file lock nobody holds (a running download
keeps its lock, so it is never pulled from under it). huggingface_hub's: ``*.incomplete`` files in its hub cache
(``<cache>/models--*/blobs``) and in ``<target>/.cache/huggingface/download``; since huggingface_hub >= 1.18
never resumes those across runs they are pure waste once nobody writes them (judged by age).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from qwen_core.download.file_lock import FileLock
from qwen_core.download.layout import Placement, Staging
from qwen_core.download.plan import DamagedPlan, load_plan
from qwen_core.paths import hf_hub_cache


@dataclass
class CleanupReport:
    removed: list[Path] = field(default_factory=list)
    bytes_freed: int = 0
    skipped_in_use: list[Path] = field(default_factory=list)

    def text(self) -> str:
        lines = [f"cleanup: removed {len(self.removed)} partial files, freed {self.bytes_freed / 1e6:.1f} MB"]
        lines += [f"  removed {p}" for p in self.removed]
        lines += [f"  kept (in use by a running download) {p}" for p in self.skipped_in_use]
        return "\n".join(lines)


def cleanup_partials(target: Path | None, *, hub_cache: Path | None = None, min_age_s: float = 60.0,
                     placement: Placement | None = None) -> CleanupReport:
    """Partials of the download into ``target`` (the diffusers layout), or of ``placement`` (any layout)."""
    report = CleanupReport()
    if placement is None and target is not None:
        placement = Placement.tree(target)
    for stage in _our_partials(placement) if placement is not None else []:
        lock = FileLock(stage.lock, timeout=0)
        if not lock.try_acquire():
            report.skipped_in_use.append(stage.part)
            continue
        try:
            _remove(stage.part, report)
            _remove(stage.sidecar, report, count=False)
        finally:
            lock.release()
    cutoff = time.time() - min_age_s
    roots = [hub_cache if hub_cache is not None else hf_hub_cache()]
    if placement is not None and not placement.is_comfy:  # the xet engine's (never used for the comfyui layout)
        roots.append(placement.root / ".cache" / "huggingface" / "download")
    for root in roots:
        if not root.is_dir():
            continue
        for inc in sorted(root.rglob("*.incomplete")):
            try:
                if inc.is_file() and inc.stat().st_mtime <= cutoff:
                    _remove(inc, report)
                elif inc.is_file():
                    report.skipped_in_use.append(inc)
            except OSError:
                continue
    return report


def _our_partials(where: Placement) -> list[Staging]:
    """Partials in the bookkeeping folder, plus those of listed files staged in a component folder on another
    disk (layout.py)."""
    found: dict[Path, Staging] = {}
    if where.staging.is_dir():
        for part in sorted(where.staging.rglob("*.part")):
            base = part.with_name(part.name[: -len(".part")])
            found[part] = Staging(part, part.with_name(part.name + ".json"), base.with_name(base.name + ".lock"),
                                  base.with_name(base.name + ".ok"))
    try:
        plan = load_plan(where)
    except DamagedPlan:
        plan = None
    for f in plan.listing if plan is not None else ():
        if not where.places(f.path):  # a file the comfyui layout never fetches
            continue
        stage = where.stage(f.path)
        if stage.part.exists():
            found[stage.part] = stage
    return list(found.values())


def _remove(path: Path, report: CleanupReport, count: bool = True) -> None:
    try:
        size = path.stat().st_size
        path.unlink()
    except OSError:
        return
    if count:
        report.removed.append(path)
    report.bytes_freed += size
