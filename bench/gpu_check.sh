#!/usr/bin/env bash
# Train the tiny (~0.14M) and small (~25M parameter) LM students on CPU and on CUDA for a fixed number
# of steps and print the speed-up. Under 3 minutes on one GPU machine. No downloads.
#   bench/gpu_check.sh            (from anywhere, with kdgate's dependencies installed)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python3}"
"$PY" - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY
PYTHONPATH=. timeout 300 "$PY" -m cli bench gpu-check --sizes "${SIZES:-tiny,small}"
