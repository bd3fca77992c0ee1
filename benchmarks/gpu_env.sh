# Sourced by gpu_check.sh / gpu_quick.sh / gpu_profile.sh: wheels from .whl/ (see README.md), environment, $OUT, and
# `left N` = N seconds or what is left of $DEADLINE (counted from here), so each part is cut to fit the run.
OUT="${OUT:-/tmp/gpu_out}"; mkdir -p "$OUT"
START=$SECONDS
left() { local l=$(( DEADLINE - (SECONDS - START) )); [ "$1" -lt "$l" ] && echo "$1" || echo $(( l > 5 ? l : 5 )); }
quiet() { grep -v -i "xformers\|warn\|transformers\]\|PyTorch 2\|Python  3\|Memory-efficient\|gpuGetDeviceCount"; }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 AUDIOCRAFT_LORA_CACHE=/tmp/alcache AUDIOCRAFT_LORA_DORA_DIR=/tmp/alxps
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/triton_cache}"  # (lora.fused_norms compiles its kernels there)
# (make_wheels.sh splits the wheels into .whl and .whl2, each under the carry limit: a first call carries .whl2 and
# installs it, the next carries .whl; /tmp/site stays while the machine is warm)
for wheels in .whl .whl2; do
  if [ -d "$wheels" ] && ls "$wheels"/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$wheels"/*.whl || exit 1
  fi
done
[ -d /tmp/site ] && export PYTHONPATH="/tmp/site:$PWD"
export PYTHONPATH="${PYTHONPATH:-}:$PWD"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

dora_on_cuda() {  # `dora_on_cuda SECONDS [LOG [OVERRIDES...]]` (SECONDS: its timeout): the demo recipe trained on
  local seconds="$1" log="$OUT/${2:-cuda_dora}.log" gen=""  # the GPU, bf16 autocast (bf16 frozen base, auto plan)
  shift; shift || true
  command -v ffmpeg >/dev/null || gen="generate.lm.unprompted_samples=false generate.lm.prompted_samples=false"
  # (--clear: speed keys are outside the XP signature, so without it a second run resumes the first, finished XP)
  timeout $(left "$seconds") python3 -m dora -P audiocraft_lora run --clear solver=musicgen/lora_debug device=cuda \
    autocast=true autocast_dtype=bfloat16 dataset.num_workers=0 $gen "$@" > "$log" 2>&1
  echo "dora rc=$?"
  grep -E "Summary|exported|speed settings|Estimated peak|Activation checkpointing|Could not estimate|Error|error|CUDA graph|graphed step" \
    "$log" | tail -16
}
