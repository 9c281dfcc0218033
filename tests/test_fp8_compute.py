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


class TestDequantizeRows:
    """The streamed engine's fp8 storage dequantises into slot views (offsets inside one buffer)."""

    def _stored(self, shapes):
        from qwen_core.fp8_compute import quantize_rows

        buffer = torch.zeros(sum(r * c for r, c in shapes) + 64, dtype=torch.bfloat16)
        offset, items = 3, []
        for r, c in shapes:
            w = torch.randn(r, c, generator=torch.Generator().manual_seed(r * c))
            q, scale = quantize_rows(w)
            items.append((w, q, scale, buffer[offset: offset + r * c].view(r, c)))
            offset += r * c
        return items

    def test_the_fused_kernel_matches_the_two_passes_in_place_for_every_shape(self):
        from qwen_core import fp8_compute

        dequantize = fp8_compute._Dequantizer(fused_on=("cpu",))  # the CUDA path's code, compiled for the CPU
        for w, q, scale, out in self._stored([(64, 32), (32, 64), (96, 48)]):
            dequantize(q, scale, out)
            two = torch.empty_like(out)
            fp8_compute._dequantize_rows_two_passes(q, scale, two)
            assert dequantize.failed is None
            torch.testing.assert_close(out, two, atol=0, rtol=2 ** -7)  # one bf16 rounding apart at most
            assert (out.float() - w).abs().max() <= 0.07 * w.abs().max()  # e4m3's own error
        assert dequantize.kernel is not None

    def test_a_kernel_that_cannot_be_built_falls_back_once_with_the_same_values(self, monkeypatch):
        from qwen_core import fp8_compute

        calls = []

        def no_compile(*_args, **_kwargs):
            calls.append(1)
            raise RuntimeError("Cannot find a working triton installation")

        monkeypatch.setattr(torch, "compile", no_compile)
        dequantize = fp8_compute._Dequantizer(fused_on=("cpu",))
        for _w, q, scale, out in self._stored([(16, 16), (8, 32)]):
            dequantize(q, scale, out)
            two = torch.empty_like(out)
            fp8_compute._dequantize_rows_two_passes(q, scale, two)
            assert torch.equal(out, two)
        assert calls == [1] and "triton" in dequantize.failed  # tried once, then the eager passes
