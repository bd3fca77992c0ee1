#!/usr/bin/env bash
# One prepared device run (CUDA checks + GPU benchmark), for a session lent a GPU machine.
# Needs the project's pure-python deps as wheels in .whl/ (see benchmarks/README.md). Results land in $OUT.
# DEADLINE (seconds, default 580): every part's timeout is cut to what is left of it, so the run ends in time and the
# parts that come first (checks, then the benchmark lines in order of what #7 needs) are the ones that finish.
set -uo pipefail
OUT="${OUT:-/tmp/gpu_out}"; mkdir -p "$OUT"
DEADLINE="${DEADLINE:-580}"; START=$SECONDS
left() { local l=$(( DEADLINE - (SECONDS - START) )); [ "$1" -lt "$l" ] && echo "$1" || echo $(( l > 5 ? l : 5 )); }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 AUDIOCRAFT_LORA_CACHE=/tmp/alcache AUDIOCRAFT_LORA_DORA_DIR=/tmp/alxps
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PWD" || exit 1
fi
export PYTHONPATH="${PYTHONPATH:-}:$PWD"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, audiocraft, peft; print('torch', torch.__version__, 'peft', peft.__version__)" 2>&1 | tail -1

echo "== CUDA check: zero-init LoRA == base logits, fast path == plain path, adapter-only bf16 steps [$((SECONDS-START)) s]"
timeout $(left 75) python3 benchmarks/cuda_checks.py 2>&1 | grep -v -i xformers | tail -12

echo "== CUDA check: dora run lora_debug on cuda with bf16 autocast (auto memory plan on CUDA) [$((SECONDS-START)) s]"
GEN=""; command -v ffmpeg >/dev/null || GEN="generate.lm.unprompted_samples=false generate.lm.prompted_samples=false"
timeout $(left 45) python3 -m dora -P audiocraft_lora run solver=musicgen/lora_debug device=cuda autocast=true \
  autocast_dtype=bfloat16 dataset.num_workers=0 $GEN > "$OUT/cuda_dora.log" 2>&1
echo "dora rc=$?"; grep -E "Summary|exported|speed settings|Estimated peak|Activation checkpointing|Could not estimate|Error|error" \
  "$OUT/cuda_dora.log" | tail -14

echo "== GPU benchmark (full fine-tune, LoRA plain/fast/selective/checkpointed/compiled, HF + peft), one process per shape"
# about 1-2 min per line on an H100/H200; medium batch 16 is the "fits in 40 GB with checkpointing" check
# --estimate: memory_plan's estimate (what lora.activation_checkpointing=auto plans with) next to the measured peak
for args in "--scale small --batch 16 --cases full,lora_plain,lora_fast,lora_sac,lora_mixed,lora_compile,hf_lora,encode" \
            "--scale small --batch 4 --cases full,lora_plain,lora_fast,lora_sac,hf_lora --estimate" \
            "--scale medium --batch 4 --cases full,lora_plain,lora_fast,hf_lora" \
            "--scale medium --batch 16 --cases lora_mixed,lora_ckpt,lora_sac --estimate"; do
  name=$(echo $args | tr -d ' -' | tr ',' '_')
  limit=100; case "$args" in *lora_compile*) limit=150;; *"--batch 16 --cases lora_mixed"*) limit=115;; esac
  echo "-- $args [$((SECONDS-START)) s]"
  timeout $(left $limit) python3 benchmarks/step_time.py $args --frames 1500 --device cuda --dtype bfloat16 --warmup 3 \
    --iters 5 --json "$OUT/bench_$name.json" 2>&1 | grep -v -i "xformers\|warn\|transformers\]\|PyTorch 2\|Python  3\|Memory-efficient" | tail -60
done
echo "== done [$((SECONDS-START)) s]"
