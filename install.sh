#!/usr/bin/env bash
# Install audiocraft-lora and everything its tests need. Idempotent: re-running only checks.
#   bash install.sh                          # into ./.venv (created if missing)
#   AUDIOCRAFT_LORA_NO_VENV=1 bash install.sh  # into the current Python (e.g. a GPU image with torch 2.11)
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
if [ -z "${AUDIOCRAFT_LORA_NO_VENV:-}" ]; then
  VENV="${VENV:-.venv}"
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  PY="$VENV/bin/python"
fi
PIP=("$PY" -m pip install --disable-pip-version-check -q)

# AudioCraft's audio_write shells out to the ffmpeg binary.
if ! command -v ffmpeg >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq ffmpeg >/dev/null
  else
    echo "install.sh: please install the ffmpeg binary (e.g. conda install ffmpeg, brew install ffmpeg)" >&2; exit 1
  fi
fi

# A torch stack that matches itself (torchaudio == torch's version; xformers built for it), then the rest pinned
# to the versions the tests run with, then audiocraft without its impossible pins (torch==2.1.0, av==11, ...).
"${PIP[@]}" -c constraints.txt torch torchaudio xformers
"${PIP[@]}" -c constraints.txt -e '.[test]'
"${PIP[@]}" --no-deps audiocraft==1.3.0
"$PY" -c "import audiocraft, peft, torch, torchaudio, dora, flashy; print('audiocraft-lora: installed with torch',
 torch.__version__, '| audiocraft', audiocraft.__version__, '| peft', peft.__version__)" 2>&1 | grep -v -i xformers || true
