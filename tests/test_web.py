"""The frontend extension's tests (web/tests/*.test.mjs) through node's built-in runner; skipped without node."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

WEB = Path(__file__).resolve().parent.parent / "web"


def test_web_extension_with_node_test_runner() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed; the web extension tests need node >= 18 (`node --test`)")
    files = sorted(str(p) for p in (WEB / "tests").glob("*.test.mjs"))
    assert files, "no web tests found"
    run = subprocess.run([node, "--test", *files], cwd=WEB, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "# fail 0" in run.stdout


def test_no_test_file_is_loaded_into_the_comfyui_page() -> None:
    """ComfyUI loads every *.js under WEB_DIRECTORY into the page: test files must not end in .js."""
    assert not list((WEB / "tests").glob("*.js"))
    assert (WEB / "qwen_image.js").is_file()
