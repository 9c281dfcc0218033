#!/usr/bin/env bash
# Set up (with test tools) if needed, lint, then run the whole test suite on the CPU.
# Extra arguments go to pytest (e.g. -k governor -x).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh" --dev
cd "$ROOT"
VPY="${QWEN_VENV:-$ROOT/.venv}/bin/python"
"$VPY" -m ruff check .
# olah (a real third-party Hub mirror, used by the download tests) pins psutil<6, which clashes with our pins,
# so it gets its own small venv. Best effort: without it those tests skip and say why.
OLAH_VENV="$ROOT/.venv-olah"
if [ ! -x "$OLAH_VENV/bin/olah-cli" ]; then
  echo "test: creating $OLAH_VENV for the mirror tests"
  { python3 -m venv "$OLAH_VENV" && "$OLAH_VENV/bin/python" -m pip install -q --disable-pip-version-check "olah==0.5.4"; } \
    >/dev/null 2>&1 || echo "test: could not install olah; the olah mirror tests will be skipped"
fi
[ -x "$OLAH_VENV/bin/olah-cli" ] && export QWEN_OLAH_PYTHON="${QWEN_OLAH_PYTHON:-$OLAH_VENV/bin/python}"
# Tests never touch a hub or a GPU.
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 CUDA_VISIBLE_DEVICES=""
exec "$VPY" -m pytest "$@"
