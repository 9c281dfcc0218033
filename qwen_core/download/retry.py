"""Backoff between attempts: exponential with full jitter, Retry-After honoured, sleeps that notice cancel."""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Callable

from qwen_core.download.types import HttpConfig


def backoff_delay(failures: int, cfg: HttpConfig) -> float:
    # Exponential with full jitter: many clients hitting the same server don't retry in lockstep.
    return min(cfg.backoff_max, cfg.backoff_base * 2 ** max(failures - 1, 0)) * random.uniform(0.5, 1.0)


def parse_retry_after(value: str | None, cap: float) -> float | None:
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), cap)


def sleep_unless_cancelled(seconds: float, check_cancel: Callable[[], None]) -> None:
    """Sleep ``seconds``, calling ``check_cancel()`` (which raises to stop) at least every 0.1 s."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        check_cancel()
        time.sleep(min(0.1, max(end - time.monotonic(), 0)))
