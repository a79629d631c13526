#!/usr/bin/env bash
# Peer methods (issue 8) on the default data and on AV-Digits: 3 seeds, the default budget and
# protocol of the existing rows (12 epochs, SGD, validation carved from train, last epoch reported),
# joint included so the paired differences are taken within the same grid. Resumable: rerun to
# continue; finished cells are reused only if their stored config matches.
set -euo pipefail
cd "$(dirname "$0")/.."
METHODS="joint,modality-dropout,opm,gblend,agm,pmr,mmpareto,mslr,mmcosine,mbsd,cml,amco"
for dataset in ${DATASETS:-synthetic avdigits}; do
  out="docs/results/${dataset}-peers"
  start=$(date +%s)
  equimodal bench --dataset "$dataset" --methods "$METHODS" --seeds 0,1,2 --out "$out" --no-progress
  end=$(date +%s)
  {
    echo
    echo "Ran: \`DATASETS=$dataset bash benchmarks/peers_grid.sh\` ($(date -u +%Y-%m-%d), $((end - start)) s wall for the runs"
    echo "not reused), on $(nproc) CPU cores ($(uname -m)), torch $(python -c 'import torch; print(torch.__version__)'),"
    echo "with other jobs sharing the CPU, so s / epoch is indicative only."
  } >> "$out/results.md"
done
