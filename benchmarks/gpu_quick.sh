#!/usr/bin/env bash
# The short device run (~5.5 min on an H100): CUDA exactness checks, a CUDA dora run (bf16, auto memory plan), and
# #7's step-time table (LoRA fast path vs AudioCraft full fine-tune vs HF transformers + peft LoRA) at small b16 (also
# with the recipes' LoRA dropout 0.05) and medium b4; `lora_fast_f32attn` (AudioCraft's float32 round trip around
# attention, lora.attention_in_autocast_dtype=false) beside `lora_fast`, and `lora_fast_concat` with one part of
# fast_lora.CONCAT_RANK_GEMMS on per line (all three together: faster at medium b4, slower at small; which part is
# which is not known yet). gpu_check.sh is the long one. Results in $OUT (the tables in the log); DEADLINE (s, default
# 340) bounds the run.
set -uo pipefail
DEADLINE="${DEADLINE:-340}"
source "$(dirname "$0")/gpu_env.sh"
echo "== CUDA checks [$((SECONDS-START)) s]"
timeout $(left 40) python3 benchmarks/cuda_checks.py > "$OUT/cuda_checks.txt" 2>&1; echo "rc=$?"
quiet < "$OUT/cuda_checks.txt" | tail -10
echo "== dora run lora_debug on cuda, bf16 autocast [$((SECONDS-START)) s]"
dora_on_cuda 40
for args in "--scale small --batch 16 --cases full,lora_fast,lora_fast_f32attn,hf_lora" \
            "--scale small --batch 16 --cases lora_fast,lora_fast_concat --concat-rank-gemms forward" \
            "--scale small --batch 16 --cases lora_fast,lora_fast_concat --concat-rank-gemms backward" \
            "--scale small --batch 16 --cases lora_fast,lora_fast_concat,hf_lora --lora-dropout 0.05 --concat-rank-gemms dropout_forward" \
            "--scale medium --batch 4 --cases full,lora_fast,lora_fast_f32attn,lora_fast_concat,hf_lora --concat-rank-gemms forward" \
            "--scale medium --batch 4 --cases lora_fast,lora_fast_concat --concat-rank-gemms backward"; do
  echo "-- $args [$((SECONDS-START)) s]"
  timeout $(left 60) python3 benchmarks/step_time.py $args --frames 1500 --device cuda --dtype bfloat16 --warmup 3 \
    --iters 5 2>&1 | quiet
done
echo "== done [$((SECONDS-START)) s]"
