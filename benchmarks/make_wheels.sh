#!/usr/bin/env bash
# Fetch, here, the wheels a GPU device run needs (the image has torch 2.11, peft, transformers, ...; not audiocraft
# and the rest of benchmarks/gpu_wheels.txt) into .whl/ (git-ignored), as Python 3.12 x86_64 wheels; packages
# published only as sources are built into pure-Python wheels here. gpu_env.sh installs them on the device:
#   bash benchmarks/make_wheels.sh
# They are ~100 MiB (av and spacy ~36 MiB each) and a carry is 64 MiB for the whole working tree, so they are split:
# .whl2 (the largest) for a first device call, .whl for the next (gpu_env.sh installs either into /tmp/site, which a
# warm machine keeps):
#   run(command="bash benchmarks/gpu_env.sh", carry=[".whl2"], timeout_s=120)
#   run(command="DEADLINE=520 OUT=$OUT bash benchmarks/gpu_quick.sh 2>&1 | tee $OUT/log", carry=[".whl"], timeout_s=540)
# (on an H200, kind="nvidia-h200" in both calls: gpu_quick.sh also runs medium b16 full fine-tuning there)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${WHL_DIR:-.whl}"
PY="${PYTHON:-.venv/bin/python}"
mkdir -p "$DEST" "${DEST}2"
mv -n "${DEST}2"/*.whl "$DEST"/ 2>/dev/null || true; rm -f "${DEST}2"/*.whl  # (an earlier split: shared out again)
for d in /.whl/ /.whl2/; do grep -qx "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64; do
  PLATFORMS+=(--platform "$p")
done
while read -r spec; do
  case "$spec" in ''|'#'*) continue ;; esac
  if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${PLATFORMS[@]}" -d "$DEST" "$spec" 2>/dev/null; then
    if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
        -d "$DEST" "$spec" 2>/dev/null; then
      "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$spec" || { echo "no wheel for $spec" >&2; exit 1; }
    fi
  fi
done < benchmarks/gpu_wheels.txt
# more than one carry holds: the wheels are shared out between $DEST and ${DEST}2, largest first into the lighter
# (each carry is 64 MiB with the ~2 MiB working tree)
mkdir -p "${DEST}2"
"$PY" - "$DEST" "${DEST}2" <<'PYEOF'
import pathlib, sys
first, second = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheels = sorted(list(first.glob('*.whl')) + list(second.glob('*.whl')), key=lambda p: -p.stat().st_size)
totals = {first: 0, second: 0}
for wheel in wheels:
    folder = min(totals, key=totals.get)
    totals[folder] += wheel.stat().st_size
    if wheel.parent != folder:
        wheel.rename(folder / wheel.name)
PYEOF
for d in "$DEST" "${DEST}2"; do
  n=$(ls "$d"/*.whl 2>/dev/null | wc -l); total=$(du -cb "$d"/*.whl 2>/dev/null | tail -1 | cut -f1)
  echo "$n wheels in $d, $(( ${total:-0} / 1048576 )) MiB"
  [ "${total:-0}" -lt $((60 * 1048576)) ] || { echo "$d is over 60 MiB: split the list" >&2; exit 1; }
done
