#!/usr/bin/env bash
# P1 on a CUDA machine: Tunery's SFT recipe against a plain HF Trainer (bench/p1_training.py) on a bf16
# Llama-shaped model of 8 layers × 1024 (about 165M matmul parameters, MiniLM's 30,524-token vocabulary),
# batch 16, max length 512, 60 steps, 3 interleaved repeats, MFU against a bf16 8192² matmul peak measured
# in the same run. A few minutes on one H100; nothing is downloaded beyond what scripts/bootstrap installs.
#
#   TUNERY_TORCH_SPEC=torch==2.13.0 bench/gpu.sh    # PyPI's Linux torch wheel is the CUDA build
#
# The figures go to stdout and to bench/results/gpu-<UTC timestamp>.txt (the whole output to .log).
set -euo pipefail
cd "$(dirname "$0")/.."

TUNERY_TORCH_SPEC="${TUNERY_TORCH_SPEC:-torch==2.13.0}" scripts/bootstrap train,minilm
if ! .venv/bin/python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu.sh: torch in .venv sees no CUDA device (a CPU build? set TUNERY_TORCH_SPEC to a CUDA build and remove .venv/.tunery-installed)" >&2
  exit 1
fi

mkdir -p bench/results
out="bench/results/gpu-$(date -u +%Y%m%dT%H%M%SZ).txt"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
  .venv/bin/python -c 'import platform, torch, transformers, peft; print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "peft", peft.__version__)'
  if ! timeout 540 .venv/bin/python bench/p1_training.py --device cuda --layers 8 --hidden 1024 \
    --batch-size 16 --max-length 512 --steps 60 --repeats 3 >"${out%.txt}.log" 2>&1; then
    tail -30 "${out%.txt}.log" >&2
    exit 1
  fi
  grep -E '^(P1|BENCH-RESULT|median)' "${out%.txt}.log"
  echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$out"
