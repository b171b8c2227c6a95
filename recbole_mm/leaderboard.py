"""``recbole-mm leaderboard``: every model on one dataset, several seeds, one table and chart.

    recbole-mm leaderboard -d Scientific_mm -m SASRec,UniSRec,MISSRec --mode inductive,transductive \\
        --seeds 3 --data_path ../shared/data --out results/

A *cell* is one (model, mode, pre-trained checkpoint, seed) run of ``recbole_mm.quick_start.run``
(fine-tuning stage, the model's props, the ``--key=value`` overrides given to every cell).  A
*row* of the table is a cell's seeds: RecBole's full-ranking test metrics as mean +- sample std
(ddof 1) over the finished seeds, parameter counts, seconds per training epoch, evaluation
seconds and peak RSS.  Outputs in ``--out``: ``<dataset>.md`` (table, failures, the command),
``<dataset>.csv`` (one line per row), ``<dataset>.runs.csv`` (one line per cell) and
``<dataset>.png`` (test metric per row, validation curve per epoch).

* Isolation: each cell runs in its own process (``--isolation subprocess``, default: a fresh
  interpreter; ``fork``: a fork of this process, no import cost), so a crash, an
  out-of-memory kill or a ``--timeout`` of one cell never stops the others and the peak RSS
  is the cell's own.  A failed cell appears in the table with its error; its output is in
  ``<checkpoint_dir>/<run>.log``.
* Names and skipping: a cell's run name is ``lb-<dataset>-<Model>[-<mode>][-pt-<ckpt>]-s<seed>-<hash>``
  where ``<hash>`` digests the cell's resolved config (props, config files, overrides, seed;
  not the display/device keys of :data:`HASH_EXCLUDE`) and the pre-trained checkpoint's path
  and size.  Its result is the run's own ``<checkpoint_dir>/<run>.json`` (default ``saved/``,
  next to ``<run>.pth``): when it exists the cell is finished and is not run again
  (``--rerun`` runs it anyway).  A changed config is a new name, so stale results are never
  reused.
* Resume: a cell interrupted mid-training has ``<run>.resume.pth`` (state after its last
  complete epoch); with ``--resume`` it continues from there (the run's ``--resume``),
  otherwise it starts again from scratch.
* Modes: ``--mode inductive,transductive`` gives feature-based models (our models) one row
  per mode they support (Recformer and Reo-LM are ID-free: inductive only); ID-only models
  (SASRec & co.) ignore it and have one row.  Without ``--mode`` every model runs its props'
  stage.
* Seeds: ``--seeds 3`` is seeds 2020, 2021, 2022 (from ``--seed`` when given), ``--seeds
  1,7,42`` an explicit list; language-model recommenders (:data:`LM_MODELS`) take
  ``--lm-seeds`` instead (e.g. 1), marked "LM" in the table.
* ``--pretrained MODEL=CKPT`` (repeatable) adds rows for MODEL fine-tuned from CKPT, next to
  its from-scratch rows when MODEL is also in ``-m``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field

from recbole_mm.utils import pid_alive

LM_MODELS = ("Recformer", "ReoLM")
MODES = ("inductive", "transductive")
DEFAULT_SEED = 2020  # props/overall.yaml

# config keys that do not change what a run computes (display, logging, device placement,
# where files go): left out of a cell's config hash
HASH_EXCLUDE = frozenset({
    "run_name", "checkpoint_dir", "show_progress", "state", "log_wandb", "wandb_project",
    "device", "use_gpu", "gpu_id", "local_rank", "world_size", "single_spec", "nproc", "offset",
    "ip", "port", "dist_timeout", "worker", "data_path", "data_root",
    "encoding",  # how a byte-order mark is read, not what is trained: cells of earlier runs stay finished
})

METRIC_ORDER = ("recall", "ndcg", "mrr", "hit", "precision", "map")
METRIC_NAMES = {"recall": "Recall", "ndcg": "NDCG", "mrr": "MRR", "hit": "Hit", "precision": "Precision",
                "map": "MAP"}


class LeaderboardError(ValueError):
    """A usage error of the leaderboard command (reported in one line)."""


@dataclass
class Cell:
    model: str                      # the name asked for (canonical class name once resolved)
    mode: str | None                # inductive / transductive / None (ID model or the props' stage)
    pretrained: str | None
    seed: int | None
    lm: bool = False
    mode_label: str = "-"
    run_name: str | None = None
    config_hash: str | None = None
    checkpoint_dir: str | None = None
    overrides: dict = field(default_factory=dict)
    status: str = "pending"         # pending | finished | skipped | failed | interrupted
    error: str | None = None
    result: dict | None = None
    ran: bool = False               # run (or resumed) by this invocation
    resumed: bool = False
    seconds: float | None = None    # wall time of this invocation's attempt
    child_peak_rss_mb: float | None = None
    stage: str = "finetune"         # finetune | pretrain (recbole-mm transfer's pre-training cells)
    dataset: str | None = None      # the cell's own dataset (transfer: targets and corpus); None: the command's

    @property
    def row_key(self):
        return (self.model, self.mode_label, self.pretrained)

    def _file(self, suffix):
        return os.path.join(self.checkpoint_dir, self.run_name + suffix) if self.run_name else None

    @property
    def result_file(self):
        return self._file(".json")

    @property
    def resume_file(self):
        return self._file(".resume.pth")

    @property
    def log_file(self):
        return self._file(".log")

    @property
    def error_file(self):
        return self._file(".error.json")

    @property
    def spec_file(self):
        return self._file(".cell.json")

    @property
    def label(self):
        return self.model + ("" if self.mode_label in ("-", None) else f" {self.mode_label}") \
            + (f" pt={os.path.basename(self.pretrained)}" if self.pretrained else "") \
            + (f" seed {self.seed}" if self.seed is not None else "")


# -- planning -----------------------------------------------------------------------------

def parse_seeds(value, base: int = DEFAULT_SEED) -> list[int]:
    """``"3"`` -> ``[base, base+1, base+2]``; ``"1,7,42"`` -> ``[1, 7, 42]``."""
    if isinstance(value, int):
        n = value
    elif isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    else:
        text = str(value).strip()
        if "," in text:
            try:
                return [int(v) for v in text.split(",") if v.strip()]
            except ValueError:
                raise LeaderboardError(f"--seeds: a count or a comma-separated list of integers, got {value!r}") from None
        try:
            n = int(text)
        except ValueError:
            raise LeaderboardError(f"--seeds: a count or a comma-separated list of integers, got {value!r}") from None
    if n < 1:
        raise LeaderboardError(f"--seeds must be >= 1, got {n}")
    return [base + i for i in range(n)]


def parse_pretrained(items) -> list[tuple[str, str]]:
    out = []
    for item in items or []:
        name, eq, path = str(item).partition("=")
        if not eq or not name or not path:
            raise LeaderboardError(f"--pretrained takes MODEL=CKPT, got {item!r}")
        out.append((name.strip(), path.strip()))
    return out


def split_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [v.strip() for v in str(value).split(",") if v.strip()]


def is_lm(cls) -> bool:
    return any(c.__name__ in LM_MODELS for c in cls.__mro__)


def supported_modes(cls) -> tuple[str, ...] | None:
    """Modes a feature-based model supports (None: an ID-only model, modes do not apply)."""
    from recbole_mm.model.abstract import MMSequentialRecommender

    if not issubclass(cls, MMSequentialRecommender):
        return None
    stages = next((getattr(sys.modules.get(c.__module__), "STAGES", None) for c in cls.__mro__
                   if getattr(sys.modules.get(c.__module__), "STAGES", None)), None)  # the model's module's, or a base's
    if not stages:
        return MODES
    return tuple(m for m in MODES if f"{m}_ft" in stages)


def config_hash(config, pretrained: str | None) -> str:
    from recbole_mm.config import config_to_plain

    plain = {k: v for k, v in config_to_plain(config).items() if k not in HASH_EXCLUDE}
    plain["data_root"] = os.path.realpath(str(config["data_path"]))
    if pretrained:
        plain["__pretrained__"] = [os.path.realpath(pretrained),
                                   os.path.getsize(pretrained) if os.path.isfile(pretrained) else None]
    blob = json.dumps(plain, sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:10]


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text).strip("_")


def parse_model_overrides(items) -> dict[str, dict[str, str]]:
    """``["Recformer:epochs=2", ...]`` -> ``{"Recformer": {"epochs": "2"}}`` (``--set``)."""
    out: dict[str, dict[str, str]] = {}
    for item in items or []:
        model, sep, kv = str(item).partition(":")
        key, eq, value = kv.partition("=")
        if not sep or not eq or not model.strip() or not key.strip():
            raise LeaderboardError(f"--set: expected MODEL:key=value (e.g. Recformer:epochs=2), got {item!r}")
        out.setdefault(model.strip(), {})[key.strip().lstrip("-")] = value.strip()
    return out


def plan(dataset, models, modes=None, pretrained=None, seeds=3, lm_seeds=None, overrides=None,
         config_files=None, model_overrides=None) -> tuple[list[Cell], list[str]]:
    """The cells to run, in table order, and notes (modes a model does not support).
    ``model_overrides``: ``{model name: {key: value}}`` for that model's cells only."""
    from recbole_mm.quick_start import build_config
    from recbole_mm.utils import get_model

    model_overrides = dict(model_overrides or {})
    for name in model_overrides:
        try:
            get_model(name)
        except Exception:
            raise LeaderboardError(f"--set {name}:...: unknown model {name!r}") from None
    overrides = {k: str(v) for k, v in (overrides or {}).items()}
    overrides.setdefault("show_progress", "False")  # no progress bars in the cells' log files
    base = int(overrides.pop("seed", DEFAULT_SEED))
    seed_list = parse_seeds(seeds, base)
    lm_seed_list = parse_seeds(lm_seeds, base) if lm_seeds is not None else seed_list
    modes = split_list(modes)
    for m in modes:
        if m not in MODES:
            raise LeaderboardError(f"--mode: each of {', '.join(MODES)}, got {m!r}")
    entries = [(name, None) for name in split_list(models)] + list(parse_pretrained(pretrained))
    if not entries:
        raise LeaderboardError("no model given (-m SASRec,UniSRec,...)")
    cells, notes, seen = [], [], set()
    for name, ckpt in entries:
        try:
            cls = get_model(name)
        except Exception as e:  # unknown model: one failed cell, reported in the table
            cells.append(Cell(name, None, ckpt, None, status="failed", error=_one_line(e)))
            continue
        lm = is_lm(cls)
        supported = supported_modes(cls)
        if supported is None or not modes:
            cell_modes = [None]
        else:
            cell_modes = [m for m in modes if m in supported]
            for m in modes:
                if m not in supported:
                    notes.append(f"{cls.__name__}: no {m} mode (supports {', '.join(supported)}); not run")
        for mode in cell_modes:
            for seed in (lm_seed_list if lm else seed_list):
                cell = Cell(cls.__name__, mode, ckpt, seed, lm=lm)
                own = {k: v for n, kv in model_overrides.items() if get_model(n) is cls for k, v in kv.items()}
                cell.overrides = dict(overrides, **own, seed=str(seed))
                try:
                    if ckpt and not os.path.isfile(ckpt):
                        raise FileNotFoundError(f"pre-trained checkpoint not found: {ckpt}")
                    config = build_config(cls, dataset, "finetune", mode, config_files, overrides=cell.overrides)
                    stage = str(config["train_stage"] or "")
                    cell.mode_label = stage[: -len("_ft")] if supported is not None and stage.endswith("_ft") else (
                        mode or ("-" if supported is None else stage or "-"))
                    cell.config_hash = config_hash(config, ckpt)
                    cell.checkpoint_dir = str(config["checkpoint_dir"] or "saved")
                    pt = f"-pt-{_safe(os.path.splitext(os.path.basename(ckpt))[0])}" if ckpt else ""
                    tag = "" if cell.mode_label == "-" else f"-{cell.mode_label}"
                    cell.run_name = _safe(f"lb-{dataset}-{cls.__name__}{tag}{pt}-s{seed}-{cell.config_hash}")
                    cell.overrides["run_name"] = cell.run_name
                except Exception as e:
                    cell.mode_label = mode or "-"
                    cell.status, cell.error = "failed", _one_line(e)
                if cell.run_name and cell.run_name in seen:  # the same cell asked for twice
                    continue
                seen.add(cell.run_name)
                cells.append(cell)
    return cells, notes


# -- running ------------------------------------------------------------------------------

def _one_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return " ".join(text.split())[:500]


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def finished_result(cell: Cell) -> dict | None:
    if not cell.run_name:
        return None
    res = _read_json(cell.result_file)
    if not res or (res.get("config") or {}).get("run_name") != cell.run_name:
        return None
    if res.get("test") is None and cell.stage != "pretrain":  # pre-training has no test split
        return None
    return res


def _write_json(obj, path):
    from recbole_mm.quick_start import write_json

    write_json(obj, path)


def run_cell(spec_file: str) -> int:
    """Run one cell (in its own process): ``run(...)`` with the cell's arguments; on an error,
    write ``{"error": ..., "traceback": ...}`` to the cell's error file."""
    with open(spec_file) as f:
        spec = json.load(f)
    try:
        from recbole_mm.quick_start import run

        run(spec["model"], spec["dataset"], spec.get("stage", "finetune"), mode=spec["mode"], pretrained=spec["pretrained"],
            resume=spec["resume"], config_files=spec["config_files"], overrides=spec["overrides"])
    except BaseException as e:  # noqa: BLE001 - every failure is the cell's result
        traceback.print_exc()
        _write_json({"error": _one_line(e), "traceback": traceback.format_exc()}, spec["error_file"])
        return 130 if isinstance(e, KeyboardInterrupt) else 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return 0


def _launch(cell: Cell, isolation: str, log):
    """Start the cell's process; returns (pid, popen or None)."""
    if isolation == "subprocess":
        proc = subprocess.Popen([sys.executable, "-m", "recbole_mm.leaderboard", "_cell", cell.spec_file],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return proc.pid, proc
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: output to the cell's log, run, exit without returning to the caller
        code = 1
        try:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            sys.stdout = sys.stderr = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
            code = run_cell(cell.spec_file)
        finally:
            os._exit(code)
    return pid, None


def _wait(pid, proc, timeout):
    """Wait for the child; returns (exit code or -signal, peak RSS MB, timed_out)."""
    start, timed_out, killed_at = time.monotonic(), False, None
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        elapsed = time.monotonic() - start
        if timeout and elapsed > timeout and not timed_out:
            timed_out, killed_at = True, time.monotonic()
            os.kill(pid, signal.SIGTERM)
        elif killed_at is not None and time.monotonic() - killed_at > 30:
            os.kill(pid, signal.SIGKILL)
            killed_at = float("inf")
        time.sleep(0.1)
    code = os.waitstatus_to_exitcode(status)
    if proc is not None:
        proc.returncode = code
    return code, usage.ru_maxrss / 1024, timed_out


def _tail(path, n=3000):
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - n))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def claim(cell: Cell) -> bool:
    """Take the cell for this process (``<run>.claim`` created exclusively, holding our pid), so
    that two leaderboard / transfer processes sharing checkpoint_dir never run the same cell at
    once; False when a live process holds it.  A claim left by a dead process is taken over."""
    path = cell._file(".claim")
    os.makedirs(cell.checkpoint_dir, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(path) as f:
                    pid = int(f.read().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid_alive(pid):
                return False
            try:
                os.unlink(path)  # stale: its process is gone
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def release(cell: Cell) -> None:
    try:
        os.unlink(cell._file(".claim"))
    except FileNotFoundError:
        pass


def execute(cell: Cell, dataset, config_files, resume: bool, isolation: str, timeout, say) -> None:
    """Run (or resume) one cell in its own process and fill in its status/result/error."""
    resume_from = cell.resume_file if resume and os.path.isfile(cell.resume_file) else None
    if os.path.isfile(cell.resume_file) and not resume_from:
        say(f"  {cell.run_name}: a previous attempt left {os.path.basename(cell.resume_file)}; starting again "
            "(--resume continues from it)")
    spec = {"model": cell.model, "dataset": cell.dataset or dataset, "stage": cell.stage, "mode": cell.mode,
            "pretrained": cell.pretrained,
            "resume": resume_from, "config_files": config_files, "overrides": cell.overrides,
            "error_file": cell.error_file}
    os.makedirs(cell.checkpoint_dir, exist_ok=True)
    _write_json(spec, cell.spec_file)
    if os.path.exists(cell.error_file):
        os.unlink(cell.error_file)
    cell.ran, cell.resumed = True, bool(resume_from)
    t0 = time.monotonic()
    with open(cell.log_file, "a") as log:
        log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {cell.label}"
                  + (f" (resumed from {resume_from})" if resume_from else "") + "\n")
        log.flush()
        pid, proc = _launch(cell, isolation, log)
        try:
            code, peak, timed_out = _wait(pid, proc, timeout)
        except KeyboardInterrupt:
            try:
                os.kill(pid, signal.SIGTERM)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            cell.status, cell.error = "interrupted", "interrupted (--resume continues from the last finished epoch)"
            cell.seconds = time.monotonic() - t0
            raise
    cell.seconds, cell.child_peak_rss_mb = time.monotonic() - t0, peak
    result = finished_result(cell) if code == 0 else None
    if result is not None:
        cell.status, cell.result, cell.error = "finished", result, None
        return
    err = _read_json(cell.error_file) or {}
    if timed_out:
        msg = f"timed out after {timeout:g} s (--resume continues from the last finished epoch)"
    elif err.get("error"):
        msg = err["error"]
    elif code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        msg = f"killed by {name}" + (" (out of memory?)" if -code == signal.SIGKILL else "")
    elif code == 0:
        msg = f"finished without its result file {cell.result_file}"
    else:
        last = [ln for ln in _tail(cell.log_file).splitlines() if ln.strip()]
        msg = f"exit status {code}" + (f": {last[-1].strip()}" if last else "")
    cell.status, cell.error = "failed", msg
    if not err.get("error"):
        _write_json({"error": msg}, cell.error_file)


# -- report -------------------------------------------------------------------------------

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
        pending = n - ok - len(failed)
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
    epochs = _mean_std([len(c.result.get("history") or []) for c in done])[0]
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


def write_report(dataset, cells, notes, out, command=None, seeds_desc="", lm_seeds_desc=None) -> dict:
    os.makedirs(out, exist_ok=True)
    rows = build_rows(cells)
    keys = metric_keys(cells)
    paths = {"md": os.path.join(out, f"{dataset}.md"), "csv": os.path.join(out, f"{dataset}.csv"),
             "runs_csv": os.path.join(out, f"{dataset}.runs.csv"), "png": os.path.join(out, f"{dataset}.png")}
    chart = write_chart(dataset, rows, keys, paths["png"])
    if not chart:
        paths["png"] = None
    _atomic_text(paths["csv"], _rows_csv(rows, keys))
    _atomic_text(paths["runs_csv"], _runs_csv(cells, keys))
    _atomic_text(paths["md"], _markdown(dataset, rows, keys, notes, command, paths, seeds_desc, lm_seeds_desc))
    return paths


def _atomic_text(path, text):
    """Write ``text`` to ``path`` through a uniquely named temporary file in the same folder
    (concurrent leaderboard / transfer processes rewrite the same report)."""
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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


def _num(v):
    if v is None:
        return ""
    return f"{v:.6g}" if isinstance(v, float) else str(v)


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
                    c.run_name or "", c.result_file if c.result else ""]
                   + [_num((res.get("test") or {}).get(k)) for k in keys]
                   + [_num(p.get("total")), _num(p.get("trainable")), _num(len(res.get("history") or []) if res else None),
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
    valid_metrics = {str((c.result.get("config") or {}).get("valid_metric")) for r in rows for c in r.done}
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
        lines += [f"LM: language-model recommender ({', '.join(LM_MODELS)}) in its props' small CPU "
                  f"configuration, run with {lm_seeds_desc or 'fewer'} seed(s) instead of {seeds_desc}.", ""]
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
                 f"its checkpoint_dir as `<run>.json`, `<run>.pth`, `<run>.log` (run names in the per-seed CSV).")
    lines.append("")
    lines.append(f"Machine: {_machine()}.")
    lines.append("")
    return "\n".join(lines)


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
    tmp = f"{path}.{os.getpid()}.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# -- the command ---------------------------------------------------------------------------

def leaderboard(dataset, models, modes=None, pretrained=None, seeds=3, lm_seeds=None, overrides=None,
                config_files=None, out="results", resume=False, rerun=False, isolation="subprocess",
                timeout=None, report_only=False, command=None, log=print, model_overrides=None) -> dict:
    """Run every missing cell and write the report; returns ``{"cells": [...], "paths": {...}}``."""
    if isolation not in ("subprocess", "fork"):
        raise LeaderboardError(f"isolation must be 'subprocess' or 'fork', got {isolation!r}")
    if isolation == "fork" and not hasattr(os, "fork"):
        raise LeaderboardError("--isolation fork needs os.fork (Linux/macOS)")
    for f in config_files or []:
        if not os.path.isfile(f):
            raise LeaderboardError(f"config file not found: {f}")
    cells, notes = plan(dataset, models, modes, pretrained, seeds, lm_seeds, overrides, config_files, model_overrides)
    seeds_desc = str(seeds)
    lm_desc = str(lm_seeds) if lm_seeds is not None else None
    todo = []
    for c in cells:
        if c.status == "failed":
            continue
        res = None if rerun else finished_result(c)
        if res is not None:
            c.status, c.result = "skipped", res
        elif report_only:
            err = _read_json(c.error_file) if c.run_name else None
            if err and err.get("error"):
                c.status, c.error = "failed", err["error"] + " (last attempt)"
        else:
            todo.append(c)
    n_done = sum(c.result is not None for c in cells)
    log(f"leaderboard {dataset}: {len(cells)} cells, {n_done} finished before, {len(todo)} to run")

    def report():
        return write_report(dataset, cells, notes, out, command, seeds_desc, lm_desc)

    try:
        for i, c in enumerate(todo, 1):
            res = None if rerun else finished_result(c)
            if res is not None:  # finished meanwhile by another leaderboard process sharing checkpoint_dir
                c.status, c.result = "skipped", res
                log(f"[{i}/{len(todo)}] {c.label}: finished meanwhile by another process, skipped")
                continue
            if not claim(c):
                c.status = "pending"
                log(f"[{i}/{len(todo)}] {c.label}: being run by another process, skipped")
                continue
            log(f"[{i}/{len(todo)}] {c.label} -> {c.run_name}")
            try:
                execute(c, dataset, config_files, resume, isolation, timeout, log)
            finally:
                release(c)
            log(f"  {c.status} in {c.seconds:.1f} s" + (f": {c.error}" if c.error else
                "" if not c.result else f": test {_headline(c.result)}"))
            report()  # after every cell, so that an interruption keeps what is done
    except KeyboardInterrupt:
        report()
        raise
    paths = report()
    log(f"wrote {paths['md']}, {paths['csv']}" + (f", {paths['png']}" if paths["png"] else ""))
    return {"cells": cells, "paths": paths, "notes": notes}


def _headline(result):
    test = result.get("test") or {}
    return ", ".join(f"{metric_title(k)} {v:.4f}" for k, v in sorted(test.items(), key=lambda kv: _metric_key(kv[0]))[:2])


DESCRIPTION = """\
Run every model on one dataset with several seeds and write <out>/<dataset>.md, .csv,
.runs.csv and .png: RecBole's full-ranking test metrics (mean +- std over seeds), parameter
counts, seconds per training epoch, evaluation seconds, peak RSS, validation curves.

Each cell (model, mode, pre-trained checkpoint, seed) is one fine-tuning run (the model's
props + the overrides) in its own process; a cell that fails is reported with its error and
the others still run.  A cell's result is its run's <checkpoint_dir>/<run>.json (saved/ by
default; <run> = lb-<dataset>-<Model>[-<mode>][-pt-<ckpt>]-s<seed>-<config hash>), next to its
checkpoint and its log <run>.log: a finished cell is skipped when the command is run again
(same config = same name), an interrupted one continues from <run>.resume.pth with --resume.
ID-only models (SASRec, ...) ignore --mode; language-model recommenders (Recformer, ReoLM)
take --lm-seeds and are marked LM.
"""

EPILOG = """\
examples:
  recbole-mm leaderboard -d Scientific_mm -m SASRec,UniSRec,MISSRec,PMMRec,Recformer,ReoLM \\
      --mode inductive,transductive --seeds 3 --lm-seeds 1 --data_path ../shared/data --out results/
  # pre-trained rows next to the from-scratch ones, config overrides for every run
  recbole-mm leaderboard -d Scientific_mm -m SASRec,UniSRec --pretrained UniSRec=saved/UniSRec-pt.pth \\
      --data_path ../shared/data --epochs=50
  # the language-model recommenders' small CPU run: 2 epochs, 1 seed
  recbole-mm leaderboard -d Scientific_mm -m SASRec,Recformer --lm-seeds 1 --set Recformer:epochs=2 ...
  # after an interruption: finished cells are skipped, interrupted ones continue
  recbole-mm leaderboard ... --resume
  # only rewrite the report from the finished cells
  recbole-mm leaderboard ... --report-only

Any other --key=value (or --key value) is a config override given to every run (as for finetune).
"""


def register(sub) -> None:
    p = sub.add_parser(
        "leaderboard",
        help="compare models on one dataset over seeds: results/<dataset>.md, .csv and .png",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # --seed=5 is a config override, not --seeds
    )
    p.add_argument("-d", "--dataset", required=True, help="dataset folder under data_path")
    p.add_argument("-m", "--models", required=True, metavar="M1,M2,...", help="comma-separated model names")
    p.add_argument("--mode", default=None, metavar="inductive,transductive",
                   help="transfer modes for feature-based models, one row each (ID-only models ignore it); "
                        "default: each model's props")
    p.add_argument("--pretrained", "-p", action="append", default=[], metavar="MODEL=CKPT",
                   help="also fine-tune MODEL from this pre-trained checkpoint (repeatable)")
    p.add_argument("--seeds", default="3", metavar="N|S1,S2,...",
                   help="seeds per cell: a count (from --seed, default 2020) or a list (default: 3)")
    p.add_argument("--lm-seeds", "--lm_seeds", dest="lm_seeds", default=None, metavar="N|S1,...",
                   help=f"seeds for the language-model recommenders ({', '.join(LM_MODELS)}); default: --seeds")
    p.add_argument("--set", action="append", default=[], metavar="MODEL:key=value", dest="model_set",
                   help="a config override for one model's cells only (repeatable), e.g. Recformer:epochs=2")
    p.add_argument("--data_path", "--data-path", dest="data_path", default=None, metavar="DIR",
                   help="folder holding the dataset folder (a config override for every run)")
    p.add_argument("--config_files", nargs="+", default=None, metavar="YAML", help="extra YAML files for every run")
    p.add_argument("--out", default="results", metavar="DIR", help="report folder (default: results/)")
    p.add_argument("--resume", action="store_true",
                   help="continue interrupted cells from their <run>.resume.pth (default: start them again)")
    p.add_argument("--rerun", action="store_true", help="run finished cells again (default: skip them)")
    p.add_argument("--report-only", action="store_true", help="run nothing; write the report from finished cells")
    p.add_argument("--isolation", choices=["subprocess", "fork"], default="subprocess",
                   help="each cell in a fresh Python process (default) or a fork of this one (no import time; "
                        "only from a process that has not run torch ops: OpenMP pools do not survive fork)")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="stop a cell after this long (it is reported as failed; --resume continues it)")
    p.set_defaults(func=main, config_overrides=True)


def main(args) -> int:
    overrides = dict(getattr(args, "overrides", None) or {})
    if args.data_path:
        overrides["data_path"] = args.data_path
    argv = getattr(args, "argv", None)  # the whole command line (set by recbole_mm.cli)
    # the command that runs the cells (a --report-only / --resume re-run shows the same)
    command = "recbole-mm " + shlex.join([a for a in argv if a not in ("--report-only", "--resume")]) if argv else None
    try:
        res = leaderboard(args.dataset, args.models, modes=args.mode, pretrained=args.pretrained, seeds=args.seeds,
                          lm_seeds=args.lm_seeds, overrides=overrides, config_files=args.config_files, out=args.out,
                          model_overrides=parse_model_overrides(args.model_set),
                          resume=args.resume, rerun=args.rerun, isolation=args.isolation, timeout=args.timeout,
                          report_only=args.report_only, command=command)
    except LeaderboardError as e:
        print(f"recbole-mm leaderboard: error: {e}", file=sys.stderr)
        return 2
    failed = [c for c in res["cells"] if c.status == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_cell":  # one cell, in its own process (see _launch)
        sys.exit(run_cell(sys.argv[2]))
    from recbole_mm.cli import main as cli_main

    sys.exit(cli_main(["leaderboard", *sys.argv[1:]]))
