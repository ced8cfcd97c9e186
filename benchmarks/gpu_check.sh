#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): one JSON line of training, sampling and FID-feature speeds.
# PYTHON picks the interpreter (default: python3, the one that holds PyTorch on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
