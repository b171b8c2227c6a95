"""Running a transfer plan: every missing cell, pre-training first, the reports after each cell."""

from __future__ import annotations

import os

from recbole_mm import leaderboard as lb
from recbole_mm.leaderboard import Cell, LeaderboardError
from recbole_mm.leaderboard.record import is_recorded
from recbole_mm.transfer.plan import (NOT_RUN, TransferPlan, _fraction_list, checkpoint_of, plan_pretrain,
                                      plan_targets)
from recbole_mm.transfer.report import write_transfer_report


def _priority(c: Cell):
    """Run order: what the comparison needs first (cheap rows, then small training sets, then
    inductive before transductive, scratch before pre-trained within a seed)."""
    kind = {"popularity": 0, "content": 0, "zero-shot": 1, "finetune": 2, "curve": 3}.get(getattr(c, "kind", ""), 4)
    return (kind, getattr(c, "fraction", 1.0), c.mode_label != "inductive", c.seed or 0, bool(c.pretrained))


def _finished(c: Cell, out, rerun: bool, report_only: bool) -> dict | None:
    """The cell's result when it need not run (saved/, else the committed record in ``out``).  A
    pre-training read from the record whose transferred checkpoint is not in checkpoint_dir is no
    checkpoint to fine-tune from: it runs again (as a missing one does), unless nothing is run
    (``report_only``: its costs stay in the report)."""
    res = None if rerun else lb.finished_result(c, out)
    if (res is not None and c.stage == "pretrain" and is_recorded(res) and not report_only
            and not os.path.isfile(checkpoint_of(c))):
        return None
    return res


def _run_cells(cells, config_files, resume, rerun, isolation, timeout, log, report=None, report_only=False,
               order=False, out=None):
    todo = []
    if order:
        cells = sorted(cells, key=_priority)
    for c in cells:
        if c.status == "failed":
            continue
        res = _finished(c, out, rerun, report_only)
        if res is not None:
            c.status, c.result = "skipped", res
        elif report_only or c.pretrained_recorded:
            lb.mark_unfinished(c)
            if c.pretrained_recorded and c.status == "pending":  # nothing to start it from
                c.status, c.error = NOT_RUN, "not run: its checkpoint is only in the committed record: pre-train again"
        else:
            todo.append(c)
    for i, c in enumerate(todo, 1):
        res = _finished(c, out, rerun, False)
        if res is not None:  # finished meanwhile by another process sharing checkpoint_dir
            c.status, c.result = "skipped", res
            log(f"[{i}/{len(todo)}] {c.dataset} {c.label}: finished meanwhile by another process, skipped")
            continue
        if not lb.claim(c):
            log(f"[{i}/{len(todo)}] {c.dataset} {c.label}: being run by another process, skipped")
            continue
        log(f"[{i}/{len(todo)}] {c.dataset} {c.stage} {c.label} -> {c.run_name}")
        try:
            lb.execute(c, c.dataset, config_files, resume, isolation, timeout, log)
        finally:
            lb.release(c)
        log(f"  {c.status} in {c.seconds:.1f} s" + (f": {c.error}" if c.error else ""))
        if report:
            report()
    return todo


def transfer(models, corpus, targets, modes=None, fractions="1.0", seeds=3, lm_seeds=None, overrides=None,
             model_overrides=None, pt_overrides=None, config_files=None, pretrain_path="dataset/pretrain",
             pt_epochs=None, curve=None, min_steps=200, zero_shot=True, out="results", resume=False, rerun=False,
             isolation="subprocess", timeout=None, report_only=False, command=None, log=print,
             no_pretrain=False) -> dict:
    models = lb.split_list(models)
    targets = lb.split_list(targets)
    if not models:
        raise LeaderboardError("no model given (-m UniSRec,MISSRec,...)")
    if not targets:
        raise LeaderboardError("no target given (--target Scientific)")
    if not lb.split_list(corpus):
        raise LeaderboardError("no pre-training domain given (--pretrain A,B,C)")
    corpus = ",".join(lb.split_list(corpus))
    overlap = sorted(set(lb.split_list(corpus)) & set(targets))
    if overlap:
        raise LeaderboardError(f"a target is also a pre-training domain: {', '.join(overlap)}")
    fraction_list = _fraction_list(fractions)
    curve = sorted({int(e) for e in lb.split_list(curve)}) if curve else []
    if any(e < 1 for e in curve):
        raise LeaderboardError(f"--curve: pre-training epochs >= 1, got {curve}")
    for f in config_files or []:
        if not os.path.isfile(f):
            raise LeaderboardError(f"config file not found: {f}")
    for name in list(models) + list(model_overrides or {}) + list(pt_overrides or {}):
        try:
            from recbole_mm.utils import get_model

            get_model(name)
        except ValueError as e:
            raise LeaderboardError(str(e)) from None
    overrides = {k: str(v) for k, v in (overrides or {}).items()}
    overrides.setdefault("show_progress", "False")
    seed_base = int(overrides.get("seed", lb.DEFAULT_SEED))
    seed_list = lb.parse_seeds(seeds, seed_base)
    lm_seed_list = lb.parse_seeds(lm_seeds, seed_base) if lm_seeds is not None else None

    pre = plan_pretrain(models, corpus, pretrain_path, overrides, dict(pt_overrides or {}), config_files, pt_epochs,
                        curve)
    if no_pretrain:
        log(f"transfer: --no-pretrain: the pre-trained checkpoints that exist are used ({corpus})")
    else:
        log(f"transfer: pre-training {len(pre)} model(s) on {corpus}")
    _run_cells(pre, config_files, resume, rerun, isolation, timeout, log, report_only=report_only or no_pretrain,
               out=out)
    ft, zs, base, notes = plan_targets(models, targets, modes, fraction_list, seed_list, lm_seed_list, overrides,
                                       dict(model_overrides or {}), config_files, pre, min_steps, zero_shot, curve,
                                       out)
    plan = TransferPlan(pre, ft, zs, base, notes)
    for n in notes:
        log(f"transfer: {n}")
    settings = {"corpus": corpus, "min_steps": min_steps, "seeds": seed_list, "lm_seeds": lm_seed_list,
                "fractions": fraction_list, "curve": curve}

    def report():
        return {t: write_transfer_report(t, plan, out, command, settings) for t in targets}

    n_cells = len(ft) + len(zs) + len(base)
    log(f"transfer: {n_cells} fine-tuning / zero-shot / popularity cells on {', '.join(targets)}")
    try:
        # cheap cells first (popularity, zero-shot), then the fine-tuning runs
        _run_cells(base + zs + ft, config_files, resume, rerun, isolation, timeout, log, report, report_only,
                   order=True, out=out)
    except KeyboardInterrupt:
        report()
        raise
    paths = report()
    for t, p in paths.items():
        log(f"wrote {p['md']}, {p['csv']}" + (f", {p['png']}" if p.get("png") else ""))
    return {"plan": plan, "paths": paths}
