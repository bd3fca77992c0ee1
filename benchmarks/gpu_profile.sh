#!/usr/bin/env bash
# Short device run that says where a LoRA step's time goes on a GPU (profile_step.py, lora_gemms.py), then the CUDA
# checks. Results land in $OUT; DEADLINE (s, default 185) cuts every part to what is left, earlier parts first.
set -uo pipefail
DEADLINE="${DEADLINE:-185}"
source "$(dirname "$0")/gpu_env.sh"
echo "== profile small b4 [$((SECONDS-START)) s]"
timeout $(left 45) python3 benchmarks/profile_step.py --scale small --batch 4 --frames 1500 --device cuda \
  --cases full,lora_fast,lora_plain --print-top 10 2>&1 | quiet
timeout $(left 40) python3 benchmarks/profile_step.py --scale small --batch 4 --frames 1500 --device cuda \
  --cases lora_fast --shapes --print-top 0 --out "$OUT/prof_shapes" 2>&1 | quiet
echo "== LoRA products alone [$((SECONDS-START)) s]"
timeout $(left 25) python3 benchmarks/lora_gemms.py --dim 1024 --tokens 6000,24000 2>&1 | quiet
timeout $(left 15) python3 benchmarks/lora_gemms.py --dim 1536 --tokens 6000 2>&1 | quiet
echo "== profile medium b4 [$((SECONDS-START)) s]"
timeout $(left 45) python3 benchmarks/profile_step.py --scale medium --batch 4 --frames 1500 --device cuda \
  --cases full,lora_fast --print-top 8 2>&1 | quiet
echo "== compiled layers, small b4 [$((SECONDS-START)) s]"
timeout $(left 40) python3 benchmarks/step_time.py --scale small --batch 4 --frames 1500 --device cuda \
  --cases lora_fast,lora_compile --warmup 3 --iters 5 2>&1 | quiet
echo "== CUDA checks [$((SECONDS-START)) s]"
timeout $(left 40) python3 benchmarks/cuda_checks.py > "$OUT/cuda_checks.txt" 2>&1; echo "rc=$?"
grep -v -i "xformers\|warn" "$OUT/cuda_checks.txt" | tail -12
echo "== done [$((SECONDS-START)) s]"
