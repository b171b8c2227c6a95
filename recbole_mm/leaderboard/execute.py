"""Running leaderboard cells: each in its own process (subprocess or fork), claimed so that
concurrent leaderboard / transfer processes never run the same cell, with its result, error and
log files; :func:`leaderboard` runs the missing cells of a plan and rewrites the report."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback

from recbole_mm.leaderboard.plan import Cell, LeaderboardError, _one_line, plan
from recbole_mm.leaderboard.record import _read_json, is_recorded, recorded_result
from recbole_mm.leaderboard.report import write_report
from recbole_mm.leaderboard.stats import _metric_key, metric_title
from recbole_mm.utils import pid_alive, write_json


def finished_result(cell: Cell, out=None) -> dict | None:
    """The cell's result when it is finished: its run's ``<checkpoint_dir>/<run>.json``; when that
    is missing and ``out`` (a report folder) is given, the committed record there
    (:func:`recbole_mm.leaderboard.record.recorded_result`, marked ``recorded_from``)."""
    if not cell.run_name:
        return None
    res = _usable(cell, _read_json(cell.result_file))
    if res is None and out is not None:
        res = _usable(cell, recorded_result(cell.run_name, out))
    return res


def _usable(cell: Cell, res) -> dict | None:
    if not isinstance(res, dict) or (res.get("config") or {}).get("run_name") != cell.run_name:
        return None
    if res.get("test") is None and cell.stage != "pretrain":  # pre-training has no test split
        return None
    return res


def _write_json(obj, path):
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


@contextlib.contextmanager
def _terminate_as_interrupt():
    """While a cell's process runs: SIGTERM to this process (``kill``, ``timeout``, a job
    scheduler) is handled as Ctrl-C is, so the cell's process is stopped with it and the cell is
    reported interrupted, instead of the cell running on, orphaned, with nobody holding its claim."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
            pid = _claim_holder(cell)
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


def _claim_holder(cell: Cell) -> int:
    """The pid written in the cell's claim (0: no claim, or unreadable)."""
    try:
        with open(cell._file(".claim")) as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def running_elsewhere(cell: Cell) -> bool:
    """Whether another live process holds the cell's claim (it is being run now)."""
    pid = _claim_holder(cell)
    return bool(pid) and pid != os.getpid() and pid_alive(pid)


def mark_unfinished(cell: Cell) -> None:
    """--report-only, a cell without a result: "running" while another live process holds it,
    "failed" when its last attempt left an error, else it stays pending."""
    if not cell.run_name:
        return
    if running_elsewhere(cell):
        cell.status = "running"
        return
    err = _read_json(cell.error_file)
    if err and err.get("error"):
        cell.status, cell.error = "failed", err["error"] + " (last attempt)"


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
            with _terminate_as_interrupt():
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
    result = finished_result(cell) if code == 0 else None  # the run's own file, never the record
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
        res = None if rerun else finished_result(c, out)
        if res is not None:
            c.status, c.result = "skipped", res
        elif report_only:
            mark_unfinished(c)
        else:
            todo.append(c)
    n_done = sum(c.result is not None for c in cells)
    n_recorded = sum(is_recorded(c.result) for c in cells)
    log(f"leaderboard {dataset}: {len(cells)} cells, {n_done} finished before"
        + (f" ({n_recorded} read from the record in {out})" if n_recorded else "") + f", {len(todo)} to run")

    def report():
        return write_report(dataset, cells, notes, out, command, seeds_desc, lm_desc)

    try:
        for i, c in enumerate(todo, 1):
            res = None if rerun else finished_result(c, out)
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
