"""qwen_core.atomic_io: the whole new content or the old one, never a temp file left behind."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from qwen_core.atomic_io import write_bytes_atomic


def test_writes_replaces_and_creates_the_folder(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b.json"
    write_bytes_atomic(target, b"one")
    write_bytes_atomic(target, b"two")
    assert target.read_bytes() == b"two" and [p.name for p in target.parent.iterdir()] == ["b.json"]


def test_the_file_gets_the_umask_permissions_not_0600(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_bytes_atomic(tmp_path / "x.png", b"png")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x.png").stat().st_mode) == 0o644


def test_a_failed_rename_keeps_the_old_content_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.mkdir()
    (target / "inside").write_text("keep")  # a non-empty folder: the rename must fail
    with pytest.raises(OSError):
        write_bytes_atomic(target, b"new")
    assert (target / "inside").read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
