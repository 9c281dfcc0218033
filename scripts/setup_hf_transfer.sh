#!/usr/bin/env bash
# Enable the Rust download accelerator for Hugging Face downloads: hf_xet, with HF_XET_HIGH_PERFORMANCE=1.
#
# Usage: scripts/setup_hf_transfer.sh [--python PATH] [--no-install]
#   --python PATH   interpreter to install into (default <repo>/.venv/bin/python; use ComfyUI's python there)
#   --no-install    only check and print what to export
#
# Why not hf_transfer: huggingface_hub >= 1.0 never imports hf_transfer; HF_HUB_ENABLE_HF_TRANSFER=1 only
# prints a FutureWarning. Its successor is hf_xet (a dependency of huggingface_hub >= 1.0 on most platforms),
# used whenever the server offers Xet storage (the Hub does for most repos). HF_XET_HIGH_PERFORMANCE=1 lets it
# use more threads and memory. Our own downloader (qwen_core download) adds cross-run resume on top.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${QWEN_VENV:-$ROOT/.venv}/bin/python"; INSTALL=1
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PY="${2:?--python needs a path}"; shift ;;
    --python=*) PY="${1#--python=}" ;;
    --no-install) INSTALL=0 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "setup_hf_transfer: unknown option '$1' (allowed: --python PATH --no-install)" >&2; exit 2 ;;
  esac
  shift
done
if [ ! -x "$PY" ] && ! command -v "$PY" >/dev/null 2>&1; then
  echo "setup_hf_transfer: no Python at $PY; run scripts/setup.sh first or pass --python" >&2
  exit 2
fi

if ! "$PY" -c 'import hf_xet' 2>/dev/null; then
  if [ "$INSTALL" = 1 ]; then
    echo "setup_hf_transfer: installing hf_xet into $PY"
    "$PY" -m pip install --disable-pip-version-check -q "hf_xet>=1.1,<2"
  else
    echo "setup_hf_transfer: hf_xet is not installed in $PY (run without --no-install to install it)" >&2
    exit 1
  fi
fi
"$PY" - <<'PY'
import importlib.metadata as md
print(f"setup_hf_transfer: hf_xet {md.version('hf_xet')} with huggingface_hub {md.version('huggingface_hub')}")
PY
if [ -n "${HF_HUB_ENABLE_HF_TRANSFER:-}" ]; then
  echo "setup_hf_transfer: note: HF_HUB_ENABLE_HF_TRANSFER is set but ignored by huggingface_hub >= 1.0 (unset it)"
fi
echo "setup_hf_transfer: hf_transfer is no longer used by huggingface_hub >= 1.0; hf_xet replaces it."
echo "Add this to your shell profile (or run it before ComfyUI / downloads):"
echo "export HF_XET_HIGH_PERFORMANCE=1"
