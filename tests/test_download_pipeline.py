"""A downloaded tiny Qwen-Image pipeline loads with diffusers' own QwenImagePipeline, fully offline."""

from __future__ import annotations

from pathlib import Path

import pytest
from download_helpers import FAST
from hub_server import HubServer

from qwen_core.download import DownloadOptions, download_repo, resolve_endpoint

pytest_plugins = ["download_fixtures"]


@pytest.mark.slow
def test_downloaded_tiny_pipeline_loads_offline(hub: HubServer, tiny_model_dir: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    files = {p.relative_to(tiny_model_dir).as_posix(): p for p in tiny_model_dir.rglob("*") if p.is_file()}
    hub.add_repo("org/tiny-qwen", files)
    hub.faults.drop_after, hub.faults.drop_count = 1_000_000, 2  # and survive two dropped connections
    out = tmp_path / "tiny-qwen"
    result = download_repo("org/tiny-qwen", DownloadOptions(endpoint=resolve_endpoint(hub.url), local_dir=out, http=FAST))
    assert set(result.files) == set(files)

    import huggingface_hub.constants as hub_constants
    from diffusers import QwenImagePipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    pipe = QwenImagePipeline.from_pretrained(out, local_files_only=True)
    assert type(pipe.vae).__name__ == "AutoencoderKLQwenImage"
    assert not any(p.is_symlink() for p in out.rglob("*"))
