"""MISSRec (k-means itself: test_layers.py): interest sets, exactness of the packed encoder-decoder, stages, PEFT,
modal types, checkpoints, real-data learning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import quick
from fixtures import assert_reload_identical, popularity_ndcg10

from recbole_mm.data import create_dataset, data_preparation
from recbole_mm.quick_start import build_config, run
from recbole_mm.trainer import load_checkpoint


def _model(root, mode="transductive", **extra):
    from recbole_mm.model.missrec import MISSRec

    cfg = build_config("MISSRec", "Tiny", mode=mode, config_dict=quick(root, **extra))
    ds = create_dataset(cfg)
    return MISSRec(cfg, ds), cfg, ds


def test_interest_discovery_skips_missing_modalities_and_is_seeded(tiny_root):
    model, _, ds = _model(tiny_root)
    model.on_epoch_start(0)
    n_vectors = int(ds.feature_presence["text"].sum() + ds.feature_presence["image"].sum())
    assert model.interest_embeddings.shape[0] == 1 + -(-n_vectors // 2)  # ceil(0.5 * vectors) + padding row
    missing = ~ds.feature_presence["image"]
    assert bool((model.image_interest[missing] == 0).all()) and bool((model.image_interest[~missing] > 0).all())
    assert model.text_interest[0] == 0 and bool((model.text_interest[1:] > 0).all())
    first = model.text_interest.clone()
    model.on_epoch_start(0)
    assert torch.equal(first, model.text_interest)


def test_interest_ids_are_the_sorted_distinct_interests_of_each_sequence(tiny_root):
    model, _, _ = _model(tiny_root)
    model.on_epoch_start(0)
    seq = torch.tensor([[1, 2, 3, 0, 0], [4, 4, 4, 4, 4], [8, 0, 0, 0, 0]])  # item 8 has no image
    ids = model.interest_ids(seq)
    for row, out in zip(seq.tolist(), ids.tolist()):
        expect = sorted({int(model.text_interest[i]) for i in row if i} | {int(model.image_interest[i]) for i in row if i} - {0})
        assert out[: len(expect)] == expect and all(v == 0 for v in out[len(expect):])
    assert ids.shape[1] == max(len({*r} - {0}) for r in ids.tolist())


@pytest.mark.parametrize("layers", [2, 4])
def test_packed_encoder_decoder_equals_nn_transformer(tiny_root, layers):
    model, _, _ = _model(tiny_root, n_layers=layers, hidden_size=32, inner_size=24, n_heads=4)
    model.on_epoch_start(0)
    model.eval()
    torch.manual_seed(0)
    seq = torch.randint(1, model.n_items, (6, 7))
    lengths = torch.tensor([7, 1, 3, 5, 2, 6])
    seq = seq * (torch.arange(7).unsqueeze(0) < lengths.unsqueeze(1))
    with torch.no_grad():
        table = model.compute_item_table()
        ours, _ = model.encode(seq, lengths, table)
        # the padded reference: nn.Transformer with key-padding masks
        x = sum(table[m][seq] * model._presence(m)[seq].unsqueeze(-1) for m in model.modalities)
        x = x + model.position_embedding(torch.arange(7)).unsqueeze(0) + table["id"][seq]
        x = model.LayerNorm(x)
        ids = model.interest_ids(seq)
        ref = model.trm_model(
            model.interest_embeddings[ids], x,
            src_key_padding_mask=ids == 0, tgt_key_padding_mask=seq == 0, memory_key_padding_mask=ids == 0,
        )
        ref = F.normalize(ref[torch.arange(6), lengths - 1], dim=-1)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def _reference_regulariser(model, seq, lengths, scale):
    """The reference's formula (MM23-MISSRec ``MISSRec.forward``) on a padded batch: RecBole
    1.0.1 pads item lists to MAX_ITEM_LIST_LENGTH, so a shorter sequence's ``unique()``
    interests include 0; ``pad_sequence``; encoder with the key-padding mask; every slot's
    output (padding ones too) weighted by the share of real interests; ``sum ||.||^2 / d``."""
    ids = model.interest_ids(seq)
    rows = []
    for b in range(seq.size(0)):
        real = ids[b][ids[b] > 0]
        rows.append(torch.cat([real.new_zeros(int(lengths[b] < model.max_seq_length)), real]))
    padded = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=0)
    mask = padded == 0
    memory = model.trm_model.encoder(model.interest_embeddings[padded], src_key_padding_mask=mask)
    if scale == "mean":
        pooled = (memory * (~mask).unsqueeze(-1)).sum(1) / (~mask).sum(1, keepdim=True)
    else:
        pooled = (memory * (~mask).unsqueeze(-1).float().mean(1, keepdim=True)).sum(1)
    return (pooled * pooled).sum() / pooled.shape[1]


@pytest.mark.parametrize("scale", ["reference", "mean"])
def test_diversity_regulariser_matches_the_reference_formula(tiny_root, scale):
    model, cfg, _ = _model(tiny_root, diversity_reg=scale, hidden_size=32, inner_size=24, n_heads=4,
                           MAX_ITEM_LIST_LENGTH=7)
    assert cfg["diversity_reg"] == scale and model.max_seq_length == 7
    model.on_epoch_start(0)
    model.eval()
    torch.manual_seed(0)
    seq = torch.randint(1, model.n_items, (6, 7))
    lengths = torch.tensor([7, 1, 3, 5, 2, 6])  # the first one is full: no padding interest
    seq = seq * (torch.arange(7).unsqueeze(0) < lengths.unsqueeze(1))
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # nn.Transformer's fast path zeroes padding outputs
    try:
        with torch.no_grad():
            _, ours = model.encode(seq, lengths, model.compute_item_table())
            ref = _reference_regulariser(model, seq, lengths, scale)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert float(ours) > 0


def test_diversity_regulariser_default_is_the_reference_scale(tiny_root):
    model, cfg, _ = _model(tiny_root)
    assert cfg["diversity_reg"] == "reference" and model.diversity_reg == "reference"
    with pytest.raises(ValueError, match="diversity_reg"):
        _model(tiny_root, diversity_reg="sum")


@pytest.mark.parametrize("key,value", [("seq_mm_fusion", "contextual"), ("item_mm_fusion", "dynamic_instance"),
                                       ("id_type", "none")])
def test_unimplemented_reference_options_are_errors_naming_them(tiny_root, key, value):
    with pytest.raises(ValueError, match=f"{key}: '{value}' is not implemented"):
        _model(tiny_root, **{key: value})
    _model(tiny_root, **{key: {"seq_mm_fusion": "add", "item_mm_fusion": "static", "id_type": "id"}[key]})


def test_inductive_has_no_id_parameters(tiny_root):
    ind, _, _ = _model(tiny_root, mode="inductive")
    trans, _, _ = _model(tiny_root, mode="transductive")
    assert ind.item_embedding is None and not [n for n, _ in ind.named_parameters() if "item_embedding" in n]
    assert trans.item_embedding.weight.shape == (trans.n_items, 300)


@pytest.mark.slow
@pytest.mark.parametrize("modal_type", ["img_text", "text", "img"])
def test_each_modal_type_pretrains_and_finetunes(tiny_root, workdir, modal_type):
    pre = run("MISSRec", "Tiny,Tiny2", "pretrain",
              overrides=quick(tiny_root, epochs=3, modal_type=modal_type, run_name=f"pt-{modal_type}",
                              train_batch_size=64))
    losses = [h["train_loss"] for h in pre["history"]]
    assert all(map(torch.isfinite, map(torch.tensor, losses))) and losses[-1] < losses[0]
    ft = run("MISSRec", "Tiny", mode="inductive", pretrained=pre["checkpoint"],
             overrides=quick(tiny_root, epochs=2, modal_type=modal_type, run_name=f"ft-{modal_type}"))
    assert ft["test"]["ndcg@10"] > 0
    names = {"img_text": {"text_adaptor", "img_adaptor"}, "text": {"text_adaptor"}, "img": {"img_adaptor"}}[modal_type]
    ckpt = load_checkpoint(ft["checkpoint"])
    assert {k.split(".")[0] for k in ckpt["state_dict"] if "adaptor" in k} == names


def test_peft_trains_exactly_the_reference_parameter_set(tiny_root, workdir):
    pre = run("MISSRec", "Tiny,Tiny2", "pretrain", overrides=quick(tiny_root, epochs=1, run_name="pt"))
    ckpt = load_checkpoint(pre["checkpoint"])
    d_text, d_img, H = 16, 8, 300
    for mode, extra in (("inductive", 0), ("transductive", None)):
        model, _, _ = _model(tiny_root, mode=mode)
        model.load_pretrained(ckpt["state_dict"])
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        expect = {"fusion_factor", "LayerNorm.weight", "LayerNorm.bias", "text_adaptor.weight", "text_adaptor.bias",
                  "img_adaptor.weight", "img_adaptor.bias"}
        if mode == "transductive":
            expect.add("item_embedding.weight")
            extra = model.n_items * H
        assert trainable == expect
        count = sum(p.numel() for p in model.parameters() if p.requires_grad)
        # the reference's formula: 2 adaptors + LayerNorm + fusion scalar (+ IDs)
        assert count == (d_text * H + H) + (d_img * H + H) + 2 * H + 1 + extra
        torch.testing.assert_close(model.trm_model.encoder.layers[0].linear1.weight,
                                   ckpt["state_dict"]["trm_model.encoder.layers.0.linear1.weight"])
    ft = run("MISSRec", "Tiny", mode="inductive", pretrained=pre["checkpoint"], overrides=quick(tiny_root, epochs=1, run_name="ft"))
    assert ft["params"]["trainable"] == (d_text * H + H) + (d_img * H + H) + 2 * H + 1


def test_checkpoint_reloads_to_identical_scores(tiny_root, workdir):
    from recbole_mm.model.missrec import MISSRec

    res = run("MISSRec", "Tiny", mode="transductive", overrides=quick(tiny_root, epochs=2, run_name="m"))
    cfg = build_config("MISSRec", "Tiny", mode="transductive", config_dict=quick(tiny_root))
    ds = create_dataset(cfg)
    _, _, test = data_preparation(cfg, ds)
    assert_reload_identical(MISSRec, cfg, ds, test, res)


@pytest.mark.slow
@pytest.mark.integration
def test_missrec_learns_on_real_data_and_beats_popularity(shared_data, workdir):
    res = run(
        "MISSRec",
        "Scientific_mm",
        mode="transductive",
        overrides={"data_path": str(shared_data), "epochs": 2, "show_progress": False, "state": "WARNING",
                   "use_gpu": False, "eval_step": 2},
        saved=False,
    )
    losses = [h["train_loss"] for h in res["history"]]
    assert losses[1] < losses[0]
    pop = popularity_ndcg10(shared_data, "Scientific_mm")
    assert res["test"]["ndcg@10"] > pop + 0.01, (res["test"], pop)
