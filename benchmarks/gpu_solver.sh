#!/usr/bin/env bash
# The solver end to end at MusicGen's shapes on a GPU machine (random weights, synthetic clips: solver_run.py): seconds
# per step with everything a step does (data loading with 4 workers, EnCodec's encode at lora.encode_chunk=auto, the
# LM step in the layers' CUDA graphs), the plans `auto` took, and the GPU memory at the epoch's peak against what the
# memory plan counted (gpu_peak.py). Written in session 20, not yet run: the first check of the encode's planning
# (counted on top of the graphs' pool) inside the solver. ~4 min on an H100 (DEADLINE=230, timeout_s=250), after a
# first call that installs the wheels (gpu_env.sh with .whl2, as gpu_quick.sh). Results in $OUT/solver_*.log.
set -uo pipefail
DEADLINE="${DEADLINE:-230}"
source "$(dirname "$0")/gpu_env.sh"
run() {
  local name="$1"; shift
  echo "-- solver_run.py $* [$((SECONDS-START)) s]"
  timeout $(left 110) python3 benchmarks/solver_run.py "$@" --steps 10 --out /tmp/solver_run_$name 2>&1 | quiet
  cp /tmp/solver_run_$name/solver_run.log "$OUT/solver_$name.log" 2>/dev/null
}
run small_b16_30s --scale small --batch 16 --seconds 30   # #7's shape: the encode (18 GiB for the whole batch) beside the step
run small_b16_15s --scale small --batch 16 --seconds 15   # the recipe's segment
run medium_b8_15s --scale medium --batch 8 --seconds 15   # lora_medium's recipe shape
echo "== done [$((SECONDS-START)) s]"
