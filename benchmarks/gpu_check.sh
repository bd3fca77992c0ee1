#!/usr/bin/env bash
# One prepared device run (CUDA checks + GPU benchmark), for a session lent a GPU machine.
# Needs the project's pure-python deps as wheels in .whl/ (see benchmarks/README.md). Results land in $OUT.
# DEADLINE (seconds, default 580): every part's timeout is cut to what is left of it, so the run ends in time and the
# parts that come first (checks, then the benchmark lines in order of what #7 needs) are the ones that finish.
set -uo pipefail
DEADLINE="${DEADLINE:-580}"
source "$(dirname "$0")/gpu_env.sh"
python3 -c "import torch, audiocraft, peft; print('torch', torch.__version__, 'peft', peft.__version__)" 2>&1 | tail -1

echo "== CUDA check: zero-init LoRA == base logits, fast path == plain path, adapter-only bf16 steps [$((SECONDS-START)) s]"
timeout $(left 75) python3 benchmarks/cuda_checks.py > "$OUT/cuda_checks.txt" 2>&1; echo "rc=$?"
quiet < "$OUT/cuda_checks.txt" | tail -14

echo "== CUDA check: dora run lora_debug on cuda with bf16 autocast (auto memory plan on CUDA) [$((SECONDS-START)) s]"
dora_on_cuda 45

echo "== LoRA's rank-r products alone and other ways to compute them (small, batch 16) [$((SECONDS-START)) s]"
timeout $(left 30) python3 benchmarks/lora_gemms.py --dim 1024 --tokens 24000 --variants 2>&1 | quiet

echo "== GPU benchmark (full fine-tune, LoRA plain/fast/selective/checkpointed/compiled, HF + peft), one process per shape"
# about 1-2 min per line on an H100/H200; medium batch 16 is the "fits in 40 GB with checkpointing" check
# --estimate: memory_plan's estimate (what lora.activation_checkpointing=auto plans with) next to the measured peak
for args in "--scale small --batch 16 --cases full,lora_plain,lora_fast,lora_fast_ac,lora_sac,lora_mixed,hf_lora,encode" \
            "--scale small --batch 4 --cases full,lora_plain,lora_fast,lora_sac,hf_lora --estimate" \
            "--scale medium --batch 4 --cases full,lora_plain,lora_fast,hf_lora" \
            "--scale medium --batch 16 --cases lora_mixed,lora_ckpt,lora_sac --estimate"; do
  name=$(echo $args | tr -d ' -' | tr ',' '_')
  limit=100; case "$args" in *"--scale small --batch 16"*) limit=120;; *"--batch 16 --cases lora_mixed"*) limit=115;; esac
  echo "-- $args [$((SECONDS-START)) s]"
  timeout $(left $limit) python3 benchmarks/step_time.py $args --frames 1500 --device cuda --dtype bfloat16 --warmup 3 \
    --iters 5 --json "$OUT/bench_$name.json" 2>&1 | quiet | tail -60
done
echo "== done [$((SECONDS-START)) s]"
