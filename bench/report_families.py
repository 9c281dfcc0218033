"""Markdown rows for bench/RESULTS.md from family_bench.py's results.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HEADER = ("| case | size | diffusers as-is ms/step (s/image) | ours gpu ms/step (s/image) | ours streamed 16 GiB "
          "ms/step (s/image), peak GiB | governor: cap, chosen size, no OOM, within 15% |\n"
          "|---|---|---|---|---|---|")


def _cell(run: dict[str, Any] | None) -> str:
    if not run:
        return "-"
    step, est = run.get("median_step_ms"), run.get("est_s_per_image")
    text = f"{step:g}" if step is not None else "?"
    return f"{text} ({est:g})" if est is not None else text


def _governor(check: dict[str, Any] | None, where: str) -> str:
    if not check:
        return ""
    if "skipped" in check:
        return f"{where}: skipped ({check['skipped']})"
    size = "x".join(str(v) for v in check.get("chosen", {}).get("size", []))
    within = check.get("within_15pct")
    probe = "x".join(str(v) for v in check.get("probe", {}).get("size", []))
    verdict = "-" if within is None else ("yes" if within else "not shown")  # a probe that ran proves no "no"
    over = check.get("probe", {})
    outcome = "OOM" if not over.get("fits", True) else "needed the tiled re-decode" if over.get("tiled_fallback") else "ran"
    detail = f" ({probe} {outcome})" if probe else f" ({check['note']})" if check.get("note") else " (no probe run)"
    largest = check.get("largest_fitting")
    if largest:  # the probe ladder ran past the probe: the largest size that ran, and whether one failed above it
        fitted = "x".join(str(v) for v in largest["size"])
        verdict = "no" if largest["bracketed"] else "not shown"
        bound = "the next one failed" if largest["bracketed"] else "none failed"
        detail = f" ({fitted} ran, {largest['area_over_chosen']:g}x the area; {bound})"
    return f"{where}: {size}, {'yes' if check.get('never_oom') else 'OOM'}, {verdict}{detail}"


def rows(data: dict[str, Any]) -> list[str]:
    out = [HEADER]
    for name, section in data.items():
        if not isinstance(section, dict) or not {"diffusers_as_is", "streamed_cap16", "governor_gpu"} & set(section):
            continue
        ours = section.get("ours_gpu") or section.get("streamed_cap16") or {}
        size = "x".join(str(v) for v in ours.get("size", [])) or "-"
        streamed = section.get("streamed_cap16")
        peak = f", {streamed['peak_gib']:.1f}" if streamed and streamed.get("peak_gib") is not None else ""
        gpu_check = section.get("governor_gpu")
        checks = [_governor(gpu_check, f"gpu {gpu_check['cap_gib']:g} GiB" if gpu_check and "cap_gib" in gpu_check
                            else "gpu"),
                  _governor(section.get("governor_cap16"), "streamed 16 GiB")]
        out.append(f"| {name} | {size} | {_cell(section.get('diffusers_as_is'))} | {_cell(section.get('ours_gpu'))} | "
                   f"{_cell(streamed)}{peak} | {'; '.join(c for c in checks if c) or '-'} |")
    return out


def write_rows(data: dict[str, Any], path: Path) -> Path:
    path.write_text("\n".join(rows(data)) + "\n", encoding="utf-8")
    return path


if __name__ == "__main__":  # python bench/report_families.py OUT/results.json [...]: one table
    merged: dict[str, Any] = {}
    for arg in sys.argv[1:]:
        merged.update(json.loads(Path(arg).read_text(encoding="utf-8")))
    print("\n".join(rows(merged)))
