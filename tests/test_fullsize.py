"""bench/fullsize.py: the full-size configs (counted on meta) and the random-weight builder (scaled down)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import fullsize as F  # noqa: E402


class TestFullConfigs:
    def test_transformer_is_the_20b_model(self) -> None:
        # 20.43 B parameters = 38 GiB in bf16 (bench/RESULTS.md, "GPU results").
        assert F.count_params("transformer") == 20_430_401_088

    def test_text_encoder_is_qwen25_vl_7b(self) -> None:
        assert F.count_params("text_encoder") == 8_292_166_656

    def test_vae_is_the_real_config(self) -> None:
        assert F.count_params("vae") == 126_892_531

    def test_unknown_kind_is_rejected(self) -> None:
        with pytest.raises(ValueError, match="kind"):
            F.count_params("unet")


class TestRandomBuild:
    @pytest.fixture(scope="class")
    @classmethod
    def transformer(cls) -> torch.nn.Module:
        return F.build_transformer("cpu", torch.float32, overrides=F.TINY_OVERRIDES["transformer"])

    def test_weights_are_real_random_and_never_zero(self, transformer: torch.nn.Module) -> None:
        for name, p in transformer.named_parameters():
            assert p.device.type == "cpu", name
            assert torch.isfinite(p).all(), name
            assert (p != 0).any(), f"{name} is all zeros"
            if p.ndim >= 2:
                assert 0.01 < p.std().item() < 0.04, name

    def test_same_seed_same_weights(self, transformer: torch.nn.Module) -> None:
        again = F.build_transformer("cpu", torch.float32, overrides=F.TINY_OVERRIDES["transformer"])
        for (n, a), (_, b) in zip(transformer.named_parameters(), again.named_parameters(), strict=True):
            assert torch.equal(a, b), n

    def test_text_encoder_buffers_survive_to_empty(self) -> None:
        te = F.build_text_encoder("cpu", torch.float32, text_overrides=F.TINY_OVERRIDES["text"],
                                  vision_overrides=F.TINY_OVERRIDES["vision"])
        inv = dict(te.named_buffers())["model.language_model.rotary_emb.inv_freq"]
        # Rotary frequencies start at exactly 1 (theta^0): garbage memory would not.
        assert inv[0].item() == 1.0 and torch.all(inv[1:] < 1)

    @pytest.mark.slow
    def test_tiny_pipeline_generates(self) -> None:
        pipe = F.build_pipeline("cpu", torch.float32, tiny=True)
        out = pipe(prompt="a red cube", negative_prompt=" ", true_cfg_scale=2.0, height=64, width=64,
                   num_inference_steps=2, output_type="pt").images
        assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()
