"""Fixtures and helpers shared by the download tests (imported by tests/test_download*.py)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from qwen_core.download import HttpConfig

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "robust_download.py"



def _slowdown() -> float:
    """How much slower than an idle machine this run may be: QWEN_TEST_TIMEOUT_SCALE if set, else the load average
    per CPU core when the tests start (at least 1, at most 8). A loaded 2-core CI box gets longer timeouts."""
    env = os.environ.get("QWEN_TEST_TIMEOUT_SCALE", "").strip()
    if env:
        return max(1.0, float(env))
    try:
        load = os.getloadavg()[0] / (os.cpu_count() or 1)
    except (OSError, AttributeError):  # no load average (Windows)
        load = 1.0
    return min(max(1.0, load), 8.0)


SLOWDOWN = _slowdown()


def scaled(seconds: float) -> float:
    """A timeout for the tests: ``seconds`` on an idle machine, longer under load. Timeouts only bound waits for
    something that should happen; no test passes because of one."""
    return seconds * SLOWDOWN


# Short timeouts and backoffs so fault tests take milliseconds, not minutes. A stall test makes its server stall
# for longer than FAST.read_timeout (a multiple of it), so the timeout can grow with the load.
FAST = HttpConfig(connect_timeout=scaled(2.0), read_timeout=scaled(1.0), backoff_base=0.01, backoff_max=0.05,
                  lock_timeout=scaled(5.0))
FAST_CLI = ["--read-timeout", f"{scaled(1.0):.1f}", "--connect-timeout", f"{scaled(2.0):.1f}", "--backoff", "0.01",
            "--progress-interval", "0.2"]


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


def _child_setup(extra=None):  # noqa: ANN001, ANN202
    """A CLI child with Python's own Ctrl-C handling: a test run started as a background job (a CI runner, `cmd &`)
    has SIGINT ignored, the child inherits that, and then Python installs no KeyboardInterrupt handler at all."""
    if os.name != "posix":
        return extra

    def setup() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if extra is not None:
            extra()

    return setup


def start_cli(args: list[str], *, env: dict[str, str] | None = None, preexec_fn=None) -> subprocess.Popen:  # noqa: ANN001
    return subprocess.Popen([sys.executable, str(TOOL), *args], env=env or cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_child_setup(preexec_fn))


def run_cli(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 60,
            preexec_fn=None) -> subprocess.CompletedProcess:  # noqa: ANN001
    return subprocess.run([sys.executable, str(TOOL), *args], env=env or cli_env(), capture_output=True, text=True,
                          timeout=scaled(timeout), preexec_fn=_child_setup(preexec_fn))


def wait_for(pred, timeout: float = 30.0, what: str = "condition") -> bool:  # noqa: ANN001
    """Poll ``pred`` (a readiness check, not a sleep) until it is true or ``scaled(timeout)`` passes."""
    import time

    end = time.monotonic() + scaled(timeout)
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return bool(pred())
