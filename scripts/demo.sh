#!/usr/bin/env bash
# The main job: set up if needed, then build a tiny offline Qwen-Image pipeline and generate an image.
# Extra arguments go to `python -m qwen_core demo` (e.g. --out demo.png --width 128 --height 96).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "${QWEN_VENV:-$ROOT/.venv}/bin/python" -m qwen_core demo "$@"
