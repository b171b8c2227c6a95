"""Datasets without an image feature file: image-using models run text-only (one warning), pre-train
on text-only domains, and a text-only checkpoint fine-tunes on data with images (image side fresh)."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from conftest import quick
from fixtures import make_dataset

from recbole_mm.data import create_dataset, data_preparation
from recbole_mm.data.dataset import DEFAULT_IMG_SIZE
from recbole_mm.quick_start import build_config, run
from recbole_mm.trainer import load_checkpoint
from recbole_mm.utils import get_model

SMALL = {"hidden_size": 32, "inner_size": 64, "fusion_inner_size": 64}
PER_MODEL = {"PMMRec": SMALL, "MISSRec": {}}


@pytest.fixture(scope="module")
def text_only_root(tmp_path_factory):
    """Two text-only domains (no .feat3CLS) and one with images (``Tiny``, 8-d images)."""
    root = tmp_path_factory.mktemp("textonly")
    for name, seed in (("TextA", 3), ("TextB", 4)):
        folder = make_dataset(root, name, n_users=80, n_items=30, seed=seed)
        os.remove(os.path.join(folder, f"{name}.feat3CLS"))
    make_dataset(root, "Tiny", seed=0)
    return root


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if "no image features" in r.getMessage()]


def test_missing_image_file_is_every_image_missing_with_one_warning(text_only_root, caplog):
    caplog.set_level(logging.WARNING)
    cfg = build_config("PMMRec", "TextA,TextB", stage="pretrain", config_dict=quick(text_only_root))
    ds = create_dataset(cfg)
    (msg,) = _warnings(caplog)  # one warning for both domains
    assert "TextA.feat3CLS" in msg and "TextB.feat3CLS" in msg and "extract-image" in msg
    assert ds.features["image"].shape == (ds.item_num, DEFAULT_IMG_SIZE)
    assert not ds.feature_presence["image"].any() and ds.feature_presence["text"][1:].all()


def test_image_size_of_a_text_only_domain_follows_the_other_domains(text_only_root, caplog):
    caplog.set_level(logging.WARNING)
    cfg = build_config("PMMRec", "TextA,Tiny", stage="pretrain", config_dict=quick(text_only_root))
    ds = create_dataset(cfg)
    (msg,) = _warnings(caplog)
    assert "TextA.feat3CLS" in msg and "Tiny.feat3CLS" not in msg
    img, present = ds.features["image"], ds.feature_presence["image"]
    assert img.shape[1] == 8
    from_a = ds.item_domain == 0
    assert not present[from_a].any() and int(present[~from_a].sum()) == 40 - 2  # Tiny: two rows missing


def test_text_features_are_still_required(text_only_root, tmp_path):
    folder = make_dataset(tmp_path, "NoText", n_users=40, n_items=20)
    os.remove(os.path.join(folder, "NoText.feat1CLS"))
    cfg = build_config("PMMRec", "NoText", config_dict=quick(tmp_path))
    with pytest.raises(ValueError, match=r"NoText\.feat1CLS: missing text feature file"):
        create_dataset(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["PMMRec", "MISSRec"])
def test_text_only_pretraining_then_finetuning_with_images(text_only_root, workdir, model):
    extra = PER_MODEL[model]
    pre = run(model, "TextA,TextB", "pretrain",
              overrides=quick(text_only_root, epochs=3, run_name=f"pt-{model}", **extra))
    losses = [h["train_loss"] for h in pre["history"]]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    ckpt = load_checkpoint(pre["checkpoint"])
    assert ckpt["untrained_modalities"] == ["image"]

    # the image side starts fresh (its 512-d pre-training shape would not even fit Tiny's 8-d images)
    cfg = build_config(model, "Tiny", config_dict=quick(text_only_root, **extra))
    ds = create_dataset(cfg)
    train, _, _ = data_preparation(cfg, ds)
    torch.manual_seed(7)
    fresh = get_model(model)(cfg, train._dataset)
    torch.manual_seed(7)
    net = get_model(model)(cfg, train._dataset)
    net.load_pretrained(net.keep_fresh(ckpt["state_dict"], ckpt["untrained_modalities"]))
    prefixes = net.MODALITY_PREFIXES["image"]
    image_side = [k for k in net.state_dict() if k.startswith(prefixes)]
    assert image_side
    for k, v in net.state_dict().items():
        if k.startswith(prefixes):
            assert torch.equal(v, fresh.state_dict()[k]), k
    text_side = [k for k, _ in net.named_parameters() if "text" in k]  # the text adaptor/tower: pre-trained
    assert text_side and all(torch.equal(net.state_dict()[k], ckpt["state_dict"][k]) for k in text_side)

    ft = run(model, "Tiny", pretrained=pre["checkpoint"],
             overrides=quick(text_only_root, epochs=2, run_name=f"ft-{model}", **extra))
    assert ft["test"]["ndcg@10"] > 0
