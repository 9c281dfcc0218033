"""Our fused kernels in compiled blocks (issue 13): the q/k norm + RoPE + concatenation kernel
(``qwen_core.speed.qk_rope``) and the feed-forward's projection + GELU call (``qwen_core.speed.linear_gelu``).

The Triton kernel itself runs here in Triton's interpreter (CPU, numpy); on a GPU ``bench/fused_ops.py`` and
``bench/speed.py`` measure it (bench/RESULTS.md). The interpreter rounds float-to-bfloat16 by truncation, so the
kernel's rounding is checked in float32 and float16 here and in bf16 by the GPU probe.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from test_speed import _forward, _rel, _transformer  # noqa: F401 - _rel: the interpreter script takes it from here

from qwen_core.errors import InvalidInputError
from qwen_core.speed import linear_gelu, qk_rope
from qwen_core.speed.options import SpeedOptions, resolve_speed
from qwen_core.speed.rope import install_real_rope, processor_class, set_fused_kernels

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed (requirements-dev.txt installs it on Linux x86-64)")


def _inputs(dtype: torch.dtype, seq: int = 9, text: int = 4, heads: int = 3, dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # Views of projections, as the processor hands them over: [B, S, H*D] unflattened to [B, S, H, D].
    img = torch.randn(2, seq, heads * dim, generator=g).to(dtype).unflatten(-1, (heads, dim))
    txt = torch.randn(2, text, heads * dim, generator=g).to(dtype).unflatten(-1, (heads, dim))
    w_img, w_txt = ((torch.rand(dim, generator=g) + 0.5).to(dtype) for _ in range(2))
    angles = torch.rand(seq + text, dim // 2, generator=g) * 6
    table = torch.stack((angles.cos(), angles.sin()), dim=-1)
    return txt, img, w_txt, w_img, table[:text].contiguous(), table[text:].contiguous()


def _ours(block: torch.nn.Module) -> object:
    """The block's real-RoPE processor (inside the split-CFG wrapper once _forward has installed it)."""
    processor = block.attn.processor
    return getattr(processor, "inner", processor)


def _unfused(txt, img, w_txt, w_img, t_txt, t_img, eps=1e-6):
    return torch.cat([qk_rope.reference(txt, w_txt, eps, t_txt), qk_rope.reference(img, w_img, eps, t_img)], dim=1)


_INTERPRETED = """
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
from test_fused_kernels import _inputs, _rel, _unfused
from qwen_core.speed import qk_rope

results = {}
for dtype in (torch.float32, torch.float16):
    for heads, dim in ((3, 16), (24, 128), (1, 16)):  # 24 x 128: Qwen-Image's heads
        txt, img, w_txt, w_img, t_txt, t_img = _inputs(dtype, heads=heads, dim=dim)
        out = torch.full((2, 13, heads, dim), 7.0, dtype=dtype)  # a sentinel in the text rows
        qk_rope.launch(img, w_img, 1e-6, t_img, out, 4)
        untouched = bool((out[:, :4] == 7.0).all())
        qk_rope.launch(txt, w_txt, 1e-6, t_txt, out, 0)
        results[f"{dtype}-{heads}x{dim}"] = {"rel": _rel(out, _unfused(txt, img, w_txt, w_img, t_txt, t_img)),
                                             "text_rows_untouched": untouched}
txt, img, w_txt, w_img, t_txt, t_img = _inputs(torch.float32)
wide = torch.cat([img.flatten(2), img.flatten(2) * 2], dim=-1)[..., 48:].unflatten(-1, (3, 16))
out = torch.zeros(2, 9, 3, 16)
qk_rope.launch(wide, w_img, 1e-6, t_img, out, 0)
results["strided"] = {"rel": _rel(out, qk_rope.reference(wide, w_img, 1e-6, t_img)),
                      "was_strided": not wide.is_contiguous() and wide.stride(-1) == 1}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def interpreted() -> dict:
    """The kernel run in Triton's interpreter, in a fresh process: Triton reads TRITON_INTERPRET when it is first
    imported, and other tests import it earlier in this one."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", _INTERPRETED, str(Path(__file__).parent)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_triton
class TestKernelInTritonsInterpreter:
    @pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-6), (torch.float16, 2e-3)])
    @pytest.mark.parametrize("shape", ["3x16", "24x128", "1x16"])
    def test_matches_the_unfused_ops_and_writes_only_its_rows(self, interpreted, dtype, tolerance, shape):
        row = interpreted[f"{dtype}-{shape}"]
        assert row["text_rows_untouched"] and row["rel"] < tolerance, row

    def test_strided_input_a_slice_of_a_wider_projection(self, interpreted):
        # position stride 96, not 48: the kernel reads the view in place
        assert interpreted["strided"]["was_strided"] and interpreted["strided"]["rel"] < 1e-6


def test_a_table_of_the_wrong_shape_is_refused():
    txt, img, w_txt, w_img, t_txt, t_img = _inputs(torch.float32)
    with pytest.raises(ValueError, match=r"rotary table must be float32 \[9, 8, 2\]"):
        qk_rope.launch(img, w_img, 1e-6, t_txt, torch.zeros(2, 9, 3, 16), 0)


class TestCustomOp:
    def test_cpu_runs_the_unfused_ops_exactly(self):
        txt, img, w_txt, w_img, t_txt, t_img = _inputs(torch.float32)
        out = torch.ops.qwen_core.qk_norm_rope(txt, img, w_txt, w_img, 1e-6, 1e-6, t_txt, t_img)
        assert torch.equal(out, _unfused(txt, img, w_txt, w_img, t_txt, t_img))

    def test_no_kernel_on_a_cpu_device(self):
        qk_rope.reset_probe()
        try:
            assert not qk_rope.kernel_usable(torch.device("cpu"), torch.float32)
            assert qk_rope.probe(torch.device("cpu"), torch.float32)  # says why
        finally:
            qk_rope.reset_probe()

    def test_linear_gelu_matches_diffusers_math_on_cpu(self):
        g = torch.Generator().manual_seed(0)
        x, w, b = torch.randn(2, 5, 8, generator=g), torch.randn(32, 8, generator=g), torch.randn(32, generator=g)
        expected = torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b), approximate="tanh")
        assert torch.equal(linear_gelu.linear_gelu_tanh(x, w, b), expected)


class TestInstalled:
    def test_fused_processors_give_the_unfused_output(self):
        plain, fused = _transformer(), _transformer()
        install_real_rope(plain)
        install_real_rope(fused)
        set_fused_kernels(fused, True)
        assert all(_ours(b).fuse_qk for b in fused.transformer_blocks)
        assert linear_gelu.linear_gelu_installed(fused) and not linear_gelu.linear_gelu_installed(plain)
        calls = []
        op = torch.ops.qwen_core.qk_norm_rope

        def counting(*args):
            calls.append(args[0].shape)
            return op(*args)

        with pytest.MonkeyPatch.context() as mp:  # the fused processors go through the op (q and k per block)
            mp.setattr(qk_rope.torch.ops.qwen_core, "qk_norm_rope", counting)
            for side, lens in ((8, [9, 4]), (6, [5, 5])):  # split attention (two lengths) and one length
                calls.clear()
                assert torch.equal(_forward(fused, side, lens), _forward(plain, side, lens))
                assert len(calls) >= 2 * len(fused.transformer_blocks)

    def test_off_restores_diffusers_modules_and_the_same_weights(self):
        t = _transformer()
        install_real_rope(t)
        originals = [b.img_mlp.net[0] for b in t.transformer_blocks]
        keys = list(t.state_dict())
        set_fused_kernels(t, True)
        set_fused_kernels(t, True)  # idempotent
        swapped = t.transformer_blocks[0].img_mlp.net[0]
        assert isinstance(swapped, linear_gelu.fused_class()) and swapped.proj is originals[0].proj
        assert list(t.state_dict()) == keys  # LoRA and checkpoint names unchanged
        set_fused_kernels(t, False)
        assert [b.img_mlp.net[0] for b in t.transformer_blocks] == originals
        assert not any(_ours(b).fuse_qk for b in t.transformer_blocks)

    def test_a_norm_the_kernel_does_not_reproduce_keeps_the_unfused_ops(self):
        t = _transformer()
        install_real_rope(t)
        block = t.transformer_blocks[0]
        block.attn.norm_added_k = torch.nn.LayerNorm(16)
        set_fused_kernels(t, True)
        assert not _ours(block).fuse_qk and _ours(t.transformer_blocks[1]).fuse_qk

    def test_the_processor_default_is_unfused(self):
        assert processor_class().fuse_qk is False  # only set_fused_kernels (apply_speed, with compile) turns it on


class TestSwitch:
    def test_on_by_default_and_the_env_turns_it_off(self, monkeypatch):
        monkeypatch.delenv("QWEN_FUSED_KERNELS", raising=False)
        assert resolve_speed(device="cuda").fused
        monkeypatch.setenv("QWEN_FUSED_KERNELS", "0")
        assert not resolve_speed(device="cuda").fused

    def test_a_bad_value_names_the_variable(self, monkeypatch):
        monkeypatch.setenv("QWEN_FUSED_KERNELS", "maybe")
        with pytest.raises(InvalidInputError, match="QWEN_FUSED_KERNELS"):
            resolve_speed(device="cuda")

    @pytest.mark.parametrize("on", [True, False])
    def test_apply_speed_follows_it(self, monkeypatch, on):
        from types import SimpleNamespace

        from qwen_core.speed import apply as speed_apply

        monkeypatch.setattr(speed_apply, "compile_blocks", lambda *a, **k: None)  # the install alone
        t = _transformer()
        speed_apply.apply_speed(SimpleNamespace(transformer=t), SpeedOptions(compile=True, fused=on))
        assert linear_gelu.linear_gelu_installed(t) is on
        assert all(_ours(b).fuse_qk is on for b in t.transformer_blocks)
