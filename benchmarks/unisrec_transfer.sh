#!/usr/bin/env bash
# UniSRec transfer: pre-train on Office_Products, fine-tune on Scientific (both MiniLM
# features from the data pipeline), inductive and transductive, with and without the
# pre-trained checkpoint.  Two single-threaded lanes, one per core (2-core machine).
#
# Data (see docs/data.md):
#   recbole-mm preprocess --input ../shared/data/raw/amazon2023/Office_Products \
#       --category Office_Products --output dataset/pretrain
#   recbole-mm extract-text --dataset dataset/pretrain/Office_Products
#   mkdir -p dataset/downstream/Scientific && cp ../shared/data/Scientific/* dataset/downstream/Scientific/
#   recbole-mm extract-text --dataset dataset/downstream/Scientific
set -euo pipefail
cd "$(dirname "$0")/.."
PT_EPOCHS=${PT_EPOCHS:-12}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p benchmarks/out
common="--show_progress=False"
lane() { taskset -c "$1" "${@:2}"; }

# lane 0: pre-training, then pre-trained fine-tuning (transductive)
(
  lane 0 python run_pretrain.py -m UniSRec -d Office_Products --run_name=UniSRec-Office-pt \
      --epochs="$PT_EPOCHS" --train_batch_size=1024 $common
  lane 0 python run_finetune.py -m UniSRec -d Scientific --mode transductive \
      -p saved/UniSRec-Office-pt.pth --run_name=UniSRec-Scientific-pt-trans $common
) > benchmarks/out/unisrec_transfer_lane0.log 2>&1 &
# lane 1: from-scratch fine-tuning (both modes), then pre-trained inductive
(
  lane 1 python run_finetune.py -m UniSRec -d Scientific --mode transductive \
      --run_name=UniSRec-Scientific-scratch-trans $common
  lane 1 python run_finetune.py -m UniSRec -d Scientific --mode inductive \
      --run_name=UniSRec-Scientific-scratch-ind $common
  while [ ! -f saved/UniSRec-Office-pt.json ]; do sleep 10; done
  lane 1 python run_finetune.py -m UniSRec -d Scientific --mode inductive \
      -p saved/UniSRec-Office-pt.pth --run_name=UniSRec-Scientific-pt-ind $common
) > benchmarks/out/unisrec_transfer_lane1.log 2>&1 &
wait
python - <<'PY'
import json
rows = [("scratch", "inductive", "UniSRec-Scientific-scratch-ind"), ("pre-trained", "inductive", "UniSRec-Scientific-pt-ind"),
        ("scratch", "transductive", "UniSRec-Scientific-scratch-trans"), ("pre-trained", "transductive", "UniSRec-Scientific-pt-trans")]
out = []
for init, mode, run in rows:
    r = json.load(open(f"saved/{run}.json"))
    out.append({"init": init, "mode": mode, "run": run, "best_epoch": r.get("best_epoch"), "test": r.get("test")})
    print(init, mode, r.get("best_epoch"), r.get("test"))
json.dump(out, open("benchmarks/results/UniSRec-transfer-Office-to-Scientific.json", "w"), indent=2)
PY
