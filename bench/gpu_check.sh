#!/usr/bin/env bash
# One script for the GPU figures of docs/benchmarks.md and the timm recipes' steps (issue 20);
# about 4 minutes on one H100 (not yet measured with the recipe steps).
# Usage: bash bench/gpu_check.sh   (prints the card, then each figure)
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONUNBUFFERED=1 timeout 420 python bench/gpu_check.py --device cuda "$@"
