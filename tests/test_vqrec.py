"""VQRec: item codes (training items only, cached by hash), the permutation, learning, reload,
catalogue swap and transfer."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import quick
from fixtures import assert_reload_identical, make_dataset, popularity_ndcg10

from recbole_mm.quick_start import build_config, run
from recbole_mm.trainer import load_checkpoint

faiss = pytest.importorskip("faiss")

CODES = {"code_dim": 4, "code_cap": 16}  # fixture: 16-d features, 40 items


def _dataset(root, name="Tiny", **extra):
    from recbole_mm.data import create_dataset

    cfg = build_config("VQRec", name, mode="inductive", config_dict=quick(root, **{**CODES, **extra}))
    return cfg, create_dataset(cfg)


def _model(root, name="Tiny", **extra):
    from recbole_mm.model.vqrec import VQRec

    cfg, ds = _dataset(root, name, **extra)
    torch.manual_seed(0)
    return VQRec(cfg, ds), cfg, ds


def test_encode_matches_faiss_own_codes():
    from recbole_mm.data.codes import encode, fit_quantiser

    x = np.random.default_rng(0).normal(size=(400, 16)).astype(np.float32)
    quantiser = fit_quantiser(x, 4, 256)
    index = faiss.index_factory(16, "OPQ4,IVF1,PQ4x8", faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    ivf.do_polysemous_training = False  # as fit_quantiser (it would only relabel the codewords)
    index.train(x)
    index.add(x)
    lists = ivf.invlists
    codes = faiss.rev_swig_ptr(lists.get_codes(0), lists.list_size(0) * ivf.code_size).copy().reshape(-1, 4)
    ids = faiss.rev_swig_ptr(lists.get_ids(0), lists.list_size(0)).copy()
    ref = np.zeros_like(codes)
    ref[ids] = codes
    assert (encode(torch.from_numpy(x), quantiser).numpy() == ref).all()


def test_codes_fitted_on_training_items_only(tmp_path):
    from recbole_mm.data.codes import training_items

    root = tmp_path / "d"
    make_dataset(root, "Tiny", seed=0)
    # an item that only occurs as a valid/test target must not be fitted on
    folder = root / "Tiny"
    lines = (folder / "Tiny.train.inter").read_text().splitlines()
    kept = [lines[0]] + [ln for ln in lines[1:] if "39" not in ln.split("\t")[1].split() + [ln.split("\t")[2]]]
    (folder / "Tiny.train.inter").write_text("\n".join(kept) + "\n")
    model, cfg, ds = _model(root)
    items = training_items(ds)
    tok = list(ds.field2id_token["item_id"])
    assert tok.index("39") not in items.tolist() and len(items) == 39
    payload = torch.load(model.codes_path, weights_only=True)
    assert torch.equal(payload["train_items"], items)
    # the quantiser is the one fitted on exactly those rows
    from recbole_mm.data.codes import fit_quantiser

    again = fit_quantiser(ds.features["text"][items].numpy(), 4, 16)
    torch.testing.assert_close(again["centroids"], model.quantiser_centroids)
    # every item, the unseen one included, still has codes (encoded with that quantiser)
    assert (model.pq_codes[1:] > 0).all() and (model.pq_codes[0] == 0).all()


def test_codes_rebuilt_only_when_features_change(tmp_path):
    root = tmp_path / "d"
    make_dataset(root, "Tiny", seed=0)
    model, _, _ = _model(root)
    path = model.codes_path
    assert os.path.dirname(path) == str(root / "Tiny")
    before = (os.stat(path).st_mtime_ns, open(path, "rb").read())
    model2, _, _ = _model(root)
    assert (os.stat(path).st_mtime_ns, open(path, "rb").read()) == before  # loaded, not refitted
    assert torch.equal(model.pq_codes, model2.pq_codes)
    feats = np.fromfile(root / "Tiny" / "Tiny.feat1CLS", dtype=np.float32).reshape(40, 16)
    (feats * 2 + 1).tofile(root / "Tiny" / "Tiny.feat1CLS")
    _model(root)
    assert open(path, "rb").read() != before[1]  # refitted
    # other settings: another file, this one untouched
    after = open(path, "rb").read()
    m8, _, _ = _model(root, code_cap=8)
    assert m8.codes_path != path and open(path, "rb").read() == after


def test_too_few_training_items_names_the_flag(tiny_root):
    from recbole_mm.data.codes import CodesError

    with pytest.raises(CodesError, match="--code_cap=32"):
        _model(tiny_root, code_cap=256)
    with pytest.raises(CodesError, match="code_dim 5 must divide"):
        _model(tiny_root, code_dim=5)


def test_permutation_step_keeps_a_valid_assignment_and_learns(tiny_root):
    from recbole_mm.data import data_preparation

    model, cfg, ds = _model(tiny_root, reassign_steps=2)
    model.pretrained = True
    model.on_epoch_start(0)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["trans_matrix"]
    for noise in (True, False):
        perm = model.permutation_matrix(noise=noise).detach()
        assert set(perm.unique().tolist()) <= {0.0, 1.0}
        assert (perm.sum(-1) == 1).all() and (perm.sum(-2) == 1).all()  # a permutation per sub-code
    train, _, _ = data_preparation(cfg, ds)
    batch = next(iter(train))
    model.train()
    before = model.trans_matrix.detach().clone()
    loss = model.calculate_loss(batch)
    loss.backward()
    assert model.trans_matrix.grad is not None and model.trans_matrix.grad.abs().sum() > 0
    torch.optim.Adam([model.trans_matrix], lr=0.1).step()
    assert not torch.equal(before, model.trans_matrix)
    # hardening permutes each sub-code block of the code embedding table: same rows, new order
    old = model.pq_code_embedding.weight.detach().clone().view(4, 17, -1)
    model.on_epoch_start(2)
    new = model.pq_code_embedding.weight.detach().view(4, 17, -1)
    assert not model.reassigning and not model.trans_matrix.requires_grad
    for d in range(4):
        assert sorted(map(tuple, new[d, 1:].tolist())) == sorted(map(tuple, old[d, 1:].tolist()))
    assert model.pq_code_embedding.weight[0].abs().sum() == 0


def test_reference_permutation_gets_no_gradient(tiny_root):
    from recbole_mm.data import data_preparation

    model, cfg, ds = _model(tiny_root, permutation="reference", reassign_steps=2)
    model.pretrained = True
    model.on_epoch_start(0)
    batch = next(iter(data_preparation(cfg, ds)[0]))
    model.train()
    model.calculate_loss(batch).backward()
    assert model.trans_matrix.grad is not None and not model.trans_matrix.grad.any()  # the ceil passes none


def test_learns_beats_popularity_and_reloads_identically(tiny_root, workdir):
    from recbole_mm.data import create_dataset, data_preparation
    from recbole_mm.model.vqrec import VQRec

    res = run("VQRec", "Tiny", mode="inductive", overrides=quick(tiny_root, epochs=6, run_name="v", **CODES))
    losses = [h["train_loss"] for h in res["history"]]
    assert losses[-1] < losses[0]
    assert res["test"]["ndcg@10"] > popularity_ndcg10(tiny_root, "Tiny") + 0.1
    cfg = build_config("VQRec", "Tiny", mode="inductive", config_dict=quick(tiny_root, **CODES))
    ds = create_dataset(cfg)
    _, _, test = data_preparation(cfg, ds)
    assert_reload_identical(VQRec, cfg, ds, test, res)


def test_transductive_has_id_embedding(tiny_root):
    from recbole_mm.model.vqrec import VQRec

    cfg = build_config("VQRec", "Tiny", mode="transductive", config_dict=quick(tiny_root, **CODES))
    from recbole_mm.data import create_dataset

    model = VQRec(cfg, create_dataset(cfg))
    assert [n for n, _ in model.named_parameters() if "item_embedding" in n] == ["item_embedding.weight"]


def test_catalogue_swap_ranks_new_items_with_the_stored_quantiser(tmp_path, workdir):
    import recbole_mm

    root = tmp_path / "d"
    make_dataset(root, "Tiny", seed=0)
    make_dataset(root, "Tiny2", n_users=80, n_items=30, seed=1)
    res = run("VQRec", "Tiny", mode="inductive", overrides=quick(root, epochs=3, run_name="swap", **CODES))
    rec = recbole_mm.load(res["checkpoint"], device="cpu")
    own = rec.model
    other = rec.with_catalogue(str(root / "Tiny2"))
    assert len(other.item_ids) == 30
    # the new items are encoded with the trained quantiser (no refit: no codes file for Tiny2)
    torch.testing.assert_close(other.model.quantiser_centroids, own.quantiser_centroids)
    assert not list((root / "Tiny2").glob("*.codes.pt"))
    from recbole_mm.data.codes import encode

    feats = other.model.text_features
    assert torch.equal(other.model.pq_codes[1:], encode(feats, own.quantiser())[1:] + 1 + torch.arange(4) * 17)
    recs = other.recommend([[other.item_ids[0], other.item_ids[1]]], k=5)
    assert len(recs[0].items) == 5 and set(recs[0].items) <= set(other.item_ids)
    # and the own catalogue scores exactly as the evaluator's model does
    assert torch.equal(own.pq_codes, rec.model.pq_codes)


def test_pretrain_two_domains_then_finetune(tiny_root, workdir):
    pre = run("VQRec", "Tiny,Tiny2", "pretrain", overrides=quick(tiny_root, epochs=3, run_name="pt", **CODES))
    losses = [h["train_loss"] for h in pre["history"]]
    assert losses[-1] < losses[0]
    state = load_checkpoint(pre["checkpoint"])["state_dict"]
    assert "pq_code_embedding.weight" in state and "quantiser_centroids" in state
    ft = run("VQRec", "Tiny", mode="inductive", pretrained=pre["checkpoint"],
             overrides=quick(tiny_root, epochs=4, reassign_steps=2, run_name="ft", **CODES))
    assert ft["params"]["trainable"] < ft["params"]["total"]  # fix_enc after the re-assignment
    assert ft["test"]["ndcg@10"] > popularity_ndcg10(tiny_root, "Tiny")


def test_read_only_dataset_folder_caches_codes_in_checkpoint_dir(tmp_path):
    root = tmp_path / "d"
    make_dataset(root, "Tiny", seed=0)
    os.chmod(root / "Tiny", 0o555)
    try:
        with pytest.warns(UserWarning, match="not writable"):
            model, _, _ = _model(root, checkpoint_dir=str(tmp_path / "saved"))
    finally:
        os.chmod(root / "Tiny", 0o755)
    assert os.path.dirname(model.codes_path) == str(tmp_path / "saved" / "codes")
    assert not list((root / "Tiny").glob("*.codes.pt"))


def test_cli_reports_bad_code_settings_and_missing_faiss_in_one_line(tiny_root, workdir, monkeypatch, capsys):
    import sys

    from recbole_mm.cli import main

    argv = ["finetune", "-m", "VQRec", "-d", "Tiny", "--data_path", str(tiny_root), "--epochs=1", "--use_gpu=False",
            "--state=WARNING", "--code_dim=4", "--topk=[10]"]
    assert main(argv) == 2  # code_cap 256 > 40 training items
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--code_cap=32" in err[0]
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    assert main(argv + ["--code_cap=16", "--codes_dir", str(workdir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install faiss-cpu" in err[0]


def test_transfer_codes_pretrained_keeps_the_checkpoints_quantiser(tiny_root, workdir):
    """``transfer_codes: pretrained`` (the reference's ``index_pretrain_dataset``): the downstream
    items are encoded by the pre-training quantiser, no re-assignment, the encoder frozen at once,
    and the codes (so the zero-shot scores) are those of the checkpoint's quantiser."""
    from recbole_mm.data.codes import encode

    pre = run("VQRec", "Tiny,Tiny2", "pretrain", overrides=quick(tiny_root, epochs=2, run_name="pt", **CODES))
    state = load_checkpoint(pre["checkpoint"])["state_dict"]
    model, _, _ = _model(tiny_root, transfer_codes="pretrained", reassign_steps=2)
    fitted = {k: v.clone() for k, v in model.quantiser().items()}
    model.load_pretrained(state)
    assert torch.equal(model.quantiser_centroids, state["quantiser_centroids"])
    assert not torch.equal(model.quantiser_centroids, fitted["centroids"])  # Tiny's own fit differs
    raw = encode(model.text_features, model.quantiser())
    assert torch.equal(model.pq_codes[1:], raw[1:] + 1 + torch.arange(4) * 17)
    torch.testing.assert_close(model.pq_code_embedding.weight, state["pq_code_embedding.weight"])
    model.on_epoch_start(0)  # no re-assignment phase: the code embeddings are used as pre-trained
    assert not model.reassigning and not model.trans_matrix.requires_grad
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == set(model.frozen_on_transfer()) | {"trans_matrix"}

    target, _, _ = _model(tiny_root, reassign_steps=2)  # the default: Tiny's own codes, re-assigned
    target.load_pretrained(state)
    assert torch.equal(target.quantiser_centroids, fitted["centroids"]) and target._uses_reassignment()

    zs = run("VQRec", "Tiny", mode="inductive", pretrained=pre["checkpoint"],
             overrides=quick(tiny_root, epochs=0, transfer_codes="pretrained", run_name="zs", **CODES))
    assert zs["test"]["ndcg@10"] > popularity_ndcg10(tiny_root, "Tiny")


def test_a_new_key_at_its_neutral_default_keeps_finished_cells(tiny_root):
    from recbole_mm.leaderboard.plan import HASH_NEUTRAL, config_hash

    cfg = build_config("VQRec", "Tiny", mode="inductive", config_dict=quick(tiny_root, **CODES))
    assert cfg["transfer_codes"] == HASH_NEUTRAL["transfer_codes"] == "target"
    before = config_hash(cfg, None)
    del cfg.final_config_dict["transfer_codes"]  # a run planned before the key existed
    assert config_hash(cfg, None) == before
    cfg.final_config_dict["transfer_codes"] = "pretrained"
    assert config_hash(cfg, None) != before
