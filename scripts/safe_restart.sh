#!/usr/bin/env bash
# Restart the ComfyUI that scripts/launch_ui.sh started: stop it by its recorded PID (SIGTERM, then SIGKILL
# after a timeout), wait until the GPU no longer lists that PID (its VRAM is released), start it again.
#
# Usage: scripts/safe_restart.sh [--timeout SECONDS] [--listen HOST] [--port N] [--cpu]
#   --timeout SECONDS  how long to wait for a graceful exit, and then for the GPU memory (default 30)
#   --listen HOST      passed to launch_ui (default 127.0.0.1)
#   --port N           passed to launch_ui (default 8188)
#   --cpu              passed to launch_ui
# Env: COMFYUI_DIR (required), COMFYUI_PYTHON, QWEN_REPORTS_DIR (where comfyui.pid lives), as for launch_ui.
# Only the recorded PID is signalled, and only if its command line is a ComfyUI main.py.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TIMEOUT=30; PASS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --timeout) TIMEOUT="${2:?--timeout needs seconds}"; shift ;;
    --timeout=*) TIMEOUT="${1#--timeout=}" ;;
    --listen|--port) PASS+=("$1" "${2:?$1 needs a value}"); shift ;;
    --listen=*|--port=*|--cpu) PASS+=("$1") ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "safe_restart: unknown option '$1' (allowed: --timeout S --listen HOST --port N --cpu)" >&2; exit 2 ;;
  esac
  shift
done
case "$TIMEOUT" in ''|*[!0-9]*) echo "safe_restart: --timeout must be whole seconds (got '$TIMEOUT')" >&2; exit 2 ;; esac
if [ -z "${COMFYUI_DIR:-}" ]; then
  echo "safe_restart: COMFYUI_DIR is not set. Point it at your ComfyUI checkout, e.g." >&2
  echo "  COMFYUI_DIR=\$HOME/ComfyUI bash scripts/safe_restart.sh" >&2
  exit 2
fi

REPORTS="${QWEN_REPORTS_DIR:-$ROOT/reports}"
PID_FILE="$REPORTS/comfyui.pid"
pid="$(cat "$PID_FILE" 2>/dev/null || true)"

is_comfyui() {  # guard against a recycled PID belonging to something else
  local args
  if [ -r "/proc/$1/cmdline" ]; then args="$(tr '\0' ' ' < "/proc/$1/cmdline")"
  else args="$(ps -o args= -p "$1" 2>/dev/null || true)"; fi
  case "$args" in *main.py*) return 0 ;; *) return 1 ;; esac
}

alive() {  # running, and not a zombie (an exited child nobody has reaped yet still answers kill -0)
  kill -0 "$1" 2>/dev/null || return 1
  local state=""
  [ -r "/proc/$1/stat" ] && state="$(sed 's/.*) //' "/proc/$1/stat" | cut -d' ' -f1)"
  [ "$state" != "Z" ]
}

gpu_holds() {  # does the GPU still list this PID as a compute process?
  # In a container nvidia-smi may not see host PIDs; then this reports "released" at once.
  command -v nvidia-smi >/dev/null 2>&1 || return 1
  nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null | tr -d ' ' | grep -qx "$1"
}

if [ -n "$pid" ] && alive "$pid"; then
  if ! is_comfyui "$pid"; then
    echo "safe_restart: PID $pid from $PID_FILE is not a ComfyUI main.py; not touching it." >&2
    exit 1
  fi
  echo "safe_restart: stopping ComfyUI (PID $pid) with SIGTERM"
  kill -TERM "$pid" 2>/dev/null || true
  waited=0
  while alive "$pid" && [ "$waited" -lt $((TIMEOUT * 2)) ]; do sleep 0.5; waited=$((waited + 1)); done
  if alive "$pid"; then
    echo "safe_restart: still running after ${TIMEOUT}s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    while alive "$pid"; do sleep 0.2; done
  fi
  if command -v nvidia-smi >/dev/null 2>&1; then
    waited=0
    while gpu_holds "$pid" && [ "$waited" -lt $((TIMEOUT * 2)) ]; do sleep 0.5; waited=$((waited + 1)); done
    if gpu_holds "$pid"; then
      echo "safe_restart: the GPU still lists PID $pid after ${TIMEOUT}s; starting anyway" >&2
    else
      echo "safe_restart: GPU memory of PID $pid released"
    fi
  else
    echo "safe_restart: no nvidia-smi; skipping the GPU memory check"
  fi
  rm -f "$PID_FILE"
else
  echo "safe_restart: no running ComfyUI recorded in $PID_FILE; just starting it"
fi
exec bash "$ROOT/scripts/launch_ui.sh" "${PASS[@]+"${PASS[@]}"}"
