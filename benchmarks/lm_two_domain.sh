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
  echo "run $name: $*"
  "$@" --run_name="$name" --show_progress=False > "benchmarks/out/$name.log" 2>&1
}
PT="-d Industrial_and_Scientific,Office_Products --data_path=dataset/pretrain --epochs=4 --steps_per_epoch=50 --save_step=0"
run i6-Recformer-IS-OP-pt python run_pretrain.py -m Recformer $PT
run i6-ReoLM-IS-OP-pt python run_pretrain.py -m ReoLM $PT --img_suffix=None --img_size=512
FT="-d Scientific_mm --data_path=../shared/data --epochs=1"
run i6-Recformer-ft python run_finetune.py -m Recformer $FT -p saved/i6-Recformer-IS-OP-pt.pth
run i6-ReoLM-ft python run_finetune.py -m ReoLM $FT -p saved/i6-ReoLM-IS-OP-pt.pth
run i6-ReoLM-ft-fixenc python run_finetune.py -m ReoLM $FT -p saved/i6-ReoLM-IS-OP-pt.pth --fix_enc=True
run i6-ReoLM-ft-neg1000 python run_finetune.py -m ReoLM $FT -p saved/i6-ReoLM-IS-OP-pt.pth --num_negatives=1000
python - <<'PY'
import json
out = {"note": "CPU, one thread per run (OMP_NUM_THREADS=1, taskset to one core of the 2-core machine, "
               "the other core busy with other runs); train loss = sum over the epoch's 50 batches",
       "commands": ["benchmarks/lm_two_domain.sh"], "runs": {}}
for n in ["i6-Recformer-IS-OP-pt", "i6-ReoLM-IS-OP-pt", "i6-Recformer-ft", "i6-ReoLM-ft", "i6-ReoLM-ft-fixenc",
          "i6-ReoLM-ft-neg1000"]:
    d = json.load(open(f"saved/{n}.json"))
    t = d["timings"]
    out["runs"][n] = {"params": d["params"], "train_seconds_per_epoch": [round(x, 1) for x in t["train_seconds_per_epoch"]],
                      "train_loss_per_epoch": [h["train_loss"] for h in d["history"]], "peak_rss_mb": round(t["peak_rss_mb"]),
                      "n_items": None, "test": d.get("test"), "valid": d.get("valid")}
json.dump(out, open("benchmarks/results/LM-two-domain-pretraining.json", "w"), indent=2)
print(json.dumps(out, indent=1))
PY
