"""Transfer planning: the pre-training, fine-tuning, zero-shot and baseline cells (see :mod:`recbole_mm.transfer`)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from recbole_mm import leaderboard as lb
from recbole_mm.leaderboard import Cell, LeaderboardError
from recbole_mm.leaderboard.record import checkpoint_sizes, is_recorded

DEFAULT_METRIC = "ndcg@10"
SECOND_METRIC = "recall@10"
NOT_RUN = "not run"  # the status of a cell whose pre-trained checkpoint is only in the record (not a failure)


@dataclass
class TransferPlan:
    pretrain: list[Cell]          # one per model
    finetune: list[Cell]          # scratch and pre-trained, every target/mode/fraction/seed
    zero_shot: list[Cell]         # epochs=0: pre-trained and untrained
    baselines: list[Cell]         # Popularity per target and fraction; TextSim per target
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
        own_length = _own_epochs(cls.__name__, own)
        if own_length is not None:  # --pt-set MODEL:epochs=N: this model pre-trains N epochs, whatever the others do
            ov["epochs"] = str(own_length)
        elif pt_epochs or curve:  # long enough for the transferred checkpoint and every point of the curve
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
            cell.transfer_epoch = min(int(pt_epochs or config["epochs"]), int(config["epochs"]))
        except Exception as e:  # noqa: BLE001 - a cell's failure is reported, the others go on
            cell.status, cell.error = "failed", lb._one_line(e)
        cells.append(cell)
    return cells


def _own_epochs(model: str, own: dict) -> int | None:
    """A model's own pre-training length (``--pt-set MODEL:epochs=N``), or None."""
    if "epochs" not in own:
        return None
    try:
        n = int(own["epochs"])
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise LeaderboardError(f"--pt-set {model}:epochs: a whole number >= 1, got {own['epochs']!r}")
    return n


def _why_no_checkpoint(cell: Cell) -> str:
    if is_recorded(cell.result):
        return ("its pre-training is finished in the committed record, but its checkpoints are not in "
                f"{cell.checkpoint_dir}: run without --no-pretrain / --report-only to pre-train again")
    return "pre-training not that far"


def _other_pretraining(cell: Cell) -> str:
    """A hint when the same model was pre-trained on the same corpus with another configuration
    (most often another total length: ``--pt-epochs`` / ``--curve`` / ``--pt-set MODEL:epochs``
    set it, and it is part of the run's hash) and that run has the checkpoint this one lacks."""
    import glob
    import json

    if not cell.run_name or not getattr(cell, "config_hash", None) or not getattr(cell, "transfer_epoch", None):
        return ""
    prefix = cell.run_name[: -len(cell.config_hash)]
    found = []
    for path in sorted(glob.glob(os.path.join(glob.escape(cell.checkpoint_dir), f"{glob.escape(prefix)}*-{cell.transfer_epoch}.pth"))):
        run = os.path.basename(path)[: -len(f"-{cell.transfer_epoch}.pth")]
        if run == cell.run_name or "-" in run[len(prefix):]:
            continue
        try:
            with open(os.path.join(cell.checkpoint_dir, run + ".cell.json")) as f:
                epochs = (json.load(f).get("overrides") or {}).get("epochs")
        except (OSError, ValueError):
            epochs = None
        found.append(run + (f" (epochs={epochs})" if epochs else ""))
    if not found:
        return ""
    mine = (getattr(cell, "overrides", None) or {}).get("epochs")
    return (f". Another pre-training of {cell.model} on this corpus has that checkpoint: {', '.join(found)}; "
            f"this plan's run differs in its configuration" + (f" (epochs={mine})" if mine else "")
            + ": the same --pt-epochs / --curve / --pt-set as that run reuse it")


def checkpoint_of(cell: Cell, epoch: int | None = None) -> str:
    """The checkpoint a pre-training cell writes after ``epoch`` epochs (default: the transferred
    one, ``--pt-epochs``): ``<run>-<epoch>.pth``, written atomically and never rewritten."""
    return os.path.join(cell.checkpoint_dir, f"{cell.run_name}-{epoch or cell.transfer_epoch}.pth")


def checkpoints_on_disk(cell: Cell) -> dict[int, int]:
    """``{epoch: bytes}`` of the numbered checkpoints (:func:`checkpoint_of`) a pre-training cell
    has in checkpoint_dir now (kept in its record by the report: :mod:`recbole_mm.leaderboard.record`)."""
    if not cell.run_name:
        return {}
    pattern = re.compile(re.escape(cell.run_name) + r"-([0-9]+)\.pth")
    try:
        names = os.listdir(cell.checkpoint_dir)
    except OSError:
        return {}
    found = {}
    for n in names:
        m = pattern.fullmatch(n)
        if m:
            try:
                found[int(m.group(1))] = os.path.getsize(os.path.join(cell.checkpoint_dir, n))
            except OSError:  # removed meanwhile
                pass
    return found


def recorded_checkpoints(pre_cells, out) -> dict[str, int]:
    """``{checkpoint: bytes}``: the pre-trainings' checkpoints that are not in checkpoint_dir but
    whose size their record in ``out`` keeps (their cells are planned with it; see :func:`plan_targets`)."""
    known = {}
    for c in pre_cells:
        if c.run_name and out is not None:
            for epoch, size in checkpoint_sizes(c.run_name, out).items():
                if not os.path.isfile(checkpoint_of(c, epoch)):
                    known[checkpoint_of(c, epoch)] = size
    return known


def _tag(cells, **attrs):
    for c in cells:
        for k, v in attrs.items():
            setattr(c, k, v)
    return cells


def plan_targets(models, targets, modes, fractions, seeds, lm_seeds, overrides, model_overrides, config_files,
                 pre_cells, min_steps, zero_shot=True, curve=(), out=None) -> tuple[list, list, list, list[str]]:
    """Fine-tuning, zero-shot and popularity cells for every target from the pre-trained
    checkpoints that exist (their size is part of a cell's hash), or whose size the record of
    their pre-training in ``out`` keeps (:func:`recorded_checkpoints`): such a cell has the run
    name it had when the file existed, so its recorded result is found; unfinished, it cannot run
    (``pretrained_recorded``: :mod:`recbole_mm.transfer.run` reports it not run)."""
    from recbole_mm.utils import get_model

    known = recorded_checkpoints(pre_cells, out)

    def have(cell, epoch=None):
        return lb.checkpoint_size(checkpoint_of(cell, epoch), known) is not None

    # a numbered checkpoint is final once it exists (the run's <run>.pth is rewritten every epoch)
    ready = {c.model: c for c in pre_cells if c.run_name and have(c)}
    finetune, zs, base, notes = [], [], [], []
    first_seed = [seeds[0]] if isinstance(seeds, list) else 1  # baselines: one run (no seed dependence)
    # no transferred checkpoint yet: zero-shot rows from the latest curve checkpoint written (labelled)
    stand_in = {}
    for c in pre_cells:
        if c.model not in ready and c.run_name:
            have_epochs = [e for e in curve if e < c.transfer_epoch and have(c, e)]
            if have_epochs:
                stand_in[c.model] = (max(have_epochs), checkpoint_of(c, max(have_epochs)))
    for c in pre_cells:
        if c.model not in ready:
            notes.append(f"{c.model}: no checkpoint after {getattr(c, 'transfer_epoch', '?')} pre-training epochs yet "
                         f"({c.error or _why_no_checkpoint(c)}); pre-trained and zero-shot rows "
                         + (f"from the checkpoint after {stand_in[c.model][0]} epoch(s)" if c.model in stand_in
                            else "missing") + _other_pretraining(c))
        epochs = sorted(e for e in {getattr(c, "transfer_epoch", None), *curve}
                        if e and c.run_name and checkpoint_of(c, e) in known)
        if epochs:
            notes.append(f"{c.model}: the checkpoint(s) after {', '.join(map(str, epochs))} pre-training epoch(s) "
                         f"are not in {c.checkpoint_dir}, only their sizes in the committed record: their "
                         "pre-trained, zero-shot and curve cells keep their run names and results, and those not "
                         "finished are not run (their checkpoint is only in the record: pre-train again, without "
                         "--no-pretrain / --report-only)")
    for target in targets:
        for f in fractions:
            ov = dict(overrides, train_fraction=f"{f:g}", stopping_min_steps=str(min_steps))
            if f < 1.0:  # evaluate every 1/f epochs: patience (stopping_step evaluations) in steps as on all data
                ov["eval_step"] = str(max(1, round(int(overrides.get("eval_step", 1)) / f)))
            pretrained = [f"{m}={checkpoint_of(ready[get_model(m).__name__])}" for m in models
                          if get_model(m).__name__ in ready]
            cells, n = lb.plan(target, models, modes, pretrained, seeds, lm_seeds, ov, config_files, model_overrides,
                               known)
            finetune += _tag(cells, dataset=target, fraction=f, kind="finetune", pt_epoch=None)
            notes += [f"{target}: {x}" for x in n]
            for epoch in curve:
                curve_pt = [f"{m}={checkpoint_of(c, epoch)}" for c in pre_cells for m in models
                            if get_model(m).__name__ == c.model and c.run_name and epoch != c.transfer_epoch
                            and have(c, epoch)]
                if curve_pt:
                    cells, _ = lb.plan(target, [], "inductive", curve_pt, seeds, lm_seeds, ov, config_files,
                                       model_overrides, known)
                    finetune += _tag(cells, dataset=target, fraction=f, kind="curve", pt_epoch=epoch)
            base += _tag(lb.plan(target, ["Popularity"], None, None, first_seed,
                                 None, ov, config_files, None)[0], dataset=target, fraction=f, kind="popularity",
                         pt_epoch=None)
        # the content bar: no training, no training rows read, so one run per target (all users)
        base += _tag(lb.plan(target, ["TextSim"], None, None, first_seed, None, overrides, config_files, None)[0],
                     dataset=target, fraction=1.0, kind="content", pt_epoch=None)
        if zero_shot:
            inductive = [m for m in models if "inductive" in (lb.supported_modes(get_model(m)) or ())]
            pretrained = [f"{m}={checkpoint_of(ready[get_model(m).__name__])}" for m in inductive
                          if get_model(m).__name__ in ready]
            pretrained += [f"{m}={stand_in[get_model(m).__name__][1]}" for m in inductive
                           if get_model(m).__name__ in stand_in]
            ov = dict(overrides, epochs="0")
            if inductive:  # the untrained control: every seed (its initialisation is the seed's)
                cells, _ = lb.plan(target, inductive, "inductive", None, seeds, lm_seeds, ov, config_files,
                                   model_overrides)
                zs += _tag(cells, dataset=target, fraction=1.0, kind="zero-shot", pt_epoch=None)
            if pretrained:  # no training, no dropout in evaluation: the same scores for every seed
                cells, _ = lb.plan(target, [], "inductive", pretrained, seeds[:1], (lm_seeds or seeds)[:1], ov,
                                   config_files, model_overrides, known)
                zs += _tag(cells, dataset=target, fraction=1.0, kind="zero-shot", pt_epoch=None)
                for c in cells:
                    if c.model in stand_in and c.pretrained == stand_in[c.model][1]:
                        c.pt_epoch = stand_in[c.model][0]
    return finetune, zs, base, notes
