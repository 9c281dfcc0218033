"""The pixel window governor: memory-only window, proportional, 16-aligned, never upscales, clear errors, an
estimated time per step, and a time budget only when one is given."""

import json
import math

import pytest

from qwen_core import memory_model as mm
from qwen_core.errors import InvalidInputError, PresetError
from qwen_core.governor import (
    Situation,
    clamp_image_size,
    max_pixels,
    max_pixels_with_reason,
    memory_window,
    validate_size,
)


class TestMustShow:
    def test_a_size_that_does_not_fit_an_8gb_card_is_reduced(self):
        d = clamp_image_size(4096, 2304, vram_gb=8)
        assert d.scaled and d.limited_by == "memory" and d.memory_mode == "streamed"
        assert d.width % 16 == 0 and d.height % 16 == 0
        assert d.width * d.height <= d.max_pixels < 4096 * 2304
        assert d.message == (f"Safe Mode: Reduced pixel window (4096x2304 -> {d.width}x{d.height}: "
                             f"{d.pixels / 1e6:.2f} MP for 8 GB)")

    def test_square_native_on_80gb_is_unchanged(self):
        d = clamp_image_size(1328, 1328, vram_gb=80)
        assert (d.width, d.height, d.scaled, d.message) == (1328, 1328, False, "")

    @pytest.mark.parametrize("vram", [8, 12, 16])
    def test_native_size_fits_small_cards_unchanged(self, vram):
        # Issue 9: a 12 GiB card asked for 1328x1328 got 1104x1104 (8 GiB: 896x896) from a fixed tier table,
        # although the streamed engine holds ~12 MP there and ran 1104x1104 no faster (0.634 vs 0.647 s/step).
        d = clamp_image_size(1328, 1328, vram_gb=vram)
        assert (d.width, d.height, d.scaled, d.message) == (1328, 1328, False, "")
        assert d.memory_mode == "streamed" and d.max_pixels > 3 * 1328 * 1328

    def test_16_9_on_an_8gb_card_is_kept(self):
        d = clamp_image_size(1664, 928, vram_gb=8)
        assert (d.width, d.height, d.scaled) == (1664, 928, False)

    def test_the_decision_carries_a_step_time_estimate(self):
        d = clamp_image_size(1328, 1328, vram_gb=80)
        assert d.seconds_per_step == pytest.approx(0.6317) and "estimate" in d.estimate_note
        assert d.estimate_text.startswith("est. 0.63 s/step (estimate for an H100-class GPU")
        assert clamp_image_size(1328, 1328).seconds_per_step is None  # no GPU reading: no basis


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

    def test_no_gpu_means_no_memory_limit(self):
        assert max_pixels(None) == max_pixels(1000) == mm.MAX_PIXELS


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

    @pytest.mark.parametrize("bad", [0, -0.5, math.inf, True, "1"])
    def test_bad_time_budget(self, bad):
        with pytest.raises(InvalidInputError) as err:
            clamp_image_size(512, 512, vram_gb=80, time_budget_s=bad)
        assert err.value.field == "time_budget_s"


def _family(entries: dict) -> dict:
    return {"families": {"qwen-image": {"reference_pixels": 1_000_000, "weights_gib": {"transformer": 8.0},
                                        "entries": entries}}}


class TestMemoryModel:
    def _write(self, tmp_path, data):
        path = tmp_path / "memory_model.json"
        path.write_text(json.dumps(data))
        return path

    def test_injected_model_sets_the_window(self, tmp_path):
        path = self._write(tmp_path, _family({"gpu/bf16": {"base_gib": 10, "gib_per_mpix": 4, "headroom_gib": 2}}))
        # (16 - 2 - 10) / 4 = 1 MP
        assert max_pixels(16, "bf16", "gpu", memory_model_path=path) == 1_000_000
        d = clamp_image_size(1328, 1328, vram_gb=16, memory_mode="gpu", memory_model_path=path)
        assert d.scaled and d.pixels <= 1_000_000 and d.max_pixels == 1_000_000

    def test_nothing_fits_keeps_the_minimum_side(self, tmp_path):
        path = self._write(tmp_path, _family({"streamed/bf16": {"base_gib": 20, "gib_per_mpix": 1,
                                                                 "headroom_gib": 1}}))
        assert max_pixels(12, "bf16", "streamed", memory_model_path=path) == 0
        d = clamp_image_size(1024, 1024, vram_gb=12, memory_mode="streamed", memory_model_path=path)
        assert (d.width, d.height) == (256, 256) and "minimum side" in d.reason

    def test_a_mode_without_an_entry_names_file_and_key(self, tmp_path):
        path = self._write(tmp_path, _family({"gpu/bf16": {"base_gib": 1, "gib_per_mpix": 1, "headroom_gib": 1}}))
        with pytest.raises(PresetError) as err:
            max_pixels(16, "fp16", "gpu", memory_model_path=path)
        assert str(path) in str(err.value) and "`families.qwen-image.entries.gpu/fp16`" in str(err.value)


class TestCommittedMeasuredModel:
    """The H100-measured presets/memory_model.json is what the governor uses by default."""

    def test_streamed_window_follows_the_fit_within_the_engine_budget(self):
        entry = mm.family_model().entry("streamed", "bf16")
        limit, reason = max_pixels_with_reason(16, "bf16", "streamed")
        expected = (16 * mm.DEFAULT_MEMORY_FRACTION - entry.headroom_gib - entry.base_gib) / entry.gib_per_mpix * 1e6
        assert limit == int(expected)
        assert "memory model streamed/bf16" in reason

    def test_big_card_is_bounded_by_memory_only(self):
        limit, reason = max_pixels_with_reason(80, "bf16", "gpu")
        assert limit == int((80 - 1.0 - 53.799) / 3.40 * 1e6)  # no tier table caps it any more
        assert reason.startswith("memory model gpu/bf16")

    def test_tight_resident_mode_keeps_its_own_window(self):
        limit, reason = max_pixels_with_reason(56, "bf16", "gpu")  # 54 GiB of weights leave ~0.3 MP
        assert 0 < limit < 1328 * 1328 and reason.startswith("memory model gpu/bf16")

    def test_mode_that_cannot_fit_uses_the_auto_choice(self):
        limit, reason = max_pixels_with_reason(16, "bf16", "gpu")
        assert limit == mm.choose_memory_mode(None, 16).max_pixels > 0
        assert "the loader falls back to 'streamed'" in reason
        window = memory_window(Situation(16, "gpu"))
        assert window.memory_mode == "streamed" and window.pixels == limit


class TestTimeBudget:
    def test_no_budget_never_caps(self):
        d = clamp_image_size(2048, 2048, vram_gb=80)
        assert (d.width, d.height, d.limited_by) == (2048, 2048, "")

    def test_a_budget_caps_the_size_to_fit_the_estimate(self):
        d = clamp_image_size(1328, 1328, vram_gb=80, time_budget_s=0.4)
        assert d.limited_by == "time budget" and not d.scaled  # not a Safe Mode reduction: no badge
        assert d.pixels < 1328 * 1328 and d.seconds_per_step <= 0.4
        assert d.message.startswith(f"Time budget: 1328x1328 -> {d.width}x{d.height} (est. ")
        assert abs(d.width / d.height - 1) < 0.02

    def test_one_pass_allows_more_pixels_for_the_same_budget(self):
        two = clamp_image_size(1328, 1328, vram_gb=80, time_budget_s=0.3)
        one = clamp_image_size(1328, 1328, vram_gb=80, time_budget_s=0.3, two_pass=False)
        assert one.pixels > two.pixels

    def test_a_budget_that_size_cannot_meet_keeps_the_size(self):
        # 12 GB streamed: PCIe moves ~48 blocks per step whatever the size: no smaller image meets 0.4 s.
        d = clamp_image_size(1328, 1328, vram_gb=12, time_budget_s=0.4)
        assert (d.width, d.height, d.limited_by) == (1328, 1328, "") and "not met even at 256x256" in d.reason

    def test_memory_and_time_both_reduce(self):
        d = clamp_image_size(4096, 4096, vram_gb=8, time_budget_s=2.0)
        assert d.scaled and d.limited_by == "time budget"
        assert d.message.startswith("Safe Mode: Reduced pixel window (4096x4096 ->") and "; Time budget:" in d.message
