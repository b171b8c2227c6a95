"""Tiny generated atomic datasets (written into a test's tmp folder, never committed).

Users walk a hidden item cycle (item i is usually followed by item i+1 of its cluster), so
a sequential model can learn the next item and must beat popularity.
"""

from __future__ import annotations

import os

import numpy as np

HEADER = "user_id:token\titem_id_list:token_seq\titem_id:token\n"


def make_dataset(
    root,
    name="Tiny",
    n_users=120,
    n_items=40,
    seq_len=(5, 12),
    dim_text=16,
    dim_img=8,
    missing_images=(3, 7),
    seed=0,
    max_len=50,
    plain_inter=False,
):
    """Write ``root/name/name.*`` and return the folder path."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(str(root), name)
    os.makedirs(folder, exist_ok=True)
    asins = [f"A{seed}{i:05d}" for i in range(n_items)]
    users = [f"U{seed}{u:05d}" for u in range(n_users)]
    seqs = []
    for _ in range(n_users):
        length = int(rng.integers(seq_len[0], seq_len[1] + 1))
        start = int(rng.integers(n_items))
        s, cur = [], start
        for _ in range(length):
            s.append(cur)
            cur = (cur + 1) % n_items if rng.random() < 0.85 else int(rng.integers(n_items))
        seqs.append(s)
    p = lambda ext: os.path.join(folder, f"{name}.{ext}")  # noqa: E731
    with open(p("item2index"), "w") as f:
        f.writelines(f"{a}\t{i}\n" for i, a in enumerate(asins))
    with open(p("user2index"), "w") as f:
        f.writelines(f"{u}\t{i}\n" for i, u in enumerate(users))
    with open(p("text"), "w") as f:
        f.write("item_id:token\ttext:token_seq\n")
        f.writelines(f"{a}\tItem number {i} of cluster {i // 5}. Brand{i % 3}.\n" for i, a in enumerate(asins))
    if plain_inter:
        with open(p("inter"), "w") as f:
            f.write("user_id:token\titem_id:token\ttimestamp:float\n")
            for u, s in enumerate(seqs):
                f.writelines(f"{u}\t{it}\t{1000 + t}\n" for t, it in enumerate(s))
    else:
        tr, va, te = [HEADER], [HEADER], [HEADER]
        j = lambda xs: " ".join(map(str, xs[-max_len:]))  # noqa: E731
        for u, s in enumerate(seqs):
            train = s[:-2]
            for t in range(1, len(train)):
                tr.append(f"{u}\t{j(train[:t])}\t{train[t]}\n")
            va.append(f"{u}\t{j(train)}\t{s[-2]}\n")
            te.append(f"{u}\t{j(s[:-1])}\t{s[-1]}\n")
        for split, lines in (("train", tr), ("valid", va), ("test", te)):
            with open(p(f"{split}.inter"), "w") as f:
                f.writelines(lines)
    # features: item i's vector is close to item i+1's (so content helps), a few image rows are missing
    base = rng.normal(size=(n_items, dim_text)).astype(np.float32)
    base = (base + np.roll(base, -1, axis=0)) / 2
    base.tofile(p("feat1CLS"))
    img = rng.normal(size=(n_items, dim_img)).astype(np.float32)
    img[list(missing_images)] = 0.0
    img.tofile(p("feat3CLS"))
    return folder


def popularity_ndcg10(root, name):
    """NDCG@10 of recommending the most frequent training targets to everybody."""
    def rows(split):
        with open(os.path.join(root, name, f"{name}.{split}.inter")) as f:
            next(f)
            return [line.rstrip("\n").split("\t") for line in f]

    counts = {}
    for _, hist, target in rows("train"):
        for t in hist.split() + [target]:
            counts[t] = counts.get(t, 0) + 1
    top = [t for t, _ in sorted(counts.items(), key=lambda kv: -kv[1])[:10]]
    gains = [1 / np.log2(top.index(t) + 2) if t in top else 0.0 for _, _, t in rows("test")]
    return float(np.mean(gains))


TINY_WORDS = ["item", "number", "of", "cluster", "brand", "title", "category", "glue", "red", "blue", "tape",
              "the", "a", "for", "and", "with", "pack", "bottle", "."]


def make_tiny_bert(folder, hidden=32, layers=2, heads=2, intermediate=64, max_positions=512, seed=0):
    """A random tiny BERT (``transformers`` folder with a word-level WordPiece vocabulary:
    special tokens, :data:`TINY_WORDS`, digits, letters and their ``##`` pieces)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    os.makedirs(folder, exist_ok=True)
    chars = [str(d) for d in range(10)] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + TINY_WORDS + chars + ["##" + c for c in chars]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    tok.save_pretrained(folder)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=intermediate, max_position_embeddings=max_positions)
    torch.manual_seed(seed)
    BertModel(cfg).save_pretrained(folder)
    return str(folder)


def assert_reload_identical(model_cls, cfg, ds, test, res, checkpoint=None):
    """A checkpoint loaded into two fresh models (other random weights before loading) gives
    identical full-ranking scores, and our trainer's reload reproduces the run's test metrics.
    Returns the reloaded model."""
    import torch

    from recbole_mm.trainer import MMTrainer
    from recbole_mm.trainer.checkpoint import load_checkpoint

    checkpoint = checkpoint or res["checkpoint"]
    state = load_checkpoint(checkpoint)["state_dict"]
    batch = next(iter(test))[0]
    scores = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = model_cls(cfg, ds)
        model.load_state_dict(state)
        model.eval()
        with torch.no_grad():
            scores.append(model.full_sort_predict(batch))
    assert torch.equal(scores[0], scores[1])
    trainer = MMTrainer(cfg, model, ds, run_name="reload")
    assert trainer.evaluate(test, load_best_model=True, model_file=checkpoint) == res["test"]
    return model


def assert_steps_lower_loss_then_rank(model, batch, valid, n_items, steps=4, lr=1e-4, reseed=None):
    """A few Adam steps on one batch lower the loss (``reseed``: the same random draws, e.g.
    MLM masks, at every step so that the losses are comparable); then full ranking of a
    validation batch gives finite scores over every item."""
    import math

    import torch

    model.on_epoch_start(0)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        if reseed is not None:
            torch.manual_seed(reseed)
        loss = model.calculate_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
    model.eval()
    inter = next(iter(valid))[0]
    with torch.no_grad():
        scores = model.full_sort_predict(inter)
    assert scores.shape == (len(inter), n_items) and torch.isfinite(scores[:, 1:]).all()
