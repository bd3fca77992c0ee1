#!/usr/bin/env bash
# The short device run, most wanted first (~8.5 min on an H100: DEADLINE=520, timeout_s=540; see benchmarks/README.md,
# "On a GPU machine"): the CUDA exactness checks (cuda_checks.py: fast path, loss, checkpointing, dropout kernels,
# the layers' CUDA graphs vs eager, the solver with every default), medium b16 (#7's 40 GB plan, half whole + half
# selective, and `selective`, both inside the graphs; on an H200 also AudioCraft's full fine-tune and HF + peft,
# which an H100 can't hold), the recipe row (small b16 x 15 s, LoRA dropout 0.05: the dropout kernels against torch's
# dropout, `_tdrop`; their backward in one kernel, `_fdrop`), small b16 (#7's table), EnCodec's encode, a CUDA
# `dora run` with the defaults, small b4, the mixed text lengths, medium b4, a `dora run` with `selective`, the
# backward parts of fast_lora.CONCAT_RANK_GEMMS (forward: 1.11x slower, session 18), the layer norms alone.
# Each shape's cases run in one process; `resv GiB` (torch.cuda.max_memory_reserved, the graphs' pool included) is
# each case's own (step_time.py empties the cache before a case and subtracts what was still reserved).
# gpu_memory.sh is the short follow-up (one process per case). Session 18's results: benchmarks/README.md.
# Results in $OUT (the tables in the log; 8 files at most come back); DEADLINE (s, default 340) bounds the run.
set -uo pipefail
DEADLINE="${DEADLINE:-340}"
source "$(dirname "$0")/gpu_env.sh"
echo "== CUDA checks (150 s at most: the Triton kernels compile on a fresh machine) [$((SECONDS-START)) s]"
timeout $(left 150) python3 benchmarks/cuda_checks.py > "$OUT/cuda_checks.txt" 2>&1; echo "rc=$?"
quiet < "$OUT/cuda_checks.txt" | tail -45
run_case() {
  echo "-- $* [$((SECONDS-START)) s]"  # (LIMIT: its timeout, default 80 s)
  timeout $(left ${LIMIT:-80}) python3 benchmarks/step_time.py --frames 1500 --device cuda --dtype bfloat16 --warmup 3 \
    --iters 5 "$@" 2>&1 | quiet  # (an option given here wins over these defaults)
}
if [ "$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)" -gt 120000 ]; then
  # (an H200: AudioCraft's full fine-tune of medium at batch 16 x 30 s needs ~130 GiB)
  LIMIT=200 run_case --scale medium --batch 16 --json $OUT/medium_b16.json \
    --cases full,lora_graphed_keep,lora_graphed_sac,lora_graphed_mixed,hf_lora
else  # (an H100: the LoRA plans alone; est. 36.9 GiB with the margin for the mixed plan at rank 32, memory_plan.py, session 19)
  LIMIT=100 run_case --scale medium --batch 16 --json $OUT/medium_b16.json --cases lora_graphed_mixed,lora_graphed_sac
fi
# the recipe row (small b16 x 15 s, LoRA dropout 0.05): the dropout kernels (no `_tdrop`) against torch's dropout
# (and `_fdrop`: their backward in one kernel, dropout_kernels.FUSED_BACKWARD, off until this says it pays)
LIMIT=150 run_case --scale small --batch 16 --frames 750 --lora-dropout 0.05 --iters 10 --json $OUT/recipe.json \
  --cases full,lora_fast,lora_fast_tdrop,lora_graphed,lora_graphed_tdrop,lora_graphed_fdrop,lora_graphed_sac,lora_graphed_sac_tdrop,lora_graphed_sac_fdrop,hf_lora
run_case --scale small --batch 16 --json $OUT/small_b16.json \
  --cases full,lora_fast_keep,lora_graphed,lora_graphed_keep,lora_graphed_unfused,lora_graphed_sac,hf_lora
# EnCodec's encode of the batch, which every step without a token cache adds: float32 as the solver runs it, with
# cudnn.benchmark, under bf16 autocast (other tokens: a probe); session 6 timed it under autocast only
LIMIT=60 run_case --scale small --batch 16 --cases encode,encode_bench,encode_bf16
echo "== dora run lora_debug on cuda, bf16 autocast, speed defaults (CUDA graphs of the layers) [$((SECONDS-START)) s]"
dora_on_cuda 40
run_case --scale small --batch 4 --cases full,lora_fast_keep,lora_fast_keep_unfused,lora_graphed,lora_graphed_keep,hf_lora \
  --iters 15
# Real batches change text length nearly every step (benchmarks/text_lengths.py: 24 steps of 80 trap clips at b4,
# 14 lengths): the mean step of the graphs with exact lengths (lora_graphed_exact: 8 captured, the rest eager and
# recomputed) and padded to multiples of 32 (lora_graphed, the default: 5 signatures), next to eager
LIMIT=120 run_case --scale small --batch 4 --cases lora_fast_keep,lora_graphed_exact,lora_graphed --iters 24 \
  --text-lengths 67,84,81,1,62,122,1,160,73,1,80,1,1,1,94,101,64,1,1,91,81,1,64,159
run_case --scale medium --batch 4 --cases full,lora_fast_keep,lora_graphed_keep,hf_lora --iters 15
echo "== the dora run with selective checkpointing inside the graphs (the dropout kernels keep a seed) [$((SECONDS-START)) s]"
dora_on_cuda 40 cuda_dora_selective lora.activation_checkpointing=selective
for args in "--scale small --batch 16 --cases lora_graphed,lora_graphed_concat --concat-rank-gemms backward" \
            "--scale small --batch 16 --cases lora_graphed,lora_graphed_concat --concat-rank-gemms forward,backward"; do
  run_case $args
done
echo "== one layer norm, AudioCraft's vs lora.fused_norms (session 14) [$((SECONDS-START)) s]"
timeout $(left 40) python3 benchmarks/norms.py 2>&1 | quiet
echo "== done [$((SECONDS-START)) s]"
