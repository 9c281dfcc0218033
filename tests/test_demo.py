"""`python -m qwen_core demo` / `generate`: PNGs of the requested size, progress, errors naming the field."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from qwen_core.cli import main
from qwen_core.demo import _Progress

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def test_demo_cli_writes_png_of_requested_size_offline(tiny_model_dir, tmp_path):
    """The issue's acceptance command, as a subprocess (CPU only, no network, cached tiny pipeline)."""
    out = tmp_path / "x.png"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "QWEN_TINY_CACHE": str(tiny_model_dir.parent),
                        "QWEN_REPORTS_DIR": str(tmp_path / "reports")}
    proc = subprocess.run(
        [sys.executable, "-m", "qwen_core", "demo", "--out", str(out), "--width", "128", "--height", "96", "--steps", "2"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    with Image.open(out) as image:
        assert image.size == (128, 96) and image.mode == "RGB"
        assert image.text["seed"] == "0" and image.text["steps"] == "2"
    for marker in ("[1/4] tiny pipeline", "[2/4] preflight", "[3/4] governor", "128x96 -> 128x96", "step 2/2", "wrote"):
        assert marker in proc.stdout
    assert str(tiny_model_dir) in proc.stdout  # reused the cached build
    assert "loader: attempt 1" in (tmp_path / "reports" / "last_session.log").read_text()


def test_demo_in_process_aligns_the_size(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "sub" / "demo.png"
    assert main(["demo", "--out", str(out), "--width", "72", "--height", "64", "--steps", "2"]) == 0
    with Image.open(out) as image:
        assert image.size == (64, 64)  # 72 is not a multiple of 16: the governor aligns it
    assert "Aligned to multiples of 16" in capsys.readouterr().out
    assert [p.name for p in out.parent.iterdir()] == ["demo.png"]  # no temp file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_generate_command_batch_writes_numbered_files(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "img.png"
    argv = ["generate", "--model", str(tiny_model_dir), "--prompt", "a red boat", "--out", str(out),
            "--width", "64", "--height", "48", "--steps", "2", "--batch", "2", "--seed", "3", "--cfg", "1"]  # fmt: skip
    assert main(argv) == 0
    for name in ("img_1.png", "img_2.png"):
        with Image.open(tmp_path / name) as image:
            assert image.size == (64, 48) and image.text["prompt"] == "a red boat"
    assert not out.exists()
    assert "memory mode gpu" in capsys.readouterr().out


@pytest.mark.parametrize(("extra", "field"), [
    (["--steps", "0"], "`steps`"),
    (["--width", "100000"], "`width`"),
    (["--cfg", "nan"], "`true_cfg_scale`"),
    (["--seed", "-5"], "`seed`"),
])  # fmt: skip
def test_bad_values_fail_with_the_field_named(tiny_model_dir, tmp_path, capsys, extra, field):
    out = tmp_path / "x.png"
    argv = ["generate", "--model", str(tiny_model_dir), "--prompt", "p", "--out", str(out), *extra]
    assert main(argv) == 1
    assert field in capsys.readouterr().err and not out.exists()


def test_out_must_be_png(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "x.jpg")]) == 1
    assert "`out`" in capsys.readouterr().err


def test_generate_refuses_pickled_model(tiny_model_copy, tmp_path, capsys):
    (tiny_model_copy / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"\x80")
    argv = ["generate", "--model", str(tiny_model_copy), "--prompt", "p", "--out", str(tmp_path / "x.png")]
    assert main(argv) == 1
    assert "pickle" in capsys.readouterr().err.lower()


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_tty_and_lines_otherwise(capsys):
    tty = _Tty()
    bar = _Progress(3, stream=tty)
    for step in (1, 2, 3):
        bar(step, 3, 3 - step)
    bar.close()
    assert "denoising" in tty.getvalue() and "3/3" in tty.getvalue()
    plain = _Progress(2, stream=io.StringIO())
    plain(1, 2, 0.5)
    assert "step 1/2  eta 0.5 s" in capsys.readouterr().out
