"""Transfer reports: ``transfer-<target>.md``, ``.csv``, ``.runs.csv`` and ``.png``."""

from __future__ import annotations

import csv
import io
import os
import sys

from recbole_mm import leaderboard as lb
from recbole_mm.leaderboard import Cell
from recbole_mm.leaderboard.record import epoch_count, is_recorded, record_note, recorded_progress, write_records
from recbole_mm.utils import atomic_write
from recbole_mm.transfer.plan import (DEFAULT_METRIC, NOT_RUN, SECOND_METRIC, TransferPlan, checkpoint_of,
                                      checkpoints_on_disk)


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
    stand_in = {}
    if kind == "finetune":  # no transferred checkpoint yet: the latest curve point with results stands in
        for (model, mode, f, ep), g in groups.items():
            if g["pretrained"]:
                continue
            points = {}
            for c in plan.finetune:
                if (c.dataset == target and c.kind == "curve" and c.model == model and c.mode_label == mode
                        and c.fraction == f):
                    points.setdefault(c.pt_epoch, []).append(c)
            done = [e for e, cs in points.items() if any(c.result for c in cs)]
            if done:
                g["pretrained"] = points[max(done)]
                stand_in[(model, mode, f, ep)] = max(done)
    rows = []
    for (model, mode, f, ep), g in groups.items():
        row = {"target": target, "model": model, "mode": mode, "fraction": f,
               "pt_epoch": stand_in.get((model, mode, f, ep), ep), "stand_in": (model, mode, f, ep) in stand_in,
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
        # a verdict needs a spread on both arms: one seed on either side says nothing about noise
        spread = None if ss is None or sp is None else max(ss, sp)
        row["beyond_std"] = None if row["delta"] is None or spread is None else abs(row["delta"]) > spread
        rows.append(row)
    return rows


def _verdict(row) -> str:
    if row["delta"] is None:
        return "–"
    if row["beyond_std"] is None:
        return "1 seed" if max(row["scratch_n"], row["pretrained_n"]) <= 1 else "an arm with 1 seed"
    if not row["beyond_std"]:
        return "within noise"
    return "gain" if row["delta"] > 0 else "loss"


def _ms(pair, digits=4):
    return lb._fmt(pair[0], pair[1], digits)


def _status(row) -> str:
    bits = [f"pre-trained: the checkpoint after {row['pt_epoch']} epoch(s) (the transferred one not reached)"] \
        if row.get("stand_in") else []
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
        pt = f"pre-trained ({c.pt_epoch} epoch(s): the transferred checkpoint not reached)" \
            if getattr(c, "pt_epoch", None) else "pre-trained"
        label = f"{c.model} " + (f"{pt}, no fine-tuning" if c.pretrained else
                                 ("untrained (random init)" if c.kind == "zero-shot" else ""))
        groups.setdefault((label.strip(), c.mode_label, c.fraction), []).append(c)
    return [(label, mode, f, cs) for (label, mode, f), cs in groups.items()]


def _costs(plan: TransferPlan, target, out=None) -> list[str]:
    lines = []
    for c in plan.pretrain:
        history, peak = _pretrain_progress(c, out)
        n = epoch_count(c.result) if c.result else len(history)
        if not n:
            lines.append(f"* pre-training {c.model}: {c.status}" + (f" ({c.error})" if c.error else ""))
            continue
        secs = [h.get("train_seconds") for h in history if h.get("train_seconds")]
        per_epoch = sum(secs) / len(secs) if secs else ((c.result or {}).get("timings") or {}).get(
            "mean_train_seconds_per_epoch") or 0  # a .runs.csv line: its mean, no history
        lines.append(f"* pre-training {c.model} on {c.dataset.replace(',', ' + ')}: {n} epoch(s) "
                     + ("" if c.result else "so far (running or interrupted) ")
                     + f"of {c.overrides.get('epochs', '?')}, {per_epoch:,.0f} s per epoch"
                     + (f", peak RSS {peak:,.0f} MB" if peak else "") + f"; transferred: the checkpoint after "
                     f"epoch {c.transfer_epoch} (run `{c.run_name}`)"
                     + ("; recorded, its checkpoint is not in checkpoint_dir (fine-tuning from it needs the "
                        "pre-training run again)" if is_recorded(c.result) and not os.path.isfile(checkpoint_of(c))
                        else ""))
    cells = [c for c in plan.finetune + plan.zero_shot + plan.baselines if c.dataset == target and c.result]
    seconds = sum((c.result.get("timings") or {}).get("total_seconds") or 0 for c in cells)
    pre_s = sum((c.result.get("timings") or {}).get("total_seconds") or 0 if c.result else  # unfinished: its epochs
                sum(h.get("train_seconds") or 0 for h in _pretrain_progress(c, out)[0]) for c in plan.pretrain)
    lines.append(f"* this table's {len(cells)} finished runs: {seconds / 3600:.2f} h of run time; with the "
                 f"pre-training: {(seconds + pre_s) / 3600:.2f} h (wall time of each run's process; CPU hours = "
                 "wall hours x threads per run, see Machine)")
    return lines


def _pretrain_progress(cell: Cell, out=None):
    """(epoch history, peak RSS MB or None) of a pre-training cell, finished or still running
    (read from its ``.resume.pth``, rewritten atomically after every epoch; without that file,
    the epochs its record in ``out`` kept)."""
    if cell.result:
        return cell.result.get("history") or [], (cell.result.get("timings") or {}).get("peak_rss_mb")
    if not cell.run_name:
        return [], None
    try:
        st = os.stat(cell.resume_file)
    except OSError:
        return recorded_progress(cell.run_name, out), None
    key = (st.st_mtime_ns, st.st_size)
    cached = _RESUME_HISTORY.get(cell.resume_file)
    if cached is None or cached[0] != key:  # a report reads it several times (costs, totals, record)
        try:
            from recbole_mm.trainer.checkpoint import load_checkpoint

            history = (load_checkpoint(cell.resume_file).get("trainer") or {}).get("history") or []
        except Exception:  # noqa: BLE001 - a report never fails on a file being replaced
            return [], None
        cached = _RESUME_HISTORY[cell.resume_file] = (key, history)
    return cached[1], None


_RESUME_HISTORY: dict = {}  # resume file -> ((mtime_ns, size), epoch history): loaded once per version


def render_markdown(target, plan: TransferPlan, command, settings, out=None) -> str:
    rows = comparison_rows(target, plan)
    lines = [f"# Transfer to {target}", "",
             f"Pre-training corpus: **{settings['corpus'].replace(',', ' + ')}**; target: **{target}**. "
             f"Test metrics (RecBole full ranking), mean ± sample std over seeds {settings['seeds']}"
             + (f" (language models: {settings['lm_seeds']})" if settings.get("lm_seeds") else "")
             + f". Both arms: early stopping cannot end a fine-tuning run before {settings['min_steps']} optimiser "
               "steps, and a run on a fraction f of the users evaluates every 1/f epochs (patience in steps as on "
               "all the data); *best* = best epoch / optimiser steps at the best epoch (means). "
               "*verdict*: the difference against the larger of the two standard deviations (none while an arm has one seed).", "",
             "| model | mode | train users | scratch NDCG@10 | pre-trained NDCG@10 | Δ | verdict | scratch Recall@10 "
             "| pre-trained Recall@10 | best (scratch) | best (pre-trained) | seeds | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append("| " + " | ".join([
            r["model"] + (" [LM]" if r["lm"] else ""), r["mode"], f"{r['fraction']:.0%}",
            _ms(r[f"scratch_{DEFAULT_METRIC}"]),
            _ms(r[f"pretrained_{DEFAULT_METRIC}"]) + (f" ({r['pt_epoch']} ep.)" if r.get("stand_in") else ""),
            "–" if r["delta"] is None else f"{r['delta']:+.4f}", _verdict(r),
            _ms(r[f"scratch_{SECOND_METRIC}"]), _ms(r[f"pretrained_{SECOND_METRIC}"]),
            _budget(r["scratch_cells"]), _budget(r["pretrained_cells"]),
            f"{r['scratch_n']}+{r['pretrained_n']}", _status(r)]) + " |")
    single = _single_rows(target, plan.zero_shot) + _single_rows(target, plan.baselines)
    if single:
        lines += ["", "## Zero-shot and baselines", "",
                  "Zero-shot: the model evaluated on the target with no training on it (`epochs=0`); the untrained "
                  "row is the same architecture freshly initialised. Popularity: items by their count as training "
                  "targets of the (kept) training users. TextSim: items by the cosine of their text features to the "
                  "user's last item (no training, no parameter): what the text alone ranks.", "",
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
                          for r in rows if r["mode"] == "inductive" and not r.get("stand_in")
                          and any(c["model"] == r["model"] and c["fraction"] == r["fraction"] for c in curve)]
        for r in sorted(points, key=lambda r: (r["model"], r["fraction"], r["pt_epoch"] or 0)):
            ep = f"{r['pt_epoch']} (transferred)" if r.get("transferred") else str(r["pt_epoch"])
            lines.append(f"| {r['model']} | {r['mode']} | {r['fraction']:.0%} | {ep} | "
                         f"{_ms(r[f'scratch_{DEFAULT_METRIC}'])} | {_ms(r[f'pretrained_{DEFAULT_METRIC}'])} | "
                         + ("–" if r["delta"] is None else f"{r['delta']:+.4f}")
                         + f" | {r['scratch_n']}+{r['pretrained_n']} |")
    lines += ["", f"![transfer to {target}](transfer-{target}.png)", "", "## Costs", ""] + _costs(plan, target, out)
    recorded = record_note(_report_cells(plan, target))
    notes = plan.notes + ([recorded] if recorded else [])
    if notes:
        lines += ["", "## Notes", ""] + [f"* {n}" for n in notes]
    failures = [c for c in plan.pretrain + plan.finetune + plan.zero_shot + plan.baselines
                if c.error and c.status != NOT_RUN and (c.dataset == target or c.stage == "pretrain")]
    if failures:
        lines += ["", "## Failures", ""] + [f"* {c.dataset} {c.label}: {lb._md_escape(c.error)}" for c in failures]
    lines += ["", "## Command", "", "```bash", command or "(Python API)", "```", "",
              f"Per-run values: `transfer-{target}.runs.csv` (run names: results, checkpoints and logs in "
              "checkpoint_dir as `<run>.json`, `<run>.pth`, `<run>.log`; what the report reads of each result "
              "also here in `runs/<run>.json`).", "", f"Machine: {lb._machine()}.", ""]
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


def _report_cells(plan: TransferPlan, target) -> list[Cell]:
    """The cells of a target's report: the pre-training ones, then the target's own."""
    return plan.pretrain + [c for c in plan.baselines + plan.zero_shot + plan.finetune if c.dataset == target]


def _runs_csv(target, plan: TransferPlan) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["kind", "dataset", "model", "mode", "fraction", "pretrained", "seed", "run_name", "status",
                "ndcg@10", "recall@10", "best_epoch", "best_step", "steps", "epochs", "train_s_per_epoch",
                "total_seconds", "peak_rss_mb", "error"])
    for c in _report_cells(plan, target):
        r = c.result or {}
        t = r.get("timings") or {}
        test = r.get("test") or {}
        w.writerow([getattr(c, "kind", c.stage), c.dataset, c.model, c.mode_label, getattr(c, "fraction", ""),
                    c.pretrained or "", c.seed, c.run_name, c.status, lb._num(test.get(DEFAULT_METRIC)),
                    lb._num(test.get(SECOND_METRIC)), r.get("best_epoch", ""), r.get("best_step", ""),
                    r.get("steps", ""), epoch_count(r), lb._num(t.get("mean_train_seconds_per_epoch")),
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
    atomic_write(paths["md"], render_markdown(target, plan, command, settings, out))
    progress = {c.run_name: _pretrain_progress(c)[0] for c in plan.pretrain if not c.result and c.run_name}
    write_records(_report_cells(plan, target), out, {c.run_name: checkpoints_on_disk(c) for c in plan.pretrain},
                  progress)
    return paths
