"""The embedded demo datasets: deterministic, valid atomic files, written on first use of
``-d demo``, learnable (models beat popularity), and every model runs on them."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from fixtures import popularity_ndcg10

from recbole_mm.data import create_dataset
from recbole_mm.data.demo import DEMOS, IMAGE_DIM, TEXT_DIM, ensure_demo, write_demo
from recbole_mm.quick_start import build_config, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _files(folder):
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    for name in DEMOS:
        assert ensure_demo(str(root), name) == os.path.join(str(root), name)
    return root


@pytest.mark.parametrize("name", sorted(DEMOS))
def test_generator_is_deterministic(tmp_path, demo_root, name):
    (tmp_path / "again").mkdir()
    write_demo(str(tmp_path / "again"), name)
    again = _files(str(tmp_path / "again"))
    assert again == _files(str(demo_root / name))
    assert set(again) == {f"{name}.{s}" for s in ("train.inter", "valid.inter", "test.inter", "text", "attr",
                                                  "item2index", "user2index", "feat1CLS", "feat3CLS")}


def test_demos_differ_and_have_text_images_and_a_few_missing_images(demo_root):
    texts = {}
    for name in DEMOS:
        folder = demo_root / name
        raws = [line.split("\t")[0] for line in open(folder / f"{name}.item2index")]
        text = np.fromfile(folder / f"{name}.feat1CLS", dtype="<f4").reshape(len(raws), TEXT_DIM)
        img = np.fromfile(folder / f"{name}.feat3CLS", dtype="<f4").reshape(len(raws), IMAGE_DIM)
        no_image = (np.abs(img).sum(1) == 0).sum()
        assert 0 < no_image < 0.1 * len(raws) and (np.abs(text).sum(1) > 0).all()
        attr = open(folder / f"{name}.attr").read().splitlines()
        assert attr[0] == "item_id:token\ttitle:token_seq\tbrand:token_seq\tcategory:token_seq"
        assert len(attr) == len(raws) + 1 and all(all(c for c in row.split("\t")) for row in attr[1:])
        texts[name] = open(folder / f"{name}.text").read()
    assert len(set(texts.values())) == len(DEMOS)


def test_dash_d_demo_writes_it_on_first_use_and_keeps_it(tmp_path):
    cfg = build_config("SASRec", "demo", config_dict={"data_path": str(tmp_path), "use_gpu": False})
    ds = create_dataset(cfg)
    folder = tmp_path / "demo"
    before = _files(str(folder))
    assert ds.item_num == sum(1 for _ in open(folder / "demo.item2index")) + 1
    (folder / "demo.text").write_text((folder / "demo.text").read_text())  # a user's own edit stays
    os.utime(folder / "demo.text", (1, 1))
    create_dataset(cfg)
    assert os.stat(folder / "demo.text").st_mtime == 1 and _files(str(folder)) == before
    cfg = build_config("UniSRec", "demo_a,demo_b", stage="pretrain", config_dict={"data_path": str(tmp_path), "use_gpu": False})
    assert create_dataset(cfg).item_num > ds.item_num and (tmp_path / "demo_b" / "demo_b.feat1CLS").is_file()


def test_demo_that_cannot_be_written_is_a_one_line_error(tmp_path):
    from recbole_mm.data import DataValidationError

    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(DataValidationError, match=r"afile/sub/demo: cannot write the demo dataset there .*--data_path"):
        ensure_demo(str(tmp_path / "afile" / "sub"), "demo")


@pytest.mark.slow
def test_unisrec_beats_popularity_by_a_margin(demo_root, workdir):
    pop = popularity_ndcg10(str(demo_root), "demo")
    res = run("UniSRec", "demo", mode="inductive",
              overrides={"data_path": str(demo_root), "use_gpu": False, "show_progress": False, "state": "WARNING",
                         "epochs": 4},
              saved=False)
    assert res["test"]["ndcg@10"] > 2 * pop, (res["test"]["ndcg@10"], pop)


@pytest.mark.slow
def test_pmmrec_beats_popularity_on_the_demo_with_its_demo_props(demo_root, workdir):
    """props/PMMRec.demo.yaml (batch 64, lr 1e-4): with PMMRec.yaml's 512-user batch alone the demo
    is one step per epoch and PMMRec stayed below popularity (issue 20)."""
    pop = popularity_ndcg10(str(demo_root), "demo")
    res = run("PMMRec", "demo", overrides={"data_path": str(demo_root), "use_gpu": False, "show_progress": False,
                                            "state": "WARNING", "epochs": 12}, saved=False)
    assert res["config"]["train_batch_size"] == 64 and res["config"]["learning_rate"] == 1e-4
    assert res["test"]["ndcg@10"] > 1.5 * pop, (res["test"]["ndcg@10"], pop)


MODELS = ["SASRec", "GRU4Rec", "BERT4Rec", "FDSA", "UniSRec", "MISSRec", "PMMRec", "Recformer", "ReoLM"]


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_every_model_runs_on_the_demo_with_its_props(demo_root, workdir, model):
    res = run(model, "demo", overrides={"data_path": str(demo_root), "use_gpu": False, "show_progress": False,
                                         "state": "WARNING", "epochs": 1, "steps_per_epoch": 3}, saved=False)
    assert np.isfinite(res["history"][0]["train_loss"]) and res["test"]["ndcg@10"] > 0


@pytest.mark.slow
def test_two_domain_pretraining_then_finetuning_on_the_demo(demo_root, workdir):
    quick = {"data_path": str(demo_root), "use_gpu": False, "show_progress": False, "state": "WARNING"}
    pre = run("UniSRec", "demo_a,demo_b", "pretrain", overrides={**quick, "epochs": 2})
    losses = [h["train_loss"] for h in pre["history"]]
    assert losses[-1] < losses[0]
    ft = run("UniSRec", "demo", mode="inductive", pretrained=pre["checkpoint"], overrides={**quick, "epochs": 3},
             saved=False)
    assert ft["test"]["ndcg@10"] > popularity_ndcg10(str(demo_root), "demo")


@pytest.mark.slow
def test_readme_run_command_prints_the_table_and_the_checkpoint(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "run_finetune.py"), "-m", "MISSRec", "-d", "demo", "--use_gpu=False",
         "--show_progress=False", f"--data_path={tmp_path}/data", f"--checkpoint_dir={tmp_path}/saved"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout + out.stderr
    assert "metric           valid      test" in text and "ndcg@10" in text
    ckpt = next(line.split(": ", 1)[1] for line in out.stdout.splitlines() if line.startswith("checkpoint: "))
    assert os.path.isfile(ckpt) and ckpt.startswith(f"{tmp_path}/saved")
