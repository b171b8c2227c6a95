"""Leaderboard planning: cells (model, mode, pre-trained checkpoint, seed), their resolved
configs, config hashes and run names (see :mod:`recbole_mm.leaderboard`)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field

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

# config keys added after runs were cached, with the value that reproduces what those runs computed:
# at that value a key is left out of the hash, so adding an option does not orphan finished cells
HASH_NEUTRAL = {
    "transfer_codes": "target",  # VQRec: the target's own quantiser (the only behaviour before the key)
}

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
    status: str = "pending"         # pending | running (another process, report only) | finished | skipped | failed | interrupted
    error: str | None = None
    result: dict | None = None
    ran: bool = False               # run (or resumed) by this invocation
    resumed: bool = False
    seconds: float | None = None    # wall time of this invocation's attempt
    child_peak_rss_mb: float | None = None
    stage: str = "finetune"         # finetune | pretrain (recbole-mm transfer's pre-training cells)
    dataset: str | None = None      # the cell's own dataset (transfer: targets and corpus); None: the command's
    # its pre-trained checkpoint was not on disk when planned: named with the size the committed
    # record of its pre-training keeps (``known_sizes`` of :func:`plan`); finished there, or never run
    pretrained_recorded: bool = False

    @property
    def row_key(self):
        return (self.model, self.mode_label, self.pretrained)

    def _file(self, suffix):
        return os.path.join(self.checkpoint_dir, self.run_name + suffix) if self.run_name else None

    # the run's files in checkpoint_dir: result, resume state, log, error, the cell's spec
    result_file = property(lambda self: self._file(".json"))
    resume_file = property(lambda self: self._file(".resume.pth"))
    log_file = property(lambda self: self._file(".log"))
    error_file = property(lambda self: self._file(".error.json"))
    spec_file = property(lambda self: self._file(".cell.json"))

    @property
    def label(self):
        return self.model + ("" if self.mode_label in ("-", None) else f" {self.mode_label}") \
            + (f" pt={os.path.basename(self.pretrained)}" if self.pretrained else "") \
            + (f" seed {self.seed}" if self.seed is not None else "")


# -- planning -----------------------------------------------------------------------------

MAX_SEED_COUNT = 100


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
    if n > MAX_SEED_COUNT:  # almost surely a seed meant as one: refuse rather than plan thousands of runs
        raise LeaderboardError(f"--seeds {n}: a single number is a count of seeds (at most {MAX_SEED_COUNT}); "
                               f"to run the one seed {n}, give a list: --seeds {n},")
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
    """A language-model recommender (its own seeds, marked LM): the model contract's ``IS_LANGUAGE_MODEL``."""
    from recbole_mm.model.abstract import is_language_model

    return is_language_model(cls)


def supported_modes(cls) -> tuple[str, ...] | None:
    """Modes a feature-based model supports (None: an ID-only model, modes do not apply)."""
    from recbole_mm.model.abstract import MMSequentialRecommender

    if not issubclass(cls, MMSequentialRecommender):
        return None
    from recbole_mm.model.abstract import model_stages

    stages = model_stages(cls)
    if not stages:
        return MODES
    return tuple(m for m in MODES if f"{m}_ft" in stages)


def checkpoint_size(path: str, known_sizes: dict | None = None) -> int | None:
    """A pre-trained checkpoint's size in bytes (part of a fine-tuning cell's hash): the file's;
    when it is not on disk, the size ``known_sizes`` (``{path: bytes}``: what the committed record
    of its pre-training keeps, :func:`recbole_mm.leaderboard.record.checkpoint_sizes`) gives for
    that path; else None."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return (known_sizes or {}).get(path)


def config_hash(config, pretrained: str | None, known_sizes: dict | None = None) -> str:
    """The run's hash: its resolved config (less :data:`HASH_EXCLUDE`), its data folder and the
    pre-trained checkpoint's real path and size (:func:`checkpoint_size`)."""
    from recbole_mm.config import config_to_plain

    plain = {k: v for k, v in config_to_plain(config).items()
             if k not in HASH_EXCLUDE and not (k in HASH_NEUTRAL and v == HASH_NEUTRAL[k])}
    plain["data_root"] = os.path.realpath(str(config["data_path"]))
    if pretrained:
        plain["__pretrained__"] = [os.path.realpath(pretrained), checkpoint_size(pretrained, known_sizes)]
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
         config_files=None, model_overrides=None, known_sizes=None) -> tuple[list[Cell], list[str]]:
    """The cells to run, in table order, and notes (modes a model does not support).
    ``model_overrides``: ``{model name: {key: value}}`` for that model's cells only.
    ``known_sizes``: ``{checkpoint: bytes}`` of pre-trained checkpoints not on disk whose size a
    record keeps: planned with it (the same run names as when the file existed), marked
    ``pretrained_recorded``; any other missing checkpoint is a failed cell."""
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
                    if ckpt and checkpoint_size(ckpt, known_sizes) is None:
                        raise FileNotFoundError(f"pre-trained checkpoint not found: {ckpt}")
                    cell.pretrained_recorded = bool(ckpt) and not os.path.isfile(ckpt)
                    config = build_config(cls, dataset, "finetune", mode, config_files, overrides=cell.overrides)
                    stage = str(config["train_stage"] or "")
                    cell.mode_label = stage[: -len("_ft")] if supported is not None and stage.endswith("_ft") else (
                        mode or ("-" if supported is None else stage or "-"))
                    cell.config_hash = config_hash(config, ckpt, known_sizes)
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


def _one_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return " ".join(text.split())[:500]
