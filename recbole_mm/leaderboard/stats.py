"""Leaderboard statistics: metric order and names, mean +- sample std over seeds, rows."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from recbole_mm.leaderboard.plan import METRIC_NAMES, METRIC_ORDER
from recbole_mm.leaderboard.record import epoch_count


def _metric_key(name: str):
    base, _, k = name.partition("@")
    order = METRIC_ORDER.index(base) if base in METRIC_ORDER else len(METRIC_ORDER)
    return (int(k) if k.isdigit() else 0, order, base)


def metric_title(name: str) -> str:
    base, at, k = name.partition("@")
    return METRIC_NAMES.get(base, base) + at + k


def _mean_std(values):
    values = [float(v) for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


@dataclass
class Row:
    model: str
    mode: str
    pretrained: str | None
    lm: bool
    cells: list

    @property
    def done(self):
        return [c for c in self.cells if c.result is not None]

    @property
    def name(self):
        pt = f" (pre-trained: {os.path.basename(self.pretrained)})" if self.pretrained else ""
        return self.model + pt

    @property
    def label(self):
        return self.name + ("" if self.mode in ("-", None) else f", {self.mode}")

    def metric(self, key):
        return _mean_std([c.result["test"].get(key) for c in self.done])

    def timing(self, key):
        return _mean_std([(c.result.get("timings") or {}).get(key) for c in self.done])

    def status(self):
        n, ok = len(self.cells), len(self.done)
        failed = [c for c in self.cells if c.status in ("failed", "interrupted")]
        if ok == n:
            return "ok"
        if ok == 0 and failed:
            return "failed"
        parts = [f"{ok}/{n} seeds"]
        if failed:
            parts.append(f"{len(failed)} failed")
        running = sum(c.status == "running" for c in self.cells)
        if running:
            parts.append(f"{running} running")
        pending = n - ok - len(failed) - running
        if pending:
            parts.append(f"{pending} not run")
        return ", ".join(parts)


def build_rows(cells) -> list[Row]:
    rows: dict = {}
    for c in cells:
        key = c.row_key
        if key not in rows:
            rows[key] = Row(c.model, c.mode_label, c.pretrained, c.lm, [])
        rows[key].cells.append(c)
    return list(rows.values())


def _fmt(mean, std, digits=4):
    if mean is None:
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def _int(v):
    return f"{int(v):,}" if v is not None else "–"


def _row_stats(row: Row) -> dict:
    done = row.done
    first = done[0].result if done else {}
    params = first.get("params") or {}
    epochs = _mean_std([epoch_count(c.result) for c in done])[0]
    best = _mean_std([c.result.get("best_epoch") for c in done])[0]
    valid_s = _mean_std([_avg((c.result.get("timings") or {}).get("valid_seconds_per_epoch")) for c in done])[0]
    peaks = [(c.result.get("timings") or {}).get("peak_rss_mb") for c in done]
    peaks = [p for p in peaks if p is not None]
    return {
        "params_total": params.get("total"),
        "params_trainable": params.get("trainable"),
        "train_s_per_epoch": row.timing("mean_train_seconds_per_epoch")[0],
        "valid_s_per_epoch": valid_s,
        "test_eval_s": row.timing("test_seconds")[0],
        "epochs": epochs,
        "best_epoch": best,
        "peak_rss_mb": max(peaks) if peaks else None,
    }


def _avg(values):
    values = [v for v in values or [] if v is not None]
    return sum(values) / len(values) if values else None


def metric_keys(cells) -> list[str]:
    keys = set()
    for c in cells:
        if c.result and c.result.get("test"):
            keys.update(c.result["test"])
    return sorted(keys, key=_metric_key)


def _num(v):
    if v is None:
        return ""
    return f"{v:.6g}" if isinstance(v, float) else str(v)
