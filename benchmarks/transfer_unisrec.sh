#!/usr/bin/env bash
# Issue 16's UniSRec transfer table, two single-threaded lanes (2-core machine), resumable:
# run it again (in a later session too) and it continues where it stopped.
#   lane 0: pre-training on the corpus (10 epochs, checkpoint after each), then the fine-tuning cells
#   lane 1: --no-pretrain: fine-tuning cells from the checkpoints that exist, rerun until lane 0 ends
# Data: benchmarks/transfer_data.sh.  Reports: results/transfer-Scientific{,_mm}.md
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
MODELS=${MODELS:-UniSRec}
ARGS=(-m "$MODELS" --pretrain Video_Games,Beauty,Office_Products --target Scientific,Scientific_mm
      --data_path dataset/downstream --mode inductive,transductive --fraction 0.1,1.0 --seeds 3
      --pt-epochs 3 --curve 1,3,10 --out results --resume)
mkdir -p benchmarks/out
taskset -c 0 recbole-mm transfer "${ARGS[@]}" >> "benchmarks/out/transfer-$MODELS-lane0.log" 2>&1 &
lane0=$!
(
  while kill -0 "$lane0" 2>/dev/null; do
    taskset -c 1 recbole-mm transfer "${ARGS[@]}" --no-pretrain || true
    sleep 60
  done
) >> "benchmarks/out/transfer-$MODELS-lane1.log" 2>&1 &
wait
