"""``recbole-mm transfer``: pre-train once on a corpus of other domains, then fine-tune on each
target from scratch and from the checkpoint, with several seeds; one report per target.

    recbole-mm transfer -m UniSRec,MISSRec --pretrain Video_Games,Beauty,Office_Products \\
        --target Scientific,Scientific_mm --mode inductive,transductive --fraction 1.0,0.1 --seeds 3

Every run is a leaderboard cell (:mod:`recbole_mm.leaderboard`): its own process, named by a
hash of its resolved config, skipped when its result file exists (or, without it, the
committed record in ``--out``: :mod:`recbole_mm.leaderboard.record`; a recorded pre-training
without its checkpoint is pre-trained again; the record keeps the checkpoints' sizes, so the
cells fine-tuned from a checkpoint that is gone keep their names, and are not run unless
finished), continued from its ``.resume.pth`` with ``--resume``, failures reported in the
table.  The cells:

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
* **popularity** (``Popularity``: items by their training count), per fraction;
* **content** (``TextSim``: items by the cosine of their text features to the user's last item,
  no training), per target: what the item text alone ranks, the bar of a zero-shot model.

Outputs in ``--out``: ``transfer-<target>.md`` (scratch vs pre-trained side by side per
model, mode and fraction: mean +- sample std over seeds, the difference, whether it exceeds
the larger of the two standard deviations; zero-shot rows; costs), ``.csv`` (those rows),
``.runs.csv`` (one line per cell) and ``.png`` (bars with error bars).
Modules: :mod:`.plan` (the cells), :mod:`.run` (:func:`transfer`), :mod:`.report`, :mod:`.cli`.
"""

from recbole_mm.transfer.plan import (DEFAULT_METRIC, SECOND_METRIC, TransferPlan, checkpoint_of,  # noqa: F401
                                      plan_pretrain, plan_targets)
from recbole_mm.transfer.report import comparison_rows, render_markdown, write_transfer_report  # noqa: F401
from recbole_mm.transfer.run import transfer  # noqa: F401
