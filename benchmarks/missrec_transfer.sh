#!/usr/bin/env bash
# MISSRec on Scientific_mm (CLIP text + image features): from scratch and after pre-training
# on Scientific_mm itself, inductive (features only) and transductive (+ item IDs), as in the
# reference README's table.  Runs one after another; a run whose saved/<run>.json exists is
# skipped, so the script can be re-run after an interruption.
#
#   benchmarks/missrec_transfer.sh            # PT_EPOCHS=30 by default (props: 100)
#   PT_EPOCHS=100 benchmarks/missrec_transfer.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PT_EPOCHS=${PT_EPOCHS:-30}
DATA=${DATA:-../shared/data}
common="--data_path=$DATA --show_progress=False"
mkdir -p benchmarks/out
run() {  # run NAME command...
  local name=$1; shift
  if [ -f "saved/$name.json" ]; then echo "skip $name (saved/$name.json exists)"; return; fi
  echo "run $name: $*"
  /usr/bin/time -v "$@" --run_name="$name" $common > "benchmarks/out/$name.log" 2>&1
}
run MISSRec-Scientific_mm-scratch-trans python run_finetune.py -m MISSRec -d Scientific_mm --mode transductive
run MISSRec-Scientific_mm-scratch-ind python run_finetune.py -m MISSRec -d Scientific_mm --mode inductive
run MISSRec-Scientific_mm-pt python run_pretrain.py -m MISSRec -d Scientific_mm --epochs="$PT_EPOCHS"
run MISSRec-Scientific_mm-pt-trans python run_finetune.py -m MISSRec -d Scientific_mm --mode transductive \
    -p saved/MISSRec-Scientific_mm-pt.pth
run MISSRec-Scientific_mm-pt-ind python run_finetune.py -m MISSRec -d Scientific_mm --mode inductive \
    -p saved/MISSRec-Scientific_mm-pt.pth
python - <<'PY'
import json
rows = [("scratch", "inductive", "MISSRec-Scientific_mm-scratch-ind"), ("pre-trained", "inductive", "MISSRec-Scientific_mm-pt-ind"),
        ("scratch", "transductive", "MISSRec-Scientific_mm-scratch-trans"), ("pre-trained", "transductive", "MISSRec-Scientific_mm-pt-trans")]
out = []
for init, mode, run in rows:
    r = json.load(open(f"saved/{run}.json"))
    t = r["timings"]
    out.append({"init": init, "mode": mode, "run": run, "best_epoch": r["best_epoch"], "params": r["params"],
                "mean_train_seconds_per_epoch": round(t["mean_train_seconds_per_epoch"], 2),
                "peak_rss_mb": round(t["peak_rss_mb"]), "test": r["test"]})
    print(f"{init:12s} {mode:12s} best {r['best_epoch']:3d} trainable {r['params']['trainable']:>9,d} test {r['test']}")
pt = json.load(open("saved/MISSRec-Scientific_mm-pt.json"))
summary = {"pretrain": {"run": "MISSRec-Scientific_mm-pt", "epochs": len(pt["history"]),
                        "mean_train_seconds_per_epoch": round(pt["timings"]["mean_train_seconds_per_epoch"], 2),
                        "peak_rss_mb": round(pt["timings"]["peak_rss_mb"])}, "rows": out}
json.dump(summary, open("benchmarks/results/MISSRec-Scientific_mm-transfer.json", "w"), indent=2)
PY
