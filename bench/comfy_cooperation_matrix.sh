#!/usr/bin/env bash
# The before/after matrix of bench/comfy_cooperation.py on one GPU, one fresh process per configuration:
# the pack's previous free_memory hook ("legacy") against the current one ("new"), on a card capped at
# CAP GiB (default 80), with a native ComfyUI model that fits beside ours (FIT, 12 GiB) and one that does not
# (TIGHT, 30 GiB).
#
#   bash bench/comfy_cooperation_matrix.sh OUT_DIR VERSION_LABEL COMFYUI_DIR [dyn|nodyn|plain ...]
#
#   dyn    ComfyUI's defaults (0.33: dynamic VRAM on), fit and tight
#   nodyn  --disable-dynamic-vram (0.33), fit only
#   plain  ComfyUI's defaults for a version without dynamic VRAM (0.3.64), fit only
#   tight  ComfyUI's defaults, tight only
#   two    ComfyUI's defaults, two native models (30 + 20 GiB) beside ours on a CAP2 (100) GiB card: the second
#          fits only if ComfyUI pages the first out; the legacy hook releases ours instead
# Each configuration writes OUT_DIR/<label>_<config>.json and .log (the log in LOG_DIR if set); a configuration that fails or runs past
# PER_RUN_S (default 120) is reported and the next one runs.
set -u
out=$1 label=$2 comfy=$3
shift 3
cap=${CAP:-80} fit=${FIT:-12} tight=${TIGHT:-30} per_run=${PER_RUN_S:-120}
# Our model resident on the card (memory mode gpu: 53.7 GiB of weights), eager: compiling is beside the point
# here and would add its first-call time to every fresh process.
export QWEN_COMPILE=0
logs=${LOG_DIR:-$out}  # the logs beside the results unless LOG_DIR says otherwise
mkdir -p "$out" "$logs"

one() {  # name, then the script's arguments
  local name=$1
  shift
  local t0=$SECONDS
  timeout "$per_run" python3 bench/comfy_cooperation.py --comfyui-dir "$comfy" --vram-cap-gib "$cap" --native blob \
    --memory-mode gpu --json "$out/${label}_$name.json" "$@" >"$logs/${label}_$name.log" 2>&1
  echo "$label $name rc=$? $((SECONDS - t0)) s: $(tail -n 1 "$logs/${label}_$name.log" | cut -c1-300)"
}

for mode in "$@"; do
  case $mode in
    dyn | plain)
      for hooks in legacy new; do one "${mode}_fit_$hooks" --hooks "$hooks" --native-gib "$fit"; done
      if [ "$mode" = dyn ]; then
        for hooks in legacy new; do one "${mode}_tight_$hooks" --hooks "$hooks" --native-gib "$tight"; done
      fi
      ;;
    tight)
      for hooks in legacy new; do one "tight_$hooks" --hooks "$hooks" --native-gib "$tight"; done
      ;;
    two)  # two native models on a CAP2 card: where the hooks should differ under dynamic VRAM
      for hooks in legacy new; do
        one "two_$hooks" --hooks "$hooks" --vram-cap-gib "${CAP2:-100}" --native-gib 30 --second-native-gib 20
      done
      ;;
    nodyn)
      for hooks in legacy new; do
        one "nodyn_fit_$hooks" --hooks "$hooks" --native-gib "$fit" --comfy-args=--disable-dynamic-vram
      done
      ;;
    *) echo "unknown mode '$mode' (dyn, nodyn, plain, tight or two)" >&2; exit 2 ;;
  esac
done
