#!/usr/bin/env bash
# The transfer protocol's data (../shared/data/README.md): three pre-training domains with no
# science items, two Scientific targets, every text encoded with the same MiniLM (384-d).
#   dataset/pretrain/{Video_Games,Beauty,Office_Products}   preprocess + extract-text
#   dataset/downstream/Scientific      UniSRec's split, MiniLM text features
#   dataset/downstream/Scientific_mm   the shared files (linked), MiniLM text features
#                                      (.feat1CLS) + the shared CLIP image features (.feat3CLS)
# Idempotent: a step whose output exists is skipped.  Usage: bash benchmarks/transfer_data.sh [SHARED]
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${1:-../shared/data}
SHARED=$(cd "$SHARED" && pwd)
for d in Video_Games Beauty Office_Products; do
  [ -d "dataset/pretrain/$d" ] || recbole-mm preprocess --input "$SHARED/raw/amazon2023/$d" --category "$d" --output dataset/pretrain
  [ -f "dataset/pretrain/$d/$d.feat1CLS" ] || recbole-mm extract-text --dataset "dataset/pretrain/$d"
done
for t in Scientific Scientific_mm; do
  mkdir -p "dataset/downstream/$t"
  for f in "$SHARED/$t"/*; do
    case "$f" in *.feat1CLS) continue ;; esac   # Scientific_mm's CLIP text features: replaced by MiniLM
    [ -e "dataset/downstream/$t/$(basename "$f")" ] || ln -s "$f" "dataset/downstream/$t/"
  done
  [ -f "dataset/downstream/$t/$t.feat1CLS" ] || recbole-mm extract-text --dataset "dataset/downstream/$t"
done
