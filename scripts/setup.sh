#!/usr/bin/env bash
# Create (or refresh) the repo's own virtualenv and install what the pack needs.
# Idempotent: a second run with unchanged requirements returns in about a second.
#
# Usage: scripts/setup.sh [--dev] [--force] [--cuda auto|cpu|cu126|cu128|cu130]
#   --dev    also install test/lint tools (requirements-dev.txt)
#   --force  reinstall even if nothing changed
#   --cuda   which torch build to install (default: auto = CUDA wheel if nvidia-smi works, else CPU)
# Env: QWEN_VENV (default <repo>/.venv), QWEN_PYTHON (interpreter to build the venv with),
#      QWEN_TORCH_VERSION / QWEN_TORCHVISION_VERSION (default 2.14.1 / 0.29.1 on CPU; newest matching pair for CUDA)
# torch and torchvision are installed as a matched pair: transformers 5 builds the edit models' Qwen2VLProcessor
# (and 2.1's Qwen3VLProcessor) only with torchvision, and a torchvision built for another torch fails to load.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${QWEN_VENV:-$ROOT/.venv}"
DEV=0; FORCE=0; CUDA="auto"
while [ $# -gt 0 ]; do
  case "$1" in
    --dev) DEV=1 ;;
    --force) FORCE=1 ;;
    --cuda) CUDA="${2:?--cuda needs a value: auto|cpu|cu126|cu128|cu130}"; shift ;;
    --cuda=*) CUDA="${1#--cuda=}" ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "setup: unknown option '$1' (allowed: --dev --force --cuda X)" >&2; exit 2 ;;
  esac
  shift
done

find_python() {
  for candidate in "${QWEN_PYTHON:-}" python3.12 python3.11 python3.10 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(0 if (3, 10) <= sys.version_info[:2] < (3, 14) else 1)' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  echo "setup: no Python 3.10-3.13 found; install one or set QWEN_PYTHON=/path/to/python" >&2
  return 1
}

if [ ! -x "$VENV/bin/python" ]; then
  PY="$(find_python)"
  echo "setup: creating virtualenv $VENV with $($PY --version 2>&1)"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"

# torchvision must load beside torch (its compiled ops are built for one torch build): import and run one op.
torch_pair_ok() {
  "$VPY" -c 'import torch, torchvision; torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)' >/dev/null 2>&1
}

# The stamp records what was installed, so an unchanged second run does nothing.
stamp_input="$(cat "$ROOT/requirements.txt" "$ROOT/constraints.txt"; [ "$DEV" = 1 ] && cat "$ROOT/requirements-dev.txt"; echo "cuda=$CUDA")"
stamp="$(printf '%s' "$stamp_input" | sha256sum | cut -c1-16)"
STAMP_FILE="$VENV/.qwen_setup_${DEV}"
if [ "$FORCE" = 0 ] && [ -f "$STAMP_FILE" ] && [ "$(cat "$STAMP_FILE")" = "$stamp" ] && torch_pair_ok; then
  echo "setup: $VENV is up to date"
  exit 0
fi

pick_torch_build() {
  if [ "$CUDA" != "auto" ]; then echo "$CUDA"; return; fi
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    # The driver's highest supported CUDA runtime decides which wheel can run.
    local v; v="$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9]*\)\.\([0-9]*\).*/\1\2/p' | head -n1)"
    if [ -n "$v" ] && [ "$v" -ge 130 ]; then echo cu130
    elif [ -n "$v" ] && [ "$v" -ge 128 ]; then echo cu128
    else echo cu126; fi
  else
    echo cpu
  fi
}

if [ "$FORCE" = 1 ] || ! torch_pair_ok; then
  build="$(pick_torch_build)"
  case "$build" in
    # 2.14.1 + 0.29.1: the CPU index serves them as +cpu builds; where it is unreachable, PyPI's CUDA builds of
    # the same pair run on the CPU too. (torch 2.13.0+cpu beside PyPI's torchvision 0.28.0, a CUDA build, does not
    # load: "operator torchvision::nms does not exist".)
    cpu) spec=("torch==${QWEN_TORCH_VERSION:-2.14.1}" "torchvision==${QWEN_TORCHVISION_VERSION:-0.29.1}") ;;
    cu126|cu128|cu130) spec=("torch${QWEN_TORCH_VERSION:+==$QWEN_TORCH_VERSION}"
                             "torchvision${QWEN_TORCHVISION_VERSION:+==$QWEN_TORCHVISION_VERSION}") ;;
    *) echo "setup: --cuda must be auto, cpu, cu126, cu128 or cu130 (got '$build')" >&2; exit 2 ;;
  esac
  echo "setup: installing ${spec[*]} ($build build)"
  # PyPI has the CUDA builds only; the CPU build (200 MB instead of several GB) lives on PyTorch's index.
  # Few retries: where that index is unreachable (offline mirrors, locked-down CI) pip would otherwise retry
  # it five times with backoff for each of torch's dependencies before using the other indexes.
  "$VPY" -m pip install --disable-pip-version-check -q --retries 1 "${spec[@]}" \
    --extra-index-url "https://download.pytorch.org/whl/$build"
  if ! torch_pair_ok; then
    echo "setup: torch and torchvision do not load together ($("$VPY" -m pip list 2>/dev/null | grep -E '^torch(vision)? ' | tr -s ' ' | tr '\n' ' '))." >&2
    echo "setup: set QWEN_TORCH_VERSION and QWEN_TORCHVISION_VERSION to a matching pair (2.14.1 / 0.29.1) and run with --force" >&2
    exit 1
  fi
else
  echo "setup: torch $("$VPY" -c 'import torch, torchvision; print(torch.__version__, "+ torchvision", torchvision.__version__)') already installed"
fi

echo "setup: installing requirements (exact versions from constraints.txt)"
reqs=(-r "$ROOT/requirements.txt")
[ "$DEV" = 1 ] && reqs+=(-r "$ROOT/requirements-dev.txt")
"$VPY" -m pip install --disable-pip-version-check -q "${reqs[@]}" -c "$ROOT/constraints.txt"
echo "$stamp" > "$STAMP_FILE"
echo "setup: done ($VENV)"
