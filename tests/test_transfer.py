"""``recbole-mm transfer`` and what it is built on: ``train_fraction`` (a seeded subset of the
training users, valid/test untouched), ``stopping_min_steps`` (equal optimisation budgets),
``epochs=0`` (zero-shot evaluation), the Popularity baseline, cell claims between processes."""

import csv
import os

import numpy as np
import pytest
import torch

from conftest import quick
from fixtures import make_dataset
from recbole_mm.config import Config
from recbole_mm.data import create_dataset, data_preparation
from recbole_mm.leaderboard import Cell, claim, release
from recbole_mm.quick_start import run
from recbole_mm.utils import get_model


def _dataset(root, **extra):
    cfg = Config("SASRec", "Tiny", "finetune", cmd_overrides={k: str(v) for k, v in quick(root, **extra).items()})
    return create_dataset(cfg)


def _rows(ds, split_index):
    """(raw user, raw item list, raw target) of one split, independent of the internal numbering."""
    if not hasattr(ds, "_built"):
        ds._built = ds.build()  # RecBole's build() runs once per dataset
    built = ds._built[split_index].inter_feat
    users = ds.field2id_token["user_id"][built["user_id"].numpy()]
    items = ds.field2id_token["item_id"]
    lists = [tuple(items[row[:n]]) for row, n in zip(built["item_id_list"].numpy(), built["item_length"].numpy())]
    return sorted(zip(users, lists, items[built["item_id"].numpy()]))


def _train_users(folder):
    with open(os.path.join(folder, "Tiny.train.inter")) as f:
        next(f)
        return [line.split("\t")[0] for line in f]


def test_train_fraction_keeps_a_seeded_subset_of_users_with_all_their_rows(tiny_root, workdir):
    full = _dataset(tiny_root)
    part = _dataset(tiny_root, train_fraction=0.25, seed=7)
    file_users = _train_users(os.path.join(tiny_root, "Tiny"))
    users = np.sort(np.unique(np.array(file_users, dtype=np.int64)))  # user tokens as the reader maps them
    expected = set(users[np.random.default_rng(7).permutation(len(users))[: round(0.25 * len(users))]].tolist())
    train_full, train_part = _rows(full, 0), _rows(part, 0)
    kept_users = {int(u) for u, _, _ in train_part}
    assert kept_users == expected
    # every training row of a kept user, and nothing else
    assert train_part == [r for r in train_full if int(r[0]) in expected]
    assert len(train_part) == sum(int(u) in expected for u in file_users) < len(train_full)
    # valid and test untouched
    assert _rows(part, 1) == _rows(full, 1) and _rows(part, 2) == _rows(full, 2)
    assert part.train_fraction_info == {"fraction": 0.25, "seed": 7, "users": len(expected), "of_users": len(users),
                                        "rows": len(train_part), "of_rows": len(train_full)}
    # train_fraction_seed, not the run's seed, when given; another seed, another subset
    fixed = _dataset(tiny_root, train_fraction=0.25, seed=99, train_fraction_seed=7)
    assert {int(u) for u, _, _ in _rows(fixed, 0)} == expected
    other = _dataset(tiny_root, train_fraction=0.25, seed=8)
    assert {int(u) for u, _, _ in _rows(other, 0)} != expected


@pytest.mark.parametrize("bad", ["0", "-0.5", "1.5", "half"])
def test_train_fraction_out_of_range_is_refused(tiny_root, workdir, bad):
    with pytest.raises(ValueError, match=r"train_fraction.*\(0, 1\]"):
        _dataset(tiny_root, train_fraction=bad)


def test_popularity_ranks_items_by_training_count(tiny_root, workdir):
    res = run("Popularity", "Tiny", overrides=quick(tiny_root, epochs=1))
    cfg = Config("Popularity", "Tiny", "finetune", cmd_overrides={k: str(v) for k, v in quick(tiny_root).items()})
    ds = create_dataset(cfg)
    train, _, test = data_preparation(cfg, ds)
    state = torch.load(res["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    counts = torch.bincount(train._dataset.inter_feat["item_id"], minlength=ds.item_num).float()
    assert torch.equal(state["item_count"], counts)
    model = get_model("Popularity")(cfg, train._dataset)
    model.load_state_dict(state)
    batch = next(iter(test))[0]
    scores = model.full_sort_predict(batch)
    assert torch.equal(scores[0], counts) and scores.shape == (len(batch), ds.item_num)
    sas = run("SASRec", "Tiny", overrides=quick(tiny_root, epochs=5))
    assert sas["test"]["ndcg@10"] > res["test"]["ndcg@10"] > 0  # a learnable pattern beats popularity


def test_stopping_min_steps_keeps_a_stalled_run_going(tiny_root, workdir, monkeypatch):
    from recbole_mm.trainer import MMTrainer

    def falling(self, valid_data, show_progress=False):  # a validation score that only gets worse
        self._n_valid = getattr(self, "_n_valid", 0) + 1
        return 1.0 / self._n_valid, {"ndcg@10": 1.0 / self._n_valid}

    monkeypatch.setattr(MMTrainer, "_valid_epoch", falling)
    base = quick(tiny_root, epochs=40, stopping_step=1)
    plain = run("SASRec", "Tiny", overrides=base, saved=False)
    steps_per_epoch = plain["steps"] // len(plain["history"])
    assert len(plain["history"]) == 3  # best at epoch 0, two epochs without gain
    held = run("SASRec", "Tiny", overrides=dict(base, stopping_min_steps=5 * steps_per_epoch + 1), saved=False)
    assert len(held["history"]) == 6 and held["steps"] == 6 * steps_per_epoch
    assert [h["steps"] for h in held["history"]] == [steps_per_epoch * (e + 1) for e in range(6)]
    assert held["best_step"] == steps_per_epoch and held["best_epoch"] == 0


def test_epochs_zero_evaluates_the_given_weights(tiny_root, workdir):
    pre = run("UniSRec", "Tiny", mode="inductive", overrides=quick(tiny_root, epochs=3))
    zs = run("UniSRec", "Tiny", mode="inductive", pretrained=pre["checkpoint"], overrides=quick(tiny_root, epochs=0))
    assert zs["history"] == [] and zs["steps"] == 0 and zs["best_epoch"] is None
    # the fine-tuned weights, evaluated without training: the first run's test metrics
    assert zs["test"] == pytest.approx(pre["test"], abs=1e-4)
    assert zs["valid"] == pytest.approx(pre["valid"], abs=1e-4)
    assert os.path.isfile(zs["checkpoint"])
    untrained = run("UniSRec", "Tiny", mode="inductive", overrides=quick(tiny_root, epochs=0))
    assert untrained["test"]["ndcg@10"] < pre["test"]["ndcg@10"]


def test_a_cell_is_claimed_by_one_process_at_a_time(tmp_path):
    cell = Cell("SASRec", None, None, 2020, run_name="lb-x", checkpoint_dir=str(tmp_path))
    assert claim(cell)
    assert not claim(cell)  # held by a live process (this one)
    release(cell)
    assert claim(cell)
    release(cell)
    with open(tmp_path / "lb-x.claim", "w") as f:  # left by a process that died
        f.write("999999999")
    assert claim(cell)
    release(cell)


def test_textsim_ranks_by_the_cosine_to_the_last_items(tiny_root, workdir):
    res = run("TextSim", "Tiny", overrides={k: v for k, v in quick(tiny_root).items() if k != "epochs"})
    assert res["steps"] == 0 and res["history"] == []  # epochs 0 (props): nothing trained, nothing to train
    cfg = Config("TextSim", "Tiny", "finetune", cmd_overrides={k: str(v) for k, v in quick(tiny_root).items()})
    ds = create_dataset(cfg)
    train, _, test = data_preparation(cfg, ds)
    batch = next(iter(test))[0]
    seq, lengths = batch["item_id_list"], batch["item_length"]
    feats = torch.nn.functional.normalize(ds.features["text"].float(), dim=1)

    def expected(window):
        rows = []
        for s, n in zip(seq, lengths):
            q = torch.nn.functional.normalize(feats[s[max(0, n - window):n]].sum(0), dim=0)
            rows.append(feats @ q)
        return torch.stack(rows)

    for window in (1, 3):
        cfg["textsim_window"] = window
        model = get_model("TextSim")(cfg, train._dataset)
        scores = model.full_sort_predict(batch)
        assert torch.allclose(scores, expected(window), atol=1e-5)
        pos = batch["item_id"]
        assert torch.allclose(model.predict(batch), scores[torch.arange(len(pos)), pos], atol=1e-6)
    # the last item itself is its own nearest item (cosine 1)
    last = seq[torch.arange(len(seq)), lengths - 1]
    cfg["textsim_window"] = 1
    scores = get_model("TextSim")(cfg, train._dataset).full_sort_predict(batch)
    assert torch.allclose(scores[torch.arange(len(seq)), last], torch.ones(len(seq)), atol=1e-5)
    # two modalities: the mean of the two cosines
    both = Config("TextSim", "Tiny", "finetune", cmd_overrides={
        **{k: str(v) for k, v in quick(tiny_root).items()}, "img_suffix": "feat3CLS", "textsim_modalities": "text,image"})
    ds2 = create_dataset(both)
    tr2, _, te2 = data_preparation(both, ds2)
    b2 = next(iter(te2))[0]
    m2 = get_model("TextSim")(both, tr2._dataset)
    img = torch.nn.functional.normalize(ds2.features["image"].float(), dim=1)
    txt = torch.nn.functional.normalize(ds2.features["text"].float(), dim=1)
    last2 = b2["item_id_list"][torch.arange(len(b2["item_id"])), b2["item_length"] - 1]
    want = (txt[last2] @ txt.T + img[last2] @ img.T) / 2
    assert torch.allclose(m2.full_sort_predict(b2), want, atol=1e-5)


@pytest.mark.parametrize("bad, message", [({"textsim_window": 0}, "textsim_window"),
                                          ({"textsim_modalities": "audio"}, "textsim_modalities"),
                                          ({"textsim_modalities": "image"}, "img_suffix")])
def test_textsim_bad_settings_are_named(tiny_root, workdir, bad, message):
    with pytest.raises(Exception, match=message):
        run("TextSim", "Tiny", overrides=quick(tiny_root, **bad), saved=False)


@pytest.mark.slow
def test_transfer_end_to_end_writes_the_report_and_skips_finished_cells(tmp_path, workdir):
    make_dataset(tmp_path / "pt", "DomA", n_users=80, n_items=30, seed=3)
    make_dataset(tmp_path / "pt", "DomB", n_users=80, n_items=30, seed=4)
    make_dataset(tmp_path / "data", "Tiny", seed=0)
    from recbole_mm.transfer import transfer

    ov = {k: str(v) for k, v in quick(tmp_path / "data", epochs=2).items()}
    kw = dict(models="UniSRec", corpus="DomA,DomB", targets="Tiny", modes="inductive", fractions="0.5",
              seeds=1, overrides=ov, pretrain_path=str(tmp_path / "pt"), pt_epochs=2, curve="1", min_steps=4,
              out=str(tmp_path / "results"), log=lambda *a: None)
    res = transfer(**kw)
    plan = res["plan"]
    cells = plan.pretrain + plan.finetune + plan.zero_shot + plan.baselines
    assert all(c.status == "finished" for c in cells), [(c.label, c.error) for c in cells if c.status != "finished"]
    kinds = sorted((getattr(c, "kind", "pretrain"), c.fraction if hasattr(c, "fraction") else None, bool(c.pretrained))
                   for c in cells)
    assert kinds == sorted([("pretrain", None, False), ("popularity", 0.5, False), ("content", 1.0, False),
                            ("zero-shot", 1.0, False), ("zero-shot", 1.0, True),
                            ("finetune", 0.5, False), ("finetune", 0.5, True), ("curve", 0.5, True)])
    pt = plan.pretrain[0]
    assert pt.result["config"]["epochs"] == 2 and len(pt.result["history"]) == 2
    for c in cells:  # the checkpoint after --pt-epochs, the curve's after its own epoch
        if c.pretrained:
            n = 1 if c.kind == "curve" else 2
            assert c.pretrained == os.path.join(pt.checkpoint_dir, f"{pt.run_name}-{n}.pth")
    for c in plan.finetune:  # both arms obey the same minimum budget; half the users: evaluated every 2 epochs
        assert c.result["steps"] >= 4 and c.result["config"]["stopping_min_steps"] == 4
        assert c.result["config"]["eval_step"] == 2 and len(c.result["history"]) % 2 == 0
    assert all(c.result["train_fraction"]["users"] == 60 for c in plan.finetune)  # half of the 120 users
    md = open(res["paths"]["Tiny"]["md"]).read()
    assert "| UniSRec | inductive | 50% |" in md
    assert "UniSRec pre-trained, no fine-tuning | inductive" in md and "UniSRec untrained (random init)" in md
    assert "| Popularity | - | 50% |" in md and "| TextSim | - | 100% |" in md and "pre-training UniSRec on DomA + DomB: 2 epoch(s)" in md
    assert "## Pre-training length" in md and "| UniSRec | inductive | 50% | 1 |" in md
    assert "| UniSRec | inductive | 50% | 2 (transferred) |" in md
    scratch = [c for c in plan.finetune if not c.pretrained][0]
    assert f"{scratch.result['test']['ndcg@10']:.4f}" in md
    rows = list(csv.DictReader(open(res["paths"]["Tiny"]["csv"])))
    assert [(r["mode"], r["fraction"], r["pt_epoch"]) for r in rows] == [("inductive", "0.5", ""),
                                                                         ("inductive", "0.5", "1")]
    assert all(r["scratch_seeds"] == "1" and r["pretrained_seeds"] == "1" for r in rows)
    with open(res["paths"]["Tiny"]["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    stamps = {c.run_name: os.path.getmtime(c.result_file) for c in cells}
    again = transfer(**kw)["plan"]
    again_cells = again.pretrain + again.finetune + again.zero_shot + again.baselines
    assert len(again_cells) == len(cells) and all(c.status == "skipped" and not c.ran for c in again_cells)
    assert stamps == {c.run_name: os.path.getmtime(c.result_file) for c in again_cells}


def test_pt_set_epochs_gives_one_model_its_own_pretraining_length(tmp_path, workdir):
    """``--pt-set MODEL:epochs=N``: that model pre-trains N epochs (its run, hence its hash, as a run
    planned with N alone) and transfers min(--pt-epochs, N); the others follow --pt-epochs/--curve."""
    from recbole_mm.leaderboard import LeaderboardError
    from recbole_mm.transfer.plan import checkpoint_of, plan_pretrain

    make_dataset(tmp_path / "pt", "DomA", n_users=40, n_items=20, seed=3)
    ov = {k: str(v) for k, v in quick(tmp_path / "pt").items()}
    kw = dict(corpus="DomA", pretrain_path=str(tmp_path / "pt"), overrides=ov, config_files=None)
    uni, ids = plan_pretrain(["UniSRec", "SASRec"], pt_overrides={"SASRec": {"epochs": "3"}}, pt_epochs=3,
                            curve=[1, 3, 10], **kw)
    assert uni.overrides["epochs"] == "10" and uni.transfer_epoch == 3
    assert ids.overrides["epochs"] == "3" and ids.transfer_epoch == 3
    (short,) = plan_pretrain(["SASRec"], pt_overrides={"SASRec": {"epochs": "2"}}, pt_epochs=3, curve=[1, 3], **kw)
    assert short.transfer_epoch == 2 and checkpoint_of(short).endswith("-2.pth")
    # the same length reached through --pt-epochs/--curve alone is the same run (its checkpoints are reused)
    (same,) = plan_pretrain(["SASRec"], pt_overrides={}, pt_epochs=1, curve=[1, 3], **kw)
    assert same.run_name == ids.run_name and same.transfer_epoch == 1
    with pytest.raises(LeaderboardError, match="--pt-set SASRec:epochs"):
        plan_pretrain(["SASRec"], pt_overrides={"SASRec": {"epochs": "zero"}}, pt_epochs=3, curve=[], **kw)


def test_report_shows_the_latest_curve_point_while_the_transferred_checkpoint_is_missing():
    """Pre-training stopped before --pt-epochs: the main table's pre-trained arm is the latest
    curve point with results, labelled with its epoch, not an empty cell."""
    from recbole_mm.transfer.plan import TransferPlan
    from recbole_mm.transfer.report import _verdict, comparison_rows, render_markdown

    def cell(seed, pretrained, kind, pt_epoch, ndcg):
        c = Cell("UniSRec", "inductive", pretrained, seed, mode_label="inductive", dataset="T", status="finished",
                 result={"test": {"ndcg@10": ndcg, "recall@10": 2 * ndcg}, "best_epoch": 3, "best_step": 6})
        c.kind, c.fraction, c.pt_epoch = kind, 0.1, pt_epoch
        return c

    scratch = [cell(s, None, "finetune", None, 0.040 + 0.001 * i) for i, s in enumerate((1, 2, 3))]
    one = [cell(s, "pt-1.pth", "curve", 1, 0.050 + 0.001 * i) for i, s in enumerate((1, 2, 3))]
    two = [cell(1, "pt-2.pth", "curve", 2, 0.060)]  # one seed of the later point finished
    two[0].result = None
    two += [cell(2, "pt-2.pth", "curve", 2, 0.061)]
    pre = Cell("UniSRec", None, None, 2020, stage="pretrain", dataset="A,B")
    pre.transfer_epoch = 3
    plan = TransferPlan(pretrain=[pre], finetune=scratch + one + two, zero_shot=[], baselines=[], notes=[])
    (row,) = comparison_rows("T", plan)
    assert row["stand_in"] and row["pt_epoch"] == 2 and row["pretrained_n"] == 1
    assert row["pretrained_ndcg@10"][0] == pytest.approx(0.061)
    # 3 scratch seeds against 1 pre-trained: no verdict (one arm has no spread), however large the gap
    assert row["beyond_std"] is None and _verdict(row) == "an arm with 1 seed"
    md = render_markdown("T", plan, "cmd", {"corpus": "A,B", "seeds": [1, 2, 3], "min_steps": 200})
    assert "| 0.0610 (2 ep.) |" in md and "the checkpoint after 2 epoch(s)" in md
    assert "2 (transferred)" not in md and "3 (transferred)" not in md  # the curve lists what was measured
    # once the transferred checkpoint's cells exist, they are the pre-trained arm
    plan.finetune += [cell(s, "pt-3.pth", "finetune", None, 0.07) for s in (1, 2, 3)]
    (row,) = comparison_rows("T", plan)
    assert not row["stand_in"] and row["pretrained_n"] == 3
    assert row["beyond_std"] and _verdict(row) == "gain"


def test_zero_shot_uses_the_latest_checkpoint_while_the_transferred_one_is_missing(tmp_path, workdir):
    from recbole_mm.transfer.plan import plan_targets

    make_dataset(tmp_path / "data", "Tiny", seed=0)
    ov = {k: str(v) for k, v in quick(tmp_path / "data").items()}
    pre = Cell("UniSRec", None, None, 2020, stage="pretrain", dataset="A,B", run_name="tr-pt-x",
               checkpoint_dir=str(tmp_path))
    pre.transfer_epoch = 3
    (tmp_path / "tr-pt-x-1.pth").write_bytes(b"stand-in")  # only epoch 1 written so far
    finetune, zs, _, notes = plan_targets(["UniSRec"], ["Tiny"], "inductive", [0.5], [2020], None, ov, {}, None,
                                          [pre], 10, zero_shot=True, curve=[1, 3])
    (pt,) = [c for c in zs if c.pretrained]
    assert pt.pretrained == str(tmp_path / "tr-pt-x-1.pth") and pt.pt_epoch == 1
    assert [c.pt_epoch for c in finetune if c.pretrained] == [1] and finetune[-1].kind == "curve"
    assert any("no checkpoint after 3" in n for n in notes)


def test_missing_checkpoint_note_names_another_pretraining_that_has_it(tmp_path):
    """A pre-training of the same model on the same corpus with another total length (another
    hash) that has the wanted checkpoint is named in the note, with both lengths."""
    import json

    from recbole_mm.transfer.plan import _other_pretraining

    prefix = "tr-pt-UniSRec-A+B-"
    cell = Cell("UniSRec", None, None, 2020, run_name=prefix + "aaaaaaaaaa", config_hash="aaaaaaaaaa",
                checkpoint_dir=str(tmp_path), overrides={"epochs": "3"})
    cell.transfer_epoch = 3
    assert _other_pretraining(cell) == ""  # nothing else in checkpoint_dir
    other = prefix + "bbbbbbbbbb"
    (tmp_path / f"{other}-1.pth").write_bytes(b"x")
    (tmp_path / "tr-pt-UniSRec-A+B+C-cccccccccc-3.pth").write_bytes(b"x")  # another corpus
    (tmp_path / "tr-pt-MISSRec-A+B-dddddddddd-3.pth").write_bytes(b"x")  # another model
    assert _other_pretraining(cell) == ""  # only epoch 1 there
    (tmp_path / f"{other}-3.pth").write_bytes(b"x")
    (tmp_path / f"{other}.cell.json").write_text(json.dumps({"overrides": {"epochs": "10"}}))
    note = _other_pretraining(cell)
    assert f"{other} (epochs=10)" in note and "(epochs=3)" in note
    assert "cccccccccc" not in note and "dddddddddd" not in note
