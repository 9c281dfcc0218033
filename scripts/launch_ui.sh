#!/usr/bin/env bash
# Start ComfyUI from COMFYUI_DIR with this pack linked into its custom_nodes, in the background.
#
# Usage: scripts/launch_ui.sh [--listen HOST] [--port N] [--cpu] [--foreground] [-- EXTRA_COMFYUI_ARGS...]
#   --listen HOST   address to listen on (default 127.0.0.1: only this machine; 0.0.0.0 exposes it to the network)
#   --port N        port (default 8188)
#   --cpu           pass --cpu to ComfyUI (no GPU)
#   --foreground    run in this terminal instead of the background (Ctrl+C stops it)
# Env: COMFYUI_DIR (required: the ComfyUI checkout holding main.py),
#      COMFYUI_PYTHON (interpreter; default <repo>/.venv/bin/python, i.e. QWEN_VENV),
#      QWEN_REPORTS_DIR (default <repo>/reports: comfyui.pid and comfyui.log are written there)
# The PID goes to reports/comfyui.pid so scripts/safe_restart.sh can stop exactly this process.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LISTEN="127.0.0.1"; PORT="8188"; CPU=0; FOREGROUND=0; EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --listen) LISTEN="${2:?--listen needs a host, e.g. 127.0.0.1}"; shift ;;
    --listen=*) LISTEN="${1#--listen=}" ;;
    --port) PORT="${2:?--port needs a number}"; shift ;;
    --port=*) PORT="${1#--port=}" ;;
    --cpu) CPU=1 ;;
    --foreground) FOREGROUND=1 ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "launch_ui: unknown option '$1' (allowed: --listen HOST --port N --cpu --foreground -- ARGS)" >&2; exit 2 ;;
  esac
  shift
done
case "$PORT" in ''|*[!0-9]*) echo "launch_ui: --port must be a number (got '$PORT')" >&2; exit 2 ;; esac

if [ -z "${COMFYUI_DIR:-}" ]; then
  echo "launch_ui: COMFYUI_DIR is not set. Point it at your ComfyUI checkout, e.g." >&2
  echo "  COMFYUI_DIR=\$HOME/ComfyUI bash scripts/launch_ui.sh" >&2
  exit 2
fi
if [ ! -f "$COMFYUI_DIR/main.py" ]; then
  echo "launch_ui: $COMFYUI_DIR has no main.py; COMFYUI_DIR must be the ComfyUI folder itself." >&2
  exit 2
fi
PY="${COMFYUI_PYTHON:-${QWEN_VENV:-$ROOT/.venv}/bin/python}"
if [ ! -x "$PY" ] && ! command -v "$PY" >/dev/null 2>&1; then
  echo "launch_ui: no Python at $PY; run scripts/setup.sh or set COMFYUI_PYTHON to ComfyUI's interpreter." >&2
  exit 2
fi
REPORTS="${QWEN_REPORTS_DIR:-$ROOT/reports}"
PID_FILE="$REPORTS/comfyui.pid"
LOG_FILE="$REPORTS/comfyui.log"
mkdir -p "$REPORTS"

alive() {  # running, and not a zombie (an exited child nobody has reaped yet still answers kill -0)
  kill -0 "$1" 2>/dev/null || return 1
  local state=""
  [ -r "/proc/$1/stat" ] && state="$(sed 's/.*) //' "/proc/$1/stat" | cut -d' ' -f1)"
  [ "$state" != "Z" ]
}

if [ -f "$PID_FILE" ]; then
  old="$(cat "$PID_FILE" 2>/dev/null || true)"
  if [ -n "$old" ] && alive "$old"; then
    echo "launch_ui: ComfyUI already running (PID $old); use scripts/safe_restart.sh to restart it."
    exit 0
  fi
fi

# Link this checkout into custom_nodes (a symlink: edits here are live after a restart).
LINK="$COMFYUI_DIR/custom_nodes/comfyui-qwen-image"
mkdir -p "$COMFYUI_DIR/custom_nodes"
if [ -L "$LINK" ]; then
  if [ "$(cd "$LINK" && pwd -P)" != "$(cd "$ROOT" && pwd -P)" ]; then
    echo "launch_ui: $LINK links to another copy of the pack; remove it first (two copies would clash)." >&2
    exit 2
  fi
elif [ -e "$LINK" ]; then
  echo "launch_ui: $LINK exists and is not a link to this checkout; remove or rename it first." >&2
  exit 2
else
  ln -s "$ROOT" "$LINK"
  echo "launch_ui: linked $LINK -> $ROOT"
fi

args=(main.py --listen "$LISTEN" --port "$PORT")
[ "$CPU" = 1 ] && args+=(--cpu)
args+=("${EXTRA[@]+"${EXTRA[@]}"}")
cd "$COMFYUI_DIR"
if [ "$FOREGROUND" = 1 ]; then
  echo "$$" > "$PID_FILE"
  echo "launch_ui: ComfyUI on http://$LISTEN:$PORT (PID $$, foreground)"
  exec "$PY" "${args[@]}"
fi
nohup "$PY" "${args[@]}" >>"$LOG_FILE" 2>&1 &
pid=$!
echo "$pid" > "$PID_FILE"
sleep 1
if ! alive "$pid"; then
  echo "launch_ui: ComfyUI exited at once; last lines of $LOG_FILE:" >&2
  tail -n 20 "$LOG_FILE" >&2 || true
  rm -f "$PID_FILE"
  exit 1
fi
echo "launch_ui: ComfyUI starting on http://$LISTEN:$PORT (PID $pid, log $LOG_FILE)"
