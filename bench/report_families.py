"""Markdown rows for bench/RESULTS.md from family_bench.py's results.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HEADER = ("| case | size | diffusers as-is ms/step (s/image) | ours gpu ms/step (s/image) | ours streamed 16 GiB "
          "ms/step (s/image), peak GiB | governor in 16 GiB: chosen size, no OOM, within 15% |\n"
          "|---|---|---|---|---|---|")


def _cell(run: dict[str, Any] | None) -> str:
    if not run:
        return "-"
    step, est = run.get("median_step_ms"), run.get("est_s_per_image")
    text = f"{step:g}" if step is not None else "?"
    return f"{text} ({est:g})" if est is not None else text


def _governor(check: dict[str, Any] | None) -> str:
    if not check:
        return "-"
    size = "x".join(str(v) for v in check.get("chosen", {}).get("size", []))
    within = check.get("within_15pct")
    return f"{size}, {'yes' if check.get('never_oom') else 'OOM'}, {'-' if within is None else ('yes' if within else 'no')}"


def rows(data: dict[str, Any]) -> list[str]:
    out = [HEADER]
    for name, section in data.items():
        if not isinstance(section, dict) or "diffusers_as_is" not in section and "streamed_cap16" not in section:
            continue
        ours = section.get("ours_gpu") or section.get("streamed_cap16") or {}
        size = "x".join(str(v) for v in ours.get("size", [])) or "-"
        streamed = section.get("streamed_cap16")
        peak = f", {streamed['peak_gib']:.1f}" if streamed and streamed.get("peak_gib") is not None else ""
        out.append(f"| {name} | {size} | {_cell(section.get('diffusers_as_is'))} | {_cell(section.get('ours_gpu'))} | "
                   f"{_cell(streamed)}{peak} | {_governor(section.get('governor_cap16'))} |")
    return out


def write_rows(data: dict[str, Any], path: Path) -> Path:
    path.write_text("\n".join(rows(data)) + "\n", encoding="utf-8")
    return path


if __name__ == "__main__":  # python bench/report_families.py OUT/results.json [...]: one table
    merged: dict[str, Any] = {}
    for arg in sys.argv[1:]:
        merged.update(json.loads(Path(arg).read_text(encoding="utf-8")))
    print("\n".join(rows(merged)))
