#!/usr/bin/env bash
# Short device run that says where a LoRA step's time goes on a GPU (profile_step.py, lora_gemms.py), then the CUDA
# checks. Results land in $OUT; DEADLINE (s, default 185) cuts every part to what is left, earlier parts first.
set -uo pipefail
OUT="${OUT:-/tmp/gpu_out}"; mkdir -p "$OUT"
DEADLINE="${DEADLINE:-185}"; START=$SECONDS
left() { local l=$(( DEADLINE - (SECONDS - START) )); [ "$1" -lt "$l" ] && echo "$1" || echo $(( l > 5 ? l : 5 )); }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 AUDIOCRAFT_LORA_CACHE=/tmp/alcache AUDIOCRAFT_LORA_DORA_DIR=/tmp/alxps
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PWD" || exit 1
fi
export PYTHONPATH="${PYTHONPATH:-}:$PWD"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
quiet() { grep -v -i "xformers\|warn\|transformers\]\|PyTorch 2\|Python  3\|Memory-efficient\|gpuGetDeviceCount"; }
echo "== profile small b4 [$((SECONDS-START)) s]"
timeout $(left 45) python3 benchmarks/profile_step.py --scale small --batch 4 --frames 1500 --device cuda \
  --cases full,lora_fast,lora_plain --print-top 10 --out "$OUT/prof" 2>&1 | quiet
echo "== LoRA products alone [$((SECONDS-START)) s]"
timeout $(left 25) python3 benchmarks/lora_gemms.py --dim 1024 --tokens 6000,24000 2>&1 | quiet
timeout $(left 15) python3 benchmarks/lora_gemms.py --dim 1536 --tokens 6000 2>&1 | quiet
echo "== profile medium b4 [$((SECONDS-START)) s]"
timeout $(left 45) python3 benchmarks/profile_step.py --scale medium --batch 4 --frames 1500 --device cuda \
  --cases full,lora_fast --print-top 8 --out "$OUT/prof" 2>&1 | quiet
echo "== compiled layers, small b4 [$((SECONDS-START)) s]"
timeout $(left 40) python3 benchmarks/step_time.py --scale small --batch 4 --frames 1500 --device cuda \
  --cases lora_fast,lora_compile --warmup 3 --iters 5 2>&1 | quiet
echo "== CUDA checks [$((SECONDS-START)) s]"
timeout $(left 40) python3 benchmarks/cuda_checks.py > "$OUT/cuda_checks.txt" 2>&1; echo "rc=$?"
grep -v -i "xformers\|warn" "$OUT/cuda_checks.txt" | tail -12
echo "== done [$((SECONDS-START)) s]"
