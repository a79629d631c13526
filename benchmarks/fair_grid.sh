#!/usr/bin/env bash
# The fair grids: equal tuning (bench --tune: one Optuna study per row, TRIALS=12 trials over the
# learning rate and the row's search space, the same sampler and pruner for every row, tuning seed
# TUNE_SEEDS=100 apart from the reporting seeds 0,1,2; picked on validation), equal epochs
# (--equal-epochs: multi-stage methods share train.epochs), 3 seeds, every modality alone as the
# reference. Resumable: rerun to continue (finished cells are reused if their config matches).
#   GRID=synthetic-fair  the default data: joint, alone x2, OGM-GE, OGM-boost, the four proposals,
#                     the 2025 methods and every other published peer
#   GRID=mfeat        the 6 views of UCI mfeat: joint, alone x6, OGM-GE with the N-modality
#                     coefficient forms and ratio rules, the four proposals
#   GRID=mfeat-hard   the four weakest views (fou, kar, mor, zer), same rows
#   GRID=mfeat-weak3  the three weakest views (fou, mor, zer: 72-84% alone), where the fused model
#                     is off its ceiling: the same rows, the best peers and the 2025 methods
#   GRID=mfeat-peers  every other method supporting N modalities on the 6 views, tuned
#   GRID=avdigits-fair AV-Digits: joint, alone x2, OGM-GE, OGM-boost, the four proposals, the 2025
#                      methods and every other published peer
# Output: docs/results/<GRID>-optuna (the folders without the suffix hold the grids of the earlier
# fixed-grid protocol, bench --tune-grid, and stay as they are).
# METHODS=joint,...: run only these rows (into the same folder); JOBS=2: two runs at a time (bench --jobs; one torch thread each with OMP_NUM_THREADS=1)
set -euo pipefail
cd "$(dirname "$0")/.."
flags=(--tune --trials "${TRIALS:-12}" --tune-seeds "${TUNE_SEEDS:-100}" --equal-epochs --alone)
# mfeat's encoders are MLPs: the OGM family modulates all their parameters (params=all; the
# paper's conv-only default selects nothing there)
OURS="joint,ogm-ge:params=all,ogm-ge:params=all:coefficient=continuous,ogm-ge:params=all:ratio=min"
OURS="$OURS,ogm-ge:params=all:ratio=pairwise,ogm-boost:params=all,uncertainty,distill,ssl"
# the peers with the largest gains in the untuned AV-Digits table, and the 2025 methods (issue 16)
BEST_PEERS="mmcosine,mbsd,mmpareto"
PEERS_2025="remix,arl,aug,midas"
# every other published peer (issue 8 and the later ports)
PEERS="modality-dropout,opm,gblend,agm,pmr,mmpareto,mslr,mmcosine,mbsd,cml,amco,mla,umt,ume,reconboost,relearn,inforeg,lfm,dimml,valuation"
case "${GRID:?set GRID}" in
  synthetic-fair) dataset=synthetic; extra=()
               methods="joint,ogm-ge,ogm-boost,uncertainty,distill,ssl,$PEERS_2025,$PEERS" ;;
  mfeat)       dataset=mfeat; methods="$OURS"; extra=() ;;
  mfeat-hard)  dataset=mfeat; methods="$OURS"; extra=(--set "data.modalities=[fou,kar,mor,zer]") ;;
  mfeat-weak3) dataset=mfeat; methods="$OURS,$BEST_PEERS,$PEERS_2025"; extra=(--set "data.modalities=[fou,mor,zer]") ;;
  mfeat-peers) dataset=mfeat; extra=()
               methods="joint,$PEERS,$PEERS_2025" ;;
  avdigits-fair) dataset=avdigits; extra=()
               methods="joint,ogm-ge,ogm-boost,uncertainty,distill,ssl,$PEERS_2025,$PEERS" ;;
  *) echo "unknown GRID=$GRID" >&2; exit 2 ;;
esac
methods="${METHODS:-$methods}"  # METHODS=a,b,...: only these rows of the grid (same folder, cells reused)
out="docs/results/${GRID}-optuna"
mkdir -p "$out"
exec 9>"$out/.lock" && flock 9  # one grid per folder at a time (a second invocation waits, then reuses)
start=$(date +%s)
status=0
equimodal bench --dataset "$dataset" --methods "$methods" --seeds 0,1,2 --out "$out" "${flags[@]}" \
  ${JOBS:+--jobs "$JOBS"} --no-progress "${extra[@]}" || status=$?
end=$(date +%s)
{
  echo
  echo "Ran: \`${METHODS:+METHODS=$methods }GRID=$GRID bash benchmarks/fair_grid.sh\` ($(date -u +%Y-%m-%d), $((end - start)) s wall for the runs"
  echo "not reused), on $(nproc --all) CPU cores ($(uname -m)), torch $(python -c 'import torch; print(torch.__version__)'),"
  echo "with other jobs sharing the CPU, so s / epoch is indicative only. Exit status $status."
  echo "Tuning: Optuna, ${TRIALS:-12} trials per row on tuning seed(s) ${TUNE_SEEDS:-100}; the picks then ran with seeds 0,1,2."
} | tee -a "$out/results.md" >> "$out/tuning.md"
exit $status
