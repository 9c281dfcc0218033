"""bench/multigpu.py's --tiny dry run: the same code as the H200 x2/x4 run (one-card row, context-parallel rows
through torch.distributed.run, placement rows), on the CPU with gloo and the scaled-down model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_tiny_dry_run_writes_every_row(tmp_path):
    out = tmp_path / "mg"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
                        "QWEN_REPORTS_DIR": str(tmp_path / "reports")}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "multigpu.py"), "--tiny", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "multigpu.json").read_text())
    assert set(data["rows"]) == {"single-eager", "cp2-ulysses", "placed-te", "placed-split"}
    for name, row in data["rows"].items():
        assert row["rc"] == 0 and row["finite"], name
        assert row["multicast_env"]["NCCL_NVLS_ENABLE"] == "0", name  # NVLink multicast off in every process
    cp = data["rows"]["cp2-ulysses"]
    assert cp["cards"] == 2 and "context parallel x2 (ulysses)" in cp["parallel"] and cp["process_group"] == "cpu:gloo"
    table = {e["row"]: e for e in data["summary"]["table"]}
    assert table["cp2-ulysses"]["rel_err"] < 1e-5 and "efficiency" in table["cp2-ulysses"]
    assert table["placed-split"]["rel_err"] == 0.0 and "efficiency" not in table["placed-split"]
    assert "| cp2-ulysses | 2 |" in proc.stdout
