"""End-to-end through run()/the CLI on the tiny fixture: train, evaluate, save, reload, resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import quick
from fixtures import make_dataset, popularity_ndcg10
from recbole_mm.quick_start import build_config, run
from recbole_mm.trainer import load_checkpoint


def test_sasrec_learns_saves_and_reloads_exactly(tiny_root, workdir):
    result = run("SASRec", "Tiny", overrides=quick(tiny_root, epochs=15, learning_rate=0.005, stopping_step=20))
    losses = [h["train_loss"] for h in result["history"]]
    assert losses[-1] < 0.8 * losses[0]
    pop = popularity_ndcg10(tiny_root, "Tiny")
    assert result["test"]["ndcg@10"] > pop + 0.05, (result["test"], pop)

    with open(result["result_file"]) as f:
        saved = json.load(f)
    assert saved["test"] == result["test"] and saved["params"]["trainable"] > 0
    assert saved["timings"]["mean_train_seconds_per_epoch"] > 0 and saved["timings"]["peak_rss_mb"] > 0

    ckpt = torch.load(result["checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == result["best_epoch"] and ckpt["item_tokens"][0] == "[PAD]"
    assert isinstance(ckpt["config"], dict) and ckpt["config"]["model"] == "SASRec"
    assert ckpt["metrics"]["valid"] == pytest.approx(result["valid"])

    # reload into a fresh model and evaluate again: identical test metrics
    from recbole.model.sequential_recommender import SASRec
    from recbole_mm.data import create_dataset, data_preparation
    from recbole_mm.trainer import MMTrainer

    config = build_config("SASRec", "Tiny", overrides=quick(tiny_root))
    ds = create_dataset(config)
    _, _, test = data_preparation(config, ds)
    model = SASRec(config, test._dataset)
    trainer = MMTrainer(config, model, ds, run_name="reload")
    again = trainer.evaluate(test, load_best_model=True, model_file=result["checkpoint"])
    assert again == result["test"]


def test_checkpoint_rejects_pickled_objects(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"format": "recbole_mm.checkpoint/1", "state_dict": {}, "obj": object()}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_checkpoint(str(path))


def _cli(args, cwd, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "recbole_mm.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_uninterrupted(tmp_path):
    root = tmp_path / "data"
    make_dataset(root, "Mid", n_users=500, n_items=60, seq_len=(6, 14), seed=3)
    common = ["finetune", "-m", "SASRec", "-d", "Mid", f"--data_path={root}", "--epochs=5", "--stopping_step=20",
              "--train_batch_size=16", "--show_progress=False", "--use_gpu=False", "--state=WARNING"]
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    full_dir.mkdir(), cut_dir.mkdir()
    proc = _cli(common + ["--run_name=full"], full_dir)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    full = json.load(open(full_dir / "saved" / "full.json"))

    proc = _cli(common + ["--run_name=cut"], cut_dir)
    resume_file = cut_dir / "saved" / "cut.resume.pth"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if resume_file.exists() and torch.load(resume_file, weights_only=True)["epoch"] >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (cut_dir / "saved" / "cut.json").exists()

    proc = _cli(common + ["--run_name=cut", f"--resume={cut_dir / 'saved' / 'cut.pth'}"], cut_dir)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    resumed = json.load(open(cut_dir / "saved" / "cut.json"))
    # a temporary file the kill may have left is removed by the resumed run; the lock is released
    assert not [f for f in os.listdir(cut_dir / "saved") if ".tmp-" in f or f.endswith(".lock")]
    assert resumed["test"] == full["test"]
    assert resumed["valid"] == full["valid"] and resumed["best_epoch"] == full["best_epoch"]
    assert [h["train_loss"] for h in resumed["history"]] == pytest.approx([h["train_loss"] for h in full["history"]], rel=1e-6)


def test_resume_of_an_early_stopped_run_trains_no_further(tiny_root, workdir, monkeypatch):
    """Early stopping ended the run: resuming from its files reports the same result, no new epoch."""
    import recbole_mm.trainer.trainer as trainer_module

    real = trainer_module.early_stopping

    def stop_at_third_validation(value, best, cur_step, max_step, bigger=True):
        best, cur_step, _, improved = real(value, best, cur_step, max_step, bigger)
        calls.append(value)
        return best, cur_step, len(calls) == 3, improved

    calls = []
    monkeypatch.setattr(trainer_module, "early_stopping", stop_at_third_validation)
    over = quick(tiny_root, epochs=10, eval_step=1, run_name="stopped")
    first = run("SASRec", "Tiny", overrides=over)
    monkeypatch.setattr(trainer_module, "early_stopping", real)  # (undo() would also undo workdir's chdir)
    assert len(first["history"]) == 3
    resume = os.path.join(os.path.dirname(first["checkpoint"]), "stopped.resume.pth")
    assert torch.load(resume, weights_only=True)["trainer"]["stopped"] is True
    again = run("SASRec", "Tiny", resume=resume, overrides=over)
    assert len(again["history"]) == len(first["history"]) and again["best_epoch"] == first["best_epoch"]
    assert again["test"] == first["test"]


@pytest.mark.parametrize("model", ["GRU4Rec", "BERT4Rec", "NARM", pytest.param("Caser", marks=pytest.mark.slow), "FDSA",
                                   "LightSANs"])
def test_recbole_baselines_run_through_our_cli(model, tiny_root, workdir):
    result = run(model, "Tiny", overrides=quick(tiny_root, epochs=1))
    assert set(result["test"]) >= {"recall@10", "ndcg@10", "mrr@10"}
    assert 0.0 <= result["test"]["ndcg@10"] <= 1.0


@pytest.mark.slow
def test_s3rec_pretrain_then_finetune(tiny_root, workdir):
    pre = run("S3Rec", "Tiny", stage="pretrain", overrides=quick(tiny_root, epochs=1, train_stage="pretrain"))
    assert pre["valid"] is None and os.path.isfile(pre["checkpoint"])
    ft = run("S3Rec", "Tiny", overrides=quick(tiny_root, epochs=1, pre_model_path=pre["checkpoint"]))
    assert 0.0 <= ft["test"]["ndcg@10"] <= 1.0
    with pytest.raises(ValueError, match="pre_model_path"):
        run("S3Rec", "Tiny", overrides=quick(tiny_root, epochs=1))


def test_inductive_mode_is_refused_for_id_models(tiny_root, workdir):
    with pytest.raises(ValueError, match="no inductive"):
        run("SASRec", "Tiny", mode="inductive", overrides=quick(tiny_root))


def test_untrimmed_sasrec_trains_bit_for_bit_as_plain_recbole(tiny_root, workdir):
    """trim_batch_seq False: same item numbering, same batches, same random draws as RecBole
    1.2.1's own pipeline on the same files, so the same losses and metrics (to the last digit)."""
    from recbole.config import Config
    from recbole.data import create_dataset as plain_dataset, data_preparation as plain_preparation
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer
    from recbole.utils import init_seed

    ours = run("SASRec", "Tiny", overrides=quick(tiny_root, epochs=3, trim_batch_seq=False, eval_step=1))
    cfg = {
        "data_path": str(tiny_root), "seed": 2020, "reproducibility": True, "use_gpu": False, "state": "WARNING",
        "benchmark_filename": ["train", "valid", "test"], "alias_of_item_id": ["item_id_list"],
        "load_col": {"inter": ["user_id", "item_id_list", "item_id"]}, "MAX_ITEM_LIST_LENGTH": 50,
        "train_neg_sample_args": None, "loss_type": "CE", "epochs": 3, "train_batch_size": 64,
        "learning_rate": 0.001, "stopping_step": 10, "eval_step": 1, "eval_batch_size": 64,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
        "metrics": ["Recall", "NDCG", "MRR"], "topk": [10], "valid_metric": "NDCG@10", "show_progress": False,
        "checkpoint_dir": str(workdir / "plain"),
    }
    config = Config(model="SASRec", dataset="Tiny", config_dict=cfg)
    init_seed(config["seed"], config["reproducibility"])
    ds = plain_dataset(config)
    train, valid, test = plain_preparation(config, ds)
    init_seed(config["seed"], config["reproducibility"])
    trainer = Trainer(config, SASRec(config, train._dataset))
    losses, train_epoch = [], trainer._train_epoch
    trainer._train_epoch = lambda *a, **k: losses.append(train_epoch(*a, **k)) or losses[-1]
    trainer.fit(train, valid, saved=True, show_progress=False)
    assert [h["train_loss"] for h in ours["history"]] == pytest.approx(losses, rel=0, abs=1e-9)
    result = trainer.evaluate(test, load_best_model=True, show_progress=False)
    assert {k: round(float(v), 4) for k, v in result.items()} == ours["test"]


def test_steps_per_epoch_caps_the_batches_of_an_epoch(tiny_root, workdir, monkeypatch):
    from recbole.model.sequential_recommender import SASRec

    calls = []
    original = SASRec.calculate_loss
    monkeypatch.setattr(SASRec, "calculate_loss", lambda self, inter: calls.append(len(inter)) or original(self, inter))
    run("SASRec", "Tiny", overrides=quick(tiny_root, epochs=2, steps_per_epoch=3, train_batch_size=16))
    assert len(calls) == 2 * 3 and set(calls) == {16}
