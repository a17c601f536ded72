#!/usr/bin/env bash
# The GPU check, in one command, on a machine with a CUDA GPU (about 6-8 minutes
# on one H100/H200): tests/gpu (a real CUDA out-of-memory forcing a step down),
# bench.overhead on the GPU in bf16 (MiniLM and BERT-base shapes), bench.ceiling,
# and Whisper batched vs one file with whisper-small shapes. Writes one JSON.
#
#   scripts/gpu-check.sh [OUT.json]        (default gpu-figures.json)
#
# Installs into ./.venv like scripts/install.sh, but with a CUDA build of torch
# (TORCH_SPEC, default torch==2.13.0 from the CUDA index pip is configured with).
# Starts a throwaway Postgres and Redis when none answers on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-figures.json}

nvidia-smi -L || { echo "no NVIDIA GPU visible (nvidia-smi -L failed)" >&2; exit 2; }

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0} ./scripts/install.sh
fi

if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
  if [ -d /etc/postgresql ]; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
    for _ in $(seq 30); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 1; done
  else
    echo "no Postgres on 127.0.0.1:5432: set TEST_ADMIN_DATABASE_URL to one" >&2
  fi
fi
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && command -v redis-server >/dev/null; then
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  for _ in $(seq 30); do redis-cli -h 127.0.0.1 ping >/dev/null 2>&1 && break; sleep 1; done
fi

exec .venv/bin/python -m bench.gpu --out "$OUT"
