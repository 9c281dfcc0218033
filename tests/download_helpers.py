"""Fixtures and helpers shared by the download tests (imported by tests/test_download*.py)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from qwen_core.download import HttpConfig

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "robust_download.py"

# Short timeouts and backoffs so fault tests take milliseconds, not minutes.
FAST = HttpConfig(connect_timeout=2.0, read_timeout=0.5, backoff_base=0.01, backoff_max=0.05, lock_timeout=5.0)
FAST_CLI = ["--read-timeout", "1", "--connect-timeout", "2", "--backoff", "0.01", "--progress-interval", "0.2"]


def blob(n: int, seed: int = 0) -> bytes:
    """Deterministic incompressible bytes (fast: sha256 counter stream)."""
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(b"%d:%d" % (seed, counter)).digest() * 64
        counter += 1
    return bytes(out[:n])


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN", "HF_HUB_ENABLE_HF_TRANSFER")}
    env.update({"HF_HUB_OFFLINE": "0", "HF_HOME": os.environ.get("QWEN_REPORTS_DIR", "/tmp") + "/hf-home",
                "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def start_cli(args: list[str], *, env: dict[str, str] | None = None, preexec_fn=None) -> subprocess.Popen:  # noqa: ANN001
    return subprocess.Popen([sys.executable, str(TOOL), *args], env=env or cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=preexec_fn)


def run_cli(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 60,
            preexec_fn=None) -> subprocess.CompletedProcess:  # noqa: ANN001
    return subprocess.run([sys.executable, str(TOOL), *args], env=env or cli_env(), capture_output=True, text=True,
                          timeout=timeout, preexec_fn=preexec_fn)
