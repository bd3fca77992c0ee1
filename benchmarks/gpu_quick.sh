#!/usr/bin/env bash
# The short device run (~4 min on an H100): #7's step-time table (LoRA fast path vs AudioCraft full fine-tune vs
# HF transformers + peft LoRA) at small b4/b16 (b16 also with the recipes' LoRA dropout 0.05) and medium b4, a CUDA
# dora run (bf16, auto memory plan), a profile of the LoRA step. gpu_check.sh is the long one. Results in $OUT;
# DEADLINE (s, default 220) bounds the run.
set -uo pipefail
OUT="${OUT:-/tmp/gpu_out}"; mkdir -p "$OUT"
DEADLINE="${DEADLINE:-220}"; START=$SECONDS
left() { local l=$(( DEADLINE - (SECONDS - START) )); [ "$1" -lt "$l" ] && echo "$1" || echo $(( l > 5 ? l : 5 )); }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 AUDIOCRAFT_LORA_CACHE=/tmp/alcache AUDIOCRAFT_LORA_DORA_DIR=/tmp/alxps
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PWD" || exit 1
fi
export PYTHONPATH="${PYTHONPATH:-}:$PWD"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
quiet() { grep -v -i "xformers\|warn\|transformers\]\|PyTorch 2\|Python  3\|Memory-efficient\|gpuGetDeviceCount"; }
echo "== dora run lora_debug on cuda, bf16 autocast [$((SECONDS-START)) s]"
GEN=""; command -v ffmpeg >/dev/null || GEN="generate.lm.unprompted_samples=false generate.lm.prompted_samples=false"
timeout $(left 40) python3 -m dora -P audiocraft_lora run solver=musicgen/lora_debug device=cuda autocast=true \
  autocast_dtype=bfloat16 dataset.num_workers=0 $GEN > "$OUT/cuda_dora.log" 2>&1
echo "dora rc=$?"; grep -E "Summary|speed settings|Estimated peak|Activation checkpointing|Could not estimate|Error|error" \
  "$OUT/cuda_dora.log" | tail -8
for args in "--scale small --batch 4 --cases full,lora_plain,lora_fast_ac,lora_fast,hf_lora" \
            "--scale small --batch 16 --cases full,lora_fast,hf_lora" \
            "--scale small --batch 16 --cases lora_fast,hf_lora --lora-dropout 0.05" \
            "--scale medium --batch 4 --cases full,lora_fast,hf_lora"; do
  name=$(echo $args | tr -d ' -' | tr ',' '_')
  echo "-- $args [$((SECONDS-START)) s]"
  timeout $(left 45) python3 benchmarks/step_time.py $args --frames 1500 --device cuda --dtype bfloat16 --warmup 3 \
    --iters 5 --json "$OUT/bench_$name.json" 2>&1 | quiet
done
echo "== profile of the LoRA step, small b4 [$((SECONDS-START)) s]"
timeout $(left 30) python3 benchmarks/profile_step.py --scale small --batch 4 --frames 1500 --device cuda \
  --cases lora_fast --no-shapes --print-top 14 --out "$OUT/prof" 2>&1 | quiet
echo "== done [$((SECONDS-START)) s]"
