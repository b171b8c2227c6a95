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
* The record: writing a report also writes what it reads of each finished result (metrics,
  curve, timings; no checkpoint) to ``<out>/runs/<run>.json``, committed with the report.
  Without ``<checkpoint_dir>/<run>.json`` (``saved/`` is git-ignored: a fresh clone) a cell is
  finished when that record, or a finished line with its run name in ``<out>/*.runs.csv``,
  exists (:mod:`.record`; ``--rerun`` ignores it too).
* Resume: a cell interrupted mid-training has ``<run>.resume.pth`` (state after its last
  complete epoch); with ``--resume`` it continues from there (the run's ``--resume``),
  otherwise it starts again from scratch.
* Modes: ``--mode inductive,transductive`` gives feature-based models (our models) one row
  per mode they support (Recformer and Reo-LM are ID-free: inductive only); ID-only models
  (SASRec & co.) ignore it and have one row.  Without ``--mode`` every model runs its props'
  stage.
* Seeds: ``--seeds 3`` is seeds 2020, 2021, 2022 (from ``--seed`` when given), ``--seeds
  1,7,42`` an explicit list; language-model recommenders (the model contract's ``IS_LANGUAGE_MODEL``: Recformer, ReoLM) take
  ``--lm-seeds`` instead (e.g. 1), marked "LM" in the table.
* ``--pretrained MODEL=CKPT`` (repeatable) adds rows for MODEL fine-tuned from CKPT, next to
  its from-scratch rows when MODEL is also in ``-m``.

Modules: :mod:`.plan` (cells, config hashes, run names), :mod:`.execute` (one process per cell,
claims, :func:`leaderboard`), :mod:`.record` (the committed record of finished cells),
:mod:`.stats` (mean +- std, rows), :mod:`.report` (table, CSVs, chart), :mod:`.cli` (the
sub-command).
"""

from recbole_mm.leaderboard.plan import (  # noqa: F401
    DEFAULT_SEED,
    HASH_EXCLUDE,
    METRIC_NAMES,
    METRIC_ORDER,
    MODES,
    Cell,
    LeaderboardError,
    _one_line,
    _safe,
    checkpoint_size,
    config_hash,
    is_lm,
    parse_model_overrides,
    parse_pretrained,
    parse_seeds,
    plan,
    split_list,
    supported_modes,
)
from recbole_mm.leaderboard.stats import Row, _fmt, _mean_std, _num, build_rows, metric_keys, metric_title  # noqa: F401
from recbole_mm.leaderboard.report import _machine, _md_escape, save_figure, write_chart, write_report  # noqa: F401
from recbole_mm.leaderboard.execute import (  # noqa: F401
    _read_json,
    claim,
    execute,
    finished_result,
    leaderboard,
    mark_unfinished,
    release,
    run_cell,
)
