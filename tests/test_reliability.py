"""Nothing silent, nothing misleading (docs/reliability.md).

* The broken-input corpus: every case runs through the real CLI entry point (``main(argv)``) and
  must exit with code 2, print one line naming the file or key, and write nothing.  The cases are
  refused before a model is built, so the whole corpus runs in seconds.
* One test per class of silent wrong result: checkpoints that do not fit the model, resumes from
  another folder / with another config / against another run's best model, run-name ownership,
  byte-order marks, unknown config keys, files left by killed runs.
"""

import gzip
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import quick
from recbole_mm.cli import main
from recbole_mm.config import config_to_plain
from recbole_mm.quick_start import build_config, run
from recbole_mm.trainer.checkpoint import CheckpointError, RunLock, save_checkpoint
from test_pipeline import make_raw, write_2023

N_ITEMS = 40  # the Tiny fixture


# -- the broken-input corpus ------------------------------------------------------------------
class Env:
    """A case's world: a fresh copy of the Tiny dataset, a run folder (the working directory)."""

    def __init__(self, tmp_path, tiny_root):
        self.tmp = tmp_path
        self.data = tmp_path / "data"
        shutil.copytree(tiny_root / "Tiny", self.data / "Tiny")
        self.run = tmp_path / "run"
        self.run.mkdir()

    def file(self, suffix):
        return self.data / "Tiny" / f"Tiny.{suffix}"

    def overrides(self, **over):
        base = {"data_path": str(self.data), "use_gpu": "False", "topk": "[10]", "epochs": "1", "state": "WARNING",
                "show_progress": "False"}
        base.update({k: str(v) for k, v in over.items()})
        return {k: v for k, v in base.items() if v != "None"}

    def finetune(self, model="SASRec", *extra, **over):
        return ["finetune", "-m", model, "-d", "Tiny", *extra] + [f"--{k}={v}" for k, v in self.overrides(**over).items()]

    def ckpt(self, name="x.pth", model="SASRec", **payload):
        path = self.tmp / name
        payload = {"model": model, "dataset": "Tiny", "epoch": 0, "state_dict": {}, "config": {}, **payload}
        save_checkpoint(payload, str(path))
        return str(path)

    def plain_config(self, **over):
        return config_to_plain(build_config("SASRec", "Tiny", overrides=self.overrides(**over)))

    def write(self, suffix, data: bytes):
        self.file(suffix).write_bytes(data)

    def replace_line(self, suffix, n, line: bytes):
        lines = self.file(suffix).read_bytes().split(b"\n")
        lines[n - 1] = line
        self.write(suffix, b"\n".join(lines))

    def raw(self, cat="Cat"):
        reviews, meta = make_raw()
        folder = self.tmp / "raw"
        write_2023(folder, cat, reviews, meta)
        return folder

    def preprocess(self, raw):
        return ["preprocess", "--input", str(raw), "--category", "Cat", "--output", str(self.tmp / "out")]


def _bad_value(key, value):
    return lambda e: (e.finetune(**{key: value}), [f"--{key}", "expected"])


def _float64(e, suffix="feat1CLS"):
    arr = np.fromfile(e.file(suffix), dtype="<f4")
    arr.astype("<f8").tofile(e.file(suffix))


def _feature_case(corrupt, suffix, fragment, **over):
    def case(e):
        corrupt(e)
        return e.finetune(plm_suffix="feat1CLS", img_suffix="feat3CLS", **over), [f"Tiny.{suffix}", fragment]

    return case


def _zero(suffix):
    return lambda e: np.zeros(N_ITEMS * {"feat1CLS": 16, "feat3CLS": 8}[suffix], dtype="<f4").tofile(e.file(suffix))


def _non_utf8(suffix, line):
    def case(e):
        e.replace_line(suffix, line, e.file(suffix).read_bytes().split(b"\n")[line - 1] + b"\xff\xfe")
        return e.finetune(), [f"Tiny.{suffix}:{line}", "not UTF-8"]

    return case


def _duplicate_user(split):
    def case(e):
        lines = e.file(f"{split}.inter").read_bytes().split(b"\n")
        lines[3] = lines[2].split(b"\t")[0] + b"\t" + b"\t".join(lines[3].split(b"\t")[1:])  # line 4: user of line 3
        e.write(f"{split}.inter", b"\n".join(lines))
        return e.finetune(), [f"Tiny.{split}.inter:4", "listed twice"]

    return case


def _checkpoint_case(make, fragment, flag="-p"):
    def case(e):
        path = make(e)
        return e.finetune("SASRec", flag, path), [os.path.basename(path), fragment]

    return case


def _write_bytes(data):
    def make(e):
        path = e.tmp / "bad.pth"
        path.write_bytes(data)
        return str(path)

    return make


def _truncated(e):
    path = e.ckpt("full.pth", state_dict={"w": torch.randn(64, 64)})
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    return path


def _pickled(e):
    path = e.tmp / "evil.pth"
    torch.save({"format": "recbole_mm.checkpoint/1", "state_dict": {}, "obj": object()}, path)
    return str(path)


def _not_ours(e):
    path = e.tmp / "plain.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    return str(path)


def _resume_changed(e):
    config = e.plain_config(learning_rate=0.01)
    return e.ckpt("r.resume.pth", config=config, trainer={"saved_model_file": "saved/r.pth"})


def _gz(corrupt):
    def case(e):
        raw = e.raw()
        corrupt(raw / "Cat.jsonl.gz")
        return e.preprocess(raw), ["Cat.jsonl.gz"]

    return case


def _truncate_gz(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def _fake_gz(path):
    path.write_bytes(b'{"user_id": "U1", "parent_asin": "B1", "timestamp": 1}\n')


def _raw_non_utf8(e):
    raw = e.raw()
    with gzip.open(raw / "Cat.jsonl.gz", "rb") as f:
        lines = f.read().split(b"\n")
    lines[6] = lines[6].replace(b'"rating"', b'"r\xe9ting"')
    with gzip.open(raw / "Cat.jsonl.gz", "wb") as f:
        f.write(b"\n".join(lines))
    return e.preprocess(raw), ["Cat.jsonl.gz:7", "not UTF-8"]


def _meta_non_utf8(e):
    raw = e.raw()
    with gzip.open(raw / "meta_Cat.jsonl.gz", "rb") as f:
        data = f.read()
    with gzip.open(raw / "meta_Cat.jsonl.gz", "wb") as f:
        f.write(data.replace(b"number 3", b"number \xc33", 1))
    return e.preprocess(raw), ["meta_Cat.jsonl.gz:", "not UTF-8"]


def _histories_non_utf8(e):
    path = e.tmp / "users.txt"
    path.write_bytes(b"A000001,A000002\nA000003\xff\n")
    return ["recommend", e.ckpt(), "--histories", str(path), "--output", str(e.tmp / "recs.jsonl")], \
        ["users.txt:2", "not UTF-8"]


def _config_file(text: bytes, fragment, *flags):
    def case(e):
        path = e.tmp / "extra.yaml"
        path.write_bytes(text)
        return e.finetune("SASRec", "--config_files", str(path), *flags), ["extra.yaml", fragment]

    return case


def _plain_inter_non_utf8(e):
    from fixtures import make_dataset

    make_dataset(e.tmp / "plain", "P", plain_inter=True)
    path = e.tmp / "plain" / "P" / "P.inter"
    lines = path.read_bytes().split(b"\n")
    lines[4] = lines[4] + b"\x80"
    path.write_bytes(b"\n".join(lines))
    argv = e.finetune() + [f"--data_path={e.tmp / 'plain'}"]
    argv[argv.index("Tiny")] = "P"
    argv.remove(f"--data_path={e.data}")
    return argv, ["P.inter:5", "not UTF-8"]


def _recommend_truncated(e):
    path = _truncated(e)
    return ["recommend", path, "--history", "A000001", "--output", str(e.tmp / "recs.jsonl")], \
        ["full.pth", "not a recbole_mm checkpoint"]


def _run_name_taken(e):
    lock = RunLock(str(e.run / "saved" / "taken")).acquire()  # another live run holds the name
    e.keep = lock
    return e.finetune(run_name="taken"), ["saved/taken", "in use"]


CORPUS = {
    # config values: one line naming the key
    "train_fraction_zero": _bad_value("train_fraction", 0),
    "train_fraction_above_one": _bad_value("train_fraction", 1.5),
    "stopping_min_steps_negative": _bad_value("stopping_min_steps", -1),
    "epochs_negative": _bad_value("epochs", -3),
    "epochs_text": _bad_value("epochs", "abc"),
    "epochs_float": _bad_value("epochs", 1.5),
    "learning_rate_zero": _bad_value("learning_rate", 0),
    "learning_rate_negative": _bad_value("learning_rate", -0.1),
    "learning_rate_text": _bad_value("learning_rate", "fast"),
    "train_batch_size_zero": _bad_value("train_batch_size", 0),
    "train_batch_size_negative": _bad_value("train_batch_size", -64),
    "train_batch_size_text": _bad_value("train_batch_size", "big"),
    "eval_batch_size_zero": _bad_value("eval_batch_size", 0),
    "stopping_step_zero": _bad_value("stopping_step", 0),
    "eval_step_negative": _bad_value("eval_step", -1),
    "max_len_zero": _bad_value("MAX_ITEM_LIST_LENGTH", 0),
    "topk_zero": lambda e: (e.finetune(topk="[0]"), ["topk"]),
    "topk_text": lambda e: (e.finetune(topk="many"), ["topk"]),
    "valid_metric_not_computed": lambda e: (e.finetune(topk="[5]"), ["valid_metric", "NDCG@10", "[5]"]),
    "topk_larger_than_catalogue": lambda e: (e.finetune(topk="[10,50]"), ["topk", "50", f"{N_ITEMS} items"]),
    "unknown_key_strict": lambda e: (e.finetune("SASRec", "--strict-config", learnin_rate=0.01),
                                     ["learnin_rate", "did you mean 'learning_rate'"]),
    "unknown_key_in_config_file_strict": _config_file(b"epochs: 1\nleraning_rate: 0.01\n", "leraning_rate",
                                                      "--strict-config"),
    "config_file_not_utf8": _config_file(b"epochs: 1\n# caf\xe9\n", "not UTF-8"),
    "config_file_not_a_mapping": _config_file(b"- epochs\n- 1\n", "YAML mapping"),
    "unknown_model": lambda e: (e.finetune("SASRek"), ["unknown model 'SASRek'", "UniSRec", "sasrec"]),
    "unknown_model_pretrain": lambda e: (["pretrain", "-m", "Nope", "-d", "Tiny", f"--data_path={e.data}"],
                                         ["unknown model 'Nope'"]),
    "pretrain_epochs_zero": lambda e: (["pretrain", "-m", "SASRec", "-d", "Tiny", f"--data_path={e.data}",
                                        "--epochs=0"], ["--epochs", "expected"]),
    # checkpoints given with -p / --resume
    "pretrained_missing": lambda e: (e.finetune("SASRec", "-p", str(e.tmp / "nope.pth")), ["nope.pth", "not found"]),
    "pretrained_empty": _checkpoint_case(_write_bytes(b""), "empty"),
    "pretrained_random_bytes": _checkpoint_case(_write_bytes(os.urandom(300)), "not a recbole_mm checkpoint"),
    "pretrained_truncated": _checkpoint_case(_truncated, "not a recbole_mm checkpoint"),
    "pretrained_pickled_object": _checkpoint_case(_pickled, "weights_only=True"),
    "pretrained_not_ours": _checkpoint_case(_not_ours, "not a recbole_mm checkpoint"),
    "pretrained_other_model": _checkpoint_case(lambda e: e.ckpt(model="UniSRec"), "UniSRec checkpoint cannot initialise SASRec"),
    "pretrained_feature_size": lambda e: (
        e.finetune("UniSRec", "-p", e.ckpt(model="UniSRec", config={"plm_suffix": "feat1CLS", "plm_size": 768})),
        ["x.pth", "plm_size 768", "plm_size 16"]),
    "resume_truncated": _checkpoint_case(_truncated, "not a recbole_mm checkpoint", "--resume"),
    "resume_other_model": _checkpoint_case(lambda e: e.ckpt(model="GRU4Rec", trainer={}), "written by GRU4Rec",
                                           "--resume"),
    "resume_without_training_state": _checkpoint_case(lambda e: e.ckpt(), "no training state", "--resume"),
    "resume_changed_config": _checkpoint_case(_resume_changed, "learning_rate: 0.01 -> 0.001", "--resume"),
    # data files
    "item2index_not_utf8": _non_utf8("item2index", 3),
    "text_not_utf8": _non_utf8("text", 5),
    "train_inter_not_utf8": _non_utf8("train.inter", 7),
    "valid_inter_not_utf8": _non_utf8("valid.inter", 2),
    "user2index_not_utf8": _non_utf8("user2index", 9),
    "valid_duplicate_user": _duplicate_user("valid"),
    "test_duplicate_user": _duplicate_user("test"),
    "text_features_float64": _feature_case(_float64, "feat1CLS", "float64"),
    "text_features_float64_sized": _feature_case(_float64, "feat1CLS", "float64", plm_size=16),
    "image_features_float64": _feature_case(lambda e: _float64(e, "feat3CLS"), "feat3CLS", "float64"),
    "text_features_all_zero": _feature_case(_zero("feat1CLS"), "feat1CLS", "every value is 0"),
    "image_features_all_zero": _feature_case(_zero("feat3CLS"), "feat3CLS", "every value is 0"),
    # preprocess raw files
    "raw_gz_truncated": _gz(_truncate_gz),
    "raw_gz_fake": _gz(_fake_gz),
    "raw_reviews_not_utf8": _raw_non_utf8,
    "raw_meta_not_utf8": _meta_non_utf8,
    "plain_inter_not_utf8": _plain_inter_non_utf8,
    # recommend
    "histories_not_utf8": _histories_non_utf8,
    "recommend_truncated_checkpoint": _recommend_truncated,
    # run names
    "run_name_in_use": _run_name_taken,
}


def _tree(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, dirs, files in os.walk(root) for f in files + dirs)


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_broken_input_exits_2_with_one_line_and_writes_nothing(case, tiny_root, tmp_path, monkeypatch, capsys):
    env = Env(tmp_path, tiny_root)
    monkeypatch.chdir(env.run)
    argv, fragments = CORPUS[case](env)
    before = _tree(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err.strip()
    lock = getattr(env, "keep", None)
    if lock is not None:
        lock.release()
        before.remove(os.path.join("run", "saved", "taken.lock"))
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert _tree(tmp_path) == before  # no log, checkpoint, lock, partial output


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 40


# -- -p: a checkpoint must fit the model ------------------------------------------------------
def _state(model_name, root, **over):
    from recbole_mm.data import create_dataset
    from recbole_mm.utils import get_model

    config = build_config(model_name, "Tiny", config_dict=quick(root, **over))
    torch.manual_seed(0)
    model = get_model(model_name)(config, create_dataset(config))
    return model, config


@pytest.mark.parametrize("source, target, fragment", [
    ("SASRec", "UniSRec", "a SASRec checkpoint cannot initialise UniSRec"),
    ("UniSRec", "GRU4Rec", "a UniSRec checkpoint cannot initialise GRU4Rec"),
    ("GRU4Rec", "SASRec", "a GRU4Rec checkpoint cannot initialise SASRec"),
])
def test_pretrained_checkpoint_of_another_model_is_refused_before_training(source, target, fragment, tiny_root,
                                                                           tmp_path, workdir):
    model, config = _state(source, tiny_root)
    path = str(tmp_path / "src.pth")
    save_checkpoint({"model": source, "state_dict": model.state_dict(), "config": config_to_plain(config)}, path)
    with pytest.raises(CheckpointError, match=fragment):
        run(target, "Tiny", pretrained=path, overrides=quick(tiny_root, epochs=1))
    assert os.listdir(workdir) == ["src.pth"]


@pytest.mark.parametrize("drop, fragment", [
    ("trm_encoder.layer.0.", "trm_encoder.layer.0"),  # a part frozen under fix_enc is missing
    ("position_embedding.", r"position_embedding\.weight \(missing\)"),
])
def test_parts_frozen_on_transfer_must_come_from_the_checkpoint(drop, fragment, tiny_root):
    pre, _ = _state("UniSRec", tiny_root, train_stage="pretrain")
    state = {k: v for k, v in pre.state_dict().items() if not k.startswith(drop)}
    model, _ = _state("UniSRec", tiny_root, train_stage="inductive_ft")
    with pytest.raises(CheckpointError, match=fragment):
        model.load_pretrained(state)


def test_weights_of_another_feature_size_are_refused(tiny_root):
    pre, _ = _state("UniSRec", tiny_root, train_stage="pretrain")
    state = dict(pre.state_dict())
    key = next(k for k in state if k.startswith("moe_adaptor.") and state[k].dim() == 2)
    state[key] = torch.zeros(state[key].shape[0] * 2, state[key].shape[1])
    model, _ = _state("UniSRec", tiny_root, train_stage="inductive_ft")
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        model.load_pretrained(state)


def test_id_model_transfers_all_but_its_item_table_to_another_catalogue(tiny_root, tmp_path, workdir):
    from recbole_mm.model.abstract import load_pretrained_state

    other, _ = _state("SASRec", tiny_root)
    other_state = {k: (torch.randn(31, v.shape[1]) if k == "item_embedding.weight" else v + 1)
                   for k, v in other.state_dict().items()}  # another catalogue: 30 items
    model, _ = _state("SASRec", tiny_root)
    fresh = model.item_embedding.weight.detach().clone()
    loaded = load_pretrained_state(model, other_state)
    assert "item_embedding.weight" not in loaded and len(loaded) == len(other_state) - 1
    assert torch.equal(model.item_embedding.weight, fresh)
    torch.testing.assert_close(model.trm_encoder.layer[0].feed_forward.dense_1.weight,
                               other_state["trm_encoder.layer.0.feed_forward.dense_1.weight"])
    # a tensor of another shape that is not an item table is refused
    other_state["position_embedding.weight"] = torch.zeros(7, other_state["position_embedding.weight"].shape[1])
    with pytest.raises(CheckpointError, match="position_embedding.weight"):
        load_pretrained_state(_state("SASRec", tiny_root)[0], other_state)


# -- --resume ------------------------------------------------------------------------------
def _cli_run(args, cwd):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "recbole_mm.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_resume_from_another_folder_uses_the_runs_own_files(tiny_root, tmp_path, monkeypatch):
    first, other = tmp_path / "first", tmp_path / "other"
    first.mkdir(), other.mkdir()
    over = quick(tiny_root, epochs=2, eval_step=1, run_name="r")
    monkeypatch.chdir(first)
    done = run("SASRec", "Tiny", overrides=over)
    monkeypatch.chdir(other)
    unrelated = run("SASRec", "Tiny", overrides=dict(over, seed=7))  # an unrelated saved/r.pth here
    resume = str(first / "saved" / "r.resume.pth")
    again = run("SASRec", "Tiny", resume=resume, overrides=over)  # nothing left to train: evaluates the best
    assert again["checkpoint"] == str(first / "saved" / "r.pth") and again["test"] == done["test"]
    assert unrelated["test"] != done["test"]
    # the run's best model replaced by another run's: refused, not evaluated
    shutil.copy(other / "saved" / "r.pth", first / "saved" / "r.pth")
    with pytest.raises(CheckpointError, match="written by another run"):
        run("SASRec", "Tiny", resume=resume, overrides=over)


@pytest.mark.parametrize("key, value, allowed", [
    ("learning_rate", 0.01, False),
    ("train_batch_size", 32, False),
    ("seed", 1, False),
    ("epochs", 3, True),
    ("show_progress", True, True),
])
def test_resume_refuses_config_changes_it_cannot_honour(key, value, allowed, tiny_root, workdir):
    over = quick(tiny_root, epochs=2, eval_step=1, run_name="c")
    first = run("SASRec", "Tiny", overrides=over)
    resume = os.path.join(os.path.dirname(first["checkpoint"]), "c.resume.pth")
    if allowed:
        again = run("SASRec", "Tiny", resume=resume, overrides=dict(over, **{key: value}))
        assert again["config"][key] == value and len(again["history"]) == (3 if key == "epochs" else 2)
    else:
        with pytest.raises(CheckpointError, match=f"{key}: "):
            run("SASRec", "Tiny", resume=resume, overrides=dict(over, **{key: value}))


# -- run names -------------------------------------------------------------------------------
def test_a_run_owns_its_name_while_it_runs(tiny_root, workdir):
    over = quick(tiny_root, epochs=1, run_name="own")
    with RunLock(os.path.join("saved", "own")):
        with pytest.raises(CheckpointError, match="in use"):
            run("SASRec", "Tiny", overrides=over)
    assert not os.path.exists(os.path.join("saved", "own.lock"))
    res = run("SASRec", "Tiny", overrides=over)  # free again; the lock is gone after the run
    assert os.path.isfile(res["checkpoint"]) and not os.path.exists(os.path.join("saved", "own.lock"))


def test_lock_of_a_killed_run_does_not_block_the_next(tmp_path):
    base = str(tmp_path / "k")
    code = "from recbole_mm.trainer.checkpoint import RunLock; import os; RunLock(%r).acquire(); os._exit(0)" % base
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert os.path.exists(base + ".lock")  # left behind, but not held
    with RunLock(base):
        pass


# -- byte-order marks ------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", ["item2index", "user2index", "text", "train.inter", "valid.inter", "test.inter"])
def test_byte_order_mark_is_stripped_in_every_atomic_file(suffix, tiny_root, tmp_path):
    from recbole_mm.data import create_dataset

    data = tmp_path / "data"
    shutil.copytree(tiny_root / "Tiny", data / "Tiny")
    path = data / "Tiny" / f"Tiny.{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    ds = create_dataset(build_config("SASRec", "Tiny", config_dict=quick(data, plm_suffix="feat1CLS")))
    plain = create_dataset(build_config("SASRec", "Tiny", config_dict=quick(tiny_root, plm_suffix="feat1CLS")))
    assert ds.item_raw_ids == plain.item_raw_ids and not any("\ufeff" in r for r in ds.item_raw_ids)
    assert ds.item_text == plain.item_text
    assert list(ds.inter_feat["item_id"]) == list(plain.inter_feat["item_id"])


def test_byte_order_mark_is_stripped_in_plain_inter_and_histories(tmp_path):
    from fixtures import make_dataset
    from recbole_mm.data import create_dataset
    from recbole_mm.recommend.cli import read_histories

    make_dataset(tmp_path / "a", "P", plain_inter=True)
    make_dataset(tmp_path / "b", "P", plain_inter=True)
    path = tmp_path / "b" / "P" / "P.inter"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    ds = [create_dataset(build_config("SASRec", "P", config_dict=quick(tmp_path / r))) for r in ("a", "b")]
    assert list(ds[0].inter_feat["user_id"]) == list(ds[1].inter_feat["user_id"])
    hist = tmp_path / "h.txt"
    hist.write_bytes(b"\xef\xbb\xbfA1,A2\n")
    assert read_histories(str(hist)) == [(1, ["A1", "A2"])]


# -- unknown config keys -----------------------------------------------------------------------
@pytest.mark.parametrize("key, closest", [("learnin_rate", "learning_rate"), ("epoch", "epochs"),
                                          ("plm_sufix", "plm_suffix"), ("fix_encc", "fix_enc")])
def test_unknown_config_key_warns_with_the_closest_known_key(key, closest, tiny_root, capsys):
    from recbole_mm.config import ConfigError, check_keys

    assert check_keys({key: "1", "epochs": "1"}, "command line") == [key]
    err = capsys.readouterr().err
    assert f"unknown config key {key!r} (did you mean {closest!r}?)" in err and len(err.splitlines()) == 1
    with pytest.raises(ConfigError, match=closest):
        check_keys({key: "1"}, "command line", strict=True)


def test_every_props_key_is_known(tiny_root):
    import yaml

    from recbole_mm.config import known_keys, props_dir

    for f in props_dir().glob("*.yaml"):
        assert set(yaml.safe_load(f.read_text()) or {}) <= known_keys(), f


# -- leftovers of killed runs ----------------------------------------------------------------
def test_stale_temporary_checkpoints_of_the_same_run_are_removed(tiny_root, workdir, capfd):
    os.makedirs("saved")
    mine = [".t.pth.tmp-abc123", ".t.resume.pth.tmp-x", ".t.json.tmp-1"]
    others = [".other.pth.tmp-abc", ".tx.pth.tmp-1"]
    for name in mine + others:
        open(os.path.join("saved", name), "wb").write(b"partial")
    run("SASRec", "Tiny", overrides=quick(tiny_root, epochs=1, run_name="t"))
    left = os.listdir("saved")
    assert not set(mine) & set(left) and set(others) <= set(left)
    assert capfd.readouterr().err.count("left by an interrupted run of t") == len(mine)


def test_stale_partial_output_of_preprocess_is_removed(tmp_path, capsys):
    from recbole_mm.pipeline.preprocess import preprocess

    reviews, meta = make_raw()
    write_2023(tmp_path / "raw", "Cat", reviews, meta)
    out = tmp_path / "out"
    stale = out / ".Cat.partial-99999999-abcd1234"  # a process that no longer exists
    stale.mkdir(parents=True)
    (stale / "Cat.item2index").write_text("half")
    live = out / f".Cat.partial-{os.getppid()}-abcd"  # its process still runs: left alone
    live.mkdir()
    preprocess(str(tmp_path / "raw"), "Cat", str(out), log=lambda m: None)
    assert sorted(os.listdir(out)) == sorted(["Cat", live.name])
    assert f"removed {stale}" in capsys.readouterr().err
    assert (out / "Cat" / "Cat.train.inter").is_file()


# -- feature tables of the recommend path ----------------------------------------------------
@pytest.mark.parametrize("corrupt, fragment", [
    (lambda a: a.astype("<f8").view("<f4"), "float64"),
    (lambda a: np.zeros_like(a), "every value is 0"),
])
def test_feature_table_reader_refuses_impossible_files(corrupt, fragment, tmp_path):
    from recbole_mm.data.readers import DataValidationError, read_feature_table

    arr = np.random.default_rng(0).normal(size=(10, 4)).astype("<f4")
    path = tmp_path / "x.feat"
    corrupt(arr).tofile(path)
    with pytest.raises(DataValidationError, match=fragment):
        read_feature_table(str(path), [str(i) for i in range(10)], 8 if "float64" in fragment else 4)
    arr.tofile(path)
    assert read_feature_table(str(path), [str(i) for i in range(10)], 4).shape == (11, 4)


def test_topk_equal_to_the_catalogue_is_accepted(tiny_root, workdir):
    res = run("SASRec", "Tiny", overrides=quick(tiny_root, epochs=1, topk=[10, N_ITEMS]), saved=False)
    assert 0 <= res["test"][f"ndcg@{N_ITEMS}"] <= 1


def test_docs_describe_every_guarantee():
    text = open(os.path.join(os.path.dirname(__file__), "..", "docs", "reliability.md")).read()
    for topic in ("atomic", "resume", "refused", "run name", "test_reliability.py"):
        assert topic in text.lower(), topic

