"""UniSRec (the shared blocks: test_layers.py): stages, transfer, checkpoints, real-data learning."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import quick
from fixtures import assert_reload_identical, popularity_ndcg10

from recbole_mm.quick_start import build_config, run
from recbole_mm.trainer import load_checkpoint

REFERENCE_ENCODER_KEYS = {
    f"trm_encoder.layer.{i}.{part}.{p}"
    for i in range(2)
    for part in [
        "multi_head_attention.query",
        "multi_head_attention.key",
        "multi_head_attention.value",
        "multi_head_attention.dense",
        "multi_head_attention.LayerNorm",
        "feed_forward.dense_1",
        "feed_forward.dense_2",
        "feed_forward.LayerNorm",
    ]
    for p in ("weight", "bias")
}
# The reference's pre-trained state dict (UniSRec-FHCKM-300.pth), by name.
REFERENCE_PRETRAIN_KEYS = (
    {"position_embedding.weight", "LayerNorm.weight", "LayerNorm.bias", "moe_adaptor.w_gate", "moe_adaptor.w_noise"}
    | REFERENCE_ENCODER_KEYS
    | {f"moe_adaptor.experts.{k}.{p}" for k in range(8) for p in ("bias", "lin.weight")}
)


def _model(tiny_root, stage="transductive_ft", **extra):
    from recbole_mm.data import create_dataset
    from recbole_mm.model.unisrec import UniSRec

    cfg = build_config("UniSRec", "Tiny", config_dict=quick(tiny_root, train_stage=stage, **extra))
    ds = create_dataset(cfg)
    torch.manual_seed(0)
    return UniSRec(cfg, ds), cfg


def test_item_drop_keeps_order_first_item_and_lengths(tiny_root):
    model, _ = _model(tiny_root, stage="pretrain", item_drop_coefficient=1.0, item_drop_ratio=0.5)
    torch.manual_seed(1)
    seq = torch.tensor([[5, 6, 7, 8, 9, 0], [3, 4, 0, 0, 0, 0], [2, 0, 0, 0, 0, 0]])
    lens = torch.tensor([5, 2, 1])
    for _ in range(20):
        aug, aug_len, replace = model.augment(seq, lens)
        assert replace is None
        for row, n, orig, on in zip(aug.tolist(), aug_len.tolist(), seq.tolist(), lens.tolist()):
            assert 1 <= n <= on and row[0] == orig[0]
            kept = row[:n]
            assert all(v != 0 for v in kept) and all(v == 0 for v in row[n:])
            it = iter(orig[:on])
            assert all(v in it for v in kept)  # a subsequence, order preserved


def test_word_drop_view_swaps_positions_only_within_the_sequence(tiny_root):
    model, _ = _model(tiny_root, stage="pretrain", item_drop_coefficient=0.0, item_drop_ratio=0.5)
    seq = torch.tensor([[5, 6, 7, 0], [3, 0, 0, 0]])
    lens = torch.tensor([3, 1])
    aug, aug_len, replace = model.augment(seq, lens)
    assert torch.equal(aug, seq) and torch.equal(aug_len, lens)
    assert not replace[0, 3] and not replace[1, 1:].any()


def test_inductive_has_no_id_parameters_and_transductive_has_them(tiny_root):
    ind, _ = _model(tiny_root, stage="inductive_ft")
    assert not [n for n, _ in ind.named_parameters() if "item_embedding" in n]
    tra, _ = _model(tiny_root, stage="transductive_ft")
    assert [n for n, _ in tra.named_parameters() if "item_embedding" in n] == ["item_embedding.weight"]
    pre, _ = _model(tiny_root, stage="pretrain")
    assert set(pre.state_dict()) == REFERENCE_PRETRAIN_KEYS  # the reference checkpoint's names


def test_feature_tables_are_not_checkpointed_and_adaptor_size_comes_from_data(tiny_root):
    model, _ = _model(tiny_root)
    assert not any("features" in k for k in model.state_dict())
    assert model.moe_adaptor.experts[0].lin.weight.shape == (300, 16)  # fixture text dim 16


@pytest.mark.parametrize("per_token", [False, True])
def test_finetune_loss_both_adaptor_paths_train_the_adaptor(tiny_root, per_token):
    from recbole_mm.data import create_dataset, data_preparation

    model, cfg = _model(tiny_root, adaptor_per_token=per_token)
    train, _, _ = data_preparation(cfg, create_dataset(cfg))
    batch = next(iter(train))
    model.train()
    loss = model.calculate_loss(batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.moe_adaptor.experts[0].lin.weight.grad.abs().sum() > 0
    assert model.item_embedding.weight.grad.abs().sum() > 0
    model.eval()  # both paths score identically at evaluation (no dropout, no gate noise)
    with torch.no_grad():
        seq = model.encode(batch["item_id_list"], batch["item_length"])
        table = model.moe_adaptor(model.text_features)
        torch.testing.assert_close(seq, model.encode(batch["item_id_list"], batch["item_length"], table), atol=1e-5, rtol=1e-5)


def test_item_table_computed_once_per_evaluation(tiny_root, workdir, monkeypatch):
    from recbole_mm.model.unisrec import UniSRec

    calls = []
    original = UniSRec.compute_item_table

    def counting(self):
        calls.append(1)
        return original(self)

    monkeypatch.setattr(UniSRec, "compute_item_table", counting)
    run("UniSRec", "Tiny", overrides=quick(tiny_root, epochs=1, eval_batch_size=16, saved=False), saved=False)
    # valid (1 epoch) + test: one table each although each has several batches
    assert len(calls) == 2


@pytest.mark.slow
def test_pretrain_on_two_domains_then_transfer_freezes_reference_parameters(tiny_root, workdir):
    pre = run("UniSRec", "Tiny,Tiny2", "pretrain", overrides=quick(tiny_root, epochs=3, run_name="pt"))
    losses = [h["train_loss"] for h in pre["history"]]
    assert losses[-1] < losses[0]
    ckpt = load_checkpoint(pre["checkpoint"])
    assert set(ckpt["state_dict"]) == REFERENCE_PRETRAIN_KEYS
    assert ckpt["config"]["train_stage"] == "pretrain"
    assert ckpt["config"]["pretrain_domains"] == ["Tiny", "Tiny2"]

    from recbole_mm.data import create_dataset
    from recbole_mm.model.unisrec import UniSRec

    for stage in ("transductive_ft", "inductive_ft"):
        cfg = build_config("UniSRec", "Tiny", config_dict=quick(tiny_root, train_stage=stage))
        model = UniSRec(cfg, create_dataset(cfg))
        model.load_pretrained(ckpt["state_dict"])
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        assert frozen == REFERENCE_ENCODER_KEYS | {"position_embedding.weight"}
        torch.testing.assert_close(model.moe_adaptor.w_gate, ckpt["state_dict"]["moe_adaptor.w_gate"])

    ft = run("UniSRec", "Tiny", mode="transductive", pretrained=pre["checkpoint"],
             overrides=quick(tiny_root, epochs=2, run_name="ft"))
    assert ft["params"]["trainable"] < ft["params"]["total"]
    scratch_cfg = quick(tiny_root, epochs=1, run_name="fix_off", fix_enc=False)
    free = run("UniSRec", "Tiny", pretrained=pre["checkpoint"], overrides=scratch_cfg)
    assert free["params"]["trainable"] == free["params"]["total"]


def test_reference_mask_mode_runs_and_differs(tiny_root, workdir):
    a = run("UniSRec", "Tiny,Tiny2", "pretrain", overrides=quick(tiny_root, epochs=1, contrastive_mask="zero"), saved=False)
    b = run("UniSRec", "Tiny,Tiny2", "pretrain", overrides=quick(tiny_root, epochs=1), saved=False)
    assert math.isfinite(a["history"][0]["train_loss"]) and a["history"][0]["train_loss"] != b["history"][0]["train_loss"]


def test_checkpoint_reloads_to_identical_scores(tiny_root, workdir):
    from recbole_mm.data import create_dataset, data_preparation
    from recbole_mm.model.unisrec import UniSRec

    res = run("UniSRec", "Tiny", mode="inductive", overrides=quick(tiny_root, epochs=2, run_name="u"))
    cfg = build_config("UniSRec", "Tiny", mode="inductive", config_dict=quick(tiny_root))
    ds = create_dataset(cfg)
    _, _, test = data_preparation(cfg, ds)
    assert_reload_identical(UniSRec, cfg, ds, test, res)  # and it reproduces the run's test metrics


@pytest.mark.slow
@pytest.mark.integration
def test_unisrec_learns_on_real_data_and_beats_popularity(shared_data, workdir):
    res = run(
        "UniSRec",
        "Scientific_mm",
        mode="transductive",
        overrides={"data_path": str(shared_data), "epochs": 2, "show_progress": False, "state": "WARNING",
                   "use_gpu": False, "eval_step": 2},
        saved=False,
    )
    losses = [h["train_loss"] for h in res["history"]]
    assert losses[1] < losses[0]
    pop = popularity_ndcg10(shared_data, "Scientific_mm")
    assert res["test"]["ndcg@10"] > pop + 0.02, (res["test"], pop)
