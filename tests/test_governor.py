"""The pixel window governor: proportional, 16-aligned, never upscales, clear errors."""

import json
import math

import pytest

from qwen_core.errors import InvalidInputError, PresetError
from qwen_core.governor import (
    clamp_image_size,
    load_memory_model,
    max_pixels,
    max_pixels_with_reason,
    memory_limit_pixels,
    validate_size,
)


class TestMustShow:
    def test_16_9_on_an_8gb_card_is_reduced(self):
        d = clamp_image_size(1664, 928, vram_gb=8)
        assert d.scaled and (d.width, d.height) == (1216, 672)
        assert d.width % 16 == 0 and d.height % 16 == 0
        assert d.width * d.height <= d.max_pixels < 1664 * 928
        assert d.message == "Safe Mode: Reduced pixel window (1664x928 -> 1216x672: 0.82 MP for 8 GB)"

    def test_square_native_on_80gb_is_unchanged(self):
        d = clamp_image_size(1328, 1328, vram_gb=80)
        assert (d.width, d.height, d.scaled, d.message) == (1328, 1328, False, "")


NATIVE = [(1328, 1328), (1664, 928), (928, 1664), (1472, 1104), (1104, 1472), (1584, 1056), (1056, 1584)]


class TestInvariants:
    @pytest.mark.parametrize("w,h", NATIVE + [(2048, 2048), (8192, 512), (4000, 3000), (1000, 1000)])
    @pytest.mark.parametrize("vram", [4, 8, 12, 16, 24])
    def test_aligned_within_window_aspect_kept_never_upscaled(self, w, h, vram):
        d = clamp_image_size(w, h, vram_gb=vram)
        assert d.width % 16 == 0 and d.height % 16 == 0
        assert d.width <= w and d.height <= h
        if d.scaled:
            if "minimum side" in d.reason:  # the window is smaller than min_side allows: min side kept
                assert min(d.width, d.height) == 256
            else:
                assert d.width * d.height <= d.max_pixels
            # aspect within one 16-px step on either side
            assert abs(d.width - d.height * w / h) <= 16 and abs(d.height - d.width * h / w) <= 16
            assert d.message.startswith(f"Safe Mode: Reduced pixel window ({w}x{h} -> {d.width}x{d.height}")

    def test_uses_most_of_the_window(self):
        d = clamp_image_size(1664, 928, max_pixels=1_000_000)
        # The best 16-aligned fit is within a couple of 16-px rows of the window.
        assert d.width * d.height > 0.9 * 1_000_000

    def test_min_side_is_respected(self):
        d = clamp_image_size(4096, 512, max_pixels=300_000, min_side=256)
        assert min(d.width, d.height) >= 256 and d.width <= 4096

    def test_small_request_below_min_side_is_not_upscaled(self):
        d = clamp_image_size(128, 96, vram_gb=8)
        assert (d.width, d.height, d.scaled) == (128, 96, False)

    def test_unaligned_request_is_aligned_down(self):
        d = clamp_image_size(1000, 750, vram_gb=80)
        assert (d.width, d.height, d.scaled) == (992, 736, False) and "Aligned" in d.message

    def test_more_vram_never_gives_a_smaller_image(self):
        sizes = [clamp_image_size(1664, 928, vram_gb=v).pixels for v in (4, 8, 12, 16, 24, 48, 80)]
        assert sizes == sorted(sizes)

    def test_fp32_gets_a_smaller_window(self):
        assert max_pixels(16, "fp32") < max_pixels(16, "bf16")
        assert max_pixels(16, "torch.float32") == max_pixels(16, "fp32")

    def test_no_gpu_uses_top_tier(self):
        assert max_pixels(None) == max_pixels(1000)


class TestValidation:
    @pytest.mark.parametrize("bad", [0, -16, 15, 8193, 10**9, 3.5, math.nan, math.inf, -math.inf, True, "512",
                                     None, [512]])
    def test_bad_width(self, bad):
        with pytest.raises(InvalidInputError) as err:
            clamp_image_size(bad, 512)
        assert err.value.field == "width" and "16" in str(err.value) and "8192" in str(err.value)

    def test_bad_height_names_height(self):
        with pytest.raises(InvalidInputError) as err:
            validate_size(512, float("nan"))
        assert err.value.field == "height"

    def test_whole_floats_are_accepted(self):
        assert validate_size(512.0, 768) == (512, 768)

    @pytest.mark.parametrize("bad", [0, -1, math.nan, False])
    def test_bad_max_pixels(self, bad):
        with pytest.raises(InvalidInputError) as err:
            clamp_image_size(512, 512, max_pixels=bad)
        assert err.value.field == "max_pixels"


class TestMemoryModel:
    def _write(self, tmp_path, data):
        path = tmp_path / "memory_model.json"
        path.write_text(json.dumps(data))
        return path

    def test_measured_entry_replaces_the_tier_table(self, tmp_path):
        path = self._write(tmp_path, {"_meta": {"card": "H100"},
                                      "gpu/bf16": {"base_gib": 10, "gib_per_mpix": 4, "headroom_gib": 2}})
        # (16 - 2 - 10) / 4 = 1 MP
        assert max_pixels(16, "bf16", "gpu", memory_model_path=path) == 1_000_000
        d = clamp_image_size(1328, 1328, vram_gb=16, memory_model_path=path)
        assert d.scaled and d.pixels <= 1_000_000 and d.max_pixels == 1_000_000
        # Other modes/dtypes still use the tiers.
        assert max_pixels(16, "fp16", "gpu", memory_model_path=path) == max_pixels(16, "fp16")

    def test_entries_key_and_nothing_fits(self, tmp_path):
        path = self._write(tmp_path, {"entries": {"streamed/bf16": {"base_gib": 20, "gib_per_mpix": 1,
                                                                     "headroom_gib": 1}}})
        assert max_pixels(12, "bf16", "streamed", memory_model_path=path) == 0
        d = clamp_image_size(1024, 1024, vram_gb=12, memory_mode="streamed", memory_model_path=path)
        assert (d.width, d.height) == (256, 256) and "minimum side" in d.reason

    def test_missing_file_means_tiers(self, tmp_path):
        assert load_memory_model(tmp_path / "absent.json") == {}

    @pytest.mark.parametrize("data", ["not json", "[1, 2]",
                                      json.dumps({"gpu/bf16": {"base_gib": 1}}),
                                      json.dumps({"gpu/bf16": {"base_gib": "x", "gib_per_mpix": 1, "headroom_gib": 1}}),
                                      json.dumps({"gpu/bf16": {"base_gib": 1, "gib_per_mpix": 0, "headroom_gib": 1}})])
    def test_broken_file_is_a_preset_error(self, tmp_path, data):
        path = tmp_path / "memory_model.json"
        path.write_text(data)
        with pytest.raises(PresetError) as err:
            load_memory_model(path)
        assert str(path) in str(err.value)


class TestCommittedMeasuredModel:
    """The H100-measured presets/memory_model.json is what the governor uses by default."""

    def test_entries_are_measured_data(self):
        model = load_memory_model()
        assert {"gpu/bf16", "streamed/bf16"} <= set(model)
        assert model["gpu/bf16"]["base_gib"] > 50  # transformer + text encoder + VAE weights resident

    def test_streamed_memory_bound_follows_the_fit(self):
        entry = load_memory_model()["streamed/bf16"]
        limit, reason = memory_limit_pixels(16, "bf16", "streamed")
        expected = (16 - entry["headroom_gib"] - entry["base_gib"]) / entry["gib_per_mpix"] * 1e6
        assert limit == int(expected)
        assert "measured memory model streamed/bf16" in reason

    def test_big_card_is_bounded_by_the_tier_window_not_memory(self):
        limit, reason = max_pixels_with_reason(80, "bf16", "gpu")
        memory, _ = memory_limit_pixels(80, "bf16", "gpu")
        assert limit < memory
        assert "tier 'ultra'" in reason and "memory allows" in reason

    def test_memory_bound_wins_when_it_is_tighter(self):
        limit, reason = max_pixels_with_reason(56, "bf16", "gpu")  # 54 GiB of weights leave ~0.3 MP
        assert 0 < limit == memory_limit_pixels(56, "bf16", "gpu")[0]
        assert reason.startswith("measured memory model gpu/bf16")

    def test_mode_that_cannot_fit_uses_the_streamed_fallback_window(self):
        limit, reason = max_pixels_with_reason(16, "bf16", "gpu")
        assert limit > 0
        assert "falls back to 'streamed'" in reason
        assert memory_limit_pixels(16, "bf16", "gpu")[0] == 0
