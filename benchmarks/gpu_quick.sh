#!/usr/bin/env bash
# The short device run (~4 min on an H100): #7's step-time table (LoRA fast path vs AudioCraft full fine-tune vs
# HF transformers + peft LoRA) at small b4/b16 (b16 also with the recipes' LoRA dropout 0.05) and medium b4, a CUDA
# dora run (bf16, auto memory plan), a profile of the LoRA step. gpu_check.sh is the long one. Results in $OUT;
# DEADLINE (s, default 220) bounds the run.
set -uo pipefail
DEADLINE="${DEADLINE:-220}"
source "$(dirname "$0")/gpu_env.sh"
echo "== dora run lora_debug on cuda, bf16 autocast [$((SECONDS-START)) s]"
dora_on_cuda 40
for args in "--scale small --batch 4 --cases full,lora_plain,lora_fast_ac,lora_fast,hf_lora" \
            "--scale small --batch 16 --cases full,lora_fast,hf_lora,encode" \
            "--scale small --batch 16 --cases lora_fast,hf_lora --lora-dropout 0.05" \
            "--scale medium --batch 4 --cases full,lora_fast,hf_lora"; do
  name=$(echo $args | tr -d ' -' | tr ',' '_')
  echo "-- $args [$((SECONDS-START)) s]"
  timeout $(left 45) python3 benchmarks/step_time.py $args --frames 1500 --device cuda --dtype bfloat16 --warmup 3 \
    --iters 5 --json "$OUT/bench_$name.json" 2>&1 | quiet
done
echo "== profile of the LoRA step, small b4 [$((SECONDS-START)) s]"
timeout $(left 30) python3 benchmarks/profile_step.py --scale small --batch 4 --frames 1500 --device cuda \
  --cases lora_fast --print-top 14 --out "$OUT/prof" 2>&1 | quiet
echo "== done [$((SECONDS-START)) s]"
