"""bench/family_bench.py and bench/family_memory.py on the CPU: the fits that become presets/memory_model.json
entries, the governor column of the report, and the --tiny dry run of the parts the H200 runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import common  # noqa: E402
import family_bench  # noqa: E402
import family_memory  # noqa: E402
import report_families  # noqa: E402

# 2.1 on the H200 (bench/results/h200_family_21_memory.log): streamed engine, nothing resident, (MP, peak GiB).
STREAMED_21 = [(0.262144, 4.1296), (1.048576, 4.1296), (2.359296, 4.2064), (4.194304, 5.1952)]


class TestFits:
    def test_a_fit_covers_every_point(self) -> None:
        fit = common.cover_fit(STREAMED_21)
        for x, y in STREAMED_21:
            assert fit["intercept_gib"] + fit["gib_per_mpix"] * x >= y - 1e-3

    def test_a_two_phase_peak_keeps_the_activations_slope_beyond_the_points(self) -> None:
        fit = family_memory.at_least_slope(common.cover_fit(STREAMED_21), STREAMED_21, 0.5388)
        assert fit["gib_per_mpix"] == 0.5388 and fit["intercept_gib"] == pytest.approx(3.9884, abs=1e-4)
        for x, y in STREAMED_21:
            assert fit["intercept_gib"] + fit["gib_per_mpix"] * x >= y - 1e-3
        steep = {"intercept_gib": 1.0, "gib_per_mpix": 0.9, "max_residual_gib": 0.0}
        assert family_memory.at_least_slope(steep, STREAMED_21, 0.5388) is steep

    def test_entries_compose_as_the_governor_reads_them(self) -> None:
        act = {"intercept_gib": 0.13, "gib_per_mpix": 0.54}
        vae = {"intercept_gib": 0.11, "gib_per_mpix": 6.26}
        streamed = {"intercept_gib": 3.99, "gib_per_mpix": 0.54}
        weights = {"transformer": 13.25, "text_encoder": 16.33, "vae": 0.63}
        e = family_memory.compose_entries(weights, 30.21, act, vae, streamed)
        assert e["gpu/bf16"]["base_gib"] == pytest.approx(30.34) and e["gpu/bf16"]["gib_per_mpix"] == 6.26
        assert e["model_offload/bf16"]["base_gib"] == pytest.approx(13.25 + 0.63 + 0.13)
        assert e["streamed/bf16"]["gib_per_mpix"] == 0.54 and e["group_offload/bf16"]["gib_per_mpix"] == 6.26
        assert e["gpu/fp32"]["base_gib"] == pytest.approx(2 * 30.34) and e["vae/fp16"]["gib_per_mpix"] == 6.26


class TestReport:
    @pytest.mark.parametrize(("cap", "side", "tiled", "within", "probe", "expected"), [
        # the chosen size's decode needed the tiled re-decode; the probe too: the bound is shown to be within
        (40.0, 1152, True, True, 1216, "gpu 40 GiB: 1152x1152, OOM, yes (1216x1216 needed the tiled re-decode)"),
        # a probe that ran proves no "no": the bound is conservative by at least the probe, nothing more
        (80.0, 2512, False, False, 2720, "gpu 80 GiB: 2512x2512, yes, not shown (2720x2720 ran)"),
    ])  # fmt: skip
    def test_the_governor_column_says_how_the_probe_ended(self, cap, side, tiled, within, probe, expected) -> None:
        check = {"cap_gib": cap, "chosen": {"fits": True, "tiled_fallback": tiled, "size": [side, side]},
                 "never_oom": not tiled, "probe": {"fits": True, "tiled_fallback": tiled, "size": [probe, probe]},
                 "within_15pct": within}  # fmt: skip
        assert expected in report_families.rows({"case[1 image]": {"governor_gpu": check}})[1]

    def test_a_check_without_a_probe_says_so(self) -> None:
        check = {"cap_gib": 80.0, "chosen": {"fits": True, "tiled_fallback": False, "size": [2720, 2720]},
                 "never_oom": True}  # fmt: skip
        row = report_families.rows({"case[0 images]": {"governor_gpu": check}})[1]
        assert "gpu 80 GiB: 2720x2720, yes, - (no probe run)" in row

    def test_a_bracketed_ladder_says_no_with_the_largest_size_that_ran(self) -> None:
        check = {"cap_gib": 80.0, "chosen": {"fits": True, "tiled_fallback": False, "size": [2528, 2528]},
                 "never_oom": True, "probe": {"fits": True, "tiled_fallback": False, "size": [2720, 2720]},
                 "within_15pct": False,
                 "largest_fitting": {"size": [2720, 2720], "area_over_chosen": 1.158, "bracketed": True}}  # fmt: skip
        row = report_families.rows({"case[1 image]": {"governor_gpu": check}})[1]  # as measured on the H200 (bench/RESULTS.md)
        assert "gpu 80 GiB: 2528x2528, yes, no (2720x2720 ran, 1.158x the area; the next one failed)" in row


_GEN = SimpleNamespace(loader=SimpleNamespace(family=SimpleNamespace(memory_model_key="qwen-image")))


class TestProbeLadder:
    def _fake_fits(self, monkeypatch, largest_side: int, tiled_above: int | None = None) -> list[tuple[int, int]]:
        asked: list[tuple[int, int]] = []

        def fits(_gen, _refs, size, **_governor):
            asked.append(size)
            ok = size[0] <= largest_side
            tiled = tiled_above is not None and size[0] > tiled_above
            return {"fits": ok, "tiled_fallback": ok and tiled, "size": list(size), "peak_gib": 1.0}

        monkeypatch.setattr(family_bench, "_fits", fits)
        return asked

    def test_it_climbs_until_a_probe_fails_and_brackets_the_largest(self, monkeypatch) -> None:
        asked = self._fake_fits(monkeypatch, largest_side=2944)
        out = family_bench.probe_ladder(_GEN, [], (2720, 2720), 5, lambda: 1e9)
        assert asked == [(2944, 2944), (3168, 3168)]  # 1.15x the area each, the second one failed
        assert out["bracketed"] and len(out["probes"]) == 2

    def test_a_tiled_re_decode_ends_the_ladder_like_an_oom(self, monkeypatch) -> None:
        self._fake_fits(monkeypatch, largest_side=10_000, tiled_above=2944)
        out = family_bench.probe_ladder(_GEN, [], (2720, 2720), 5, lambda: 1e9)
        assert out["bracketed"] and out["probes"][-1]["tiled_fallback"]

    def test_it_is_bounded_by_steps_and_by_the_budget(self, monkeypatch) -> None:
        asked = self._fake_fits(monkeypatch, largest_side=10_000)
        out = family_bench.probe_ladder(_GEN, [], (1024, 1024), 2, lambda: 1e9)
        assert len(asked) == 2 and not out["bracketed"]
        out = family_bench.probe_ladder(_GEN, [], (1024, 1024), 5, lambda: family_bench.LADDER_PROBE_S["qwen-image"] - 1)
        assert len(asked) == 2 and out["probes"] == [] and "budget" in out["stopped"]


class TestGovernorCheck:
    """governor_check on the H200's measured bracket: 2528 chosen, 2720 ran, 2944 needed the tiled re-decode."""

    @pytest.fixture
    def gen(self, monkeypatch):
        from qwen_core.families import FAMILIES

        def fits(_gen, _refs, size, **governor):
            if not governor:  # the governor's own choice for the 8192x8192 request
                size = (2528, 2528)
            ok_untiled = size[0] <= 2720
            return {"fits": True, "tiled_fallback": not ok_untiled, "size": list(size), "peak_gib": 79.0}

        monkeypatch.setattr(family_bench, "_fits", fits)
        return SimpleNamespace(loader=SimpleNamespace(family=FAMILIES["qwen-image"]))

    def test_the_ladder_brackets_the_largest_size_and_says_how_far_the_bound_is(self, gen) -> None:
        out = family_bench.governor_check(gen, [], (8192, 8192), family_bench.Probes(ladder=3))
        assert out["never_oom"] and out["probe"]["size"] == [2720, 2720] and not out["within_15pct"]
        assert [p["size"] for p in out["ladder"]["probes"]] == [[2944, 2944]]
        assert out["largest_fitting"] == {"size": [2720, 2720], "area_over_chosen": 1.158, "bracketed": True}

    def test_without_a_probe_only_the_governors_size_runs(self, gen) -> None:
        out = family_bench.governor_check(gen, [], (8192, 8192), family_bench.Probes(probe=False))
        assert out == {"chosen": {"fits": True, "tiled_fallback": False, "size": [2528, 2528], "peak_gib": 79.0},
                       "never_oom": True}


class TestProbeSize:
    @pytest.mark.parametrize("side", [960, 1152, 2512, 2528, 1328, 64])
    def test_the_probe_is_at_least_the_area_factor_on_the_32px_grid(self, side: int) -> None:
        w, h = family_bench.probe_size(side, side)
        assert w % 32 == 0 and h % 32 == 0
        assert w * h >= 1.15 * side * side
        assert (w - 32) * (h - 32) < 1.15 * side * side  # the smallest such size: a probe, not a second guess

    def test_run_3s_sizes_now_get_a_15pct_probe(self) -> None:
        # Rounded down, 2528 and 2512 got 2688 (1.13x and 1.145x of the area): too small to show "within 15%".
        assert family_bench.probe_size(2528, 2528) == (2720, 2720)
        assert family_bench.probe_size(2512, 2512) == (2720, 2720)


@pytest.mark.slow
def test_tiny_dry_run_of_the_memory_and_governor_parts(tmp_path: Path) -> None:
    out = tmp_path / "fb"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "family_bench.py"), "--tiny", "--group", "2.1",
                           "--cases", "qwen-image-2.1[1]", "--parts", "memory,governor", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert "errors" not in data, data.get("errors")
    entry = data["memory"]["entry"]
    assert {"gpu/bf16", "streamed/bf16", "activations/bf16", "vae/bf16"} <= set(entry["entries"])
    check = data["qwen-image-2.1[1 image]"]["governor_gpu"]
    assert check["cap_gib"] == 40.0 and check["chosen"]["fits"]
    # The committed model with this family replaced, as the run's governor would read it on a GPU.
    merged = json.loads((out / "memory_model.json").read_text())
    assert set(merged["families"]) >= {"qwen-image", "qwen-image-2.1"}
