#!/usr/bin/env bash
# What session 20 left for the next device session, most wanted first (~5 min on an H100: DEADLINE=290,
# timeout_s=310, after a first call that installs the wheels: gpu_env.sh with .whl2, as for gpu_quick.sh):
# 1. cuda_checks.py's `loss` check, now also against AudioCraft's loss on float32 logits (ours should match it up to
#    the sums' order; AudioCraft's under CUDA autocast rounds its log-probabilities to bf16: 1e-4 of the loss);
# 2. the solver end to end at MusicGen's shapes (random weights, synthetic clips: solver_run.py): seconds per step with
#    everything a step does (data loading with 4 workers, EnCodec's encode at lora.encode_chunk=auto, the LM step in
#    the layers' CUDA graphs), the plans `auto` took, and the GPU memory at the epoch's peak against what the memory
#    plan counted (gpu_peak.py): the first check of the encode planned beside the graphs;
# 3. medium b16's 40 GB plan (half whole + half selective inside the graphs) alone in its process: session 20's run
#    reserved 15% over the estimate, after other cases in the same process.
# Results in $OUT (solver_*.log, the tables in the output).
set -uo pipefail
DEADLINE="${DEADLINE:-290}"
source "$(dirname "$0")/gpu_env.sh"
echo "== cuda_checks.py loss [$((SECONDS-START)) s]"
timeout $(left 60) python3 benchmarks/cuda_checks.py loss 2>&1 | quiet | tail -4
run() {
  local name="$1"; shift
  echo "-- solver_run.py $* [$((SECONDS-START)) s]"
  timeout $(left 100) python3 benchmarks/solver_run.py "$@" --steps 10 --out /tmp/solver_run_$name 2>&1 | quiet
  cp /tmp/solver_run_$name/solver_run.log "$OUT/solver_$name.log" 2>/dev/null
}
run small_b16_30s --scale small --batch 16 --seconds 30   # #7's shape: the encode (18 GiB for the whole batch) beside the step
run small_b16_15s --scale small --batch 16 --seconds 15   # the recipe's segment
echo "-- medium b16, the 40 GB plan alone [$((SECONDS-START)) s]"
timeout $(left 80) python3 benchmarks/step_time.py --scale medium --batch 16 --frames 1500 --device cuda \
  --dtype bfloat16 --warmup 3 --iters 5 --cases lora_graphed_mixed 2>&1 | quiet
run medium_b8_15s --scale medium --batch 8 --seconds 15   # lora_medium's recipe shape (its random base takes a while)
echo "== done [$((SECONDS-START)) s]"
