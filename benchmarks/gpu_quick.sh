#!/usr/bin/env bash
# The short device run, most wanted first (~5.5 min on an H100; on an H200, with medium b16, ~9: DEADLINE=540):
# CUDA exactness checks (incl. the CUDA graphs of the layers against eager steps, `graphs_on_cuda`, and the solver
# fitting a batch with every speed default), then #7's step-time table (LoRA vs AudioCraft full fine-tune vs HF
# transformers + peft LoRA; `launches`: kernels per step; `resv GiB`: torch.cuda.max_memory_reserved, which counts
# what the graphs' pool holds) at small b4, small b16, medium b16 (only on a GPU with more than 120 GB: an H200),
# small b16 x 15 s with LoRA dropout 0.05 (the lora_small recipe as users run it) and medium b4: `lora_graphed` /
# `lora_graphed_keep` are the solver's GPU defaults (lora.graph_layers=auto; the merged weights kept where they fit
# and LoRA dropout is 0), `lora_fast_keep` the same eagerly; a CUDA dora run with the defaults (its log says what was
# captured and replayed), then the parts of fast_lora.CONCAT_RANK_GEMMS under the graphs (small b16 is GPU-bound at
# 0.75x full fine-tuning: what's left).
# Eager batch-4 steps are host-bound and vary +-30% run to run: their median is taken over 15 steps. gpu_check.sh is
# the long one. Results in $OUT (the tables in the log); DEADLINE (s, default 340) bounds the run. Session 13 added
# the mixed-text-length row (small b4; ~40 s); session 14 the layer norms alone (benchmarks/norms.py, ~15 s),
# `lora_graphed_unfused` at small b16 (the graphed step with AudioCraft's norms: what lora.fused_norms saves on the
# GPU) and `lora_fast_keep_unfused` at small b4 (what its custom ops cost the host in an eager step); session 15
# `lora_graphed_sac` at small and medium b16 (selective checkpointing inside the graphs, which since session 15 are
# one graph each way for the whole layer stack: #7's memory target, 0.55x of full fine-tuning, at the graphs' speed)
# and `lora_graphed_mixed` at medium b16 (the 40 GB plan, half whole layers + half selective, inside the graphs);
# session 16 `lora_graphed_sac` in the recipe row (LoRA dropout 0.05: the captures keep what dropout drew; estimated
# 15.8 GiB there against 10.1 eager selective and 20.1 full fine-tuning, `step_time.py --count-only`); session 17
# the LoRA dropout kernels (lora.dropout_kernel, the default on CUDA): cuda_checks' "LoRA dropout kernels on CUDA"
# line (their check, keep rate, one linear2 timed against torch's dropout) and the recipe row's `_tdrop` cases
# (torch's dropout, as before): modelled 0.92x their time at small b16 x 30 s eager, est. 10.0 GiB for
# lora_graphed_sac at 15 s where torch's dropout keeps 15.8.
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
# the recipe row first (small b16 x 15 s, LoRA dropout 0.05): the dropout kernels (no `_tdrop`) against torch's dropout
LIMIT=120 run_case --scale small --batch 16 --frames 750 --lora-dropout 0.05 --iters 10 --json $OUT/recipe.json \
  --cases full,lora_fast,lora_fast_tdrop,lora_graphed,lora_graphed_tdrop,lora_graphed_sac,lora_graphed_sac_tdrop,hf_lora
run_case --scale small --batch 16 --json $OUT/small_b16.json \
  --cases full,lora_fast_keep,lora_graphed,lora_graphed_keep,lora_graphed_unfused,lora_graphed_sac,hf_lora
echo "== dora run lora_debug on cuda, bf16 autocast, speed defaults (CUDA graphs of the layers) [$((SECONDS-START)) s]"
dora_on_cuda 40
run_case --scale small --batch 4 --cases full,lora_fast_keep,lora_fast_keep_unfused,lora_graphed,lora_graphed_keep,hf_lora \
  --iters 15 --json $OUT/small_b4.json
# Real batches change text length nearly every step (benchmarks/text_lengths.py: 24 steps of 80 trap clips at b4,
# 14 lengths): the mean step of the graphs with exact lengths (lora_graphed_exact: 8 captured, the rest eager and
# recomputed) and padded to multiples of 32 (lora_graphed, the default: 5 signatures), next to eager
LIMIT=120 run_case --scale small --batch 4 --cases lora_fast_keep,lora_graphed_exact,lora_graphed --iters 24 \
  --text-lengths 67,84,81,1,62,122,1,160,73,1,80,1,1,1,94,101,64,1,1,91,81,1,64,159
if [ "$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)" -gt 120000 ]; then
  # (an H200: AudioCraft's full fine-tune of medium at batch 16 x 30 s needs ~130 GiB; an H100 runs none of it)
  # (lora_graphed_concat: every CONCAT_RANK_GEMMS part; the rank-r GEMMs are ~6% of the modelled LoRA step here)
  LIMIT=200 run_case --scale medium --batch 16 --json $OUT/medium_b16.json \
    --cases full,lora_fast_keep,lora_graphed_keep,lora_graphed_sac,lora_graphed_mixed,lora_graphed_concat,hf_lora
fi
for args in "--scale medium --batch 4 --cases full,lora_fast_keep,lora_graphed_keep,hf_lora --iters 15"; do
  run_case $args
done
echo "== the dora run with selective checkpointing inside the graphs (session 15; LoRA dropout: masks kept) [$((SECONDS-START)) s]"
dora_on_cuda 40 cuda_dora_selective lora.activation_checkpointing=selective
for args in "--scale small --batch 16 --cases lora_graphed,lora_graphed_concat --concat-rank-gemms forward" \
            "--scale small --batch 16 --cases lora_graphed,lora_graphed_concat --concat-rank-gemms backward" \
            "--scale small --batch 16 --cases lora_graphed,lora_graphed_concat --concat-rank-gemms forward,backward"; do
  run_case $args
done
echo "== one layer norm, AudioCraft's vs lora.fused_norms (session 14) [$((SECONDS-START)) s]"
timeout $(left 40) python3 benchmarks/norms.py 2>&1 | quiet
echo "== done [$((SECONDS-START)) s]"
