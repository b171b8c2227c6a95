"""Each RecBole 1.2.1 fix of recbole_mm.compat, exercised on plain RecBole."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from recbole.config import Config as RecBoleConfig

from conftest import quick

PLAIN = {
    "benchmark_filename": ["train", "valid", "test"],
    "alias_of_item_id": ["item_id_list"],
    "load_col": {"inter": ["user_id", "item_id_list", "item_id"]},
    "train_neg_sample_args": None,
    "loss_type": "CE",
    "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full"},
    "repeatable": True,
    "topk": [10],
    "valid_metric": "NDCG@10",
}


def _plain_config(root, tmp_path, **extra):
    cfg = dict(PLAIN, **quick(root, checkpoint_dir=str(tmp_path / "saved"), **extra))
    return RecBoleConfig(model="SASRec", dataset="Tiny", config_dict=cfg)


def test_numpy2_config_builds(tiny_root, workdir):
    assert not hasattr(np, "float_") or np.__version__.startswith("1.")
    config = _plain_config(tiny_root, workdir)  # raised AttributeError (np.float_) before the fix
    assert config["model"] == "SASRec"
    assert np.float is float and np.unicode is str


def test_recbole_trainer_reloads_its_own_checkpoint(tiny_root, workdir):
    """Trainer.evaluate(load_best_model=True) unpickles RecBole's Config: fails on torch>=2.6 without the fix."""
    from recbole.data import create_dataset, data_preparation
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer

    config = _plain_config(tiny_root, workdir, epochs=1)
    dataset = create_dataset(config)
    train, valid, test = data_preparation(config, dataset)
    trainer = Trainer(config, SASRec(config, train._dataset))
    trainer.fit(train, valid, saved=True)
    with pytest.raises(Exception):
        torch.load(trainer.saved_model_file, weights_only=True)  # what broke RecBole
    result = trainer.evaluate(test, load_best_model=True)
    assert 0.0 <= result["ndcg@10"] <= 1.0


@pytest.mark.slow
def test_recbole_quick_start_imports_without_pkg_resources():
    code = (
        "import importlib.util, recbole_mm;"
        "import recbole.quick_start as q;"
        "print(importlib.util.find_spec('pkg_resources') is None, callable(q.run_recbole))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    missing_pkg_resources, ok = out.stdout.split()
    assert ok == "True"
    if missing_pkg_resources == "True":
        code2 = "import recbole_mm; from ray import tune; tune.report(x=1)"
        out2 = subprocess.run([sys.executable, "-c", code2], capture_output=True, text=True, timeout=300)
        assert out2.returncode != 0 and "setuptools<81" in out2.stderr



def test_recbole_quick_start_imports_without_ray_installed(tmp_path):
    """An environment with RecBole but no ray (installed without its dependencies): importing
    recbole_mm and recbole.quick_start works, and only ray.tune's use fails, with the fix named.
    A pkg_resources is put on the path so that the stand-in cannot come from its absence."""
    (tmp_path / "pkg_resources.py").write_text("")
    block = (
        f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n"  # ray made unfindable: the path finder answers None for it, as for a missing package
        "import sys, importlib.machinery as m\n"
        "class NoRay(m.PathFinder):\n"
        "    @classmethod\n"
        "    def find_spec(cls, name, path=None, target=None):\n"
        "        if name == 'ray' or name.startswith('ray.'): return None\n"
        "        return m.PathFinder.find_spec(name, path, target)\n"
        "sys.meta_path = [NoRay if f is m.PathFinder else f for f in sys.meta_path]\n"
    )
    code = block + "import recbole_mm, recbole.quick_start as q; print(callable(q.run_recbole))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr[-2000:]
    code2 = block + "import recbole_mm; from ray import tune; tune.report(x=1)"
    out2 = subprocess.run([sys.executable, "-c", code2], capture_output=True, text=True, timeout=300)
    assert out2.returncode != 0 and "ray<=2.6.3" in out2.stderr, out2.stderr[-2000:]

def test_empty_sequence_field_under_copy_on_write(tmp_path, workdir):
    """A token_seq cell left empty must load as an empty sequence (inplace fillna is a no-op under CoW)."""
    from recbole.data.dataset import Dataset

    folder = tmp_path / "Seq"
    folder.mkdir()
    (folder / "Seq.inter").write_text(
        "user_id:token\titem_id:token\ttags:token_seq\trating:float\n"
        "1\t10\ta b\t5\n2\t11\t\t\n3\t10\tc\t3\n"
    )
    cfg = {
        "data_path": str(tmp_path), "load_col": None, "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id",
        "RATING_FIELD": "rating", "TIME_FIELD": None, "LABEL_FIELD": None, "state": "WARNING",
        "eval_args": {"split": {"RS": [0.8, 0.1, 0.1]}, "order": "RO", "mode": "full"},
    }
    previous = pd.get_option("mode.copy_on_write") if hasattr(pd.options.mode, "copy_on_write") else None
    if previous is not None:
        pd.set_option("mode.copy_on_write", True)
    try:
        config = RecBoleConfig(model="BPR", dataset="Seq", config_dict=cfg)
        ds = Dataset(config)
    finally:
        if previous is not None:
            pd.set_option("mode.copy_on_write", previous)
    tags = ds.inter_feat["tags"]
    assert len(tags) == 3 and len(tags.iloc[1]) == 0 and len(tags.iloc[0]) == 2  # row 2: empty sequence
    assert not ds.inter_feat["rating"].isna().any()  # NaN float imputed with the mean
    assert ds.inter_feat["rating"].iloc[1] == pytest.approx(4.0)


@pytest.mark.slow
def test_importing_recbole_models_leaves_anomaly_detection_off():
    code = (
        "import torch, recbole_mm;"
        "from recbole.utils import get_model;"
        "get_model('SASRec'); import recbole.model.sequential_recommender.sine;"
        "print(torch.is_anomaly_enabled())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "False"
    # without the fix RecBole turns it on (the test would be meaningless otherwise)
    plain = "import torch; from recbole.utils import get_model; get_model('SASRec'); print(torch.is_anomaly_enabled())"
    out = subprocess.run([sys.executable, "-c", plain], capture_output=True, text=True, timeout=300)
    assert out.stdout.split()[-1] == "True", out.stderr[-2000:]


def test_ensure_dir_tolerates_a_directory_created_meanwhile(tmp_path, monkeypatch):
    """Two torchrun ranks: both see 'saved' missing, the first creates it, the second must not fail."""
    import os

    import recbole.data.utils
    import recbole.trainer.trainer
    import recbole.utils
    import recbole.utils.logger

    target = tmp_path / "saved"
    target.mkdir()
    monkeypatch.setattr(os.path, "exists", lambda p: False)  # the check of the other rank's race
    for module in (recbole.utils, recbole.utils.logger, recbole.data.utils, recbole.trainer.trainer):
        module.ensure_dir(str(target))  # RecBole's original raises FileExistsError here
    recbole.utils.ensure_dir(str(tmp_path / "new" / "deeper"))
    assert (tmp_path / "new" / "deeper").is_dir()
