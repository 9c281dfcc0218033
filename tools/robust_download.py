#!/usr/bin/env python3
"""Resumable, verified, parallel download of a Hugging Face model repo (no symlinks, no lost progress).

    python tools/robust_download.py Qwen/Qwen-Image --out-dir models/Qwen-Image --retries 3 --workers 8

Kill it at any point (Ctrl-C, SIGKILL, a reboot) and run the same command again: it resumes every file
where it stopped. Same as `python -m qwen_core download ...`; exit codes in `--help` and qwen_core/download/types.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Runnable straight from a checkout: put the repo root (the folder holding qwen_core/) on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qwen_core.download.cli import configure_download, run_download  # noqa: E402
from qwen_core.download.types import EXIT_CANCELLED  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="robust_download.py", description=__doc__.splitlines()[0])
    configure_download(parser)
    try:
        return run_download(parser.parse_args(argv))
    except KeyboardInterrupt:
        print("interrupted: partial files are kept; run the same command again to resume", file=sys.stderr)
        return EXIT_CANCELLED


if __name__ == "__main__":
    sys.exit(main())
