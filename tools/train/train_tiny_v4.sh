#!/usr/bin/env bash
# Trains models/tiny-v4 the way the shipped checkpoint was trained (docs/TINY_MODEL.md "Reproducing"):
# two runs of tools/train/train.py on one GPU, the second continuing from the first's exported
# checkpoint, then the export into the released format.
#   tools/train/train_tiny_v4.sh [SEED] [OUT]     (default seed 0, OUT models/tiny-v4)
# Run on the GPU machine with its python3 (PyTorch, tokenizers, safetensors). The schedule follows wall
# time (--time-budget), so another GPU, or a GPU shared with other runs, gives other step counts.
set -euo pipefail
cd "$(dirname "$0")/../.."
seed="${1:-0}"
out="${2:-models/tiny-v4}"
work="$(mktemp -d)"
py="${PYTHON:-python3}"
# Stage 1: from scratch; recall contexts grow from 256-768 tokens to 8k as the curriculum's gates allow.
"$py" tools/train/train.py --out "$work/stage1" --seed "$seed" --time-budget 390 --steps 1000000 \
  --eval-per-cell 0
"$py" tools/train/export.py --weights "$work/stage1" --out "$work/stage1/ckpt"
# Stage 2: continue from the stage-1 checkpoint with a fresh optimizer and schedule, fewer short rows,
# and the last 15% quantization-aware (the forward then uses exactly the exported FP8/MXFP4/BF16 values).
"$py" tools/train/train.py --out "$work/stage2" --init "$work/stage1/ckpt" --seed $((seed + 3)) --lr 1.5e-3 \
  --warmup 20 --short-rows 64 --time-budget 470 --steps 1000000 --qat-from 0.85 --eval-per-cell 20 \
  --eval-budget 60
"$py" tools/train/export.py --weights "$work/stage2" --out "$out"
echo "trained into $out (runs in $work)"
