"""``recbole-mm leaderboard``: its sub-parser and its command (registered by ``recbole_mm.cli``)."""

from __future__ import annotations

import shlex

from recbole_mm.leaderboard.execute import leaderboard
from recbole_mm.leaderboard.plan import parse_model_overrides
from recbole_mm.model import language_models


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
Writing the report also writes what it reads of each finished result to <out>/runs/<run>.json
(commit it with the report): without <checkpoint_dir>/<run>.json (a fresh clone) a cell is
finished when its <out>/runs/<run>.json, or a finished line of <out>/*.runs.csv with the same
run name, exists.
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
  # only rewrite the report from the finished cells (in a fresh clone: from the committed results/runs/)
  recbole-mm leaderboard ... --report-only

Any other --key=value (or --key value) is a config override given to every run (as for finetune).
"""


def register(sub) -> None:
    p = sub.add_parser("leaderboard", description=DESCRIPTION, epilog=EPILOG,
                       allow_abbrev=False,  # --seed=5 is a config override, not --seeds
                       help="compare models on one dataset over seeds: results/<dataset>.md, .csv and .png")
    p.add_argument("-d", "--dataset", required=True, help="dataset folder under data_path")
    p.add_argument("-m", "--models", required=True, metavar="M1,M2,...", help="comma-separated model names")
    p.add_argument("--mode", default=None, metavar="inductive,transductive",
                   help="transfer modes for feature-based models, one row each (ID-only models ignore it); "
                        "default: each model's props")
    p.add_argument("--pretrained", "-p", action="append", default=[], metavar="MODEL=CKPT",
                   help="also fine-tune MODEL from this pre-trained checkpoint (repeatable)")
    p.add_argument("--seeds", default="3", metavar="N|S1,S2,...",
                   help="seeds per cell: a count N (at most 100, from --seed, default 2020) or a list; one seed: S1, (default: 3)")
    p.add_argument("--lm-seeds", "--lm_seeds", dest="lm_seeds", default=None, metavar="N|S1,...",
                   help=f"seeds for the language-model recommenders ({', '.join(language_models())}); default: --seeds")
    p.add_argument("--set", action="append", default=[], metavar="MODEL:key=value", dest="model_set",
                   help="a config override for one model's cells only (repeatable), e.g. Recformer:epochs=2")
    p.add_argument("--data_path", "--data-path", dest="data_path", default=None, metavar="DIR",
                   help="folder holding the dataset folder (a config override for every run)")
    p.add_argument("--config_files", nargs="+", default=None, metavar="YAML", help="extra YAML files for every run")
    p.add_argument("--out", default="results", metavar="DIR", help="report folder (default: results/)")
    p.add_argument("--resume", action="store_true",
                   help="continue interrupted cells from their <run>.resume.pth (default: start them again); "
                        "finished cells (saved/<run>.json, else the record <out>/runs/<run>.json or a line of "
                        "<out>/*.runs.csv) are skipped")
    p.add_argument("--rerun", action="store_true",
                   help="run finished cells again, ignoring saved/ and the record in <out> (default: skip them)")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing; write the report from finished cells: saved/<run>.json, else the committed "
                        "record <out>/runs/<run>.json, else a finished line of <out>/*.runs.csv (no curve)")
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
    res = leaderboard(args.dataset, args.models, modes=args.mode, pretrained=args.pretrained, seeds=args.seeds,
                      lm_seeds=args.lm_seeds, overrides=overrides, config_files=args.config_files, out=args.out,
                      model_overrides=parse_model_overrides(args.model_set),
                      resume=args.resume, rerun=args.rerun, isolation=args.isolation, timeout=args.timeout,
                      report_only=args.report_only, command=command)  # LeaderboardError: one line, exit 2 (cli.py)
    failed = [c for c in res["cells"] if c.status == "failed"]
    return 1 if failed else 0
