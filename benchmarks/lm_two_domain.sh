#!/usr/bin/env bash
# Recformer and Reo-LM pre-trained on a merged two-domain set built by the data pipeline
# (Industrial_and_Scientific + Office_Products, Amazon 2023 layout, item sentences from .attr),
# then fine-tuned on Scientific_mm from that checkpoint.  A short CPU configuration: 4 epochs
# of 50 steps (batch 64) of pre-training, 1 fine-tuning epoch; the real all-MiniLM-L6-v2.
# The pipeline domains have no images: Reo-LM pre-trains with img_suffix ~ (every item gets the
# image placeholder) and img_size 512 so that its image projection fits Scientific_mm's CLIP
# features.  Reo-LM fine-tuning: every parameter (released REFinetuneWrapper), then the variants
# the defaults are chosen by: adapters only (--fix_enc=True) and stage-1 sampled negatives
# re-encoded with gradient (--num_negatives=1000, released; ~12x slower per step on CPU).
#
#   benchmarks/lm_two_domain.sh     # -> benchmarks/results/LM-two-domain-pretraining.json
#   FT_STEPS=60 benchmarks/lm_two_domain.sh   # -> ...-s60.json: the fine-tuning variants at an equal step budget
#   ONLY=ReoLM ...                            # only the runs whose name contains ReoLM
set -euo pipefail
cd "$(dirname "$0")/.."
RAW=${RAW:-../shared/data/raw/amazon2023}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p benchmarks/out
for c in Industrial_and_Scientific Office_Products; do
  [ -f "dataset/pretrain/$c/$c.attr" ] || recbole-mm preprocess --input "$RAW/$c" --category "$c" --output dataset/pretrain
done
run() {  # run NAME command...
  local name=$1; shift
  if [ -f "saved/$name.json" ]; then echo "skip $name (saved/$name.json exists)"; return; fi
  case $name in *"${ONLY:-}"*) ;; *) echo "skip $name (ONLY=$ONLY)"; return ;; esac
  echo "run $name: $*"
  "$@" --run_name="$name" --show_progress=False > "benchmarks/out/$name.log" 2>&1
}
PT="-d Industrial_and_Scientific,Office_Products --data_path=dataset/pretrain --epochs=4 --steps_per_epoch=50 --save_step=~"
run i6-Recformer-IS-OP-pt python run_pretrain.py -m Recformer $PT
run i6-ReoLM-IS-OP-pt python run_pretrain.py -m ReoLM $PT --img_suffix=None --img_size=512
# FT_STEPS=N: every fine-tuning run gets the same budget of N optimiser steps (warm-up N/10),
# so that the 1000-negative variant (~12x the seconds per step) is compared at equal steps;
# unset: one full epoch each.
FT="-d Scientific_mm --data_path=../shared/data --epochs=1"
S=""
if [ -n "${FT_STEPS:-}" ]; then FT="$FT --steps_per_epoch=$FT_STEPS --warmup_steps=$(( FT_STEPS / 10 > 0 ? FT_STEPS / 10 : 1 ))"; S="-s$FT_STEPS"; fi
run i6-Recformer-ft$S python run_finetune.py -m Recformer $FT -p saved/i6-Recformer-IS-OP-pt.pth
run i6-ReoLM-ft$S python run_finetune.py -m ReoLM $FT -p saved/i6-ReoLM-IS-OP-pt.pth
run i6-ReoLM-ft-fixenc$S python run_finetune.py -m ReoLM $FT -p saved/i6-ReoLM-IS-OP-pt.pth --fix_enc=True
run i6-ReoLM-ft-neg1000$S python run_finetune.py -m ReoLM $FT -p saved/i6-ReoLM-IS-OP-pt.pth --num_negatives=1000
S=$S python - <<'PY'
import json, os
S = os.environ.get("S", "")
note = os.environ.get("LM_NOTE") or ("CPU, one thread per run (OMP_NUM_THREADS=1, taskset to one core of the "
                                      "2-core machine, the other core busy with other runs)")
out = {"note": note + "; train loss = sum over the epoch's batches",
       "commands": [(f"FT_STEPS={S[2:]} " if S else "") + "benchmarks/lm_two_domain.sh"], "runs": {}}
for n in ["i6-Recformer-IS-OP-pt", "i6-ReoLM-IS-OP-pt", f"i6-Recformer-ft{S}", f"i6-ReoLM-ft{S}", f"i6-ReoLM-ft-fixenc{S}",
          f"i6-ReoLM-ft-neg1000{S}"]:
    if not os.path.isfile(f"saved/{n}.json"):
        continue
    d = json.load(open(f"saved/{n}.json"))
    t = d["timings"]
    out["runs"][n] = {"params": d["params"], "train_seconds_per_epoch": [round(x, 1) for x in t["train_seconds_per_epoch"]],
                      "train_loss_per_epoch": [h["train_loss"] for h in d["history"]], "peak_rss_mb": round(t["peak_rss_mb"]),
                      "n_items": None, "test": d.get("test"), "valid": d.get("valid")}
json.dump(out, open(f"benchmarks/results/LM-two-domain-pretraining{S}.json", "w"), indent=2)
print(json.dumps(out, indent=1))
PY
