#!/usr/bin/env bash
# The short device run (~5.5 min on an H100), most wanted first: CUDA exactness checks (incl. the CUDA graphs of the
# layers against eager steps, `graphs_on_cuda`, and the solver fitting a batch with every speed default), #7's
# step-time table (LoRA vs AudioCraft full fine-tune vs HF transformers + peft LoRA; `launches`: kernels per step;
# `resv GiB`: torch.cuda.max_memory_reserved, which counts what the graphs' pool holds) at small b4, small b16 and
# medium b4: `lora_graphed` / `lora_graphed_keep` are the solver's GPU defaults (lora.graph_layers=auto; the merged
# weights kept where they fit and LoRA dropout is 0), `lora_fast_keep` the same eagerly; a CUDA dora run with the
# defaults (graphs on: its log says what was captured and replayed), then the older levers: `lora_compile_ro`
# (torch.compile mode='reduce-overhead', slower than eager in session 12), each part of fast_lora.CONCAT_RANK_GEMMS
# alone, and the solver under inductor's CUDA graphs with selective checkpointing (pytorch#154306).
# Batch-4 steps are host-bound eagerly and vary +-30% run to run: their median is taken over 15 steps.
# gpu_check.sh is the long one. Results in $OUT (the tables in the log); DEADLINE (s, default 340) bounds the run.
set -uo pipefail
DEADLINE="${DEADLINE:-340}"
source "$(dirname "$0")/gpu_env.sh"
echo "== CUDA checks [$((SECONDS-START)) s]"
timeout $(left 70) python3 benchmarks/cuda_checks.py > "$OUT/cuda_checks.txt" 2>&1; echo "rc=$?"
quiet < "$OUT/cuda_checks.txt" | tail -23
run_case() {
  echo "-- $* [$((SECONDS-START)) s]"
  timeout $(left 80) python3 benchmarks/step_time.py --frames 1500 --device cuda --dtype bfloat16 --warmup 3 \
    --iters 5 "$@" 2>&1 | quiet  # (an option given here wins over these defaults)
}
for args in "--scale small --batch 4 --cases full,lora_fast_keep,lora_graphed,lora_graphed_keep,hf_lora --iters 15 \
             --json $OUT/small_b4.json" \
            "--scale small --batch 16 --cases full,lora_fast_keep,lora_graphed,lora_graphed_keep,hf_lora \
             --json $OUT/small_b16.json" \
            "--scale medium --batch 4 --cases full,lora_fast_keep,lora_graphed_keep,hf_lora --iters 15 \
             --json $OUT/medium_b4.json"; do
  run_case $args
done
echo "== dora run lora_debug on cuda, bf16 autocast, speed defaults (CUDA graphs of the layers) [$((SECONDS-START)) s]"
dora_on_cuda 40
echo "== the same without the graphs [$((SECONDS-START)) s]"
dora_on_cuda 40 cuda_dora_eager lora.graph_layers=false
for args in "--scale small --batch 4 --cases lora_fast,lora_compile_ro --iters 15" \
            "--scale small --batch 16 --cases lora_fast,lora_fast_concat --concat-rank-gemms forward" \
            "--scale small --batch 16 --cases lora_fast,lora_fast_concat --concat-rank-gemms backward"; do
  run_case $args
done
echo "== lora.compile=inductor lora.compile_mode=reduce-overhead, selective checkpointing [$((SECONDS-START)) s]"
dora_on_cuda 90 cuda_dora_graphs_sac lora.compile=inductor lora.compile_mode=reduce-overhead \
  lora.activation_checkpointing=selective
echo "== done [$((SECONDS-START)) s]"
