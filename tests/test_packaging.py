"""What the Comfy registry archive holds: git-tracked files minus .comfyignore (comfy-cli's `comfy node publish`).

comfy-cli packs the git-tracked files, drops those matching .comfyignore (gitignore syntax) unless a
[tool.comfy] includes entry covers them, then adds the includes. Our patterns are plain folder prefixes and
file paths, so the selection is reproduced here without comfy-cli.
"""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _patterns() -> list[str]:
    lines = (REPO / ".comfyignore").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    for pattern in patterns:
        if pattern.endswith("/"):
            if path.startswith(pattern) or f"/{pattern}" in f"/{path}":
                return True
        elif fnmatch.fnmatch(path, pattern) or path == pattern:
            return True
    return False


def _archive() -> list[str]:
    try:
        files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    patterns = _patterns()
    return [f for f in files.splitlines() if not _ignored(f, patterns)]


def test_includes_do_not_override_the_ignore_file() -> None:
    found = re.search(r"^includes\s*=\s*(\[.*?\])", (REPO / "pyproject.toml").read_text(encoding="utf-8"), re.M | re.S)
    includes = json.loads(found.group(1)) if found else []  # tomllib is 3.11+; the pack supports 3.10
    patterns = _patterns()
    assert not [i for i in includes if any(p.rstrip("/").startswith(i.rstrip("/")) for p in patterns)]


def test_tests_and_benchmarks_do_not_ship() -> None:
    shipped = _archive()
    assert not [f for f in shipped if f.startswith(("tests/", "bench/", "web/tests/", ".ci/"))]


def test_everything_the_pack_needs_ships() -> None:
    shipped = set(_archive())
    for needed in ("__init__.py", "nodes/comfy_bridge.py", "qwen_core/generator.py", "web/qwen_image.js",
                   "web/qwen_image_logic.js", "presets/quality_presets.yaml", "requirements.txt", "pyproject.toml",
                   "workflows/qwen_image_tiny_cpu.json", "tools/robust_download.py", "LICENSE", "README.md"):
        assert needed in shipped, needed
