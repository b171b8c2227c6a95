import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import recbole_mm  # noqa: E402,F401  (applies the RecBole compatibility fixes)
from fixtures import make_dataset  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_dataset(root, "Tiny", seed=0)
    make_dataset(root, "Tiny2", n_users=80, n_items=30, seed=1)
    return root


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run in an empty folder (RecBole writes log/ into the working directory)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def quick(root, **extra):
    """Overrides for fast runs on the tiny fixtures."""
    cfg = {
        "data_path": str(root),
        "epochs": 2,
        "show_progress": False,
        "train_batch_size": 64,
        "eval_batch_size": 64,
        "use_gpu": False,
        "state": "WARNING",
        "topk": [10],
    }
    cfg.update(extra)
    return cfg


@pytest.fixture(scope="session")
def shared_data():
    if not (SHARED_DATA / "Scientific_mm" / "Scientific_mm.train.inter").is_file():
        pytest.skip(f"real data not found at {SHARED_DATA} (see ../shared/data/README.md)")
    return SHARED_DATA
