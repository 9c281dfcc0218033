"""ARCHITECTURE.md stays true to the tree: every qwen_core module is in its module map, and every module the
map names exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")


def _modules() -> list[str]:
    return sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "qwen_core").rglob("*.py"))


def test_every_qwen_core_module_is_in_the_map():
    missing = [m for m in _modules() if f"`{m}`" not in DOC]
    assert missing == [], f"add these modules to ARCHITECTURE.md's module map: {missing}"


def test_every_module_the_map_names_exists():
    named = set(re.findall(r"`(qwen_core/[\w/]+\.py)`", DOC))
    assert named, "the module map names no module"
    assert sorted(named - set(_modules())) == []
