"""bench/files_bench.py's in-memory conversions produce what loading the files would: real Q8_0 bytes (equal
to gguf-py's quantiser), valid Q4_K blocks, fp8 layers; and its --tiny dry run completes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import files_bench  # noqa: E402


def test_q8_0_bytes_equal_gguf_py() -> None:
    import gguf

    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    ours = files_bench.q8_0_bytes(w).numpy()
    ref = gguf.quants.quantize(w.numpy().astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    back = gguf.quants.dequantize(ours, gguf.GGMLQuantizationType.Q8_0)
    assert ours.shape == ref.shape
    assert (ours != ref).mean() < 0.01  # the same bytes up to the odd rounding tie
    assert np.abs(back - w.numpy()).max() < 0.02 * w.abs().max().item()


def test_q4_k_blocks_dequantise_to_finite_small_values() -> None:
    import gguf
    from diffusers.quantizers.gguf.utils import GGUFParameter, dequantize_gguf_tensor

    raw = files_bench.q4_k_bytes(torch.zeros(4, 512), torch.Generator().manual_seed(0))
    values = dequantize_gguf_tensor(GGUFParameter(raw, quant_type=gguf.GGMLQuantizationType.Q4_K))
    assert values.shape == (4, 512) and torch.isfinite(values).all() and values.abs().max() < 1.0


@pytest.mark.slow
def test_tiny_dry_run_reports_every_point(tmp_path: Path) -> None:
    assert files_bench.main(["--tiny", "--out", str(tmp_path)]) == 0
    points = json.loads((tmp_path / "files_results.json").read_text())["points"]
    assert {"bf16_ours_full", "fp8_upcast_full", "fp8_matmul_full", "fp8_upcast_cap16", "Q8_0_full",
            "Q8_0_cap12", "Q4_K_cap16"} <= set(points)
    assert all("error" not in p for p in points.values()), points
    assert points["fp8_upcast_full"]["rel_err_vs_bf16"] < 1e-3
