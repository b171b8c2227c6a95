"""The committed record of finished cells (``<out>/runs/<run>.json``, else a line of a committed
``<out>/*.runs.csv``): a leaderboard / transfer without ``saved/`` (a fresh clone) keeps its
finished rows and does not run them again; ``--rerun`` does; a recorded pre-training without its
checkpoints is pre-trained again, and the sizes its record keeps name the cells fine-tuned from
them (found in the record, never run from it).  Cells run in this process (fast; no fork after
torch ops)."""

import csv
import json
import os
import shutil

import pytest

from conftest import quick
from fixtures import make_dataset
from recbole_mm.leaderboard import leaderboard, plan
from recbole_mm.leaderboard.record import record_path


def _overrides(root, **extra):
    return {k: str(v) for k, v in quick(root, **extra).items()}


def _quiet(*args, **kwargs):
    pass


@pytest.fixture
def in_process(monkeypatch):
    """Each cell runs in this process (``run_cell`` as the child would), not in a child of its own."""
    import importlib

    execute = importlib.import_module("recbole_mm.leaderboard.execute")  # the module, not its function
    monkeypatch.setattr(execute, "_launch", lambda cell, isolation, log: (execute.run_cell(cell.spec_file), None))
    monkeypatch.setattr(execute, "_wait", lambda code, proc, timeout: (code, 0.0, False))


def _table(md_path):
    return [ln for ln in open(md_path).read().splitlines() if ln.startswith("| ")]


def test_leaderboard_without_saved_keeps_its_rows_and_does_not_rerun(tiny_root, workdir, in_process):
    out = str(workdir / "results")
    kw = dict(dataset="Tiny", models="SASRec", seeds=2, overrides=_overrides(tiny_root), out=out, log=_quiet)
    res = leaderboard(**kw)
    assert [c.status for c in res["cells"]] == ["finished", "finished"]
    names = [c.run_name for c in res["cells"]]
    for c in res["cells"]:  # the record: small plain JSON, what the report reads
        rec = json.load(open(record_path(out, c.run_name)))
        assert rec["test"] == c.result["test"] and rec["config"]["run_name"] == c.run_name
        assert len(rec["history"]) == len(c.result["history"]) and "checkpoint" not in rec
    table, rows = _table(res["paths"]["md"]), open(res["paths"]["csv"]).read()
    assert "from the committed record" not in open(res["paths"]["md"]).read()

    shutil.rmtree("saved")  # a fresh clone: saved/ is git-ignored
    again = leaderboard(**dict(kw, report_only=True))
    assert [c.status for c in again["cells"]] == ["skipped", "skipped"]
    assert all(c.result["recorded_from"] == record_path(out, c.run_name) for c in again["cells"])
    assert _table(again["paths"]["md"]) == table  # the same rows and numbers
    assert open(again["paths"]["csv"]).read() == rows
    assert "2 of the 2 finished runs come from the committed record" in open(again["paths"]["md"]).read()

    real = leaderboard(**kw)  # not --report-only: the recorded cells are not run again
    assert [(c.status, c.ran) for c in real["cells"]] == [("skipped", False), ("skipped", False)]
    assert not os.path.exists("saved") or not any(n.endswith(".json") for n in os.listdir("saved"))
    assert _table(real["paths"]["md"]) == table

    rerun = leaderboard(**dict(kw, rerun=True))  # --rerun ignores the record as it ignores saved/
    assert [(c.status, c.ran) for c in rerun["cells"]] == [("finished", True), ("finished", True)]
    assert all(os.path.isfile(os.path.join("saved", n + ".json")) for n in names)
    assert "from the committed record" not in open(rerun["paths"]["md"]).read()


def test_a_runs_csv_line_alone_gives_the_row_its_metrics_and_epochs(tiny_root, workdir):
    out = workdir / "results"
    out.mkdir()
    ov = _overrides(tiny_root)
    kw = dict(dataset="Tiny", models="SASRec", seeds="2020,2021,2022", overrides=ov, out=str(out), log=_quiet)
    a, b, c = plan("Tiny", "SASRec", seeds="2020,2021,2022", overrides=ov)[0]
    header = ["model", "mode", "pretrained", "seed", "status", "run_name", "result_file", "recall@10", "ndcg@10",
              "params_total", "params_trainable", "epochs", "best_epoch", "train_s_per_epoch", "test_eval_s",
              "peak_rss_mb", "total_s", "error"]
    lines = [
        ["SASRec", "-", "", 2020, "skipped", a.run_name, "saved/x.json", 0.5, 0.25, 1000, 1000, 7, 4, 1.5, 0.2, 300,
         12.0, ""],
        ["SASRec", "-", "", 2021, "finished", b.run_name, "saved/y.json", 0.7, 0.35, 1000, 1000, 9, 6, 2.5, 0.4, 500,
         20.0, ""],
        ["SASRec", "-", "", 2022, "failed", c.run_name, "", 0.9, 0.9, 1, 1, 1, 0, 1, 1, 1, 1, "boom"],
        ["SASRec", "-", "", 2022, "skipped", c.run_name, "", "", "", 1, 1, 1, 0, 1, 1, 1, 1, ""],  # no metric
        ["SASRec", "-", "", 2022, "skipped", c.run_name[:-10] + "0123456789", "", 0.9, 0.9, 1, 1, 1, 0, 1, 1, 1, 1, ""],
    ]
    with open(out / "Old.runs.csv", "w", newline="") as f:  # the committed per-run lines of an earlier report
        csv.writer(f).writerows([header] + lines)
    res = leaderboard(**kw, report_only=True)
    first, second, third = res["cells"]
    # the third seed's lines: failed, no metric, another config hash: none of them is its result
    assert (first.status, second.status, third.status) == ("skipped", "skipped", "pending")
    assert first.result["recorded_from"] == str(out / "Old.runs.csv") and first.result["history"] == []
    assert first.result["test"] == {"recall@10": 0.5, "ndcg@10": 0.25} and first.result["best_epoch"] == 4
    (row,) = csv.DictReader(open(res["paths"]["csv"]))
    assert row["seeds_finished"] == "2" and float(row["ndcg@10_mean"]) == pytest.approx(0.3)
    assert row["epochs"] == "8" and row["best_epoch"] == "5" and row["train_s_per_epoch"] == "2"
    md = open(res["paths"]["md"]).read()
    assert "| 0.6000 ± 0.1414 | 0.3000 ± 0.0707 |" in md and "| 8 (5) |" in md and "| 1,000 |" in md
    assert "2 of the 2 finished runs come from the committed record here (`runs/<run>.json`; 2 of them from a " \
           "line of a `.runs.csv`, without a validation curve)" in md
    runs = {r["run_name"]: r for r in csv.DictReader(open(res["paths"]["runs_csv"]))}
    assert runs[a.run_name]["epochs"] == "7" and runs[a.run_name]["best_epoch"] == "4"

    # the report wrote the record: without the CSV line the same numbers (and epoch counts) come back
    os.unlink(out / "Old.runs.csv")
    os.unlink(res["paths"]["runs_csv"])
    again = leaderboard(**kw, report_only=True)
    assert again["cells"][0].result["recorded_from"] == record_path(str(out), a.run_name)
    (row2,) = csv.DictReader(open(again["paths"]["csv"]))
    assert row2 == row


def test_without_saved_the_pretrained_rows_come_from_the_record_and_are_never_run_from_it(tmp_path, workdir,
                                                                                          in_process):
    """The pre-training's record keeps its checkpoints' sizes: without ``saved/`` the pre-trained,
    zero-shot and curve cells get the run names they had (the size is in the hash), so their rows
    come back from the record; one not finished there is not run (no checkpoint to start from);
    the recorded pre-training itself runs again only in a run that pre-trains."""
    make_dataset(tmp_path / "pt", "DomA", n_users=60, n_items=20, seed=3)
    make_dataset(tmp_path / "data", "Tiny", n_users=60, n_items=20, seed=0)
    from recbole_mm.leaderboard.record import checkpoint_sizes, recorded_result
    from recbole_mm.transfer import checkpoint_of, transfer

    ov = _overrides(tmp_path / "data", epochs=1)
    out = str(tmp_path / "results")
    kw = dict(models="UniSRec", corpus="DomA", targets="Tiny", modes="inductive", fractions="1.0", seeds=1,
              overrides=ov, pretrain_path=str(tmp_path / "pt"), pt_epochs=2, curve="1", min_steps=1, out=out,
              log=_quiet)
    first = transfer(**kw)["plan"]
    (pt,) = first.pretrain
    assert pt.status == "finished" and os.path.isfile(record_path(out, pt.run_name))
    sizes = {e: os.path.getsize(checkpoint_of(pt, e)) for e in (1, 2)}
    assert checkpoint_sizes(pt.run_name, out) == sizes  # kept in the pre-training's record
    cells = first.finetune + first.zero_shot + first.baselines
    assert all(c.status == "finished" for c in cells)
    from_pt = {c.run_name: c.result["test"] for c in cells if c.pretrained}
    assert sorted((c.kind, c.pt_epoch) for c in cells if c.pretrained) == [("curve", 1), ("finetune", None),
                                                                          ("zero-shot", None)]
    md_path, csv_path = os.path.join(out, "transfer-Tiny.md"), os.path.join(out, "transfer-Tiny.csv")
    table, rows = _table(md_path), open(csv_path).read()

    shutil.rmtree("saved")  # checkpoints and saved/ results gone (a fresh clone); the record stays
    p = transfer(**kw, report_only=True)["plan"]
    assert p.pretrain[0].status == "skipped" and not p.pretrain[0].ran
    again = p.finetune + p.zero_shot + p.baselines
    assert {c.run_name: c.result["test"] for c in again if c.pretrained} == from_pt  # the same names, numbers
    assert all(c.status == "skipped" and c.pretrained_recorded for c in again if c.pretrained)
    assert _table(md_path) == table and open(csv_path).read() == rows
    md = open(md_path).read()
    assert "only their sizes in the committed record" in md and "rows missing" not in md
    assert checkpoint_sizes(pt.run_name, out) == sizes  # a report without the files keeps the sizes

    # a run that pre-trains nothing, with a second seed: its pre-trained cells have no checkpoint to start from
    p = transfer(**dict(kw, seeds=2), no_pretrain=True)["plan"]
    assert p.pretrain[0].status == "skipped" and not p.pretrain[0].ran and not os.path.isfile(checkpoint_of(pt))
    again = p.finetune + p.zero_shot + p.baselines
    assert {c.run_name: c.result["test"] for c in again if c.pretrained and c.seed == 2020} == from_pt
    assert all(not c.ran for c in again if c.pretrained)
    unrun = sorted((c.kind, c.status) for c in again if c.pretrained and c.seed == 2021)
    assert unrun == [("curve", "not run"), ("finetune", "not run")]
    assert all("only in the committed record" in c.error for c in again if c.status == "not run")
    assert all(c.status == "finished" and c.ran for c in again if not c.pretrained and c.seed == 2021)
    md = open(md_path).read()
    assert "pretrained 1/2 (not run: its checkpoint is only in the committed record: pre-train again) |" in md
    assert "## Failures" not in md

    # a run that pre-trains: the recorded pre-training (no checkpoint) runs again, as before; its
    # checkpoints are the same size, so the pre-trained cells keep their names and are not run again
    p = transfer(**kw)["plan"]
    (pt2,) = p.pretrain
    assert pt2.status == "finished" and pt2.ran and os.path.isfile(checkpoint_of(pt2))
    assert {e: os.path.getsize(checkpoint_of(pt2, e)) for e in (1, 2)} == sizes
    again = p.finetune + p.zero_shot + p.baselines
    assert all(not c.ran and c.status == "skipped" and not c.pretrained_recorded for c in again)
    assert {c.run_name: c.result["test"] for c in again if c.pretrained} == from_pt
    assert _table(md_path) == table

    # the sizes alone of a pre-training not finished: no result, its checkpoints still named
    rec = record_path(out, "tr-pt-unfinished")
    with open(rec, "w") as f:
        json.dump({"checkpoint_sizes": {"1": 123}}, f)
    assert recorded_result("tr-pt-unfinished", out) is None and checkpoint_sizes("tr-pt-unfinished", out) == {1: 123}


def test_a_recorded_pretraining_without_its_checkpoint_is_pretrained_again(tmp_path, workdir, in_process):
    """A record without checkpoint sizes (written before they were kept): no pre-trained cell is
    planned from it; a run that pre-trains runs it again."""
    make_dataset(tmp_path / "pt", "DomA", n_users=60, n_items=20, seed=3)
    make_dataset(tmp_path / "data", "Tiny", n_users=60, n_items=20, seed=0)
    from recbole_mm.transfer import checkpoint_of, transfer

    ov = _overrides(tmp_path / "data", epochs=1)
    out = str(tmp_path / "results")
    kw = dict(models="UniSRec", corpus="DomA", targets="Tiny", modes="inductive", fractions="1.0", seeds=1,
              overrides=ov, pretrain_path=str(tmp_path / "pt"), pt_epochs=1, zero_shot=False, min_steps=1,
              out=out, log=_quiet)
    first = transfer(**kw)["plan"]
    (pt,) = first.pretrain
    assert pt.status == "finished" and os.path.isfile(checkpoint_of(pt))
    assert os.path.isfile(record_path(out, pt.run_name))
    scratch = [c for c in first.finetune if not c.pretrained]
    assert scratch and all(c.status == "finished" for c in scratch)

    shutil.rmtree("saved")  # checkpoints (and saved/ results) gone; the record stays, without sizes
    rec = json.load(open(record_path(out, pt.run_name)))
    del rec["checkpoint_sizes"]
    with open(record_path(out, pt.run_name), "w") as f:
        json.dump(rec, f)
    md_path = os.path.join(out, "transfer-Tiny.md")
    for flags in (dict(report_only=True), dict(no_pretrain=True)):  # nothing pre-trains: costs from the record
        p = transfer(**kw, **flags)["plan"]
        assert p.pretrain[0].status == "skipped" and not p.pretrain[0].ran
        assert [c.status for c in p.finetune if not c.pretrained] == ["skipped"]
        md = open(md_path).read()
        assert "pre-training UniSRec on DomA: 1 epoch(s)" in md and "recorded, its checkpoint is not in" in md
        assert not any(c.pretrained for c in p.finetune)  # no size, no name: never planned
        assert "its pre-training is finished in the committed record" in md

    again = transfer(**kw)["plan"]  # a real run: the recorded pre-training is no checkpoint, it runs again
    (pt2,) = again.pretrain
    assert pt2.status == "finished" and pt2.ran and os.path.isfile(checkpoint_of(pt2))
    assert all(not c.ran for c in again.finetune if not c.pretrained)  # the recorded scratch cells are not
    assert any(c.pretrained and c.result for c in again.finetune)


def test_an_unfinished_pretraining_keeps_its_epochs_in_the_record(tmp_path):
    """The report's costs of a pre-training still running (read from its .resume.pth) survive the
    file: its record keeps the epochs so far, never fewer than it had, and a report without the
    file reads them from there."""
    from types import SimpleNamespace as NS

    from recbole_mm.leaderboard.record import recorded_progress, write_records
    from recbole_mm.transfer.report import _pretrain_progress

    out = str(tmp_path / "results")
    cell = NS(run_name="tr-pt-X-abc", result=None, resume_file=str(tmp_path / "missing.resume.pth"))
    two = [{"epoch": 0, "train_seconds": 900.5, "train_loss": 4.0, "metrics": {"a": 1}},
           {"epoch": 1, "train_seconds": 880.0, "train_loss": 3.5}]
    write_records([cell], out, {"tr-pt-X-abc": {1: 123}}, {"tr-pt-X-abc": two})
    write_records([cell], out, {}, {"tr-pt-X-abc": two[:1]})  # a shorter history never replaces it
    got = recorded_progress("tr-pt-X-abc", out)
    assert [h["train_seconds"] for h in got] == [900.5, 880.0] and "metrics" not in got[0]
    history, peak = _pretrain_progress(cell, out)
    assert [h["epoch"] for h in history] == [0, 1] and peak is None
    assert _pretrain_progress(cell)[0] == []  # no record folder given: nothing known
