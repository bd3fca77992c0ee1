#!/usr/bin/env bash
# The short follow-up (~2.5 min on an H100, after gpu_env.sh has installed .whl2 on the warm machine): each graphed
# case's memory in a process of its own (`resv GiB` at small b16 x 30 s, no case before it to leave a pool reserved),
# the recipe row's selective graphs with the dropout kernels against torch's dropout, and the solver's loss against
# AudioCraft's on one forward (cuda_checks.py loss).
#   run(command="DEADLINE=150 OUT=$OUT bash benchmarks/gpu_memory.sh 2>&1 | tee $OUT/log", carry=[".whl"], timeout_s=170)
set -uo pipefail
DEADLINE="${DEADLINE:-150}"
source "$(dirname "$0")/gpu_env.sh"
echo "== the loss on one forward [$((SECONDS-START)) s]"
timeout $(left 40) python3 benchmarks/cuda_checks.py loss 2>&1 | quiet | tail -4
run_case() {
  timeout $(left ${LIMIT:-40}) python3 benchmarks/step_time.py --device cuda --dtype bfloat16 --warmup 3 --iters 5 "$@" 2>&1 \
    | quiet | grep -v "^ratios\|/\|sync_debug"
}
echo "== small b16 x 30 s, one process a case [$((SECONDS-START)) s]"
for case in full lora_graphed lora_graphed_sac; do
  run_case --scale small --batch 16 --frames 1500 --cases $case --json "$OUT/small_b16_$case.json" | grep "^$case "
done
echo "== recipe row (small b16 x 15 s, LoRA dropout 0.05): selective graphs, dropout kernels vs torch's [$((SECONDS-START)) s]"
LIMIT=50 run_case --scale small --batch 16 --frames 750 --lora-dropout 0.05 --cases lora_graphed_sac,lora_graphed_sac_tdrop
echo "== done [$((SECONDS-START)) s]"
