"""Dataset: vocabulary/feature alignment, presence masks, pre-training merge, batch trimming."""

import numpy as np
import torch

from conftest import quick
from recbole_mm.config import Config
from recbole_mm.data import create_dataset, data_preparation, trim_batch


def _dataset(root, model="SASRec", dataset="Tiny", stage="finetune", **extra):
    cfg = quick(root, plm_suffix="feat1CLS", img_suffix="feat3CLS", **extra)
    config = Config(model, dataset, stage, cmd_overrides=cfg)
    return config, create_dataset(config)


def test_features_align_with_item2index(tiny_root):
    config, ds = _dataset(tiny_root)
    raw = np.fromfile(tiny_root / "Tiny" / "Tiny.feat1CLS", dtype="<f4").reshape(40, -1)
    assert ds.item_num == 41 and config["plm_size"] == 16 and config["img_size"] == 8
    assert torch.equal(ds.features["text"][0], torch.zeros(16))
    for internal in (1, 7, 40):
        token = ds.field2id_token["item_id"][internal]
        assert np.allclose(ds.features["text"][internal].numpy(), raw[int(token)])
    # .inter tokens are item2index indices: token '5' is the 6th line of Tiny.item2index
    assert ds.item_raw_ids[ds.field2token_id["item_id"]["5"]] == "A000005"
    assert ds.item_text[ds.field2token_id["item_id"]["5"]].startswith("Item number 5 ")
    for internal in range(1, ds.item_num):  # every item-aligned table follows the same permutation
        token = ds.field2id_token["item_id"][internal]
        assert ds.item_raw_ids[internal] == f"A{int(token):06d}"
        assert ds.item_text[internal].startswith(f"Item number {token} ")


def test_internal_ids_follow_plain_recbole(tiny_root):
    """Same numbering as RecBole's own loader on the same files, so ID models match it."""
    from recbole.config import Config as RecBoleConfig
    from recbole.data import create_dataset as recbole_dataset

    _, ds = _dataset(tiny_root)
    plain_cfg = RecBoleConfig(
        model="SASRec", dataset="Tiny",
        config_dict={"data_path": str(tiny_root), "benchmark_filename": ["train", "valid", "test"],
                     "alias_of_item_id": ["item_id_list"], "use_gpu": False, "train_neg_sample_args": None,
                     "load_col": {"inter": ["user_id", "item_id_list", "item_id"]}},
    )
    plain = recbole_dataset(plain_cfg)
    seen = plain.num("item_id")  # plain RecBole numbers only the items that occur
    assert list(ds.field2id_token["item_id"][:seen]) == list(plain.field2id_token["item_id"])
    assert list(ds.field2id_token["user_id"][1:]) == list(plain.field2id_token["user_id"][1:])
    for f in ("user_id", "item_id"):
        assert np.array_equal(np.asarray(ds.inter_feat[f]), np.asarray(plain.inter_feat[f]))
    for ours, theirs in zip(ds.inter_feat["item_id_list"], plain.inter_feat["item_id_list"]):
        assert np.array_equal(np.asarray(ours), np.asarray(theirs))


def test_presence_mask_marks_missing_images(tiny_root):
    _, ds = _dataset(tiny_root)
    presence = ds.feature_presence["image"]
    missing = set(torch.nonzero(~presence).flatten().tolist())
    tok = ds.field2token_id["item_id"]
    assert missing == {0, tok["3"], tok["7"]}  # padding + item indices 3 and 7
    assert bool(ds.feature_presence["text"][1:].all())


def test_pretrain_merges_domains_with_prefixes(tiny_root):
    config, ds = _dataset(tiny_root, dataset="Tiny,Tiny2", stage="pretrain", benchmark_filename=["train"])
    assert config["pretrain_domains"] == ["Tiny", "Tiny2"] and config["dataset"] == "Tiny+Tiny2"
    assert ds.item_num == 1 + 40 + 30
    tokens = list(ds.field2id_token["item_id"])
    assert sorted(tokens[1:]) == sorted([f"Tiny:{i}" for i in range(40)] + [f"Tiny2:{i}" for i in range(30)])
    raw2 = np.fromfile(tiny_root / "Tiny2" / "Tiny2.feat1CLS", dtype="<f4").reshape(30, -1)
    for i in (0, 17):
        internal = ds.field2token_id["item_id"][f"Tiny2:{i}"]
        assert np.allclose(ds.features["text"][internal].numpy(), raw2[i])
    domain_of = torch.tensor([0] + [0 if t.startswith("Tiny:") else 1 for t in tokens[1:]])
    assert torch.equal(ds.item_domain, domain_of)
    train, valid, test = data_preparation(config, ds)
    assert valid is None and test is None
    batch = next(iter(train))
    domains = ds.item_domain[batch["item_id"]]
    assert set(domains.tolist()) == {0, 1}  # shuffled batches mix domains


def test_trimmed_batches_give_identical_scores(tiny_root):
    from recbole.model.sequential_recommender import SASRec

    config, ds = _dataset(tiny_root, train_batch_size=16, trim_batch_seq=True)
    train, valid, test = data_preparation(config, ds)
    torch.manual_seed(0)
    model = SASRec(config, train._dataset).eval()
    short = torch.nonzero(test._dataset.inter_feat["item_length"] <= 6).flatten()[:16].numpy()
    full = test._dataset[short]
    assert full["item_id_list"].shape[1] == ds.field2seqlen["item_id_list"]
    trimmed = trim_batch(ds, test._dataset[short], config)
    assert trimmed["item_id_list"].shape[1] == int(full["item_length"].max()) < full["item_id_list"].shape[1]
    with torch.no_grad():
        assert torch.allclose(model.full_sort_predict(full), model.full_sort_predict(trimmed), atol=1e-5)
    batch = next(iter(train))
    assert batch["item_id_list"].shape[1] == int(batch["item_length"].max())


def test_plain_inter_goes_through_recbole_leave_one_out(tmp_path):
    from fixtures import make_dataset

    make_dataset(tmp_path, "Plain", n_users=30, n_items=20, plain_inter=True)
    config = Config("SASRec", "Plain", cmd_overrides=quick(tmp_path))
    ds = create_dataset(config)
    assert config["benchmark_filename"] is None
    train, valid, test = data_preparation(config, ds)
    assert len(valid._dataset) == 30 and len(test._dataset) == 30
    assert sorted(ds.field2id_token["item_id"][1:], key=int) == [str(i) for i in range(20)] and ds.item_num == 21
