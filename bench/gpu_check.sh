#!/usr/bin/env bash
# One script for the GPU figures of docs/benchmarks.md; finishes within 5 minutes on one H100.
# Usage: bash bench/gpu_check.sh   (prints the card, then each figure)
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONUNBUFFERED=1 timeout 290 python bench/gpu_check.py --device cuda "$@"
