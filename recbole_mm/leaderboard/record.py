"""The committed record of finished cells: what the reports need of each run's result, kept next
to the reports (``<out>/runs/<run>.json``), so that a fresh clone, or a checkout whose ``saved/``
(git-ignored scratch) was lost, still knows which cells are finished and their numbers.

* :func:`write_records`: called whenever a report is written; each finished cell's result, cut
  to what the reports read (:func:`slim`: metrics, best epoch/step, the per-epoch history
  without its metric dicts, timings, parameter counts, a few config keys; no checkpoint), is
  written atomically to ``<out>/runs/<run>.json`` (only when it changed).
* :func:`recorded_result`: a cell's result when ``saved/<run>.json`` is missing: its
  ``<out>/runs/<run>.json``, else the line with that exact run name (the name holds the config
  hash: the same name is the same config) in a committed ``<out>/*.runs.csv`` whose status is
  finished/skipped (metrics, best epoch, epoch count and timings; no curve).  Either is marked
  ``"recorded_from": <the file>`` (:func:`is_recorded`): its checkpoints and log are not on this
  machine, so a recorded pre-training is never a checkpoint to fine-tune from.
* :func:`checkpoint_sizes`: a pre-training's record also keeps the sizes of its numbered
  checkpoints (``"checkpoint_sizes": {"<epoch>": bytes}``, given to :func:`write_records` by the
  transfer report for those on disk then; merged with the sizes the record had, a size on disk
  replacing the recorded one of its epoch; a pre-training not finished yet has a record of its
  sizes alone, no result).  A fine-tuning cell's run name hashes its checkpoint's path and size,
  so without the file, that size names the cell as when the file existed: its recorded result is
  found (:func:`recbole_mm.leaderboard.plan.checkpoint_size`); there is nothing to run it from.
  An unfinished pre-training's record also keeps its epochs so far (``"progress"``, read from its
  ``.resume.pth``; :func:`recorded_progress`): the costs of the report survive the file.
"""

from __future__ import annotations

import csv
import json
import os

from recbole_mm.utils import atomic_write

RECORD_DIR = "runs"
DONE_STATUSES = ("finished", "skipped", "done")  # a .runs.csv line of a finished cell
# the config keys a record keeps (what the reports and a reader of the record use)
CONFIG_KEYS = ("run_name", "model", "dataset", "train_stage", "seed", "epochs", "valid_metric", "device",
               "MAX_ITEM_LIST_LENGTH", "train_fraction", "eval_step", "stopping_min_steps")
RESULT_KEYS = ("model", "dataset", "stage", "mode", "best_epoch", "steps", "best_step", "train_fraction", "valid",
               "test", "timings", "params", "context", "epochs_trained")


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def record_path(out, run_name: str) -> str:
    return os.path.join(out, RECORD_DIR, run_name + ".json")


def is_recorded(result) -> bool:
    """Whether a result comes from the committed record rather than the run's own ``saved/`` file."""
    return bool(result and result.get("recorded_from"))


def epoch_count(result) -> int:
    """Epochs a run trained: its history's length (a result read from a ``.runs.csv`` line has no
    history, only the count)."""
    history = (result or {}).get("history") or []
    return len(history) if history else int((result or {}).get("epochs_trained") or 0)


def slim(result: dict) -> dict:
    """What the record keeps of a result (small plain JSON)."""
    out = {k: result[k] for k in RESULT_KEYS if result.get(k) is not None}
    config = result.get("config") or {}
    out["config"] = {k: config[k] for k in CONFIG_KEYS if config.get(k) is not None}
    out["history"] = [{k: v for k, v in h.items() if v is None or isinstance(v, (int, float, str))}
                      for h in result.get("history") or []]
    return out


def write_records(cells, out, sizes=None, progress=None) -> None:
    """``<out>/runs/<run>.json`` for every finished cell, and for every run of ``sizes`` (``{run:
    {epoch: bytes}}``: a pre-training's checkpoints on disk now) its ``checkpoint_sizes``, merged
    with those its record had; for every run of ``progress`` (``{run: epoch history}``: an
    unfinished pre-training's epochs so far) the longer of that history and the recorded one
    (rewritten only when its content changed)."""
    sizes, progress = sizes or {}, progress or {}
    for c in cells:
        if not c.run_name or not (c.result or sizes.get(c.run_name) or progress.get(c.run_name)):
            continue
        path = record_path(out, c.run_name)
        try:
            with open(path) as f:
                old = f.read()
        except OSError:
            old = ""
        rec = slim(c.result) if c.result else {}
        before = _loads(old)
        kept = {**_sizes(before), **sizes.get(c.run_name, {})}
        if kept:
            rec["checkpoint_sizes"] = {str(e): kept[e] for e in sorted(kept)}
        if not c.result:
            history = max(_progress(before), slim({"history": progress.get(c.run_name) or []})["history"], key=len)
            if history:
                rec["progress"] = history
        text = json.dumps(rec, indent=1, sort_keys=True) + "\n"
        if text != old:
            atomic_write(path, text)


def _loads(text):
    try:
        return json.loads(text)
    except ValueError:
        return None


def _sizes(rec) -> dict[int, int]:
    found = rec.get("checkpoint_sizes") if isinstance(rec, dict) else None
    try:
        return {int(e): int(n) for e, n in (found or {}).items()}
    except (TypeError, ValueError, AttributeError):
        return {}


def _progress(rec) -> list:
    found = rec.get("progress") if isinstance(rec, dict) else None
    return found if isinstance(found, list) else []


def recorded_progress(run_name: str, out) -> list:
    """The epoch history of an unfinished pre-training as its record in ``out`` keeps it (the
    epochs it had done when a report was last written while its ``.resume.pth`` existed)."""
    return _progress(_read_json(record_path(out, run_name))) if out is not None else []


def checkpoint_sizes(run_name: str, out) -> dict[int, int]:
    """``{epoch: bytes}``: the sizes of a pre-training's checkpoints its record in ``out`` keeps."""
    return _sizes(_read_json(record_path(out, run_name))) if out is not None else {}


def recorded_result(run_name: str, out) -> dict | None:
    """The recorded result of ``run_name`` in ``out`` (see the module's doc), or None."""
    path = record_path(out, run_name)
    res = _read_json(path)
    if isinstance(res, dict) and "config" in res:  # not the sizes alone of an unfinished pre-training
        return dict(res, recorded_from=path)
    lines = [(path, rows[run_name]) for path, rows in _runs_csvs(out) if run_name in rows]
    if not lines:
        return None
    # the first line with metrics (a pre-training's lines have none: its first line)
    csv_path, row = min(lines, key=lambda pr: not _has_metric(pr[1]))
    return _from_row(row, csv_path)


def _has_metric(row) -> bool:
    return any("@" in k and (v or "").strip() for k, v in row.items() if k)


_CSV_CACHE: dict = {}  # path -> ((mtime_ns, size), {run_name: row of a finished cell})


def _runs_csvs(out):
    try:
        names = sorted(n for n in os.listdir(out) if n.endswith(".runs.csv"))
    except OSError:
        return []
    found = []
    for n in names:
        path = os.path.join(out, n)
        try:
            st = os.stat(path)
        except OSError:
            continue
        key = (st.st_mtime_ns, st.st_size)
        cached = _CSV_CACHE.get(path)
        if cached is None or cached[0] != key:
            rows = {}
            try:
                with open(path, newline="") as f:
                    for row in csv.DictReader(f):
                        name = row.get("run_name")
                        if name and row.get("status") in DONE_STATUSES and (
                                name not in rows or _has_metric(row) and not _has_metric(rows[name])):
                            rows[name] = row
            except (OSError, csv.Error):
                rows = {}
            cached = _CSV_CACHE[path] = (key, rows)
        found.append((path, cached[1]))
    return found


def _value(text):
    text = (text or "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return None


def _from_row(row: dict, path: str) -> dict:
    """A result from a ``.runs.csv`` line (leaderboard's or transfer's columns); test None when
    the line has no metric."""
    v = {k: _value(x) for k, x in row.items() if k}
    test = {k: v[k] for k in row if k and "@" in k and v[k] is not None}
    timings = {"mean_train_seconds_per_epoch": v.get("train_s_per_epoch"), "test_seconds": v.get("test_eval_s"),
               "peak_rss_mb": v.get("peak_rss_mb"),
               "total_seconds": v.get("total_s") if v.get("total_s") is not None else v.get("total_seconds")}
    res = {"test": test or None, "best_epoch": v.get("best_epoch"), "best_step": v.get("best_step"),
           "steps": v.get("steps"), "epochs_trained": v.get("epochs") or 0, "history": [],
           "timings": {k: x for k, x in timings.items() if x is not None},
           "config": {"run_name": row["run_name"]}, "recorded_from": path}
    params = {"total": v.get("params_total"), "trainable": v.get("params_trainable")}
    if params["total"] is not None:
        res["params"] = params
    return {k: x for k, x in res.items() if x is not None}


def record_note(cells) -> str | None:
    """One line for a report: how many of its finished runs come from the committed record."""
    done = [c for c in cells if c.result]
    recorded = [c for c in done if is_recorded(c.result)]
    if not recorded:
        return None
    no_curve = sum("epochs_trained" in c.result for c in recorded)  # kept from a .runs.csv line
    return (f"{len(recorded)} of the {len(done)} finished runs come from the committed record here "
            f"(`{RECORD_DIR}/<run>.json`" + (f"; {no_curve} of them from a line of a `.runs.csv`, without a "
                                             "validation curve" if no_curve else "")
            + ") rather than checkpoint_dir (saved/): their checkpoints and logs are not on this machine.")
