#!/usr/bin/env bash
# The short device run (~5.5 min on an H100), most wanted first: CUDA exactness checks (incl. the adapters cast once
# per step and float32-out gradient GEMMs, adapter_casts), #7's step-time table (LoRA fast path vs AudioCraft full
# fine-tune vs HF transformers + peft LoRA; `launches` column: kernels per step) at small b16 and b4 and medium b4,
# `lora_compile_ro` (torch.compile mode='reduce-overhead': CUDA graphs per layer, the lever for the launch-bound b4
# step) at small b4, `lora_graphed` (each eager layer replayed as CUDA graphs: graphed_layers.py; its loss in the
# json should equal lora_fast's) at small and medium b4, `lora_fast_keep` (lora.keep_merged_weights) at small b4,
# `lora_fast_f32attn` (lora.attention_in_autocast_dtype=false); `lora_fast_keep` is what the solver runs on a GPU
# (keep_merged_weights=auto keeps them where they fit; step_time runs no memory plan, so lora_fast has them off)
# beside `lora_fast` at small b16 (medium b4 drops it for time), a CUDA dora run
# (bf16, auto memory plan) and again with `lora.compile_mode=reduce-overhead` (the solver's CUDA graphs: does it
# train?), then `lora_fast_concat` with one part of fast_lora.CONCAT_RANK_GEMMS on per line, then the graphs run with
# selective checkpointing (which torch reports failing under CUDA graph trees). Batch-4
# steps are host-bound and vary +-30% run to run: their median is taken over 15 steps.
# gpu_check.sh is the long one. Results in $OUT (the tables in the log); DEADLINE (s, default 340) bounds the run.
set -uo pipefail
DEADLINE="${DEADLINE:-340}"
source "$(dirname "$0")/gpu_env.sh"
echo "== CUDA checks [$((SECONDS-START)) s]"
timeout $(left 40) python3 benchmarks/cuda_checks.py > "$OUT/cuda_checks.txt" 2>&1; echo "rc=$?"
quiet < "$OUT/cuda_checks.txt" | tail -19
run_case() {
  echo "-- $* [$((SECONDS-START)) s]"
  timeout $(left 80) python3 benchmarks/step_time.py --frames 1500 --device cuda --dtype bfloat16 --warmup 3 \
    --iters 5 "$@" 2>&1 | quiet  # (an option given here wins over these defaults)
}
for args in "--scale small --batch 16 --cases full,lora_fast_keep,lora_fast,lora_fast_f32attn,hf_lora" \
            "--scale small --batch 4 --cases full,lora_fast,lora_fast_keep,lora_graphed,lora_compile_ro,hf_lora \
             --iters 15 --json $OUT/small_b4.json" \
            "--scale medium --batch 4 --cases full,lora_fast_keep,lora_fast,lora_graphed,hf_lora \
             --iters 15 --json $OUT/medium_b4.json"; do
  run_case $args
done
echo "== dora run lora_debug on cuda, bf16 autocast [$((SECONDS-START)) s]"
dora_on_cuda 40
echo "== dora run lora_debug on cuda, lora.compile=inductor lora.compile_mode=reduce-overhead [$((SECONDS-START)) s]"
dora_on_cuda 90 cuda_dora_graphs lora.compile=inductor lora.compile_mode=reduce-overhead
for args in "--scale small --batch 16 --cases lora_fast,lora_fast_concat --concat-rank-gemms forward" \
            "--scale small --batch 16 --cases lora_fast,lora_fast_concat --concat-rank-gemms backward" \
            "--scale medium --batch 4 --cases lora_fast,lora_fast_concat --concat-rank-gemms forward"; do
  run_case $args
done
echo "== the same with lora.activation_checkpointing=selective (CUDA graphs on checkpointed layers) [$((SECONDS-START)) s]"
dora_on_cuda 90 cuda_dora_graphs_sac lora.compile=inductor lora.compile_mode=reduce-overhead \
  lora.activation_checkpointing=selective
echo "== done [$((SECONDS-START)) s]"
