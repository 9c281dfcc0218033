"""Model store resolution and path safety."""

from pathlib import Path

import pytest

from qwen_core import paths
from qwen_core.errors import InvalidInputError


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    for name in ("QWEN_HOME", "HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "QWEN_REPORTS_DIR"):
        monkeypatch.delenv(name, raising=False)
    paths.register_models_dirs([])
    yield
    paths.register_models_dirs([])


class TestModelsRoot:
    def test_order_qwen_home_then_registered_then_hub(self, monkeypatch, tmp_path):
        monkeypatch.setenv("HOME", str(tmp_path))
        assert paths.models_root() == tmp_path / ".cache" / "huggingface" / "hub"
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
        assert paths.models_root() == tmp_path / "hfhome" / "hub"
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hubcache"))
        assert paths.models_root() == tmp_path / "hubcache"
        paths.register_models_dirs([tmp_path / "comfy" / "diffusers", tmp_path / "extra"])
        assert paths.models_root() == tmp_path / "comfy" / "diffusers"
        monkeypatch.setenv("QWEN_HOME", str(tmp_path / "qh"))
        assert paths.models_root() == tmp_path / "qh"
        assert paths.model_search_dirs() == [tmp_path / "qh", tmp_path / "comfy" / "diffusers", tmp_path / "extra",
                                             tmp_path / "hubcache"]

    def test_reports_dir(self, monkeypatch, tmp_path):
        assert paths.reports_dir() == Path(paths.__file__).resolve().parent.parent / "reports"
        monkeypatch.setenv("QWEN_REPORTS_DIR", str(tmp_path))
        assert paths.reports_dir() == tmp_path


class TestRepoIds:
    @pytest.mark.parametrize("ok", ["Qwen/Qwen-Image", "Qwen/Qwen-Image-Edit-2509", "gpt2", "a_b/c.d"])
    def test_valid(self, ok, tmp_path):
        assert paths.validate_repo_id(ok) == ok
        folder = paths.repo_folder(ok, tmp_path)
        assert folder == tmp_path.joinpath(*ok.split("/"))

    @pytest.mark.parametrize("bad", ["", "/", "../etc", "Qwen/../x", "Qwen/Qwen/Image", "/abs/path", "C:/x",
                                     "a\\b", "Qwen//x", "Qwen/x\x00", "-bad/x", "a--b/c", "org/.hidden", 5, None,
                                     "a" * 200])
    def test_invalid(self, bad, tmp_path):
        with pytest.raises(InvalidInputError) as err:
            paths.repo_folder(bad, tmp_path)
        assert err.value.field == "repo_id"


class TestRevision:
    @pytest.mark.parametrize("ok", ["main", "v1.0", "refs/pr/1", "a" * 40, "0123456789abcdef0123456789abcdef01234567"])
    def test_valid(self, ok):
        assert paths.validate_revision(ok) == ok

    @pytest.mark.parametrize("bad", ["", "/main", "main/", "a/../b", "..", "a//b", "a b", "x\x00", "a\\b",
                                     "%2e%2e", "main.lock", None])
    def test_invalid(self, bad):
        with pytest.raises(InvalidInputError) as err:
            paths.validate_revision(bad)
        assert err.value.field == "revision"


class TestSafeJoin:
    def test_plain_relative_paths(self, tmp_path):
        assert paths.safe_join(tmp_path, "transformer/model.safetensors") == tmp_path / "transformer" / \
            "model.safetensors"

    @pytest.mark.parametrize("bad", ["", "..", "../x", "a/../../x", "/etc/passwd", "C:/Windows", "c:x", "a\\..\\b",
                                     "a//b", "./a", "a/.", "a\x00b", "a\nb"])
    def test_escapes_are_refused(self, bad, tmp_path):
        with pytest.raises(InvalidInputError):
            paths.safe_join(tmp_path, bad)
