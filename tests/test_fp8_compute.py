"""qwen_core.fp8_compute on the CPU: the swap, the numerics (close to bf16, not equal) and the undo."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from qwen_core.errors import InvalidInputError
from qwen_core.fp8_compute import Fp8Linear, enable_fp8_compute, fp8_supported

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import fullsize as F  # noqa: E402
from common import rel_err as relative_error  # noqa: E402

pytestmark = pytest.mark.skipif(not fp8_supported("cpu"), reason="this torch has no fp8 _scaled_mm on CPU")


def _model() -> torch.nn.Module:
    # The tiny config's widths (32, heads 2 x 16) are multiples of 16, as torch._scaled_mm needs.
    return F.build_transformer("cpu", torch.bfloat16, overrides=F.TINY_OVERRIDES["transformer"])


class TestFp8Linear:
    def test_close_to_bf16(self) -> None:
        torch.manual_seed(0)
        lin = torch.nn.Linear(64, 48).to(torch.bfloat16)
        x = torch.randn(5, 7, 64, dtype=torch.bfloat16)
        err = relative_error(Fp8Linear(lin)(x), lin(x))
        assert 0 < err < 0.08  # e4m3 keeps 3 mantissa bits: a few percent, never exact


class TestSwap:
    def test_swap_forward_and_undo(self) -> None:
        t = _model()
        x = dict(hidden_states=torch.randn(1, 16, t.config.in_channels, dtype=torch.bfloat16),
                 encoder_hidden_states=torch.randn(1, 5, t.config.joint_attention_dim, dtype=torch.bfloat16),
                 timestep=torch.tensor([0.5], dtype=torch.bfloat16), img_shapes=[[(1, 4, 4)]], return_dict=False)
        with torch.no_grad():
            ref = t(**x)[0]
            h = enable_fp8_compute(t, keep_original=True)
            out = t(**x)[0]
            assert h.converted == 3 * 12  # q k v out, add_q k v, add_out, 2 MLPs x 2 linears; not the mods
            assert not any(isinstance(m, Fp8Linear) for n, m in t.named_modules() if "_mod" in n)
            h.disable()
            again = t(**x)[0]
        assert torch.isfinite(out).all() and 0 < relative_error(out, ref) < 0.2
        torch.testing.assert_close(again, ref, rtol=0, atol=0)

    def test_needs_blocks(self) -> None:
        with pytest.raises(InvalidInputError, match="transformer"):
            enable_fp8_compute(torch.nn.Linear(16, 16))
