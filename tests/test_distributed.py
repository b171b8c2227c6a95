"""Distributed pre-training: 2 CPU processes (gloo) against one process, failures, resume.

The distributed jobs run as real jobs in subprocesses: through ``torchrun`` with this file as
the worker script (``python tests/test_distributed.py worker OUT FAULT -- <pretrain args>``:
it can dump every rank's parameters and inject a failure on one rank) and through
``run_pretrain.py --nproc 2``.  The single-process reference runs in the test process.

Pre-training is made deterministic so that one process and two processes can be compared:
dropout probabilities 0, no item/word drop in the second view and, for UniSRec, one adaptor
expert (the MoE gate's training noise then has no effect: a softmax over one expert is 1).
SGD keeps a float-rounding difference in a gradient a difference of the same size in the
parameters (Adam's first steps are sign-like and would amplify it for parameters with ~0
gradients).  MISSRec adds its per-epoch k-means (rank 0, broadcast) and its batch-sum
regulariser (weighted up with ``gamma`` so that a wrong scale would show).  PMMRec adds
losses that average over tokens and anchors (not rows), candidates grouped by user over the
global batch, and NICL keys that count each item once although it may sit on both ranks.
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

DETERMINISTIC = {
    "epochs": 2,
    "train_batch_size": 256,  # 1,101 training rows: 4 full global batches + one of 77 (39 + 38 rows)
    "hidden_size": 32,
    "inner_size": 32,
    "hidden_dropout_prob": 0,
    "attn_dropout_prob": 0,
    "item_drop_ratio": 0,
    "learner": "sgd",
    "show_progress": False,
    "use_gpu": False,
    "state": "WARNING",
}
MODEL = {
    "UniSRec": {"adaptor_dropout_prob": 0, "n_exps": 1, "learning_rate": 0.5},
    # the diversity regulariser at the reference's scale (~100x the mean over real interests)
    "MISSRec": {"gamma": 1e-3, "learning_rate": 0.05},
    # all four objectives; no corruption (its draws are per rank), so NID and RCL compare clean
    # sequences but still need every rank's tokens and rows for their means and negatives
    "PMMRec": {"n_exps": 1, "adaptor_dropout_prob": 0, "noise_ratio": 0, "fusion_inner_size": 64,
               "nicl_temperature": 0.1, "rcl_temperature": 0.1, "learning_rate": 0.05},
}


def _args(root, run_name, model="UniSRec"):
    cfg = dict(DETERMINISTIC, **MODEL[model], data_path=str(root), run_name=run_name)
    return ["-m", model, "-d", "Tiny,Tiny2", *[f"--{k}={v}" for k, v in cfg.items()]]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))


def _torchrun(workdir, out, fault, args, timeout=120):
    """2 processes under torchrun running this file's worker; returns (returncode, output, seconds)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           __file__, "worker", str(out), fault, "--", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, env=_env(), capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - t0


@pytest.fixture(scope="module")
def single_process(tiny_root, tmp_path_factory):
    """The reference: the same pre-training in one process (this one), per model."""
    from recbole_mm.quick_start import run

    done = {}

    def get(model="UniSRec"):
        if model not in done:
            work = tmp_path_factory.mktemp("single")
            cwd = os.getcwd()
            os.chdir(work)
            try:
                args = _args(tiny_root, "single", model)
                overrides = dict(a[2:].split("=", 1) for a in args[4:])
                result = run(model, "Tiny,Tiny2", "pretrain", overrides=overrides)
                done[model] = result, torch.load(result["checkpoint"], weights_only=True)["state_dict"]
            finally:
                os.chdir(cwd)
        return done[model]

    return get


def _assert_close(state, reference, what):
    assert state.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(state[name], reference[name], rtol=1e-4, atol=2e-5, msg=lambda m: f"{what}: {name}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("model", ["UniSRec", "MISSRec", "PMMRec"])
def test_two_processes_stay_in_sync_and_equal_one_process(model, tiny_root, tmp_path, single_process):
    ref_result, ref_state = single_process(model)
    rc, output, _ = _torchrun(tmp_path, tmp_path / "dump", "none", _args(tiny_root, "ddp", model))
    assert rc == 0, output[-5000:]

    rank0 = torch.load(tmp_path / "dump" / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "dump" / "rank1.pt", weights_only=True)
    for name in rank0:  # DDP: identical replicas, bit for bit (MISSRec's interests included)
        assert torch.equal(rank0[name], rank1[name]), name
    _assert_close(rank0, ref_state, "2 processes vs 1")
    ckpt = torch.load(tmp_path / "saved" / "ddp.pth", weights_only=True)
    _assert_close(ckpt["state_dict"], ref_state, "rank 0's checkpoint vs 1 process")
    assert ckpt["epoch"] == 1

    # the same global-batch losses, logged once (rank 0: one log file, one TensorBoard folder)
    result = json.load(open(tmp_path / "saved" / "ddp.json"))
    assert [h["train_loss"] for h in result["history"]] == pytest.approx(
        [h["train_loss"] for h in ref_result["history"]], rel=1e-5)
    assert len(glob.glob(str(tmp_path / "log" / model / "*.log"))) == 1
    assert len(os.listdir(tmp_path / "log_tensorboard")) == 1
    # training moved the weights well beyond the tolerance (the comparison is not vacuous)
    moved = max((rank0[n] - ref_state[n]).abs().max() for n in ref_state if ref_state[n].is_floating_point())
    fresh = torch.load(tmp_path / "dump" / "init.pt", weights_only=True)
    trained = [n for n in fresh if fresh[n].is_floating_point() and fresh[n].shape == rank0[n].shape]
    assert max((rank0[n] - fresh[n]).abs().max() for n in trained) > 100 * max(moved, 2e-5)


@pytest.fixture(scope="module")
def failed_job(tiny_root, tmp_path_factory):
    """A 2-process job whose rank 1 raises (or is SIGKILLed) in the middle of epoch 1, while
    rank 0 waits for it in a collective: ``(folder, returncode, output, seconds)``."""
    done = {}

    def get(fault):
        if fault not in done:
            work = tmp_path_factory.mktemp(f"failed-{fault}")
            done[fault] = (work, *_torchrun(work, work / "dump", fault, _args(tiny_root, "cut"), timeout=90))
        return done[fault]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["raise", "kill"])
def test_a_failing_rank_ends_the_job(fault, failed_job):
    """The whole job ends, non-zero, within seconds; the launcher reports rank 1's failure as
    the root cause; epoch 0's checkpoints are complete."""
    work, rc, output, seconds = failed_job(fault)
    assert rc != 0 and seconds < 60, (rc, seconds, output[-5000:])
    root_cause = output.split("Root Cause")[-1]
    assert re.search(r"rank\s*:\s*1\b", root_cause), output[-5000:]
    if fault == "raise":
        assert "RuntimeError: injected failure on rank 1" in root_cause, output[-5000:]
    else:
        assert "SIGKILL" in root_cause, output[-5000:]
    assert not (work / "saved" / "cut.json").exists()
    resume = torch.load(work / "saved" / "cut.resume.pth", weights_only=True)
    assert resume["epoch"] == 0 and len(resume["rng_ranks"]) == 2


@pytest.mark.slow
def test_resume_after_a_rank_was_killed(tiny_root, failed_job, single_process):
    """``run_pretrain.py --nproc 2 --resume`` finishes the killed run from epoch 0's checkpoint
    and ends where one uninterrupted process ends."""
    work, rc, output, _ = failed_job("kill")
    assert rc != 0, output[-5000:]
    cmd = [sys.executable, str(REPO / "run_pretrain.py"), "--nproc", "2", *_args(tiny_root, "cut"), "--resume", "saved/cut.pth"]
    proc = subprocess.run(cmd, cwd=work, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    result = json.load(open(work / "saved" / "cut.json"))
    ref_result, ref_state = single_process("UniSRec")
    assert [h["epoch"] for h in result["history"]] == [0, 1]
    assert [h["train_loss"] for h in result["history"]] == pytest.approx(
        [h["train_loss"] for h in ref_result["history"]], rel=1e-5)
    _assert_close(torch.load(work / "saved" / "cut.pth", weights_only=True)["state_dict"], ref_state,
                  "2 processes killed and resumed vs 1 process")


def test_global_batch_sampler_splits_the_single_process_batches():
    from recbole_mm.distributed import GlobalBatchSampler

    order = torch.utils.data.SequentialSampler(range(21))
    single = list(GlobalBatchSampler(order, 8))
    assert single == [list(range(8)), list(range(8, 16)), list(range(16, 21))]
    shares = [list(GlobalBatchSampler(order, 8, rank=r, world_size=2)) for r in range(2)]
    assert [sorted(a + b) for a, b in zip(*shares)] == single  # the same global batches
    assert [len(b) for b in shares[0]] == [4, 4, 3] and [len(b) for b in shares[1]] == [4, 4, 2]
    three = [list(GlobalBatchSampler(torch.utils.data.SequentialSampler(range(17)), 8, r, 4)) for r in range(4)]
    assert all(len(s) == 2 for s in three)  # a last global batch of 1 < 4 ranks is skipped
    assert len(GlobalBatchSampler(torch.utils.data.SequentialSampler(range(17)), 8, 0, 4)) == 2
    with pytest.raises(ValueError, match="divisible by the world size 3"):
        GlobalBatchSampler(order, 8, 0, 3)


def test_global_batch_must_split_evenly(tiny_root, workdir, monkeypatch):
    from recbole_mm.quick_start import UsageError, run

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="train_batch_size=255 is the global batch"):
        run("UniSRec", "Tiny,Tiny2", "pretrain", overrides={"data_path": str(tiny_root), "train_batch_size": "255"})


# --------------------------------------------------------------------------------------
# worker (torchrun runs this file): python test_distributed.py worker OUT FAULT -- ARGS


def _worker(out, fault, args):
    import recbole_mm.model.unisrec as unisrec
    from recbole_mm import cli, distributed
    from recbole_mm.trainer import MMTrainer

    os.makedirs(out, exist_ok=True)
    rank = int(os.environ["RANK"])
    real_init, real_fit, real_loss = MMTrainer.__init__, MMTrainer.fit, unisrec.UniSRec.pretrain_loss

    def init(self, config, model, *a, **kw):
        real_init(self, config, model, *a, **kw)
        if distributed.is_main():  # the weights DDP broadcast to every rank
            torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, os.path.join(out, "init.pt"))

    def fit(self, *a, **kw):
        result = real_fit(self, *a, **kw)
        torch.save({k: v.detach().clone() for k, v in self.model.state_dict().items()}, os.path.join(out, f"rank{rank}.pt"))
        return result

    calls = [0]

    def pretrain_loss(self, interaction):
        calls[0] += 1
        if rank == 1 and calls[0] == 8:  # epoch 1 (5 batches per epoch), third batch
            if fault == "raise":
                raise RuntimeError("injected failure on rank 1")
            if fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
        return real_loss(self, interaction)

    MMTrainer.__init__, MMTrainer.fit, unisrec.UniSRec.pretrain_loss = init, fit, pretrain_loss
    return cli.main(["pretrain", *args])


if __name__ == "__main__" and len(sys.argv) > 4 and sys.argv[1] == "worker" and sys.argv[4] == "--":
    sys.exit(_worker(sys.argv[2], sys.argv[3], sys.argv[5:]))
