"""``recbole-mm transfer``: pre-train once on a corpus of other domains, then fine-tune on each
target from scratch and from the checkpoint, with several seeds; one report per target.

    recbole-mm transfer -m UniSRec,MISSRec --pretrain Video_Games,Beauty,Office_Products \\
        --target Scientific,Scientific_mm --mode inductive,transductive --fraction 1.0,0.1 --seeds 3

Every run is a leaderboard cell (:mod:`recbole_mm.leaderboard`): its own process, named by a
hash of its resolved config, skipped when its result file exists, continued from its
``.resume.pth`` with ``--resume``, failures reported in the table.  The cells:

* **pre-training**, once per model: ``run_pretrain`` on the merged ``--pretrain`` domains
  (``--pretrain_path``; ``--pt-set MODEL:key=value`` for one model), keeping the checkpoint
  after every epoch (``<run>-<n>.pth``); the one after ``--pt-epochs`` is transferred.
  ``--curve 1,3,10`` also fine-tunes (inductive, every fraction) from the checkpoints after
  those epochs (pre-training runs to the longest): the pre-training-length curve.  A numbered
  checkpoint is final once written, so ``--no-pretrain`` in a second process fine-tunes from
  the ones that exist while the first process pre-trains.
* **fine-tuning**, for every target, mode, fraction and seed: from scratch and from the
  pre-trained checkpoint (``-p``).  ``--fraction 0.1``: a seeded 10% of the target's training
  users (config ``train_fraction``; the same users for both arms of a seed), valid and test
  untouched.  Both arms get the same optimisation budget rules, counted in optimiser steps as
  on the whole data: a run on a fraction f evaluates every 1/f epochs (``eval_step``), so that
  the patience (``stopping_step`` evaluations without gain) is about as many steps as on all
  the data, and early stopping cannot end a run before ``--min-steps`` optimiser steps (config
  ``stopping_min_steps``); best epochs and steps are reported next to the metrics.
* **zero-shot**, for every model with an inductive mode: the pre-trained model evaluated on
  the target with no training (``epochs=0``), next to the same architecture untrained;
* **popularity** (``Popularity``: items by their training count), per fraction.

Outputs in ``--out``: ``transfer-<target>.md`` (scratch vs pre-trained side by side per
model, mode and fraction: mean +- sample std over seeds, the difference, whether it exceeds
the larger of the two standard deviations; zero-shot rows; costs), ``.csv`` (those rows),
``.runs.csv`` (one line per cell) and ``.png`` (bars with error bars).
"""

from __future__ import annotations

import csv
import io
import os
import shlex
import sys
from dataclasses import dataclass

from recbole_mm import leaderboard as lb
from recbole_mm.leaderboard import Cell, LeaderboardError
from recbole_mm.utils import atomic_write

DEFAULT_METRIC = "ndcg@10"
SECOND_METRIC = "recall@10"


@dataclass
class TransferPlan:
    pretrain: list[Cell]          # one per model
    finetune: list[Cell]          # scratch and pre-trained, every target/mode/fraction/seed
    zero_shot: list[Cell]         # epochs=0: pre-trained and untrained
    baselines: list[Cell]         # Popularity per target and fraction
    notes: list[str]


def _fraction_list(value) -> list[float]:
    out = []
    for v in lb.split_list(value or "1.0"):
        try:
            f = float(v)
        except ValueError:
            raise LeaderboardError(f"--fraction: numbers in (0, 1], got {v!r}") from None
        if not 0.0 < f <= 1.0:
            raise LeaderboardError(f"--fraction: numbers in (0, 1], got {v!r}")
        out.append(f)
    return out


def _frac_tag(f: float) -> str:
    return "" if f >= 1.0 else f"-f{f:g}"


def plan_pretrain(models, corpus, pretrain_path, overrides, pt_overrides, config_files, pt_epochs, curve) -> list[Cell]:
    """One pre-training cell per model (named ``tr-pt-<Model>-<hash>`` of its resolved config)."""
    from recbole_mm.quick_start import build_config
    from recbole_mm.utils import get_model

    cells = []
    for name in models:
        cls = get_model(name)
        own = {k: v for n, kv in pt_overrides.items() if get_model(n) is cls for k, v in kv.items()}
        ov = dict(overrides, **own)
        ov["data_path"] = pretrain_path
        ov["save_step"] = "1"  # <run>-<n>.pth after every epoch: final once written, usable while it goes on
        if pt_epochs or curve:  # long enough for the transferred checkpoint and every point of the curve
            base_epochs = pt_epochs or int(build_config(cls, corpus, "pretrain", None, config_files,
                                                        overrides=ov)["epochs"])
            ov["epochs"] = str(max([int(base_epochs), *curve]))
        cell = Cell(cls.__name__, None, None, int(ov.get("seed", lb.DEFAULT_SEED)), lm=lb.is_lm(cls),
                    stage="pretrain", dataset=corpus)
        cell.mode_label = "pretrain"
        cell.overrides = ov
        try:
            config = build_config(cls, corpus, "pretrain", None, config_files, overrides=ov)
            cell.config_hash = lb.config_hash(config, None)
            cell.checkpoint_dir = str(config["checkpoint_dir"] or "saved")
            cell.run_name = lb._safe(f"tr-pt-{cls.__name__}-{corpus.replace(',', '+')}-{cell.config_hash}")
            cell.overrides["run_name"] = cell.run_name
            cell.transfer_epoch = int(pt_epochs or config["epochs"])
        except Exception as e:  # noqa: BLE001 - a cell's failure is reported, the others go on
            cell.status, cell.error = "failed", lb._one_line(e)
        cells.append(cell)
    return cells


def checkpoint_of(cell: Cell, epoch: int | None = None) -> str:
    """The checkpoint a pre-training cell writes after ``epoch`` epochs (default: the transferred
    one, ``--pt-epochs``): ``<run>-<epoch>.pth``, written atomically and never rewritten."""
    return os.path.join(cell.checkpoint_dir, f"{cell.run_name}-{epoch or cell.transfer_epoch}.pth")


def _tag(cells, **attrs):
    for c in cells:
        for k, v in attrs.items():
            setattr(c, k, v)
    return cells


def plan_targets(models, targets, modes, fractions, seeds, lm_seeds, overrides, model_overrides, config_files,
                 pre_cells, min_steps, zero_shot=True, curve=()) -> tuple[list, list, list, list[str]]:
    """Fine-tuning, zero-shot and popularity cells for every target (the pre-trained
    checkpoints must exist: their size is part of a cell's hash)."""
    from recbole_mm.utils import get_model

    # a numbered checkpoint is final once it exists (the run's <run>.pth is rewritten every epoch)
    ready = {c.model: c for c in pre_cells if c.run_name and os.path.isfile(checkpoint_of(c))}
    finetune, zs, base, notes = [], [], [], []
    for c in pre_cells:
        if c.model not in ready:
            notes.append(f"{c.model}: no checkpoint after {getattr(c, 'transfer_epoch', '?')} pre-training epochs yet "
                         f"({c.error or 'pre-training not that far'}); pre-trained and zero-shot rows missing")
    for target in targets:
        for f in fractions:
            ov = dict(overrides, train_fraction=f"{f:g}", stopping_min_steps=str(min_steps))
            if f < 1.0:  # evaluate every 1/f epochs: patience (stopping_step evaluations) in steps as on all data
                ov["eval_step"] = str(max(1, round(int(overrides.get("eval_step", 1)) / f)))
            pretrained = [f"{m}={checkpoint_of(ready[get_model(m).__name__])}" for m in models
                          if get_model(m).__name__ in ready]
            cells, n = lb.plan(target, models, modes, pretrained, seeds, lm_seeds, ov, config_files, model_overrides)
            finetune += _tag(cells, dataset=target, fraction=f, kind="finetune", pt_epoch=None)
            notes += [f"{target}: {x}" for x in n]
            for epoch in curve:
                curve_pt = [f"{m}={checkpoint_of(c, epoch)}" for c in pre_cells for m in models
                            if get_model(m).__name__ == c.model and c.run_name and epoch != c.transfer_epoch
                            and os.path.isfile(checkpoint_of(c, epoch))]
                if curve_pt:
                    cells, _ = lb.plan(target, [], "inductive", curve_pt, seeds, lm_seeds, ov, config_files,
                                       model_overrides)
                    finetune += _tag(cells, dataset=target, fraction=f, kind="curve", pt_epoch=epoch)
            base += _tag(lb.plan(target, ["Popularity"], None, None, [seeds[0]] if isinstance(seeds, list) else 1,
                                 None, ov, config_files, None)[0], dataset=target, fraction=f, kind="popularity",
                         pt_epoch=None)
        if zero_shot:
            inductive = [m for m in models if "inductive" in (lb.supported_modes(get_model(m)) or ())]
            pretrained = [f"{m}={checkpoint_of(ready[get_model(m).__name__])}" for m in inductive
                          if get_model(m).__name__ in ready]
            ov = dict(overrides, epochs="0")
            if inductive:  # the untrained control: every seed (its initialisation is the seed's)
                cells, _ = lb.plan(target, inductive, "inductive", None, seeds, lm_seeds, ov, config_files,
                                   model_overrides)
                zs += _tag(cells, dataset=target, fraction=1.0, kind="zero-shot", pt_epoch=None)
            if pretrained:  # no training, no dropout in evaluation: the same scores for every seed
                cells, _ = lb.plan(target, [], "inductive", pretrained, seeds[:1], (lm_seeds or seeds)[:1], ov,
                                   config_files, model_overrides)
                zs += _tag(cells, dataset=target, fraction=1.0, kind="zero-shot", pt_epoch=None)
    return finetune, zs, base, notes


def _priority(c: Cell):
    """Run order: what the comparison needs first (cheap rows, then small training sets, then
    inductive before transductive, scratch before pre-trained within a seed)."""
    kind = {"popularity": 0, "zero-shot": 1, "finetune": 2, "curve": 3}.get(getattr(c, "kind", ""), 4)
    return (kind, getattr(c, "fraction", 1.0), c.mode_label != "inductive", c.seed or 0, bool(c.pretrained))


def _run_cells(cells, config_files, resume, rerun, isolation, timeout, log, report=None, report_only=False,
               order=False):
    todo = []
    if order:
        cells = sorted(cells, key=_priority)
    for c in cells:
        if c.status == "failed":
            continue
        res = None if rerun else lb.finished_result(c)
        if res is not None:
            c.status, c.result = "skipped", res
        elif report_only:
            err = lb._read_json(c.error_file) if c.run_name else None
            if err and err.get("error"):
                c.status, c.error = "failed", err["error"] + " (last attempt)"
        else:
            todo.append(c)
    for i, c in enumerate(todo, 1):
        res = None if rerun else lb.finished_result(c)
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
    _run_cells(pre, config_files, resume, rerun, isolation, timeout, log, report_only=report_only or no_pretrain)
    ft, zs, base, notes = plan_targets(models, targets, modes, fraction_list, seed_list, lm_seed_list, overrides,
                                       dict(model_overrides or {}), config_files, pre, min_steps, zero_shot, curve)
    plan = TransferPlan(pre, ft, zs, base, notes)
    settings = {"corpus": corpus, "min_steps": min_steps, "seeds": seed_list, "lm_seeds": lm_seed_list,
                "fractions": fraction_list, "curve": curve}

    def report():
        return {t: write_transfer_report(t, plan, out, command, settings) for t in targets}

    n_cells = len(ft) + len(zs) + len(base)
    log(f"transfer: {n_cells} fine-tuning / zero-shot / popularity cells on {', '.join(targets)}")
    try:
        # cheap cells first (popularity, zero-shot), then the fine-tuning runs
        _run_cells(base + zs + ft, config_files, resume, rerun, isolation, timeout, log, report, report_only,
                   order=True)
    except KeyboardInterrupt:
        report()
        raise
    paths = report()
    for t, p in paths.items():
        log(f"wrote {p['md']}, {p['csv']}" + (f", {p['png']}" if p.get("png") else ""))
    return {"plan": plan, "paths": paths}


# -- report -------------------------------------------------------------------------------

def _metric(cells, key):
    return lb._mean_std([(c.result.get("test") or {}).get(key) for c in cells if c.result])


def _best(cells):
    """Mean best epoch (1-based) and mean best step over the finished cells."""
    done = [c.result for c in cells if c.result]
    epochs = lb._mean_std([r.get("best_epoch") + 1 for r in done if r.get("best_epoch") is not None])[0]
    steps = lb._mean_std([r.get("best_step") for r in done if r.get("best_step") is not None])[0]
    return epochs, steps


def _budget(cells) -> str:
    e, s = _best(cells)
    if e is None:
        return "–"
    return f"{e:.3g}" + (f" / {s:,.0f}" if s is not None else "")


def comparison_rows(target, plan: TransferPlan, kind="finetune") -> list[dict]:
    """Scratch vs pre-trained per (model, mode, fraction[, pre-training epoch])."""
    groups: dict = {}
    for c in plan.finetune:
        if c.dataset != target or c.kind != kind:
            continue
        key = (c.model, c.mode_label, c.fraction, c.pt_epoch)
        groups.setdefault(key, {"scratch": [], "pretrained": []})["pretrained" if c.pretrained else "scratch"].append(c)
    if kind == "curve":  # the curve's scratch arm is the ordinary scratch row
        for (model, mode, f, ep), g in groups.items():
            g["scratch"] = [c for c in plan.finetune if c.dataset == target and c.kind == "finetune"
                            and not c.pretrained and c.model == model and c.mode_label == mode and c.fraction == f]
    rows = []
    for (model, mode, f, ep), g in groups.items():
        row = {"target": target, "model": model, "mode": mode, "fraction": f, "pt_epoch": ep,
               "lm": any(c.lm for c in g["scratch"] + g["pretrained"])}
        for arm in ("scratch", "pretrained"):
            cells = g[arm]
            row[f"{arm}_cells"] = cells
            row[f"{arm}_n"] = sum(c.result is not None for c in cells)
            row[f"{arm}_of"] = len(cells)
            for k in (DEFAULT_METRIC, SECOND_METRIC):
                row[f"{arm}_{k}"] = _metric(cells, k)
            row[f"{arm}_best"] = _best(cells)
        (ms, ss), (mp, sp) = row[f"scratch_{DEFAULT_METRIC}"], row[f"pretrained_{DEFAULT_METRIC}"]
        row["delta"] = None if ms is None or mp is None else mp - ms
        spread = max([v for v in (ss, sp) if v is not None], default=None)
        row["beyond_std"] = None if row["delta"] is None or spread is None else abs(row["delta"]) > spread
        rows.append(row)
    return rows


def _verdict(row) -> str:
    if row["delta"] is None:
        return "–"
    if row["beyond_std"] is None:
        return "1 seed"
    if not row["beyond_std"]:
        return "within noise"
    return "gain" if row["delta"] > 0 else "loss"


def _ms(pair, digits=4):
    return lb._fmt(pair[0], pair[1], digits)


def _status(row) -> str:
    bits = []
    for arm in ("scratch", "pretrained"):
        if row[f"{arm}_n"] < row[f"{arm}_of"]:
            failed = [c for c in row[f"{arm}_cells"] if c.error]
            bits.append(f"{arm} {row[f'{arm}_n']}/{row[f'{arm}_of']}" + (f" ({failed[0].error[:80]})" if failed else ""))
    return "; ".join(bits) or "ok"


def _single_rows(target, cells):
    """Zero-shot / popularity rows: (label, mode, fraction, cells)."""
    groups: dict = {}
    for c in cells:
        if c.dataset != target:
            continue
        label = f"{c.model} " + ("pre-trained, no fine-tuning" if c.pretrained else
                                 ("untrained (random init)" if c.kind == "zero-shot" else ""))
        groups.setdefault((label.strip(), c.mode_label, c.fraction), []).append(c)
    return [(label, mode, f, cs) for (label, mode, f), cs in groups.items()]


def _costs(plan: TransferPlan, target) -> list[str]:
    lines = []
    for c in plan.pretrain:
        history, peak = _pretrain_progress(c)
        if not history:
            lines.append(f"* pre-training {c.model}: {c.status}" + (f" ({c.error})" if c.error else ""))
            continue
        secs = [h.get("train_seconds") for h in history if h.get("train_seconds")]
        lines.append(f"* pre-training {c.model} on {c.dataset.replace(',', ' + ')}: {len(history)} epoch(s) "
                     + ("" if c.result else "so far (running or interrupted) ")
                     + f"of {c.overrides.get('epochs', '?')}, {sum(secs) / max(1, len(secs)):,.0f} s per epoch"
                     + (f", peak RSS {peak:,.0f} MB" if peak else "") + f"; transferred: the checkpoint after "
                     f"epoch {c.transfer_epoch} (run `{c.run_name}`)")
    cells = [c for c in plan.finetune + plan.zero_shot + plan.baselines if c.dataset == target and c.result]
    seconds = sum((c.result.get("timings") or {}).get("total_seconds") or 0 for c in cells)
    pre_s = sum((c.result.get("timings") or {}).get("total_seconds") or 0 for c in plan.pretrain if c.result)
    lines.append(f"* this table's {len(cells)} finished runs: {seconds / 3600:.2f} h of run time; with the "
                 f"pre-training: {(seconds + pre_s) / 3600:.2f} h (wall time of each run's process; CPU hours = "
                 "wall hours x threads per run, see Machine)")
    return lines


def _pretrain_progress(cell: Cell):
    """(epoch history, peak RSS MB or None) of a pre-training cell, finished or still running
    (read from its ``.resume.pth``, rewritten atomically after every epoch)."""
    if cell.result:
        return cell.result.get("history") or [], (cell.result.get("timings") or {}).get("peak_rss_mb")
    if not cell.run_name or not os.path.isfile(cell.resume_file):
        return [], None
    try:
        from recbole_mm.trainer.checkpoint import load_checkpoint

        return (load_checkpoint(cell.resume_file).get("trainer") or {}).get("history") or [], None
    except Exception:  # noqa: BLE001 - a report never fails on a file being replaced
        return [], None


def render_markdown(target, plan: TransferPlan, command, settings) -> str:
    rows = comparison_rows(target, plan)
    lines = [f"# Transfer to {target}", "",
             f"Pre-training corpus: **{settings['corpus'].replace(',', ' + ')}**; target: **{target}**. "
             f"Test metrics (RecBole full ranking), mean ± sample std over seeds {settings['seeds']}"
             + (f" (language models: {settings['lm_seeds']})" if settings.get("lm_seeds") else "")
             + f". Both arms: early stopping cannot end a fine-tuning run before {settings['min_steps']} optimiser "
               "steps, and a run on a fraction f of the users evaluates every 1/f epochs (patience in steps as on "
               "all the data); *best* = best epoch / optimiser steps at the best epoch (means). "
               "*verdict*: the difference against the larger of the two standard deviations.", "",
             "| model | mode | train users | scratch NDCG@10 | pre-trained NDCG@10 | Δ | verdict | scratch Recall@10 "
             "| pre-trained Recall@10 | best (scratch) | best (pre-trained) | seeds | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append("| " + " | ".join([
            r["model"] + (" [LM]" if r["lm"] else ""), r["mode"], f"{r['fraction']:.0%}",
            _ms(r[f"scratch_{DEFAULT_METRIC}"]), _ms(r[f"pretrained_{DEFAULT_METRIC}"]),
            "–" if r["delta"] is None else f"{r['delta']:+.4f}", _verdict(r),
            _ms(r[f"scratch_{SECOND_METRIC}"]), _ms(r[f"pretrained_{SECOND_METRIC}"]),
            _budget(r["scratch_cells"]), _budget(r["pretrained_cells"]),
            f"{r['scratch_n']}+{r['pretrained_n']}", _status(r)]) + " |")
    single = _single_rows(target, plan.zero_shot) + _single_rows(target, plan.baselines)
    if single:
        lines += ["", "## Zero-shot and popularity", "",
                  "Zero-shot: the model evaluated on the target with no training on it (`epochs=0`); the untrained "
                  "row is the same architecture freshly initialised. Popularity: items by their count as training "
                  "targets of the (kept) training users.", "",
                  "| method | mode | train users | NDCG@10 | Recall@10 | seeds |", "|---|---|---|---|---|---|"]
        for label, mode, f, cs in single:
            lines.append(f"| {label} | {mode} | {f:.0%} | {_ms(_metric(cs, DEFAULT_METRIC))} | "
                         f"{_ms(_metric(cs, SECOND_METRIC))} | {sum(c.result is not None for c in cs)}/{len(cs)} |")
    curve = comparison_rows(target, plan, "curve")
    if curve:
        lines += ["", "## Pre-training length", "", "| model | mode | train users | pre-training epochs | "
                  "scratch NDCG@10 | pre-trained NDCG@10 | Δ | seeds |", "|---|---|---|---|---|---|---|---|"]
        transferred = {c.model: getattr(c, "transfer_epoch", None) for c in plan.pretrain}
        points = curve + [dict(r, pt_epoch=transferred.get(r["model"]), transferred=True)
                          for r in rows if r["mode"] == "inductive"
                          and any(c["model"] == r["model"] and c["fraction"] == r["fraction"] for c in curve)]
        for r in sorted(points, key=lambda r: (r["model"], r["fraction"], r["pt_epoch"] or 0)):
            ep = f"{r['pt_epoch']} (transferred)" if r.get("transferred") else str(r["pt_epoch"])
            lines.append(f"| {r['model']} | {r['mode']} | {r['fraction']:.0%} | {ep} | "
                         f"{_ms(r[f'scratch_{DEFAULT_METRIC}'])} | {_ms(r[f'pretrained_{DEFAULT_METRIC}'])} | "
                         + ("–" if r["delta"] is None else f"{r['delta']:+.4f}")
                         + f" | {r['scratch_n']}+{r['pretrained_n']} |")
    lines += ["", f"![transfer to {target}](transfer-{target}.png)", "", "## Costs", ""] + _costs(plan, target)
    if plan.notes:
        lines += ["", "## Notes", ""] + [f"* {n}" for n in plan.notes]
    failures = [c for c in plan.pretrain + plan.finetune + plan.zero_shot + plan.baselines
                if c.error and (c.dataset == target or c.stage == "pretrain")]
    if failures:
        lines += ["", "## Failures", ""] + [f"* {c.dataset} {c.label}: {lb._md_escape(c.error)}" for c in failures]
    lines += ["", "## Command", "", "```bash", command or "(Python API)", "```", "",
              f"Per-run values: `transfer-{target}.runs.csv` (run names: results, checkpoints and logs in "
              "checkpoint_dir as `<run>.json`, `<run>.pth`, `<run>.log`).", "", f"Machine: {lb._machine()}.", ""]
    return "\n".join(lines)


def _csv(rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["target", "model", "mode", "fraction", "pt_epoch", "scratch_ndcg10_mean", "scratch_ndcg10_std",
                "pretrained_ndcg10_mean", "pretrained_ndcg10_std", "delta", "beyond_std", "scratch_recall10_mean",
                "pretrained_recall10_mean", "scratch_best_epoch", "scratch_best_step", "pretrained_best_epoch",
                "pretrained_best_step", "scratch_seeds", "pretrained_seeds"])
    for r in rows:
        w.writerow([r["target"], r["model"], r["mode"], r["fraction"], r["pt_epoch"] or "",
                    *map(lb._num, r[f"scratch_{DEFAULT_METRIC}"]), *map(lb._num, r[f"pretrained_{DEFAULT_METRIC}"]),
                    lb._num(r["delta"]), "" if r["beyond_std"] is None else int(r["beyond_std"]),
                    lb._num(r[f"scratch_{SECOND_METRIC}"][0]), lb._num(r[f"pretrained_{SECOND_METRIC}"][0]),
                    *map(lb._num, r["scratch_best"]), *map(lb._num, r["pretrained_best"]),
                    r["scratch_n"], r["pretrained_n"]])
    return buf.getvalue()


def _runs_csv(target, plan: TransferPlan) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["kind", "dataset", "model", "mode", "fraction", "pretrained", "seed", "run_name", "status",
                "ndcg@10", "recall@10", "best_epoch", "best_step", "steps", "epochs", "train_s_per_epoch",
                "total_seconds", "peak_rss_mb", "error"])
    for c in plan.pretrain + [c for c in plan.baselines + plan.zero_shot + plan.finetune if c.dataset == target]:
        r = c.result or {}
        t = r.get("timings") or {}
        test = r.get("test") or {}
        w.writerow([getattr(c, "kind", c.stage), c.dataset, c.model, c.mode_label, getattr(c, "fraction", ""),
                    c.pretrained or "", c.seed, c.run_name, c.status, lb._num(test.get(DEFAULT_METRIC)),
                    lb._num(test.get(SECOND_METRIC)), r.get("best_epoch", ""), r.get("best_step", ""),
                    r.get("steps", ""), len(r.get("history") or []), lb._num(t.get("mean_train_seconds_per_epoch")),
                    lb._num(t.get("total_seconds")), lb._num(t.get("peak_rss_mb")), c.error or ""])
    return buf.getvalue()


def write_chart(target, rows, path) -> bool:
    """Scratch vs pre-trained test NDCG@10 per (model, mode, fraction), std error bars."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("transfer: matplotlib is not installed (pip install -e .[plot]); no chart", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 2), 4.2))
    xs = list(range(len(rows)))
    for off, arm, color in ((-0.2, "scratch", "C7"), (0.2, "pretrained", "C0")):
        means = [r[f"{arm}_{DEFAULT_METRIC}"][0] or 0.0 for r in rows]
        stds = [r[f"{arm}_{DEFAULT_METRIC}"][1] or 0.0 for r in rows]
        ax.bar([x + off for x in xs], means, width=0.4, yerr=stds, capsize=3, color=color,
               label="from scratch" if arm == "scratch" else "pre-trained")
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{r['model']}\n{r['mode']}\n{r['fraction']:.0%} users" for r in rows], fontsize=7)
    ax.set_ylabel("test NDCG@10")
    ax.set_title(f"transfer to {target}: mean ± std over seeds", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    lb.save_figure(fig, path)
    return True


def write_transfer_report(target, plan: TransferPlan, out, command, settings) -> dict:
    os.makedirs(out, exist_ok=True)
    base = os.path.join(out, f"transfer-{target}")
    paths = {"md": base + ".md", "csv": base + ".csv", "runs_csv": base + ".runs.csv", "png": base + ".png"}
    rows = comparison_rows(target, plan)
    if not write_chart(target, rows, paths["png"]):
        paths["png"] = None
    atomic_write(paths["csv"], _csv(rows + comparison_rows(target, plan, "curve")))
    atomic_write(paths["runs_csv"], _runs_csv(target, plan))
    atomic_write(paths["md"], render_markdown(target, plan, command, settings))
    return paths


# -- the command ---------------------------------------------------------------------------

DESCRIPTION = """\
Pre-train each model once on the merged --pretrain domains, then fine-tune it on every --target
from scratch and from the pre-trained checkpoint, for each mode, training fraction and seed,
plus zero-shot (pre-trained, no fine-tuning; and untrained) and popularity rows.  Writes
<out>/transfer-<target>.md, .csv, .runs.csv and .png: scratch vs pre-trained side by side,
mean +- std over seeds, best epochs and steps, costs.

Every run is a cell of the leaderboard's machinery: its own process, named by a hash of its
resolved config, skipped when finished (run the same command again to continue; --resume
continues interrupted cells from their last epoch), failures reported in the table.
"""

EPILOG = """\
examples:
  # the shared protocol (see docs/transfer.md for the data commands)
  recbole-mm transfer -m UniSRec,MISSRec --pretrain Video_Games,Beauty,Office_Products \\
      --target Scientific,Scientific_mm --mode inductive,transductive --fraction 1.0,0.1 --seeds 3 \\
      --pt-epochs 3
  # pre-training-length curve: pre-train 30 epochs, transfer the 3-epoch checkpoint, curve at 1/3/10/30
  recbole-mm transfer -m UniSRec --pretrain ... --target Scientific --mode inductive --pt-epochs 3 --curve 1,3,10,30
  # meanwhile, on the other core: fine-tune from the checkpoints written so far (run again later)
  recbole-mm transfer ... --no-pretrain
  # language models: one seed, a step budget
  recbole-mm transfer -m Recformer --lm-seeds 1 --set Recformer:epochs=2 --pt-set Recformer:steps_per_epoch=50 ...

Any other --key=value (or --key value) is a config override given to every run (pre-training and
fine-tuning); --set MODEL:key=value for one model's fine-tuning runs, --pt-set for its pre-training.
"""


def register(sub) -> None:
    p = sub.add_parser("transfer", help="pre-train once, fine-tune from scratch vs pre-trained over seeds: "
                       "results/transfer-<target>.md", description=DESCRIPTION, epilog=EPILOG,
                       allow_abbrev=False)
    p.add_argument("-m", "--models", required=True, metavar="M1,M2,...", help="comma-separated model names")
    p.add_argument("--pretrain", required=True, metavar="A,B,C", help="pre-training domains (folders under --pretrain_path)")
    p.add_argument("--target", required=True, metavar="T1,T2", help="target datasets (folders under --data_path)")
    p.add_argument("--pretrain_path", "--pretrain-path", dest="pretrain_path", default="dataset/pretrain",
                   metavar="DIR", help="folder holding the pre-training domains (default: dataset/pretrain)")
    p.add_argument("--data_path", "--data-path", dest="data_path", default=None, metavar="DIR",
                   help="folder holding the targets (default: props, dataset/downstream)")
    p.add_argument("--mode", default=None, metavar="inductive,transductive",
                   help="transfer modes, one row each (default: each model's props)")
    p.add_argument("--fraction", default="1.0", metavar="F1,F2",
                   help="fractions of the target's training users (config train_fraction), e.g. 1.0,0.1 (default 1.0)")
    p.add_argument("--seeds", default="3", metavar="N|S1,S2,...", help="seeds per cell (default 3: 2020, 2021, 2022)")
    p.add_argument("--lm-seeds", "--lm_seeds", dest="lm_seeds", default=None, metavar="N|S1,...",
                   help=f"seeds for the language-model recommenders ({', '.join(lb.LM_MODELS)}); default: --seeds")
    p.add_argument("--pt-epochs", "--pt_epochs", dest="pt_epochs", type=int, default=None, metavar="N",
                   help="the transferred checkpoint is the one after N pre-training epochs (default: "
                        "props/pretrain.yaml's epochs)")
    p.add_argument("--curve", default=None, metavar="E1,E2,...",
                   help="also fine-tune (inductive) from the checkpoints after these pre-training epochs "
                        "(pre-training runs to the longest of --pt-epochs and these)")
    p.add_argument("--min-steps", "--min_steps", dest="min_steps", type=int, default=200, metavar="N",
                   help="early stopping cannot end a fine-tuning run before N optimiser steps (default 200)")
    p.add_argument("--no-zero-shot", dest="zero_shot", action="store_false", help="no zero-shot rows")
    p.add_argument("--set", action="append", default=[], metavar="MODEL:key=value", dest="model_set",
                   help="a config override for one model's fine-tuning runs (repeatable)")
    p.add_argument("--pt-set", action="append", default=[], metavar="MODEL:key=value", dest="pt_set",
                   help="a config override for one model's pre-training (repeatable)")
    p.add_argument("--config_files", nargs="+", default=None, metavar="YAML", help="extra YAML files for every run")
    p.add_argument("--out", default="results", metavar="DIR", help="report folder (default: results/)")
    p.add_argument("--resume", action="store_true", help="continue interrupted cells from their <run>.resume.pth")
    p.add_argument("--rerun", action="store_true", help="run finished cells again")
    p.add_argument("--report-only", action="store_true", help="run nothing; write the reports from finished cells")
    p.add_argument("--no-pretrain", action="store_true",
                   help="run no pre-training: fine-tune from the pre-trained checkpoints that exist already (each "
                        "epoch's is final once written), so a second process (e.g. on the other core) fine-tunes "
                        "while the first one pre-trains; run it again to pick up new checkpoints")
    p.add_argument("--isolation", choices=["subprocess", "fork"], default="subprocess",
                   help="each run in a fresh Python process (default) or a fork of this one")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="stop a run after this long")
    p.set_defaults(func=main, config_overrides=True)


def main(args) -> int:
    overrides = dict(getattr(args, "overrides", None) or {})
    if args.data_path:
        overrides["data_path"] = args.data_path
    argv = getattr(args, "argv", None)
    skip = ("--report-only", "--resume", "--no-pretrain")
    command = "recbole-mm " + shlex.join([a for a in argv if a not in skip]) if argv else None
    res = transfer(args.models, args.pretrain, args.target, modes=args.mode, fractions=args.fraction,
                   seeds=args.seeds, lm_seeds=args.lm_seeds, overrides=overrides,
                   model_overrides=lb.parse_model_overrides(args.model_set),
                   pt_overrides=lb.parse_model_overrides(args.pt_set), config_files=args.config_files,
                   pretrain_path=args.pretrain_path, pt_epochs=args.pt_epochs, curve=args.curve,
                   min_steps=args.min_steps, zero_shot=args.zero_shot, out=args.out, resume=args.resume,
                   rerun=args.rerun, isolation=args.isolation, timeout=args.timeout,
                   report_only=args.report_only, command=command, no_pretrain=args.no_pretrain)  # LeaderboardError: exit 2
    plan = res["plan"]
    failed = [c for c in plan.pretrain + plan.finetune + plan.zero_shot + plan.baselines if c.status == "failed"]
    return 1 if failed else 0
