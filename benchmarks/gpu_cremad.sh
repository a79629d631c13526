#!/usr/bin/env bash
# joint vs ogm-ge on CREMA-D with the OGM-GE paper's settings, for a machine with a GPU.
#
#   benchmarks/gpu_cremad.sh CREMAD_ROOT [OUT_DIR] [extra equimodal options...]
#
# CREMAD_ROOT holds audio/<clip>.wav and visual/Image-01-FPS/<clip>/*.jpg (make it with
# `equimodal data prepare cremad --videos .../VideoFlash --out CREMAD_ROOT`); the split lists default
# to the OGM-GE ones. Paper settings: ResNet-18 encoders from scratch, concat fusion, SGD lr 1e-3,
# momentum 0.9, weight decay 1e-4, StepLR(70, 0.1), batch 64, 100 epochs, alpha 0.8, modulation in
# epochs 0-50. Unlike the paper, the reported epoch is the last one (never chosen on test).
# Environment: EPOCHS (100), SEEDS (0,1,2), DEVICE (cuda), WORKERS (8).
# Prints the results table (fused and per-modality accuracy, linear probes) last.
set -euo pipefail
if [ $# -lt 1 ]; then
  sed -n '2,14p' "$0"
  exit 2
fi
ROOT=$1
OUT=${2:-bench_out/cremad}
shift $(( $# >= 2 ? 2 : 1 ))
equimodal bench --dataset cremad --no-progress \
  --methods "joint,ogm-ge:alpha=0.8:modulation_starts=0:modulation_ends=50" \
  --seeds "${SEEDS:-0,1,2}" --out "$OUT" \
  --set "data.root=$ROOT" --set "train.device=${DEVICE:-cuda}" --set "train.epochs=${EPOCHS:-100}" \
  --set train.batch_size=64 --set "train.num_workers=${WORKERS:-8}" --set optim.name=sgd --set optim.lr=0.001 \
  --set optim.momentum=0.9 --set optim.weight_decay=0.0001 --set optim.schedule=step --set optim.step_size=70 \
  --set optim.gamma=0.1 --set model.fusion=concat "$@"
