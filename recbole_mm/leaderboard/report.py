"""Leaderboard reports: ``<dataset>.md``, ``.csv``, ``.runs.csv`` and ``.png``, each written
atomically (concurrent leaderboard / transfer processes rewrite the same report)."""

from __future__ import annotations

import csv
import io
import os
import platform
import sys

from recbole_mm.model import language_models
from recbole_mm.leaderboard.record import RECORD_DIR, epoch_count, record_note, write_records
from recbole_mm.leaderboard.stats import _fmt, _int, _num, _row_stats, build_rows, metric_keys, metric_title
from recbole_mm.utils import atomic_write


def write_report(dataset, cells, notes, out, command=None, seeds_desc="", lm_seeds_desc=None) -> dict:
    os.makedirs(out, exist_ok=True)
    rows = build_rows(cells)
    keys = metric_keys(cells)
    paths = {"md": os.path.join(out, f"{dataset}.md"), "csv": os.path.join(out, f"{dataset}.csv"),
             "runs_csv": os.path.join(out, f"{dataset}.runs.csv"), "png": os.path.join(out, f"{dataset}.png")}
    chart = write_chart(dataset, rows, keys, paths["png"])
    if not chart:
        paths["png"] = None
    atomic_write(paths["csv"], _rows_csv(rows, keys))
    atomic_write(paths["runs_csv"], _runs_csv(cells, keys))
    atomic_write(paths["md"], _markdown(dataset, rows, keys, notes, command, paths, seeds_desc, lm_seeds_desc))
    write_records(cells, out)
    return paths


def _rows_csv(rows, keys) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    stat_cols = ["params_total", "params_trainable", "train_s_per_epoch", "valid_s_per_epoch", "test_eval_s",
                 "epochs", "best_epoch", "peak_rss_mb"]
    w.writerow(["model", "mode", "pretrained", "lm", "seeds", "seeds_finished"]
               + [f"{k}_{s}" for k in keys for s in ("mean", "std")] + stat_cols + ["status", "errors"])
    for r in rows:
        stats = _row_stats(r)
        vals = []
        for k in keys:
            m, s = r.metric(k)
            vals += [_num(m), _num(s)]
        errors = "; ".join(f"seed {c.seed}: {c.error}" if c.seed is not None else c.error
                           for c in r.cells if c.error)
        w.writerow([r.model, r.mode, r.pretrained or "", int(r.lm), " ".join(str(c.seed) for c in r.cells if c.seed is not None),
                    len(r.done)] + vals + [_num(stats[c]) for c in stat_cols] + [r.status(), errors])
    return buf.getvalue()


def _runs_csv(cells, keys) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["model", "mode", "pretrained", "seed", "status", "run_name", "result_file"] + keys
               + ["params_total", "params_trainable", "epochs", "best_epoch", "train_s_per_epoch",
                  "test_eval_s", "peak_rss_mb", "total_s", "error"])
    for c in cells:
        res = c.result or {}
        t = res.get("timings") or {}
        p = res.get("params") or {}
        w.writerow([c.model, c.mode_label, c.pretrained or "", "" if c.seed is None else c.seed, c.status,
                    c.run_name or "", (res.get("recorded_from") or c.result_file) if c.result else ""]
                   + [_num((res.get("test") or {}).get(k)) for k in keys]
                   + [_num(p.get("total")), _num(p.get("trainable")), _num(epoch_count(res) if res else None),
                      _num(res.get("best_epoch")), _num(t.get("mean_train_seconds_per_epoch")),
                      _num(t.get("test_seconds")), _num(t.get("peak_rss_mb")), _num(t.get("total_seconds")),
                      c.error or ""])
    return buf.getvalue()


def _markdown(dataset, rows, keys, notes, command, paths, seeds_desc, lm_seeds_desc) -> str:
    best = {}
    for k in keys:
        means = [r.metric(k)[0] for r in rows]
        means = [m for m in means if m is not None]
        if len(means) > 1:
            best[k] = max(means)
    valid_metrics = {str((c.result.get("config") or {}).get("valid_metric")) for r in rows for c in r.done
                     if (c.result.get("config") or {}).get("valid_metric")}  # a .runs.csv line has no config
    lines = [f"# Leaderboard: {dataset}", ""]
    lines.append(
        "RecBole full-ranking test metrics of the best-validation checkpoint"
        + (f" (valid_metric {', '.join(sorted(valid_metrics))})" if valid_metrics else "")
        + ", mean ± sample std over the finished seeds; best mean in bold. "
        "Timings: seconds per training epoch and for the test evaluation (mean over seeds), "
        "peak RSS of the run's process (max over seeds).")
    lines.append("")
    header = ["model", "mode", "seeds"] + [metric_title(k) for k in keys] + [
        "params (trainable)", "s/epoch", "epochs (best)", "eval s", "peak RSS MB", "status"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    any_lm = False
    for r in rows:
        st = _row_stats(r)
        n_seeds = sum(c.seed is not None for c in r.cells)
        seeds = "–" if not n_seeds else f"{len(r.done)}/{n_seeds}" if len(r.done) != n_seeds else str(n_seeds)
        if r.lm:
            seeds += " (LM)"
            any_lm = True
        cells = []
        for k in keys:
            m, s = r.metric(k)
            text = _fmt(m, s)
            if m is not None and k in best and m == best[k]:
                text = f"**{text}**"
            cells.append(text)
        params = "–" if st["params_total"] is None else (
            _int(st["params_total"]) + (f" ({_int(st['params_trainable'])})"
                                        if st["params_trainable"] != st["params_total"] else ""))
        epochs = "–" if st["epochs"] is None else f"{st['epochs']:.3g}" + (
            f" ({st['best_epoch']:.3g})" if st["best_epoch"] is not None else "")
        status = r.status()
        if status != "ok":
            errs = [c.error for c in r.cells if c.error]
            if errs:
                status += ": " + _md_escape(errs[0][:160])
        lines.append("| " + " | ".join([
            r.name, r.mode or "-", seeds, *cells, params,
            "–" if st["train_s_per_epoch"] is None else f"{st['train_s_per_epoch']:.2f}",
            epochs,
            "–" if st["test_eval_s"] is None else f"{st['test_eval_s']:.2f}",
            "–" if st["peak_rss_mb"] is None else f"{st['peak_rss_mb']:,.0f}",
            status]) + " |")
    lines.append("")
    if paths.get("png"):
        lines += [f"![{dataset} leaderboard]({os.path.basename(paths['png'])})", ""]
    if any_lm:
        lines += [f"LM: language-model recommender ({', '.join(language_models())}) in its props' small CPU "
                  f"configuration, run with {lm_seeds_desc or 'fewer'} seed(s) instead of {seeds_desc}.", ""]
    lines += _context_lines(rows)
    recorded = record_note([c for r in rows for c in r.cells])
    if recorded:
        lines.append(f"* {recorded}")
    accelerated = _accelerated_note(rows)
    if accelerated:
        lines.append(f"* {accelerated}")
    for n in notes:
        lines.append(f"* {n}")
    failures = [c for c in (c for r in rows for c in r.cells) if c.error]
    if failures:
        lines += ["", "## Failures", ""]
        for c in failures:
            where = f" (log: `{c.log_file}`)" if c.run_name and os.path.exists(c.log_file) else ""
            lines.append(f"* {c.label}: {_md_escape(c.error)}{where}")
    lines += ["", "## Command", "", "```bash", command or "(Python API)", "```", ""]
    lines.append(f"Per-seed values: `{os.path.basename(paths['runs_csv'])}`; per-row: "
                 f"`{os.path.basename(paths['csv'])}`. Each run's result JSON, checkpoint and log are in "
                 f"its checkpoint_dir as `<run>.json`, `<run>.pth`, `<run>.log` (run names in the per-seed CSV); "
                 f"what the report reads of each result is also kept here in `{RECORD_DIR}/<run>.json`, read when "
                 "checkpoint_dir lacks it.")
    lines.append("")
    lines.append(f"Machine: {_machine()}.")
    lines.append("")
    return "\n".join(lines)


def _context_lines(rows) -> list[str]:
    """How much of the users' history the bounded-context models read (their runs' ``context``),
    next to the other models' ``MAX_ITEM_LIST_LENGTH``."""
    out = []
    for r in rows:
        ctx = [c.result["context"] for c in r.done if (c.result or {}).get("context")]
        if not ctx:
            continue
        c0 = ctx[0]
        seen = sum(c["history_items_seen"] for c in ctx) / len(ctx)
        out.append(f"* Context: {r.name}{f' ({r.mode})' if r.mode else ''} reads at most {c0['max_items']} items "
                   f"and {c0['max_tokens']} tokens per user: {seen:.2f} of its test users' "
                   f"{c0['history_items']:.2f} history items on average.")
    if out:
        lengths = {(c.result.get("config") or {}).get("MAX_ITEM_LIST_LENGTH") for r in rows for c in r.done
                   if not (c.result or {}).get("context")}
        lengths.discard(None)
        if lengths:
            out.append(f"* The other models read up to {', '.join(map(str, sorted(lengths)))} items "
                       "(MAX_ITEM_LIST_LENGTH), i.e. every history item counted above.")
        out.append("")
    return out


def _accelerated_note(rows) -> str | None:
    """Which rows' runs ran on an accelerator (their result's ``config.device``): their seconds per
    epoch are not CPU seconds, unlike the machine line below."""
    ran = {}
    for r in rows:
        for c in r.done:
            device = str((c.result.get("config") or {}).get("device") or "cpu").split(":")[0]
            if device != "cpu":
                ran.setdefault(device, []).append(f"{r.name}{f' ({r.mode})' if r.mode else ''} seed {c.seed}")
    if not ran:
        return None
    parts = [f"{', '.join(dict.fromkeys(labels))} on {device}" for device, labels in ran.items()]
    return (f"Run on an accelerator, not on the machine below: {'; '.join(parts)}; their seconds per epoch "
            "are that device's.")


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _machine() -> str:
    try:
        import torch

        tv = f"torch {torch.__version__}"
    except ImportError:  # pragma: no cover
        tv = "torch ?"
    return (f"{platform.machine()}, {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
            f"{tv}, Python {platform.python_version()}")


def write_chart(dataset, rows, keys, path) -> bool:
    """Left: the valid metric's test value per row (mean, std error bar); right: the validation
    score per epoch (mean over the seeds that reached that epoch).  False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        print("leaderboard: matplotlib is not installed (pip install -e .[plot]); no chart", file=sys.stderr)
        return False
    valid_metric = None
    for r in rows:
        for c in r.done:
            valid_metric = str((c.result.get("config") or {}).get("valid_metric") or "").lower() or None
            break
        if valid_metric:
            break
    metric = valid_metric if valid_metric in keys else (keys[0] if keys else None)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, max(3.5, 0.45 * len(rows) + 1.5)))
    labels, means, stds = [], [], []
    for r in rows:
        m, s = r.metric(metric) if metric else (None, None)
        labels.append(r.label + (" [LM]" if r.lm else ""))
        means.append(m or 0.0)
        stds.append(s or 0.0)
    y = list(range(len(rows)))
    colors = [f"C{i % 10}" for i in y]
    ax1.barh(y, means, xerr=stds, color=colors, capsize=3)
    for yi, (m, sd, r) in enumerate(zip(means, stds, rows)):
        if r.done:
            ax1.text(m + sd, yi, f" {m:.4f}", va="center", fontsize=7)
    ax1.set_xlim(0, max([m + sd for m, sd in zip(means, stds)] + [1e-3]) * 1.2)
    ax1.set_yticks(y)
    ax1.set_yticklabels(labels, fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xlabel(f"test {metric_title(metric)}" if metric else "no finished run")
    ax1.set_title(f"{dataset}: test {metric_title(metric) if metric else ''} (mean ± std over seeds)", fontsize=10)
    for yi, (m, r) in enumerate(zip(means, rows)):
        if not r.done:
            ax1.text(0, yi, f"  {r.status()}", va="center", fontsize=7, color="red")
    plotted, last_epoch = False, 1
    for yi, r in enumerate(rows):
        curves = [[h.get("valid_score") for h in (c.result.get("history") or [])] for c in r.done]
        n = max((len(cv) for cv in curves), default=0)
        xs, ys = [], []
        for e in range(n):
            vals = [cv[e] for cv in curves if e < len(cv) and cv[e] is not None]
            if vals:
                xs.append(e + 1)
                ys.append(sum(vals) / len(vals))
        if xs:
            ax2.plot(xs, ys, marker="." if len(xs) < 40 else None, color=colors[yi], label=labels[yi])
            plotted, last_epoch = True, max(last_epoch, xs[-1])
    ax2.set_xlabel("epoch")
    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.set_xlim(0.5, last_epoch + 0.5)
    ax2.set_ylabel(f"valid {metric_title(valid_metric) if valid_metric else 'score'}")
    ax2.set_title("validation curve (mean over seeds)", fontsize=10)
    if plotted:
        ax2.legend(fontsize=7, loc="lower right")
    ax2.grid(alpha=0.3)
    save_figure(fig, path)
    return True


def save_figure(fig, path) -> None:
    """Write a matplotlib figure as PNG atomically (concurrent processes rewrite the same chart)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    finally:
        plt.close(fig)
