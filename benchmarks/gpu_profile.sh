#!/usr/bin/env bash
# Short device run that says where a LoRA step's time goes on a GPU (profile_step.py, lora_gemms.py), then the CUDA
# checks: the fast path as the solver runs it next to `lora.compile=inductor` (one graph per layer since session 6;
# it paid at musicgen-medium batch 4, not at small: why?). Results land in $OUT (top kernels per case in
# $OUT/prof); DEADLINE (s, default 200) cuts every part to what is left, earlier parts first.
set -uo pipefail
DEADLINE="${DEADLINE:-200}"
source "$(dirname "$0")/gpu_env.sh"
echo "== profile small b16: fast path vs compiled layers [$((SECONDS-START)) s]"
timeout $(left 70) python3 benchmarks/profile_step.py --scale small --batch 16 --frames 1500 --device cuda \
  --cases lora_fast,lora_compile --print-top 15 --out "$OUT/prof" 2>&1 | quiet
echo "== profile small b4: full fine-tune, fast path, compiled layers [$((SECONDS-START)) s]"
timeout $(left 60) python3 benchmarks/profile_step.py --scale small --batch 4 --frames 1500 --device cuda \
  --cases full,lora_fast,lora_compile --print-top 8 --out "$OUT/prof" 2>&1 | quiet
echo "== LoRA products alone and other ways to compute them [$((SECONDS-START)) s]"
timeout $(left 25) python3 benchmarks/lora_gemms.py --dim 1024 --tokens 6000,24000 --variants 2>&1 | quiet
echo "== CUDA checks [$((SECONDS-START)) s]"
timeout $(left 40) python3 benchmarks/cuda_checks.py > "$OUT/cuda_checks.txt" 2>&1; echo "rc=$?"
grep -v -i "xformers\|warn" "$OUT/cuda_checks.txt" | tail -12
echo "== done [$((SECONDS-START)) s]"
