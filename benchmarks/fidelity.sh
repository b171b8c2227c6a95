#!/usr/bin/env bash
# Fidelity on Scientific_mm against the reference implementations, one seed (SEED, default 2020):
#
# * SASRec through run_finetune.py vs plain RecBole 1.2.1 (benchmarks/plain_recbole.py) on the
#   same files and config.  RecBole's own models keep RecBole's batch width by default
#   (props/recbole_models.yaml) and our item numbering is RecBole's, so both runs are the same
#   computation: identical losses and metrics are expected, not just similar ones.
# * UniSRec from scratch, transductive, the reference defaults (batch 2048, lr 1e-3, early stop
#   after 10 epochs without validation improvement) vs the reference implementation's figures
#   run on this data and config (issue 10): test Recall@10 0.1619, Recall@50 0.3333,
#   NDCG@10 0.0798, NDCG@50 0.1173; ~130 s per epoch, ~6 s per evaluation, 6.4 GB peak RSS.
#
#   benchmarks/fidelity.sh                # -> benchmarks/results/fidelity-Scientific_mm.json
#   SEED=2021 benchmarks/fidelity.sh
#
# A run whose saved/<run>.json exists is skipped (re-run after an interruption); SASREC_JSON /
# UNISREC_JSON name an existing result JSON of the same command instead (e.g. a leaderboard
# cell's saved/lb-Scientific_mm-SASRec-s2020-<hash>.json).  Timings are only meaningful with
# nothing else running on the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
SEED=${SEED:-2020}
DATA=${DATA:-../shared/data}
mkdir -p benchmarks/out benchmarks/results
run() {  # run NAME command...
  local name=$1; shift
  if [ -f "saved/$name.json" ]; then echo "skip $name (saved/$name.json exists)"; return; fi
  echo "run $name: $*"
  "$@" --run_name="$name" --data_path="$DATA" --seed="$SEED" --show_progress=False > "benchmarks/out/$name.log" 2>&1
}
if [ ! -f "benchmarks/out/plain-SASRec-s$SEED.json" ]; then
  echo "run plain RecBole SASRec seed $SEED"
  python benchmarks/plain_recbole.py -m SASRec -d Scientific_mm --data_path "$DATA" --seed "$SEED" \
      --out "benchmarks/out/plain-SASRec-s$SEED.json" > "benchmarks/out/plain-SASRec-s$SEED.log" 2>&1
fi
[ -n "${SASREC_JSON:-}" ] || run "fid-SASRec-s$SEED" python run_finetune.py -m SASRec -d Scientific_mm
[ -n "${UNISREC_JSON:-}" ] || run "fid-UniSRec-s$SEED" python run_finetune.py -m UniSRec -d Scientific_mm --mode transductive
export SASREC_JSON=${SASREC_JSON:-saved/fid-SASRec-s$SEED.json} UNISREC_JSON=${UNISREC_JSON:-saved/fid-UniSRec-s$SEED.json}
SEED=$SEED python - <<'PY'
import json, os
seed = os.environ["SEED"]
plain = json.load(open(f"benchmarks/out/plain-SASRec-s{seed}.json"))
def ours(path):
    r = json.load(open(path))
    run = r["config"]["run_name"]
    t = r["timings"]
    return {"run": run, "best_epoch": r["best_epoch"], "test": r["test"], "valid": r["valid"],
            "epochs_run": len(t["train_seconds_per_epoch"]),
            "mean_train_seconds_per_epoch": round(t["mean_train_seconds_per_epoch"], 2),
            "median_train_seconds_per_epoch": round(sorted(t["train_seconds_per_epoch"])[len(t["train_seconds_per_epoch"]) // 2], 2),
            "median_eval_seconds": round(sorted(t["valid_seconds_per_epoch"])[len(t["valid_seconds_per_epoch"]) // 2], 3),
            "peak_rss_mb": round(t["peak_rss_mb"]), "total_seconds": round(t["total_seconds"], 1)}
sas, uni = ours(os.environ["SASREC_JSON"]), ours(os.environ["UNISREC_JSON"])
for r, model in ((sas, "SASRec"), (uni, "UniSRec")):
    cfg = json.load(open(os.environ[model.upper() + "_JSON"]))["config"]
    assert cfg["model"] == model and str(cfg["seed"]) == seed and cfg["dataset"] == "Scientific_mm", cfg["model"]
ref = {"test": {"recall@10": 0.1619, "recall@50": 0.3333, "ndcg@10": 0.0798, "ndcg@50": 0.1173},
       "best_epoch": 14, "valid_ndcg@10": 0.0854, "seconds_per_epoch": "~130 (115-210)", "eval_seconds": "~6",
       "peak_rss_gb": 6.4, "minutes_to_early_stop": 64}
out = {"seed": int(seed), "dataset": "Scientific_mm",
       "SASRec": {"ours": sas, "plain_recbole": {"test": plain["test"], "best_valid": plain["best_valid"],
                                                 "seconds": round(plain["seconds"], 1)},
                  "identical_test_metrics": {k: plain["test"][k] for k in sas["test"]} == sas["test"]},
       "UniSRec_transductive": {"ours": uni, "reference_implementation": ref},
       "commands": ["benchmarks/fidelity.sh (SEED=%s)" % seed,
                    "python benchmarks/plain_recbole.py -m SASRec -d Scientific_mm --data_path ../shared/data --seed %s" % seed,
                    "python run_finetune.py -m SASRec -d Scientific_mm --data_path ../shared/data --seed=%s" % seed,
                    "python run_finetune.py -m UniSRec -d Scientific_mm --data_path ../shared/data --mode transductive --seed=%s" % seed]}
path = "benchmarks/results/fidelity-Scientific_mm.json" if seed == "2020" else f"benchmarks/results/fidelity-Scientific_mm-s{seed}.json"
json.dump(out, open(path, "w"), indent=2)
print(json.dumps({"SASRec ours": sas["test"], "SASRec plain": plain["test"], "identical": out["SASRec"]["identical_test_metrics"],
                  "UniSRec ours": uni["test"], "UniSRec reference": ref["test"]}, indent=1))
print("->", path)
PY
