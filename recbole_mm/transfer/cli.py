"""``recbole-mm transfer``: its sub-parser and its command (registered by ``recbole_mm.cli``)."""

from __future__ import annotations

import shlex

from recbole_mm import leaderboard as lb
from recbole_mm.model import language_models
from recbole_mm.transfer.run import transfer


DESCRIPTION = """\
Pre-train each model once on the merged --pretrain domains, then fine-tune it on every --target
from scratch and from the pre-trained checkpoint, for each mode, training fraction and seed,
plus zero-shot (pre-trained, no fine-tuning; and untrained) and popularity rows.  Writes
<out>/transfer-<target>.md, .csv, .runs.csv and .png: scratch vs pre-trained side by side,
mean +- std over seeds, best epochs and steps, costs.

Every run is a cell of the leaderboard's machinery: its own process, named by a hash of its
resolved config, skipped when finished (run the same command again to continue; --resume
continues interrupted cells from their last epoch), failures reported in the table.  A cell
is finished when saved/<run>.json exists, else when the committed record <out>/runs/<run>.json
(written with the reports) or a finished line of <out>/*.runs.csv has its run name; a
recorded pre-training whose checkpoint is not in saved/ is pre-trained again (not with
--no-pretrain / --report-only).  A pre-training's record keeps its checkpoints' sizes (part of
the fine-tuning run names): without the files, the runs from them keep their names and
recorded rows; one not finished is not run (pre-train again).
"""

EPILOG = """\
examples:
  # the shared protocol (see docs/transfer.md for the data commands)
  recbole-mm transfer -m UniSRec,MISSRec --pretrain Video_Games,Beauty,Office_Products \\
      --target Scientific,Scientific_mm --mode inductive,transductive --fraction 1.0,0.1 --seeds 3 \\
      --pt-epochs 3
  # pre-training-length curve: pre-train 30 epochs, transfer the 3-epoch checkpoint, curve at 1/3/10/30
  recbole-mm transfer -m UniSRec --pretrain ... --target Scientific --mode inductive --pt-epochs 3 --curve 1,3,10,30
  # meanwhile, on the other core: fine-tune from the checkpoints written so far (run again later)
  recbole-mm transfer ... --no-pretrain
  # language models: one seed, a step budget
  recbole-mm transfer -m Recformer --lm-seeds 1 --set Recformer:epochs=2 --pt-set Recformer:steps_per_epoch=50 ...

Any other --key=value (or --key value) is a config override given to every run (pre-training and
fine-tuning); --set MODEL:key=value for one model's fine-tuning runs, --pt-set for its pre-training.
"""


def register(sub) -> None:
    p = sub.add_parser("transfer", help="pre-train once, fine-tune from scratch vs pre-trained over seeds: "
                       "results/transfer-<target>.md", description=DESCRIPTION, epilog=EPILOG,
                       allow_abbrev=False)
    p.add_argument("-m", "--models", required=True, metavar="M1,M2,...", help="comma-separated model names")
    p.add_argument("--pretrain", required=True, metavar="A,B,C", help="pre-training domains (folders under --pretrain_path)")
    p.add_argument("--target", required=True, metavar="T1,T2", help="target datasets (folders under --data_path)")
    p.add_argument("--pretrain_path", "--pretrain-path", dest="pretrain_path", default="dataset/pretrain",
                   metavar="DIR", help="folder holding the pre-training domains (default: dataset/pretrain)")
    p.add_argument("--data_path", "--data-path", dest="data_path", default=None, metavar="DIR",
                   help="folder holding the targets (default: props, dataset/downstream)")
    p.add_argument("--mode", default=None, metavar="inductive,transductive",
                   help="transfer modes, one row each (default: each model's props)")
    p.add_argument("--fraction", default="1.0", metavar="F1,F2",
                   help="fractions of the target's training users (config train_fraction), e.g. 1.0,0.1 (default 1.0)")
    p.add_argument("--seeds", default="3", metavar="N|S1,S2,...", help="seeds per cell: a count N (at most 100; default 3: 2020, 2021, 2022) or a list; one seed: S1,")
    p.add_argument("--lm-seeds", "--lm_seeds", dest="lm_seeds", default=None, metavar="N|S1,...",
                   help=f"seeds for the language-model recommenders ({', '.join(language_models())}); default: --seeds")
    p.add_argument("--pt-epochs", "--pt_epochs", dest="pt_epochs", type=int, default=None, metavar="N",
                   help="the transferred checkpoint is the one after N pre-training epochs (default: "
                        "props/pretrain.yaml's epochs; a model pre-trained for fewer with --pt-set "
                        "MODEL:epochs=M transfers its last, M)")
    p.add_argument("--curve", default=None, metavar="E1,E2,...",
                   help="also fine-tune (inductive) from the checkpoints after these pre-training epochs "
                        "(pre-training runs to the longest of --pt-epochs and these; --pt-set MODEL:epochs=M "
                        "sets one model's length instead, and its curve stops at M)")
    p.add_argument("--min-steps", "--min_steps", dest="min_steps", type=int, default=200, metavar="N",
                   help="early stopping cannot end a fine-tuning run before N optimiser steps (default 200)")
    p.add_argument("--no-zero-shot", dest="zero_shot", action="store_false", help="no zero-shot rows")
    p.add_argument("--set", action="append", default=[], metavar="MODEL:key=value", dest="model_set",
                   help="a config override for one model's fine-tuning runs (repeatable)")
    p.add_argument("--pt-set", action="append", default=[], metavar="MODEL:key=value", dest="pt_set",
                   help="a config override for one model's pre-training (repeatable)")
    p.add_argument("--config_files", nargs="+", default=None, metavar="YAML", help="extra YAML files for every run")
    p.add_argument("--out", default="results", metavar="DIR", help="report folder (default: results/)")
    p.add_argument("--resume", action="store_true",
                   help="continue interrupted cells from their <run>.resume.pth; finished cells (saved/<run>.json, "
                        "else the record <out>/runs/<run>.json or a line of <out>/*.runs.csv) are skipped")
    p.add_argument("--rerun", action="store_true", help="run finished cells again, ignoring saved/ and the record")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing; write the reports from finished cells: saved/<run>.json, else the committed "
                        "record <out>/runs/<run>.json, else a finished line of <out>/*.runs.csv (no curve)")
    p.add_argument("--no-pretrain", action="store_true",
                   help="run no pre-training: fine-tune from the pre-trained checkpoints that exist already (each "
                        "epoch's is final once written), so a second process (e.g. on the other core) fine-tunes "
                        "while the first one pre-trains; run it again to pick up new checkpoints")
    p.add_argument("--isolation", choices=["subprocess", "fork"], default="subprocess",
                   help="each run in a fresh Python process (default) or a fork of this one")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="stop a run after this long")
    p.set_defaults(func=main, config_overrides=True)


def main(args) -> int:
    overrides = dict(getattr(args, "overrides", None) or {})
    if args.data_path:
        overrides["data_path"] = args.data_path
    argv = getattr(args, "argv", None)
    skip = ("--report-only", "--resume", "--no-pretrain")
    command = "recbole-mm " + shlex.join([a for a in argv if a not in skip]) if argv else None
    res = transfer(args.models, args.pretrain, args.target, modes=args.mode, fractions=args.fraction,
                   seeds=args.seeds, lm_seeds=args.lm_seeds, overrides=overrides,
                   model_overrides=lb.parse_model_overrides(args.model_set),
                   pt_overrides=lb.parse_model_overrides(args.pt_set), config_files=args.config_files,
                   pretrain_path=args.pretrain_path, pt_epochs=args.pt_epochs, curve=args.curve,
                   min_steps=args.min_steps, zero_shot=args.zero_shot, out=args.out, resume=args.resume,
                   rerun=args.rerun, isolation=args.isolation, timeout=args.timeout,
                   report_only=args.report_only, command=command, no_pretrain=args.no_pretrain)  # LeaderboardError: exit 2
    plan = res["plan"]
    failed = [c for c in plan.pretrain + plan.finetune + plan.zero_shot + plan.baselines if c.status == "failed"]
    return 1 if failed else 0
