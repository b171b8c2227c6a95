"""Recommending from a checkpoint: evaluator-equal scores, unknown ids, catalogue swaps, chunked
scoring, the ``recommend`` CLI, and (integration) the real Scientific_mm data."""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from conftest import quick
from fixtures import make_dataset

import recbole_mm
from recbole_mm.data import DataValidationError, create_dataset, data_preparation
from recbole_mm.quick_start import build_config, run
from recbole_mm.recommend import CatalogueError, EmptyHistoryError, UnknownItemError, UnknownItemWarning
from recbole_mm.trainer import load_checkpoint
from recbole_mm.utils import get_model

# name -> (model, mode, extra overrides)
RUNS = {
    "unisrec_ind": ("UniSRec", "inductive", {}),
    "unisrec_trans": ("UniSRec", "transductive", {}),
    "missrec_ind": ("MISSRec", "inductive", {}),
    "sasrec": ("SASRec", None, {}),
}


@contextmanager
def _cwd(path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@pytest.fixture(scope="module")
def ckpts(tiny_root, tmp_path_factory):
    """One short training run per model kind on Tiny; name -> checkpoint path."""
    work = tmp_path_factory.mktemp("rec_runs")
    out = {}
    with _cwd(work):
        for name, (model, mode, extra) in RUNS.items():
            res = run(model, "Tiny", mode=mode, overrides=quick(tiny_root, epochs=1, run_name=name, **extra))
            out[name] = os.path.abspath(res["checkpoint"])
    return out


def _reference(name, ckpt, root, dataset="Tiny", swap=False):
    """The evaluator's path: the model built on the dataset by the trainer's code, weights
    loaded, ``full_sort_predict`` on the test loader with the padding item masked."""
    model_name, mode, extra = RUNS[name]
    cfg = build_config(model_name, dataset, mode=mode, config_dict=quick(root, **extra))
    ds = create_dataset(cfg)
    _, _, test = data_preparation(cfg, ds)
    torch.manual_seed(0)
    model = get_model(model_name)(cfg, test._dataset)
    state = load_checkpoint(ckpt)["state_dict"]
    if swap:  # another catalogue: the model's own transfer path (MISSRec re-discovers interests)
        model.load_pretrained(state)
    else:
        model.load_state_dict(state)
    model.eval()
    histories, scores = [], []
    with torch.no_grad():
        for batch in test:
            inter = batch[0]
            s = model.full_sort_predict(inter).view(len(inter), -1)
            s[:, 0] = -math.inf
            scores.append(s)
            for seq, n in zip(inter["item_id_list"].tolist(), inter["item_length"].tolist()):
                histories.append([ds.item_raw_ids[i] for i in seq[:n]])
    return histories, torch.cat(scores), ds


def _top(scores, raw, k=10):
    v, i = scores.topk(k, dim=1)
    return [[raw[j] for j in row] for row in i.tolist()], v


def _assert_same_ranking(recs, ref_items, ref_scores, atol=1e-5):
    """Same scores; same ids wherever the score is not tied (within atol) with a neighbour."""
    for r, items, vals in zip(recs, ref_items, ref_scores.tolist()):
        np.testing.assert_allclose(r.scores, vals[: len(r.scores)], atol=atol, rtol=0)
        for j, item in enumerate(items):
            tied = any(abs(vals[j] - vals[t]) <= atol for t in (j - 1, j + 1) if 0 <= t < len(vals))
            if not tied:
                assert r.items[j] == item


# -- evaluator equality -------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(RUNS))
def test_recommend_equals_the_evaluators_full_sort_ranking(name, ckpts, tiny_root):
    histories, scores, ds = _reference(name, ckpts[name], tiny_root)
    rec = recbole_mm.load(ckpts[name], device="cpu")
    assert rec.item_ids == ds.item_raw_ids[1:]
    recs = rec.recommend(histories, k=10, exclude_seen=False)
    ref_items, ref_vals = _top(scores, ds.item_raw_ids)
    _assert_same_ranking(recs, ref_items, ref_vals)
    assert [r.items for r in recs] == ref_items  # no ties on these data: exactly the evaluator's top-10


def test_exclude_seen_drops_history_items(ckpts, tiny_root):
    histories, scores, ds = _reference("unisrec_trans", ckpts["unisrec_trans"], tiny_root)
    lookup = {r: i for i, r in enumerate(ds.item_raw_ids)}
    for row, h in enumerate(histories):
        scores[row, [lookup[x] for x in h]] = -math.inf
    rec = recbole_mm.load(ckpts["unisrec_trans"])
    recs = rec.recommend(histories, k=10)  # exclude_seen=True by default
    ref_items, ref_vals = _top(scores, ds.item_raw_ids)
    _assert_same_ranking(recs, ref_items, ref_vals)
    assert all(not set(r.items) & set(h) for r, h in zip(recs, histories))
    everything = rec.recommend([histories[0]], k=1000)[0]  # k larger than what is left
    assert len(everything.items) == len(rec.item_ids) - len(set(histories[0]))


@pytest.mark.parametrize("name", ["unisrec_ind", "unisrec_trans", "missrec_ind", "sasrec"])
def test_chunked_scoring_equals_unchunked(name, ckpts, tiny_root):
    histories, _, _ = _reference(name, ckpts[name], tiny_root)
    rec = recbole_mm.load(ckpts[name])
    for exclude in (False, True):
        whole = rec.recommend(histories, k=10, exclude_seen=exclude)
        chunked = rec.recommend(histories, k=10, exclude_seen=exclude, chunk_size=7, batch_size=13)
        assert [r.items for r in chunked] == [r.items for r in whole]
        for a, b in zip(chunked, whole):
            np.testing.assert_allclose(a.scores, b.scores, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["unisrec_ind", "unisrec_trans", "missrec_ind"])
def test_chunked_scoring_goes_through_the_models_serving_methods(name, ckpts, tiny_root, monkeypatch):
    """Any of our models: a catalogue larger than chunk_size is scored chunk by chunk with the
    model's sequence_output / item_table_range / score_items (never a whole score matrix from
    full_sort_predict), with the same top-k as the evaluator's single block."""
    histories, _, _ = _reference(name, ckpts[name], tiny_root)
    rec = recbole_mm.load(ckpts[name])
    whole = rec.recommend(histories, k=10, exclude_seen=False)
    model, ranges = rec.model, []
    table_range = model.item_table_range

    def spy(start, end):
        ranges.append((start, end))
        return table_range(start, end)

    def refuse(*_):
        raise AssertionError("full_sort_predict called by the chunked path")

    monkeypatch.setattr(model, "item_table_range", spy)
    monkeypatch.setattr(model, "full_sort_predict", refuse)
    chunked = rec.recommend(histories, k=10, exclude_seen=False, chunk_size=7, batch_size=13)
    n = len(rec.item_ids) + 1
    assert ranges == [(s, min(s + 7, n)) for s in range(0, n, 7)]  # each chunk once, for every batch
    assert [r.items for r in chunked] == [r.items for r in whole]
    for a, b in zip(chunked, whole):
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-5, rtol=0)


def test_embeddings_are_what_the_scores_are_made_of(ckpts, tiny_root):
    histories, _, _ = _reference("unisrec_ind", ckpts["unisrec_ind"], tiny_root)
    rec = recbole_mm.load(ckpts["unisrec_ind"])
    seq, items = rec.sequence_embeddings(histories[:20]), rec.item_embeddings()
    assert seq.shape == (20, 300) and items.shape == (len(rec.item_ids), 300)
    torch.testing.assert_close(items.norm(dim=1), torch.ones(len(items)))
    vals, idx = (seq @ items.T).topk(10, dim=1)
    recs = rec.recommend(histories[:20], k=10, exclude_seen=False)
    assert [r.items for r in recs] == [[rec.item_ids[j] for j in row] for row in idx.tolist()]
    np.testing.assert_allclose([r.scores for r in recs], vals.numpy(), atol=1e-5)
    torch.testing.assert_close(rec.item_embeddings(chunk_size=9), items, atol=1e-5, rtol=1e-5)
    missrec = recbole_mm.load(ckpts["missrec_ind"])
    table = missrec.item_embeddings()
    assert set(table) == {"text", "image"} and table["text"].shape == (40, 300)
    assert missrec.sequence_embeddings([histories[0]]).shape == (1, 300)


# -- unknown ids, empty histories --------------------------------------------------------------
def test_unknown_ids_are_warned_and_skipped_or_refused(ckpts):
    rec = recbole_mm.load(ckpts["unisrec_ind"])
    known = ["A000001", "A000002", "A000003"]
    with pytest.warns(UnknownItemWarning, match=r"NOPE1.*NOPE2|NOPE2.*NOPE1") as w:
        got = rec.recommend([known[:1] + ["NOPE1"] + known[1:], ["NOPE2", "[PAD]", "A000004"]], k=5)
    assert "[PAD]" in str(w[0].message)  # the padding token is not an item either
    clean = rec.recommend([known, ["A000004"]], k=5)
    assert [g.items for g in got] == [c.items for c in clean]
    assert got[0].unknown == ["NOPE1"] and got[1].unknown == ["NOPE2", "[PAD]"] and clean[0].unknown == []
    with pytest.raises(UnknownItemError, match="NOPE1"):
        rec.recommend([known + ["NOPE1"]], strict=True)
    with pytest.raises(UnknownItemError, match="NOPE1"):
        rec.sequence_embeddings([known + ["NOPE1"]], strict=True)
    with pytest.raises(TypeError, match="list of item-id lists"):
        rec.recommend(known)


def test_empty_histories_are_an_error_or_an_empty_recommendation(ckpts):
    rec = recbole_mm.load(ckpts["unisrec_ind"])
    with pytest.raises(EmptyHistoryError, match=r"index 1\b"):
        rec.recommend([["A000001"], []])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownItemWarning)
        with pytest.raises(EmptyHistoryError, match="no popularity fallback"):
            rec.recommend([["A000001"], ["NOPE"]])
        got = rec.recommend([["A000001"], ["NOPE"], []], k=3, on_empty="skip")
    assert len(got[0].items) == 3 and got[1].items == [] and got[1].unknown == ["NOPE"] and got[2].items == []


# -- catalogue swaps ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["unisrec_trans", "sasrec"])
def test_transductive_models_refuse_a_catalogue_swap(name, ckpts, tiny_root):
    rec = recbole_mm.load(ckpts[name])
    assert not rec.inductive
    with pytest.raises(CatalogueError, match="cannot score another catalogue"):
        rec.with_catalogue(tiny_root / "Tiny2")
    with pytest.raises(CatalogueError, match="transductive_ft" if name == "unisrec_trans" else "ID-based"):
        recbole_mm.load(ckpts[name], catalogue=tiny_root / "Tiny2")


@pytest.mark.parametrize("name", ["unisrec_ind", "missrec_ind"])
def test_inductive_model_scores_another_catalogue_zero_shot(name, ckpts, tiny_root):
    rec = recbole_mm.load(ckpts[name])
    assert rec.inductive
    swapped = rec.with_catalogue(tiny_root / "Tiny2")
    assert len(swapped.item_ids) == 30 and swapped.item_ids[0] == "A100000" and len(rec.item_ids) == 40
    # the reference: the model built on Tiny2's data by the trainer's code, with the weights
    histories, scores, ds = _reference(name, ckpts[name], tiny_root, dataset="Tiny2", swap=True)
    recs = swapped.recommend(histories, k=10, exclude_seen=False)
    ref_items, ref_vals = _top(scores, ds.item_raw_ids)
    _assert_same_ranking(recs, ref_items, ref_vals)
    direct = recbole_mm.load(ckpts[name], catalogue=tiny_root / "Tiny2")  # without the training data
    assert [r.items for r in direct.recommend(histories, k=10, exclude_seen=False)] == [r.items for r in recs]
    with pytest.raises(UnknownItemError, match="A000001"):  # histories are in the new catalogue's ids
        swapped.recommend([["A000001"]], strict=True)
    # the original recommender still scores its own catalogue
    assert rec.recommend([["A000001"]], k=3)[0].items[0].startswith("A0")


def test_new_items_are_recommendable_once_their_features_exist(ckpts, tiny_root, tmp_path):
    """Append an item to a copy of Tiny (index + features only): an inductive model ranks it."""
    folder = tmp_path / "Tiny"
    shutil.copytree(tiny_root / "Tiny", folder)
    feats = np.fromfile(folder / "Tiny.feat1CLS", dtype="<f4").reshape(40, 16)
    with open(folder / "Tiny.item2index", "a") as f:
        f.write("NEW0001\t40\n")
    np.concatenate([feats, feats[5:6]]).tofile(folder / "Tiny.feat1CLS")  # a twin of item 5
    img = np.fromfile(folder / "Tiny.feat3CLS", dtype="<f4").reshape(40, 8)
    np.concatenate([img, img[5:6]]).tofile(folder / "Tiny.feat3CLS")
    rec = recbole_mm.load(ckpts["unisrec_ind"]).with_catalogue(folder)
    got = rec.recommend([["A000003", "A000004"]], k=41, exclude_seen=False)[0]
    assert "NEW0001" in got.items
    assert got.scores[got.items.index("NEW0001")] == pytest.approx(got.scores[got.items.index("A000005")], abs=1e-5)
    with pytest.warns(UserWarning, match="41 items, the checkpoint was trained on 40"):  # own folder grew
        grown = recbole_mm.load(ckpts["unisrec_ind"], data_path=tmp_path)
    assert len(grown.item_ids) == 41
    with pytest.raises(CatalogueError, match="data changed since training"):  # not for an ID embedding
        recbole_mm.load(ckpts["unisrec_trans"], data_path=tmp_path)


def test_catalogue_feature_size_and_data_path_errors(ckpts, tiny_root, tmp_path):
    make_dataset(tmp_path, "Narrow", n_users=20, n_items=12, dim_text=8, seed=3)
    rec = recbole_mm.load(ckpts["unisrec_ind"])
    with pytest.raises(DataValidationError, match=r"Narrow\.feat1CLS.*dim 8; expected dim 16 \(plm_size"):
        rec.with_catalogue(tmp_path / "Narrow")
    with pytest.raises(DataValidationError, match="not found"):
        rec.with_catalogue(tmp_path / "Missing")
    with pytest.raises(DataValidationError, match="data_path"):
        recbole_mm.load(ckpts["unisrec_ind"], data_path=tmp_path / "elsewhere")
    moved = tmp_path / "moved"
    shutil.copytree(tiny_root / "Tiny", moved / "Tiny")
    assert recbole_mm.load(ckpts["unisrec_ind"], data_path=moved).catalogue.source == str(moved / "Tiny")


# -- CLI ---------------------------------------------------------------------------------------
def test_cli_batch_form_writes_valid_jsonl(ckpts, tiny_root, tmp_path, capsys):
    from recbole_mm.cli import main

    hist = tmp_path / "histories.txt"
    hist.write_text("A000001,A000002\n\n# a comment\nA000003 A000004 NOPE\n  A000010 , A000011  \n")
    out = tmp_path / "out" / "recs.jsonl"
    assert main(["recommend", ckpts["unisrec_ind"], "--histories", str(hist), "--output", str(out), "-k", "4"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in rows] == [1, 4, 5]
    assert rows[1]["history"] == ["A000003", "A000004", "NOPE"] and rows[1]["unknown"] == ["NOPE"]
    assert all(len(r["items"]) == 4 and len(r["scores"]) == 4 for r in rows)
    assert "histories.txt:4: NOPE" in capsys.readouterr().err
    api = recbole_mm.load(ckpts["unisrec_ind"]).recommend([["A000003", "A000004"]], k=4)[0]
    assert rows[1]["items"] == api.items
    # strict: error naming the line, nothing written
    out2 = tmp_path / "strict.jsonl"
    assert main(["recommend", ckpts["unisrec_ind"], "--histories", str(hist), "--output", str(out2), "--strict"]) == 2
    assert "histories.txt:4: NOPE" in capsys.readouterr().err and not out2.exists()
    # single history to stdout, zero-shot catalogue
    assert main(["recommend", ckpts["unisrec_ind"], "--history", "A100001,A100002", "--catalogue",
                 str(tiny_root / "Tiny2"), "-k", "3", "--include-seen"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert len(row["items"]) == 3 and all(i.startswith("A1") for i in row["items"])
    # transductive + catalogue: clean error
    assert main(["recommend", ckpts["unisrec_trans"], "--history", "A100001", "--catalogue", str(tiny_root / "Tiny2")]) == 2
    assert "cannot score another catalogue" in capsys.readouterr().err


def test_cli_help_explains_every_flag():
    from recbole_mm.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["recommend"]
    for action in sub._actions:
        assert action.help and len(action.help) > 10, action.option_strings
    flags = {s for a in sub._actions for s in a.option_strings}
    assert {"--history", "--histories", "-k", "--catalogue", "--output", "--strict", "--include-seen",
            "--skip-empty", "--data_path", "--device", "--batch-size", "--chunk-size"} <= flags


# -- real data ---------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.integration
def test_reloaded_unisrec_reproduces_the_evaluators_top10_on_scientific(shared_data, workdir):
    res = run(
        "UniSRec",
        "Scientific_mm",
        overrides={"data_path": str(shared_data), "epochs": 2, "show_progress": False, "state": "WARNING",
                   "use_gpu": False, "eval_step": 2, "run_name": "rec", "topk": [10]},
    )
    cfg = build_config("UniSRec", "Scientific_mm", config_dict={"data_path": str(shared_data), "use_gpu": False,
                                                               "topk": [10], "state": "WARNING"})
    ds = create_dataset(cfg)
    _, _, test = data_preparation(cfg, ds)
    model = get_model("UniSRec")(cfg, test._dataset)
    model.load_state_dict(load_checkpoint(res["checkpoint"])["state_dict"])
    model.eval()
    histories, targets, ref = [], [], []
    with torch.no_grad(), model.item_table_cache():  # the evaluator's call
        for batch in test:
            inter = batch[0]
            s = model.full_sort_predict(inter).view(len(inter), -1)
            s[:, 0] = -math.inf
            ref.append(s.topk(10, dim=1))
            for seq, n in zip(inter["item_id_list"].tolist(), inter["item_length"].tolist()):
                histories.append([ds.item_raw_ids[i] for i in seq[:n]])
            targets += [ds.item_raw_ids[i] for i in inter["item_id"].tolist()]
    ref_items = [[ds.item_raw_ids[i] for i in row] for r in ref for row in r.indices.tolist()]
    ref_vals = torch.cat([r.values for r in ref])

    rec = recbole_mm.load(res["checkpoint"], device="cpu")  # a fresh model from the checkpoint + feature files
    recs = rec.recommend(histories, k=10, exclude_seen=False)
    assert len(recs) == len(histories) == 2928
    # same scores (float noise: the histories are batched differently), same items but for near-ties
    _assert_same_ranking(recs, ref_items, ref_vals, atol=1e-4)
    exact = sum(r.items == items for r, items in zip(recs, ref_items))
    assert exact >= 2928 - 5, exact
    # and so the run's own test metrics
    ranks = [r.items.index(t) if t in r.items else None for r, t in zip(recs, targets)]
    ndcg = np.mean([1 / np.log2(k + 2) if k is not None else 0.0 for k in ranks])
    recall = np.mean([k is not None for k in ranks])
    assert round(ndcg, 4) == res["test"]["ndcg@10"] and round(recall, 4) == res["test"]["recall@10"]
