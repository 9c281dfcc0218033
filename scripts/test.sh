#!/usr/bin/env bash
# Set up (with test tools) if needed, lint, then run the whole test suite on the CPU.
# Extra arguments go to pytest (e.g. -k governor -x).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh" --dev
cd "$ROOT"
VPY="${QWEN_VENV:-$ROOT/.venv}/bin/python"
"$VPY" -m ruff check .
# Tests never touch a hub or a GPU.
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 CUDA_VISIBLE_DEVICES=""
exec "$VPY" -m pytest "$@"
