"""Presets YAML: defaults, override merge/replace, and errors naming file + key + problem."""

import pytest

from qwen_core import presets as presets_mod
from qwen_core.errors import PresetError
from qwen_core.presets import DEFAULT_PRESETS_PATH, load_presets

NATIVE = {(1328, 1328), (1664, 928), (928, 1664), (1472, 1104), (1104, 1472), (1584, 1056), (1056, 1584)}


@pytest.fixture(autouse=True)
def _no_override(monkeypatch):
    monkeypatch.delenv("QWEN_PRESETS", raising=False)
    presets_mod._CACHE.clear()


def _write(tmp_path, text, name="p.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


class TestDefaults:
    def test_shipped_file(self):
        p = load_presets()
        assert not hasattr(p, "vram_tiers")  # the governor's window is the memory model's, not a table
        assert {(a.width, a.height) for a in p.aspect_presets.values() if a.native} == NATIVE
        assert all(a.pixels == a.width * a.height for a in p.aspect_presets.values())
        assert p.aspect("16:9").pixels == 1544192
        assert {"fast", "balanced", "high"} <= set(p.quality_presets)
        assert p.quality("high").steps == 50 and p.quality("high").true_cfg_scale == 4.0
        assert p.sources == (DEFAULT_PRESETS_PATH,)

    def test_time_budget_only_on_presets_that_say_so(self):
        p = load_presets()
        assert all(p.quality(n).max_seconds_per_step is None for n in ("fast", "balanced", "high"))
        timed = {n: q.max_seconds_per_step for n, q in p.quality_presets.items() if q.max_seconds_per_step}
        assert timed == {"fast, max 0.3 s/step": 0.3, "balanced, max 0.5 s/step": 0.5}

    def test_unknown_names(self):
        p = load_presets()
        with pytest.raises(PresetError, match="21:9"):
            p.aspect("21:9")
        with pytest.raises(PresetError, match="balanced"):
            p.quality("insane")


class TestOverride:
    def test_merge_over_defaults(self, monkeypatch, tmp_path):
        path = _write(tmp_path, "quality_presets:\n  fast: {steps: 8, true_cfg_scale: 1.0}\n"
                                "aspect_presets:\n  cinema: {width: 1920, height: 816}\n")
        monkeypatch.setenv("QWEN_PRESETS", str(path))
        p = load_presets()
        assert p.quality("fast").steps == 8 and p.quality("high").steps == 50
        assert p.aspect("cinema").pixels == 1920 * 816 and "1:1" in p.aspect_presets
        assert p.sources[-1] == path

    def test_replace(self, monkeypatch, tmp_path):
        path = _write(tmp_path, "replace: true\naspect_presets:\n  only: {width: 512, height: 512}\n")
        monkeypatch.setenv("QWEN_PRESETS", str(path))
        p = load_presets()
        assert list(p.aspect_presets) == ["only"]
        assert len(p.quality_presets) == 5  # sections not given stay

    def test_retired_tier_sections_are_ignored_with_a_warning(self, monkeypatch, tmp_path, caplog):
        from qwen_core.governor import max_pixels

        path = _write(tmp_path, "vram_tiers:\n  low: {min_vram_gb: 0, max_megapixels: 0.5}\ndtype_factor: {fp32: 0.5}\n")
        monkeypatch.setenv("QWEN_PRESETS", str(path))
        with caplog.at_level("WARNING", logger="qwen_core.presets"):
            load_presets()
        assert "`vram_tiers` is ignored" in caplog.text and "`dtype_factor` is ignored" in caplog.text
        assert max_pixels(8) > 500_000  # the window is the memory model's

    def test_time_budget_in_an_override(self, monkeypatch, tmp_path):
        path = _write(tmp_path, "quality_presets:\n  quick: {steps: 8, true_cfg_scale: 1.0, max_seconds_per_step: 0.2}\n")
        monkeypatch.setenv("QWEN_PRESETS", str(path))
        assert load_presets().quality("quick").max_seconds_per_step == 0.2

    def test_missing_override_file(self, monkeypatch, tmp_path):
        monkeypatch.setenv("QWEN_PRESETS", str(tmp_path / "nope.yaml"))
        with pytest.raises(PresetError, match="QWEN_PRESETS"):
            load_presets()


BROKEN = [
    ("aspect_presets: [1, 2", "", "not valid YAML"),
    ("- a\n- b\n", "", "mapping of sections"),
    ("quality_presets:\n  fast: {steps: 0, true_cfg_scale: 1}\n", "quality_presets.fast.steps", "[1, 200]"),
    ("quality_presets:\n  fast: {steps: yes, true_cfg_scale: 1}\n", "quality_presets.fast.steps", "integer"),
    ("quality_presets:\n  fast: {steps: 4, true_cfg_scale: .nan}\n", "quality_presets.fast.true_cfg_scale", "got nan"),
    ("quality_presets:\n  fast: {steps: 4}\n", "quality_presets.fast.true_cfg_scale", "required"),
    ("quality_presets:\n  fast: {steps: 4, true_cfg_scale: 2, turbo: 1}\n", "quality_presets.fast.turbo", "unknown"),
    ("aspect_presets:\n  odd: {width: 1000, height: 1000}\n", "aspect_presets.odd.width", "multiple of 16"),
    ("aspect_presets:\n  odd: {width: 1024, height: 1024, pixels: 5}\n", "aspect_presets.odd.pixels", "1048576"),
    ("aspect_presets:\n  big: {width: 100000, height: 1024}\n", "aspect_presets.big.width", "8192"),
    ("quality_presets:\n  q: {steps: 4, true_cfg_scale: 1, max_seconds_per_step: 0}\n",
     "quality_presets.q.max_seconds_per_step", "got 0"),
    ("aspect_presets: 5\n", "aspect_presets", "mapping"),
    ("colours: {}\n", "colours", "unknown section"),
    ("replace: maybe\n", "replace", "true or false"),
    ("x: !!python/object/apply:os.system ['echo pwned']\n", "", "not valid YAML"),
    ("a: &a [1, 2]\nb: *a\n", "", "aliases are not allowed"),
]


class TestBrokenFiles:
    @pytest.mark.parametrize("text,key,problem", BROKEN)
    def test_error_names_file_key_problem(self, monkeypatch, tmp_path, text, key, problem):
        path = _write(tmp_path, text)
        monkeypatch.setenv("QWEN_PRESETS", str(path))
        with pytest.raises(PresetError) as err:
            load_presets()
        message = str(err.value)
        assert str(path) in message and problem in message
        if key:
            assert f"`{key}`" in message

    def test_broken_default_path(self, tmp_path):
        with pytest.raises(PresetError, match="not valid YAML"):
            load_presets(_write(tmp_path, "a: [\n"))

    def test_huge_file_refused_unread(self, tmp_path):
        path = _write(tmp_path, "#" * (presets_mod.MAX_FILE_BYTES + 1))
        with pytest.raises(PresetError, match="limited to"):
            load_presets(path)

    def test_alias_bomb_refused(self, monkeypatch, tmp_path):
        lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
        lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 30)]
        path = _write(tmp_path, "\n".join(lines))
        with pytest.raises(PresetError, match="aliases"):
            load_presets(path)

    def test_changed_file_is_reloaded(self, monkeypatch, tmp_path):
        path = _write(tmp_path, "quality_presets:\n  fast: {steps: 8, true_cfg_scale: 1.0}\n")
        monkeypatch.setenv("QWEN_PRESETS", str(path))
        assert load_presets().quality("fast").steps == 8
        path.write_text("quality_presets:\n  fast: {steps: 9, true_cfg_scale: 1.0}\n  # changed size\n")
        assert load_presets().quality("fast").steps == 9
