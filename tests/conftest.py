"""Shared fixtures for the whole suite.

- One torch CPU thread (see below), which keeps the suite fast on small and busy machines.
- The session never reaches a hub (HF_HUB_OFFLINE=1, set before any test imports huggingface_hub, which
  reads it at import) and never writes into the repo's reports/ (QWEN_REPORTS_DIR -> a temp dir).
- ``tiny_model_dir`` / ``tiny_model_dir_b``: two different tiny random Qwen-Image pipelines (seeds 0 and
  1), built once per session in a temp dir; ``tiny_family_dir(key)`` the tiny pipeline of any family. Treat
  them as read-only; a test that damages a model folder takes ``tiny_model_copy`` (a private copy of the
  seed-0 model) instead.
- QWEN_TINY_CACHE points at the fixtures' folder, so ``qwen_core.tiny.ensure_tiny_pipeline()`` (the demo)
  reuses the session's build instead of writing to ~/.cache.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
# One torch CPU thread (read when torch is first imported; set QWEN_TEST_THREADS to change it). The tiny
# models' ops are far too small to gain from a second thread, and on a busy 2-core box OpenMP's barrier
# waits made a 32x32 generate 10-20x slower with 2 threads than with 1 (0.05-0.16 s vs 0.45-1.7 s).
os.environ["OMP_NUM_THREADS"] = os.environ.get("QWEN_TEST_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def _hermetic_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Reports and the tiny-model cache go to session temp dirs; the caller's values come back after."""
    saved = {key: os.environ.get(key) for key in ("QWEN_REPORTS_DIR", "QWEN_TINY_CACHE")}
    os.environ["QWEN_REPORTS_DIR"] = str(tmp_path_factory.mktemp("reports"))
    os.environ["QWEN_TINY_CACHE"] = str(tmp_path_factory.mktemp("tiny-cache"))
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def tiny_model_dir(_hermetic_env: None) -> Path:
    """Tiny Qwen-Image pipeline folder (seed 0), diffusers layout; read-only."""
    from qwen_core.tiny import ensure_tiny_pipeline

    return ensure_tiny_pipeline(seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir_b(_hermetic_env: None) -> Path:
    """A second tiny pipeline with different weights (seed 1), for model-switching tests; read-only."""
    from qwen_core.tiny import ensure_tiny_pipeline

    return ensure_tiny_pipeline(seed=1)


@pytest.fixture(scope="session")
def tiny_family_dir(_hermetic_env: None) -> Callable[[str], Path]:
    """``tiny_family_dir("edit-2509")``: the tiny pipeline folder of any family (seed 0), built on first use and
    cached for the session; read-only. ``"qwen-image"`` is the same folder as ``tiny_model_dir``."""
    from qwen_core.tiny import ensure_tiny_pipeline

    return lambda family: ensure_tiny_pipeline(seed=0, family=family)


@pytest.fixture
def tiny_model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the seed-0 tiny model (for corrupting, deleting files, ...)."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "tiny-model"))
