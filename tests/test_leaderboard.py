"""``recbole-mm leaderboard`` on the tiny fixture: report files with mean +- std over seeds, failed
cells reported while the others complete, finished cells skipped, interrupted cells resumed."""

import csv
import json
import math
import os
import threading
import time

import psutil
import pytest
import torch

from conftest import quick
from recbole_mm.leaderboard import LeaderboardError, leaderboard, parse_model_overrides, parse_seeds, plan


def _overrides(root, **extra):
    return {k: str(v) for k, v in quick(root, **extra).items()}  # strings, as from the command line


def _quiet(*args, **kwargs):
    pass


@pytest.mark.slow
def test_grid_report_failure_and_skip_on_second_invocation(tiny_root, workdir):
    kw = dict(dataset="Tiny", models="SASRec,GRU4Rec,NoSuchRec", seeds=2, overrides=_overrides(tiny_root),
              out=str(workdir / "results"), isolation="subprocess", log=_quiet)
    res = leaderboard(**kw)
    cells = res["cells"]
    done = [c for c in cells if c.status == "finished"]
    assert sorted((c.model, c.seed) for c in done) == [("GRU4Rec", 2020), ("GRU4Rec", 2021),
                                                       ("SASRec", 2020), ("SASRec", 2021)]
    (bad,) = [c for c in cells if c.status == "failed"]
    assert bad.model == "NoSuchRec" and "unknown model 'NoSuchRec'" in bad.error
    for c in done:  # the run's own result JSON, next to its checkpoint
        assert c.result_file == os.path.join("saved", c.run_name + ".json")
        assert os.path.isfile(c.result_file) and os.path.isfile(c.result_file[: -len(".json")] + ".pth")
        assert c.result["config"]["seed"] == c.seed

    md = open(res["paths"]["md"]).read()
    sas = [c.result["test"]["ndcg@10"] for c in done if c.model == "SASRec"]
    mean, std = sum(sas) / 2, abs(sas[0] - sas[1]) / math.sqrt(2)
    assert f"{mean:.4f} ± {std:.4f}" in md
    assert "| Recall@10 | NDCG@10 | MRR@10 |" in md and "unknown model 'NoSuchRec'" in md
    assert "recbole-mm leaderboard" not in md  # Python API: no command line to show
    rows = list(csv.DictReader(open(res["paths"]["csv"])))
    assert [(r["model"], r["seeds_finished"], r["status"]) for r in rows] == [
        ("SASRec", "2", "ok"), ("GRU4Rec", "2", "ok"), ("NoSuchRec", "0", "failed")]
    assert float(rows[0]["ndcg@10_mean"]) == pytest.approx(mean, abs=1e-5)
    assert float(rows[0]["ndcg@10_std"]) == pytest.approx(std, abs=1e-5)
    assert int(rows[0]["params_total"]) > 0 and float(rows[0]["train_s_per_epoch"]) > 0
    assert float(rows[0]["peak_rss_mb"]) > 0 and float(rows[0]["test_eval_s"]) > 0
    runs = list(csv.DictReader(open(res["paths"]["runs_csv"])))
    assert len(runs) == 5 and {r["seed"] for r in runs if r["status"] == "finished"} == {"2020", "2021"}
    with open(res["paths"]["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    # again: every finished cell is skipped (not run: result files untouched), the failed one retried
    stamps = {c.result_file: os.stat(c.result_file).st_mtime_ns for c in done}
    res2 = leaderboard(**kw)
    again = [c for c in res2["cells"] if c.result is not None]
    assert len(again) == 4 and all(c.status == "skipped" and not c.ran for c in again)
    assert {c.result_file: os.stat(c.result_file).st_mtime_ns for c in again} == stamps
    assert open(res2["paths"]["md"]).read().split("## Failures")[0] == md.split("## Failures")[0]


def test_plan_modes_seeds_and_names(tiny_root, workdir):
    ov = _overrides(tiny_root)
    cells, notes = plan("Tiny", "SASRec,UniSRec,Recformer", modes="inductive,transductive", seeds=3, lm_seeds=1,
                        overrides=ov)
    got = [(c.model, c.mode_label, c.seed, c.lm) for c in cells if c.status == "pending"]
    assert got[:9] == [("SASRec", "-", s, False) for s in (2020, 2021, 2022)] + [
        ("UniSRec", m, s, False) for m in ("inductive", "transductive") for s in (2020, 2021, 2022)]
    recformer = [c for c in cells if c.model == "Recformer"]
    if recformer and recformer[0].status == "pending":  # ID-free: inductive only, one seed
        assert [(c.mode_label, c.seed, c.lm) for c in recformer] == [("inductive", 2020, True)]
        assert any("Recformer: no transductive mode" in n for n in notes)
    names = [c.run_name for c in cells if c.run_name]
    assert len(set(names)) == len(names)
    again, _ = plan("Tiny", "SASRec,UniSRec,Recformer", modes="inductive,transductive", seeds=3, lm_seeds=1,
                    overrides=dict(ov, show_progress="True", state="INFO"))  # display keys: same cells
    assert [c.run_name for c in again if c.run_name] == names
    other, _ = plan("Tiny", "SASRec", seeds=1, overrides=dict(ov, hidden_size="32"))
    assert other[0].run_name != names[0]
    assert parse_seeds("3") == [2020, 2021, 2022] and parse_seeds("1,7") == [1, 7]
    assert parse_seeds("2020,") == [2020]  # one seed given as a list
    with pytest.raises(LeaderboardError, match=r"count of seeds .* --seeds 2020,"):  # not 2020 runs
        parse_seeds("2020")
    # --set MODEL:key=value reaches only that model's cells (and so changes only their names)
    mo = parse_model_overrides(["UniSRec:hidden_size=32", "UniSRec:--epochs=3"])
    assert mo == {"UniSRec": {"hidden_size": "32", "epochs": "3"}}
    set_cells, _ = plan("Tiny", "SASRec,UniSRec", modes="inductive", seeds=1, overrides=ov, model_overrides=mo)
    assert set_cells[0].run_name == names[0] and "hidden_size" not in set_cells[0].overrides
    uni = set_cells[1]
    assert uni.overrides["hidden_size"] == "32" and uni.overrides["epochs"] == "3"
    assert uni.run_name != next(c.run_name for c in cells if c.model == "UniSRec" and c.seed == 2020 and c.mode_label == "inductive")
    for bad in (["UniSRec=3"], ["UniSRec:epochs"], [":epochs=3"]):
        with pytest.raises(LeaderboardError, match="--set"):
            parse_model_overrides(bad)
    with pytest.raises(LeaderboardError, match="unknown model"):
        plan("Tiny", "SASRec", seeds=1, overrides=ov, model_overrides={"NoSuchModel": {"epochs": "1"}})
    assert [c.seed for c in plan("Tiny", "SASRec", seeds=2, overrides=dict(ov, seed="5"))[0]] == [5, 6]


def _children_pids():
    return [p.pid for p in psutil.Process().children()]


@pytest.mark.slow
def test_killed_cell_is_reported_and_resumes(tiny_root, workdir):
    ov = _overrides(tiny_root, epochs=6, stopping_step=100, train_batch_size=32)
    kw = dict(dataset="Tiny", models="SASRec,GRU4Rec", seeds=1, overrides=ov, out=str(workdir / "results"),
              isolation="subprocess", log=_quiet)
    cells, _ = plan("Tiny", "SASRec", seeds=1, overrides=ov)
    resume_file = cells[0].resume_file
    seen = {}

    def kill_after_two_epochs():  # SIGKILL the SASRec cell once it has finished two epochs
        deadline, stamp = time.time() + 300, None
        while time.time() < deadline:
            try:
                new = os.stat(resume_file).st_mtime_ns
            except OSError:
                new = None
            if new is not None and new != stamp:  # written atomically: a complete file
                stamp = new
                ckpt = torch.load(resume_file, weights_only=True)
                if ckpt["epoch"] >= 1:
                    seen["history"] = ckpt["trainer"]["history"]
                    for pid in _children_pids():
                        os.kill(pid, 9)
                    return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_after_two_epochs)
    killer.start()
    res = leaderboard(**kw)
    killer.join()
    sas, gru = res["cells"]
    assert sas.status == "failed" and "SIGKILL" in sas.error and os.path.isfile(sas.resume_file)
    assert gru.status == "finished"  # the next cell still ran
    assert "killed by SIGKILL" in open(res["paths"]["md"]).read()

    res2 = leaderboard(**dict(kw, resume=True))
    sas2, gru2 = res2["cells"]
    assert gru2.status == "skipped" and not gru2.ran
    assert sas2.status == "finished" and sas2.resumed
    assert "(resumed from " in open(sas2.log_file).read()
    history = sas2.result["history"]
    assert [h["epoch"] for h in history] == list(range(6))
    k = len(seen["history"])  # the epochs before the kill are the killed attempt's own
    assert [h["train_loss"] for h in history[:k]] == [h["train_loss"] for h in seen["history"]]


@pytest.mark.slow
def test_cli_subprocess_cells_and_failure(tiny_root, workdir):
    from recbole_mm.cli import main

    bad = workdir / "bad.pth"
    bad.write_text("not a checkpoint")
    out = workdir / "res"
    args = ["leaderboard", "-d", "Tiny", "-m", "SASRec", "--pretrained", f"SASRec={bad}", "--seeds", "1",
            "--data_path", str(tiny_root), "--out", str(out), "--epochs=1", "--train_batch_size", "64", "--topk=[10]",
            "--use_gpu=False", "--state=WARNING", "--seed=7"]
    assert main(args) == 1  # a failed cell: exit status 1, the report is still written
    md = (out / "Tiny.md").read_text()
    assert "| SASRec | - | 1 |" in md and "bad.pth" in md and "not a recbole_mm checkpoint" in md
    assert "recbole-mm leaderboard -d Tiny -m SASRec" in md  # the exact command
    (row, pt_row) = list(csv.DictReader(open(out / "Tiny.csv")))
    assert row["status"] == "ok" and row["seeds"] == "7" and pt_row["status"] == "failed"
    (run,) = [r for r in csv.DictReader(open(out / "Tiny.runs.csv")) if r["status"] == "finished"]
    result = json.load(open(run["result_file"]))
    assert result["config"]["epochs"] == 1 and result["config"]["seed"] == 7
    assert result["timings"]["peak_rss_mb"] > 0
    assert (out / "Tiny.png").is_file()


@pytest.mark.slow
def test_cell_finished_by_another_process_meanwhile_is_not_run_again(tiny_root, workdir):
    """Two leaderboard processes sharing checkpoint_dir (e.g. one per GPU): a cell that the other
    one finished after this one planned it is skipped, not run twice."""
    kw = dict(dataset="Tiny", models="SASRec", out=str(workdir / "results"), isolation="subprocess")
    stamps = {}

    def log(msg):
        if msg.startswith("[1/2]"):  # meanwhile, "another process" runs seed 2021 (one seed from 2021)
            other = leaderboard(seeds=1, overrides=_overrides(tiny_root, seed=2021), log=_quiet, **kw)
            (c,) = [c for c in other["cells"] if c.status == "finished"]
            stamps[c.result_file] = os.stat(c.result_file).st_mtime_ns

    res = leaderboard(seeds="2020,2021", overrides=_overrides(tiny_root), log=log, **kw)
    first, second = res["cells"]
    assert first.status == "finished" and first.ran
    assert second.status == "skipped" and not second.ran and second.result is not None
    assert os.stat(second.result_file).st_mtime_ns == stamps[second.result_file]


def test_report_only_says_running_for_a_cell_another_live_process_holds(tiny_root, workdir):
    """--report-only while another process runs a cell: that cell is "running" (its claim's pid is
    alive), not "not run"; a claim left by a dead process counts as not run."""
    import subprocess
    import sys

    kw = dict(dataset="Tiny", models="SASRec", seeds="2020,2021", overrides=_overrides(tiny_root),
              out=str(workdir / "results"), report_only=True, log=_quiet)
    cells = leaderboard(**kw)["cells"]
    assert [c.status for c in cells] == ["pending", "pending"]
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.makedirs(cells[0].checkpoint_dir, exist_ok=True)
        with open(cells[0]._file(".claim"), "w") as f:
            f.write(str(other.pid))
        res = leaderboard(**kw)
        assert [c.status for c in res["cells"]] == ["running", "pending"]
        table = open(os.path.join(str(workdir / "results"), "Tiny.md")).read()
        assert "0/2 seeds, 1 running, 1 not run" in table
    finally:
        other.kill()
        other.wait()
    assert [c.status for c in leaderboard(**kw)["cells"]] == ["pending", "pending"]  # its process is gone


def test_report_states_the_history_a_bounded_context_model_reads():
    from types import SimpleNamespace as NS

    from recbole_mm.leaderboard.report import _context_lines

    ctx = {"history_items_seen": 4.61, "history_items": 5.73, "users": 10, "max_items": 10, "max_tokens": 128}
    lm = NS(name="Recformer", mode="inductive", done=[NS(result={"context": ctx, "config": {}})])
    other = NS(name="SASRec", mode=None, done=[NS(result={"config": {"MAX_ITEM_LIST_LENGTH": 50}})])
    lines = _context_lines([other, lm])
    assert "Recformer (inductive) reads at most 10 items and 128 tokens per user: 4.61 of its test users' 5.73" in lines[0]
    assert "up to 50 items" in lines[1]
    assert _context_lines([other]) == []


def test_sigterm_to_the_leaderboard_stops_its_running_cell(tiny_root, workdir):
    """``kill`` / ``timeout`` on a leaderboard process: the cell's own process stops with it (no
    orphan training on with nobody holding its claim), and the cell is reported interrupted."""
    import signal
    import subprocess
    import sys

    out = workdir / "res"
    args = [sys.executable, "-m", "recbole_mm.cli", "leaderboard", "-d", "Tiny", "-m", "SASRec", "--seeds", "1",
            "--data_path", str(tiny_root), "--out", str(out), "--epochs=500", "--stopping_step=1000",
            "--train_batch_size", "64", "--topk=[10]", "--use_gpu=False", "--state=WARNING"]
    parent = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=str(workdir))
    try:
        deadline, children = time.monotonic() + 120, []
        while time.monotonic() < deadline and not children:
            children = psutil.Process(parent.pid).children()
            time.sleep(0.2)
        assert children, "the cell's process never started"
        (child,) = children
        time.sleep(2)  # let it train
        assert child.is_running()
        parent.send_signal(signal.SIGTERM)
        code = parent.wait(timeout=60)
        assert code != 0
        gone, alive = psutil.wait_procs([child], timeout=30)
        assert not alive, "the cell's process outlived the leaderboard"
    finally:
        if parent.poll() is None:
            parent.kill()
        for c in psutil.Process().children(recursive=True):
            c.kill()
    md = (out / "Tiny.md").read_text()
    assert "interrupted" in md
