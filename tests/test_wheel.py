"""A wheel carries the default configs (recbole_mm/props/*.yaml) and runs from an install that is not
the source checkout: a props-only key reaches the model with its props value, and
``run_finetune.py -m UniSRec -d <fixture>`` trains from the installed package."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
from fixtures import make_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# in props/UniSRec.yaml only (not a RecBole default): it reaches the model only if the wheel ships props/
PROPS_ONLY = {"feature_drop_ratio": 0.15, "contrastive_mask": "inf"}

CHECK = """
import json, sys
import recbole_mm
from recbole_mm.config import props_dir
from recbole_mm.data import create_dataset
from recbole_mm.model.unisrec import UniSRec
from recbole_mm.quick_start import build_config

cfg = build_config("UniSRec", "Tiny", config_dict={"data_path": sys.argv[1], "use_gpu": False, "state": "WARNING"})
model = UniSRec(cfg, create_dataset(cfg))
print(json.dumps({"package": recbole_mm.__file__, "props": str(props_dir()),
                  "config": {k: cfg[k] for k in sys.argv[2:]}, "model": {k: getattr(model, k) for k in sys.argv[2:]}}))
"""


def _build_wheel(tmp_path) -> str:
    src = tmp_path / "src"  # a copy: the build writes build/ and *.egg-info next to setup.cfg
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    shutil.copytree(os.path.join(ROOT, "recbole_mm"), src / "recbole_mm",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    if out.returncode != 0 and "No module named pip" in out.stderr:
        pytest.skip("pip is not available to build a wheel")
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = glob.glob(str(tmp_path / "dist" / "recbole_mm-*.whl"))
    return wheel


@pytest.mark.slow
def test_wheel_ships_the_props_and_runs_outside_the_checkout(tmp_path):
    import recbole

    wheel = _build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {os.path.basename(n) for n in names if n.startswith("recbole_mm/props/") and n.endswith(".yaml")}
    assert shipped == {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "props", "*.yaml"))}
    # the keys checked are props-only: RecBole's defaults do not have them
    recbole_yaml = "".join(open(f, encoding="utf-8").read() for f in
                           glob.glob(os.path.join(os.path.dirname(recbole.__file__), "properties", "**", "*.yaml"),
                                     recursive=True))
    assert not any(f"{k}:" in recbole_yaml for k in PROPS_ONLY)

    site = tmp_path / "site"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target",
                          str(site), wheel], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    data, cwd = tmp_path / "data", tmp_path / "run"
    make_dataset(data, "Tiny", seed=0)
    cwd.mkdir()  # an empty folder: the source checkout is not importable from here
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RECBOLE_MM_PROPS")}
    env.update(PYTHONPATH=str(site), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")

    out = subprocess.run([sys.executable, "-c", CHECK, str(data), *PROPS_ONLY], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["package"].startswith(str(site)), got["package"]
    assert got["props"] == str(site / "recbole_mm" / "props")
    assert got["config"] == PROPS_ONLY and got["model"] == PROPS_ONLY

    shutil.copy(os.path.join(ROOT, "run_finetune.py"), cwd / "run_finetune.py")  # the README's entry point
    out = subprocess.run([sys.executable, "run_finetune.py", "-m", "UniSRec", "-d", "Tiny", f"--data_path={data}",
                          "--epochs=1", "--train_batch_size=64", "--eval_batch_size=64", "--topk=[10]",
                          "--use_gpu=False", "--show_progress=False", "--state=WARNING", "--run_name=wheel"],
                         cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    result = json.load(open(cwd / "saved" / "wheel.json"))
    assert result["config"]["feature_drop_ratio"] == 0.15 and result["config"]["n_exps"] == 8
    assert len(result["history"]) == 1 and result["test"]
