"""Recformer: item sentences, token layout, backbone equivalence, losses, the two fine-tuning
stages, checkpoints, transfer; (integration) the real all-MiniLM-L6-v2 on Scientific_mm."""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import quick
from fixtures import assert_reload_identical, assert_steps_lower_loss_then_rank, make_dataset, make_tiny_bert

from recbole_mm.model.recformer import KEY_TYPE, VALUE_TYPE, Recformer, split_text
from recbole_mm.quick_start import build_config, run
from recbole_mm.trainer import load_checkpoint



def q(root, bb, **extra):
    """Fast-run overrides with the tiny backbone, in fp32 (exact comparisons)."""
    return quick(root, **{"backbone_path": bb, "plm_precision": "fp32", **extra})

@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def attr_root(tmp_path_factory):
    """A dataset with a ``.attr`` file listing items 0 and 1 (the others fall back to ``.text``)."""
    root = tmp_path_factory.mktemp("attr")
    folder = make_dataset(root, "Attr", n_users=40, n_items=12, seed=3)
    with open(os.path.join(folder, "Attr.attr"), "w") as f:
        f.write("item_id:token\ttitle:token_seq\tbrand:token_seq\tcategory:token_seq\n")
        f.write("A300000\tred glue for the bottle and tape\tblue\t\n")  # no category
        f.write("A300001\tglue\t\ttape pack\n")  # no brand
    return root


def _model(root, bb, dataset="Tiny", **extra):
    from recbole_mm.data import create_dataset

    cfg = build_config("Recformer", dataset, config_dict=q(root, bb, **extra))
    ds = create_dataset(cfg)
    torch.manual_seed(0)
    return Recformer(cfg, ds), cfg, ds


def _item(model, i):
    s, n = int(model.sent_offsets[i]), int(model.sent_lengths[i])
    return model.sent_ids[s : s + n].tolist(), model.sent_types[s : s + n].tolist(), model.sent_word_start[s : s + n].tolist()


def test_split_text_reads_title_category_brand():
    assert split_text("Gorilla Glue, 8 ounce. Industrial & Scientific Tapes. Gorilla. ") == {
        "title": "Gorilla Glue, 8 ounce", "category": "Industrial & Scientific Tapes", "brand": "Gorilla"}
    # a title with periods keeps them; the last two pieces are category and brand
    assert split_text("24 Oz. Sprayer Bottles, Pack Of 3. Lab Bottles. Continental.") == {
        "title": "24 Oz. Sprayer Bottles, Pack Of 3", "category": "Lab Bottles", "brand": "Continental"}
    assert split_text("Item number 3 of cluster 0. Brand0.") == {"title": "Item number 3 of cluster 0", "category": "Brand0"}
    assert split_text("Just a title") == {"title": "Just a title"}


def test_sentences_key_value_capped_and_attr_file_first(attr_root, tiny_bert):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    ids = lambda words: tok.convert_tokens_to_ids(words)  # noqa: E731
    model, _, ds = _model(attr_root, tiny_bert, "Attr", max_attr_length=5, max_attr_num=3)
    iid = lambda index: ds.field2token_id["item_id"][str(index)]  # noqa: E731  (internal id of item index)
    # item index 0 (from .attr): title capped at 5 tokens (key + 4), brand; the empty category is skipped
    got_ids, types, ws = _item(model, iid(0))
    assert got_ids == ids(["title", "red", "glue", "for", "the", "brand", "blue"])
    assert types == [KEY_TYPE] + [VALUE_TYPE] * 4 + [KEY_TYPE, VALUE_TYPE]
    # item index 1: title, then category (no brand)
    assert _item(model, iid(1))[0] == ids(["title", "glue", "category", "tape", "pack"])
    # item index 2: not in .attr -> parsed .text "Item number 2 of cluster 0. Brand2." (title, category)
    got_ids, types, ws = _item(model, iid(2))
    assert got_ids == ids(["title", "item", "number", "2", "of", "category", "brand", "##2"])
    assert ws == [True, True, True, True, True, True, True, False]  # "brand ##2" is one word
    # at most max_attr_num attributes
    model1, _, _ = _model(attr_root, tiny_bert, "Attr", max_attr_length=5, max_attr_num=1)
    assert _item(model1, iid(0))[0] == ids(["title", "red", "glue", "for", "the"])
    assert int(model.sent_lengths[0]) == 0  # padding


def _naive_sequence(model, seq, max_items, max_tokens, whole=False):
    """Reference layout, one sequence at a time in Python (``whole``: ROMA's tokenizer, an item
    that does not fit ends the sequence; otherwise Recformer's, cut at max_tokens)."""
    ids, types, itempos = [model.cls_id], [0], [0]
    for k, item in enumerate(list(reversed(seq))[:max_items]):
        i_ids, i_types, _ = _item(model, item)
        if whole and len(ids) + len(i_ids) > max_tokens:
            break
        ids += i_ids
        types += i_types
        itempos += [k + 1] * len(i_ids)
    return ids[:max_tokens], types[:max_tokens], itempos[:max_tokens]


@pytest.mark.parametrize("whole", [False, True])
def test_sequence_tokens_most_recent_first_and_capped(tiny_root, tiny_bert, whole):
    model, _, _ = _model(tiny_root, tiny_bert, max_items=3, max_tokens=30, whole_items=whole)
    seqs = [[5, 6, 7, 8, 9], [3], [10, 11]]
    width = max(map(len, seqs))
    item_seq = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    tok = model.sequence_tokens(item_seq, torch.tensor([len(s) for s in seqs]))
    start = 0
    for s, n in zip(seqs, tok.lengths.tolist()):
        ids, types, itempos = _naive_sequence(model, s, 3, 30, whole)
        assert n == len(ids) <= 30
        assert tok.ids[start : start + n].tolist() == ids
        assert tok.types[start : start + n].tolist() == types
        assert tok.item_positions[start : start + n].tolist() == itempos
        assert tok.positions[start : start + n].tolist() == list(range(n))
        start += n
    if whole:  # 3 items of ~14 tokens: the third does not fit
        assert tok.lengths[0] < 30 and set(tok.item_positions[: int(tok.lengths[0])].tolist()) == {0, 1, 2}
    else:  # cut at max_tokens
        assert tok.lengths[0] == 30


@pytest.mark.parametrize("whole", [False, True])
def test_history_items_seen_counts_items_with_a_token(tiny_root, tiny_bert, whole):
    model, _, _ = _model(tiny_root, tiny_bert, max_items=3, max_tokens=30, whole_items=whole)
    seqs = [[5, 6, 7, 8, 9], [3], [10, 11], [4, 2, 1]]
    width = max(map(len, seqs))
    item_seq = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    seen = model.history_items_seen(item_seq, torch.tensor([len(s) for s in seqs])).tolist()
    expected = [len(set(_naive_sequence(model, s, 3, 30, whole)[2]) - {0}) for s in seqs]
    assert seen == expected
    # one item of one; of five, max_items 3, the third in part (cut) or left out (whole items)
    assert seen[1] == 1 and seen[0] == (2 if whole else 3)
    wide, _, _ = _model(tiny_root, tiny_bert, max_items=10, max_tokens=200, whole_items=whole)
    assert wide.history_items_seen(item_seq, torch.tensor([len(s) for s in seqs])).tolist() == [5, 1, 2, 3]


def test_checkpoint_with_other_max_items_loads_the_positions_both_have(tiny_root, tiny_bert):
    """A checkpoint written with another ``max_items`` (e.g. before the default changed) loads:
    the item positions both models have are copied, the extra ones keep their zero init."""
    small, _, _ = _model(tiny_root, tiny_bert, max_items=3, max_tokens=60)
    with torch.no_grad():
        small.item_position_embeddings.weight.normal_()
    state = {k: v.clone() for k, v in small.state_dict().items()}
    big, _, _ = _model(tiny_root, tiny_bert, max_items=6, max_tokens=60)
    big.load_state_dict(state)
    w = big.item_position_embeddings.weight
    assert w.shape[0] == 7 and torch.equal(w[:4], state["item_position_embeddings.weight"])
    assert not w[4:].any()
    assert torch.equal(big.layers[0].attention.self.query.weight, small.layers[0].attention.self.query.weight)
    tiny, _, _ = _model(tiny_root, tiny_bert, max_items=2, max_tokens=60)
    tiny.load_state_dict(state)
    assert torch.equal(tiny.item_position_embeddings.weight, state["item_position_embeddings.weight"][:3])


def test_encoder_equals_transformers_bert_at_init(tiny_root, tiny_bert):
    """Untrained, the token-type and item-position embeddings leave the backbone unchanged:
    our packed encoder = transformers' BertModel on the padded batch."""
    from transformers import BertModel

    model, _, _ = _model(tiny_root, tiny_bert)
    model.eval()
    bert = BertModel.from_pretrained(tiny_bert, add_pooling_layer=False).eval()
    items = torch.tensor([1, 7, 20])
    tok = model.item_tokens(items)
    with torch.no_grad():
        cls, hidden = model.encode_tokens(tok, hidden_at=len(model.layers) - 1)
        cls_fast, _ = model.encode_tokens(tok)  # last layer at <s> only
        width = int(tok.lengths.max())
        padded = torch.zeros(len(items), width, dtype=torch.long)
        mask = torch.arange(width).unsqueeze(0) < tok.lengths.unsqueeze(1)
        padded[mask] = tok.ids
        ref = bert(input_ids=padded, attention_mask=mask.long(), token_type_ids=torch.zeros_like(padded)).last_hidden_state
    torch.testing.assert_close(hidden, ref[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cls, ref[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cls_fast, cls, atol=1e-5, rtol=1e-5)
    assert tok.ids.numel() % 64 and model.token_pad_multiple == 64  # a filler sequence was added ...
    model.token_pad_multiple = 1
    with torch.no_grad():
        unpadded, hidden1 = model.encode_tokens(tok, hidden_at=len(model.layers) - 1)
    torch.testing.assert_close(unpadded, cls, atol=1e-6, rtol=1e-6)  # ... and changes nothing
    torch.testing.assert_close(hidden1, hidden, atol=1e-6, rtol=1e-6)


def test_finetune_loss_finite_with_gradients_table_without(tiny_root, tiny_bert):
    from recbole_mm.data import data_preparation

    model, cfg, ds = _model(tiny_root, tiny_bert)
    assert model.mlm_head is None  # Recformer fine-tuning has no MLM
    train, _, _ = data_preparation(cfg, ds)
    batch = next(iter(train))
    model.train()
    loss = model.calculate_loss(batch)
    loss.backward()
    assert math.isfinite(loss.item())
    for name in ("layers.0.attention.self.query.weight", "item_position_embeddings.weight",
                 "token_type_embeddings.weight", "word_embeddings.weight"):
        assert dict(model.named_parameters())[name].grad.abs().sum() > 0, name
    assert not model.item_embeddings.requires_grad and bool(model.table_ready)
    assert "item_embeddings" in model.state_dict() and not any(k.startswith("sent_") for k in model.state_dict())


def test_whole_word_masking_and_pretrain_loss(tiny_root, tiny_bert):
    from recbole_mm.data import data_preparation

    model, cfg, ds = _model(tiny_root, tiny_bert, train_stage="pretrain", mlm_probability=0.5)
    assert model.mlm_head is not None
    train, _, _ = data_preparation(cfg, ds)
    batch = next(iter(train))
    tok = model.sequence_tokens(batch["item_id_list"], batch["item_length"])
    torch.manual_seed(0)
    masked, where = model.mask_tokens(tok)
    assert not where[tok.types == 0].any()
    word = torch.cumsum(tok.word_start.long(), 0)
    for w in torch.unique(word[where]):  # a picked word is picked as a whole
        assert where[(word == w) & (tok.types != 0)].all()
    assert 0.3 < where.float()[tok.types != 0].mean() < 0.7
    assert (masked.ids[where] == model.mask_id).float().mean() > 0.6
    assert torch.equal(masked.ids[~where], tok.ids[~where])
    model.train()
    loss = model.calculate_loss(batch)
    loss.backward()
    assert math.isfinite(loss.item())
    assert model.mlm_head.transform.weight.grad.abs().sum() > 0
    assert model.layers[0].attention.self.query.weight.grad.abs().sum() > 0


def _trace_tables(monkeypatch):
    calls, epochs = [], []
    refresh, start = Recformer.refresh_item_table, Recformer.on_epoch_start

    def counting(self):
        calls.append(1)
        return refresh(self)

    def tracing(self, epoch, train_data=None):
        start(self, epoch, train_data)
        epochs.append((epoch, bool(self.table_frozen), self.item_embeddings.clone(),
                       self.layers[0].attention.self.query.weight.detach().clone()))

    monkeypatch.setattr(Recformer, "refresh_item_table", counting)
    monkeypatch.setattr(Recformer, "on_epoch_start", tracing)
    return calls, epochs


def test_stage1_reencodes_every_epoch_stage2_freezes(tiny_root, tiny_bert, workdir, monkeypatch):
    calls, epochs = _trace_tables(monkeypatch)
    run("Recformer", "Tiny", overrides=q(tiny_root, tiny_bert, epochs=3, stage1_epochs=-1), saved=False)
    # stage 1: encoded before epoch 0 and at each validation (the weights changed); the epoch
    # starts after a validation reuse that table
    assert len(calls) == 4
    assert [f for _, f, _, _ in epochs] == [False] * 3
    assert not torch.equal(epochs[1][2], epochs[2][2])

    calls.clear(), epochs.clear()
    run("Recformer", "Tiny", overrides=q(tiny_root, tiny_bert, epochs=3, stage1_epochs=1), saved=False)
    # stage 1 for epoch 0 (start + validation), then frozen: no more encoding
    assert len(calls) == 2
    assert [f for _, f, _, _ in epochs] == [False, True, True]
    assert torch.equal(epochs[1][2], epochs[2][2])  # the table stays ...
    assert not torch.equal(epochs[1][3], epochs[2][3])  # ... while the encoder trains


def test_checkpoint_reload_identical_scores_and_stage2_from_it(tiny_root, tiny_bert, workdir):
    from recbole_mm.data import create_dataset, data_preparation

    res = run("Recformer", "Tiny", overrides=q(tiny_root, tiny_bert, epochs=2, run_name="rf"))
    ctx = res["context"]  # the bounded context the run read, over its test users
    assert ctx["max_tokens"] == res["config"]["max_tokens"] and 0 < ctx["history_items_seen"] <= ctx["history_items"]
    ckpt = load_checkpoint(res["checkpoint"])
    assert bool(ckpt["state_dict"]["table_ready"])
    cfg = build_config("Recformer", "Tiny", config_dict=q(tiny_root, tiny_bert))
    ds = create_dataset(cfg)
    _, _, test = data_preparation(cfg, ds)
    assert_reload_identical(Recformer, cfg, ds, test, res)
    # the paper's stage 2: the best stage-1 checkpoint, its table frozen
    stage2 = Recformer(cfg, ds)
    stage2.load_pretrained(ckpt["state_dict"])
    stage2.on_epoch_start(0)
    torch.testing.assert_close(stage2.item_embeddings, ckpt["state_dict"]["item_embeddings"])
    s2 = build_config("Recformer", "Tiny", config_dict=q(tiny_root, tiny_bert, stage1_epochs=0))
    stage2 = Recformer(s2, ds)
    stage2.load_pretrained(ckpt["state_dict"])
    stage2.on_epoch_start(0)
    assert bool(stage2.table_frozen)
    torch.testing.assert_close(stage2.item_embeddings, ckpt["state_dict"]["item_embeddings"])


@pytest.mark.slow
def test_pretrain_two_domains_then_transfer(tiny_root, tiny_bert, workdir):
    pre = run("Recformer", "Tiny,Tiny2", "pretrain", overrides=q(tiny_root, tiny_bert, epochs=2,
                                                                     run_name="pt", train_batch_size=32))
    assert all(math.isfinite(h["train_loss"]) for h in pre["history"])
    sd = load_checkpoint(pre["checkpoint"])["state_dict"]
    assert "mlm_head.transform.weight" in sd and not bool(sd["table_ready"])
    cfg = build_config("Recformer", "Tiny", config_dict=q(tiny_root, tiny_bert))
    from recbole_mm.data import create_dataset

    model = Recformer(cfg, create_dataset(cfg))
    model.load_pretrained(sd)
    torch.testing.assert_close(model.layers[1].output.dense.weight, sd["layers.1.output.dense.weight"])
    assert all(p.requires_grad for p in model.parameters())  # Recformer fine-tunes everything
    ft = run("Recformer", "Tiny", pretrained=pre["checkpoint"],
             overrides=q(tiny_root, tiny_bert, epochs=1, run_name="ft"))
    assert ft["params"]["trainable"] == ft["params"]["total"] and ft["test"]["ndcg@10"] > 0


@pytest.mark.slow
@pytest.mark.integration
def test_recformer_real_minilm_on_scientific(shared_data, workdir):
    """The real all-MiniLM-L6-v2 (default backbone_path) on Scientific_mm: equal to
    transformers' BertModel at init, a few training steps lower the loss, full ranking runs."""
    from transformers import BertModel

    from recbole_mm.data import create_dataset, data_preparation
    from recbole_mm.model.recformer import default_backbone

    cfg = build_config("Recformer", "Scientific_mm", config_dict={
        "data_path": str(shared_data), "use_gpu": False, "plm_precision": "fp32", "show_progress": False, "state": "WARNING",
        "train_batch_size": 8, "eval_batch_size": 16, "max_tokens": 64, "item_encode_batch_size": 512})
    ds = create_dataset(cfg)
    torch.manual_seed(0)
    model = Recformer(cfg, ds)
    assert model.hidden_size == 384 and len(model.layers) == 6
    model.eval()
    bert = BertModel.from_pretrained(default_backbone(), add_pooling_layer=False).eval()
    tok = model.item_tokens(torch.tensor([1]))
    with torch.no_grad():
        cls, _ = model.encode_tokens(tok)
        ref = bert(input_ids=tok.ids.unsqueeze(0), token_type_ids=torch.zeros_like(tok.ids).unsqueeze(0)).last_hidden_state
    torch.testing.assert_close(cls[0], ref[0, 0], atol=1e-4, rtol=1e-4)
    train, valid, _ = data_preparation(cfg, ds)
    assert_steps_lower_loss_then_rank(model, next(iter(train)), valid, ds.item_num)


def test_bf16_precision_is_close_to_fp32_and_auto_follows_the_cpu(tiny_root, tiny_bert):
    from recbole_mm.model.recformer import native_bf16

    model, _, _ = _model(tiny_root, tiny_bert)
    model.eval()
    tok = model.item_tokens(torch.arange(1, 30))
    with torch.no_grad():
        fp32, _ = model.encode_tokens(tok)
        model.bf16 = True
        bf16, _ = model.encode_tokens(tok)
    assert bf16.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(fp32, bf16).min() > 0.99
    auto, _, _ = _model(tiny_root, tiny_bert, plm_precision="auto")
    assert auto.bf16 == native_bf16("cpu")


def test_staleness_is_checkpointed_for_exact_resume(tiny_root, tiny_bert):
    """After training steps without a validation, the table no longer matches the weights: a
    run resumed from that state re-encodes it at the next epoch, as an uninterrupted run does."""
    from recbole_mm.data import data_preparation

    model, cfg, ds = _model(tiny_root, tiny_bert)
    train, _, _ = data_preparation(cfg, ds)
    model.on_epoch_start(0)
    assert not bool(model.table_stale)
    model.train()
    model.calculate_loss(next(iter(train))).backward()
    state = model.state_dict()
    assert bool(state["table_stale"])
    resumed, _, _ = _model(tiny_root, tiny_bert)
    resumed.load_state_dict(state)
    calls = []
    resumed.refresh_item_table = lambda: calls.append(1)
    resumed.on_epoch_start(1)
    assert calls == [1]


def test_attr_file_errors_name_file_and_line(tmp_path):
    from recbole_mm.data.readers import DataValidationError, read_attributes

    path = tmp_path / "D.attr"
    path.write_text("item_id:token\ttitle:token_seq\tbrand:token_seq\nA\tglue\t\nB\ttape\tacme\n")
    keys, rows = read_attributes(str(path), ["A", "C", "B"])
    assert keys == ["title", "brand"] and rows == [{"title": "glue"}, None, {"title": "tape", "brand": "acme"}]
    path.write_text("item_id:token\ttitle:token_seq\nA\tglue\nZ\ttape\n")
    with pytest.raises(DataValidationError, match=r"D.attr:3: item 'Z' is not in .item2index"):
        read_attributes(str(path), ["A"])
    path.write_text("item\ttitle\n")
    with pytest.raises(DataValidationError, match="D.attr:1: header"):
        read_attributes(str(path), ["A"])


def test_pretrain_contrastive_forwards_are_clean_mlm_forwards_masked(tiny_root, tiny_bert, monkeypatch):
    """Released RecformerForPretraining: the contrastive vectors come from clean forwards of the
    sequence and the target; MLM from separate masked forwards of both."""
    from recbole_mm.data import data_preparation

    model, cfg, ds = _model(tiny_root, tiny_bert, train_stage="pretrain", mlm_probability=0.5)
    batch = next(iter(data_preparation(cfg, ds)[0]))
    calls, encode = [], Recformer.encode_tokens

    def recording(self, tok, hidden_at=None, stop_after=None):
        calls.append((tok.ids.clone(), hidden_at))
        return encode(self, tok, hidden_at, stop_after)

    monkeypatch.setattr(Recformer, "encode_tokens", recording)
    model.train()
    model.calculate_loss(batch).backward()
    seq = model.sequence_tokens(batch["item_id_list"], batch["item_length"])
    n = int(seq.lengths.sum()) + int(model.item_tokens(batch["item_id"]).lengths.sum())
    contrastive = [ids for ids, at in calls if at is None]
    mlm = [ids for ids, at in calls if at is not None]
    assert len(contrastive) == 1 and contrastive[0].numel() == n
    assert not (contrastive[0] == model.mask_id).any()
    assert len(mlm) == 1 and mlm[0].numel() == n and (mlm[0] == model.mask_id).any()


def test_checkpoint_of_another_catalogue_gets_its_table_reencoded(tiny_root, tiny_bert, workdir):
    """-p <checkpoint fine-tuned on another dataset> --stage1_epochs=0: the checkpoint's table
    (and its table_ready flag) belong to that dataset; the table is encoded for this one."""
    src = run("Recformer", "Tiny", overrides=q(tiny_root, tiny_bert, epochs=4, learning_rate=1e-3, lr_schedule=None, run_name="src"))
    sd = load_checkpoint(src["checkpoint"])["state_dict"]
    assert bool(sd["table_ready"]) and sd["item_embeddings"].shape[0] == 41
    ft = run("Recformer", "Tiny2", pretrained=src["checkpoint"],
             overrides=q(tiny_root, tiny_bert, epochs=1, learning_rate=1e-3, lr_schedule=None, stage1_epochs=0, run_name="dst"))
    table = load_checkpoint(ft["checkpoint"])["state_dict"]["item_embeddings"]
    assert table.shape[0] == 31 and bool((table[1:].norm(dim=1) > 0).all())
    random_ndcg = sum(1 / math.log2(r + 1) for r in range(1, 11)) / 30  # target uniform among 30 items
    assert ft["test"]["ndcg@10"] > random_ndcg
    # same catalogue: the checkpoint's table is kept as is (the paper's stage 2)
    from recbole_mm.data import create_dataset

    cfg = build_config("Recformer", "Tiny", config_dict=q(tiny_root, tiny_bert, stage1_epochs=0))
    same = Recformer(cfg, create_dataset(cfg))
    same.load_pretrained(sd)
    assert bool(same.table_ready)
    torch.testing.assert_close(same.item_embeddings, sd["item_embeddings"])


def test_fine_tuning_schedule_warms_up_then_decays_linearly(tiny_root, tiny_bert):
    """Released fine-tuning: AdamW, get_linear_schedule_with_warmup (update k: lr * k / warmup,
    then lr * max(0, 1 - k / total)), no gradient clipping; a function of the global step."""
    from recbole_mm.data import data_preparation
    from recbole_mm.trainer import MMTrainer

    model, cfg, ds = _model(tiny_root, tiny_bert, steps_per_epoch=3, epochs=2, warmup_steps=2, learning_rate=1e-3)
    assert cfg["learner"] == "adamw" and cfg["lr_schedule"] == "linear_warmup" and not cfg["clip_grad_norm"]
    train, _, _ = data_preparation(cfg, ds)
    trainer = MMTrainer(cfg, model, ds, run_name="sched")
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    lrs, step = [], trainer.optimizer.step

    def recording(*a, **k):
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        return step(*a, **k)

    trainer.optimizer.step = recording
    model.on_epoch_start(0)
    trainer._train_epoch(train, 0)
    trainer._train_epoch(train, 1)
    expected = [1e-3 * f for f in (0.5, 1 - 2 / 6, 1 - 3 / 6, 1 - 4 / 6, 1 - 5 / 6, 0.0)]
    assert lrs == pytest.approx(expected)
