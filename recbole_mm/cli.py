"""Command line: ``recbole-mm finetune|pretrain|recommend|leaderboard|import-checkpoint ...`` (also ``run_finetune.py`` / ``run_pretrain.py``)
and the data pipeline's commands (``recbole_mm/pipeline/cli.py``)."""

from __future__ import annotations

import argparse
import os
import sys

OVERRIDES_HELP = """
config overrides:
  Any other --key=value or --key value sets a config key (highest precedence), e.g.
  --data_path=../shared/data --epochs 20 --learning_rate=0.003 --use_gpu=False
  Layering, lowest first: RecBole defaults < props/overall.yaml < props/{stage}.yaml
  < props/<Model>.yaml < props/<dataset>.yaml < --config_files < overrides.
"""


DISTRIBUTED_HELP = """
distributed pre-training (torch.distributed, DistributedDataParallel):
  --nproc N on one machine, or torchrun on one or several machines (same code path):
    run_pretrain.py --nproc 2 -m UniSRec -d A,B
    torchrun --standalone --nproc_per_node 8 run_pretrain.py -m UniSRec -d A,B
    torchrun --nnodes 2 --node_rank 0|1 --nproc_per_node 8 --rdzv_endpoint HOST0:29500 \\
        run_pretrain.py -m UniSRec -d A,B
  NCCL on GPU (one GPU per process), gloo on CPU (--use_gpu=False).  train_batch_size is
  the global batch, split evenly over the processes (must be divisible by their number);
  --gather_negatives=True (default) keeps the in-batch contrastive negatives of the whole
  global batch, so the gradients equal a single process's.  Rank 0 writes the log and the
  checkpoints; --resume continues from <run>.resume.pth.  If a process fails or dies the
  whole job stops with a non-zero status and that process's error; --dist_timeout=SECONDS
  (default 1800) bounds how long a process waits for a peer on another machine.
"""


def _common(p: argparse.ArgumentParser, datasets_help: str) -> None:
    p.add_argument("-m", "--model", required=True, help="model name: UniSRec, MISSRec, ... or any RecBole sequential model (SASRec, GRU4Rec, BERT4Rec, ...)")
    p.add_argument("-d", "--dataset", required=True, help=datasets_help)
    p.add_argument("--config_files", nargs="+", default=None, metavar="YAML", help="extra YAML config files, applied after props/")
    p.add_argument("--resume", default=None, metavar="CKPT", help="continue an interrupted run from its checkpoint (<run>.pth or <run>.resume.pth)")
    p.add_argument("--no-save", dest="saved", action="store_false", help="do not write checkpoints or the result JSON")
    p.add_argument("--strict-config", dest="strict_config", action="store_true",
                   help="an unknown config key (--key=value or in --config_files) is an error (default: a warning "
                        "naming the closest known key)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recbole-mm",
        description="Transferable multi-modal sequential recommenders on RecBole.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    ft = sub.add_parser(
        "finetune",
        help="train / fine-tune on one downstream dataset and report test metrics",
        description="Train a model on one dataset (from scratch, or from a pre-trained checkpoint with -p), "
        "early-stop on validation, report valid/test metrics and write <run>.pth and <run>.json.",
        epilog=OVERRIDES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(ft, "dataset folder name under data_path (default data_path: dataset/downstream/)")
    ft.add_argument("-p", "--pretrained", default=None, metavar="CKPT", help="pre-trained checkpoint to transfer from")
    ft.add_argument("--mode", choices=["inductive", "transductive"], default=None,
                    help="inductive: item features only; transductive: features + item IDs (default: the model's props)")

    pt = sub.add_parser(
        "pretrain",
        help="pre-train on one or several merged domains",
        description="Pre-train a model on the domains given with -d (merged, tokens prefixed by domain).",
        epilog=OVERRIDES_HELP + DISTRIBUTED_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(pt, "comma-separated domain folders under data_path (default data_path: dataset/pretrain/), e.g. A,B")
    pt.add_argument("--nproc", type=int, default=1, metavar="N",
                    help="distributed pre-training in N processes on this machine (torch.distributed.elastic, "
                         "as 'torchrun --standalone --nproc_per_node N'; one GPU each, or CPU with gloo); "
                         "default 1: a single process. Several machines: torchrun (see below)")

    from recbole_mm.pipeline.cli import add_commands

    add_commands(sub)  # preprocess, extract-text, extract-image, merge

    from recbole_mm.recommend_cli import register as add_recommend

    add_recommend(sub)  # recommend

    from recbole_mm.leaderboard import register as add_leaderboard

    add_leaderboard(sub)  # leaderboard

    from recbole_mm.transfer import register as add_transfer

    add_transfer(sub)  # transfer

    from recbole_mm.trainer.import_reference import register as add_import_checkpoint

    add_import_checkpoint(sub)  # import-checkpoint
    return parser


def parse_overrides(rest: list[str]) -> dict:
    """``--key=value`` and ``--key value`` pairs; a bare ``--flag`` means True."""
    out, i = {}, 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise SystemExit(f"recbole-mm: unexpected argument {arg!r} (config overrides look like --key=value)")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(rest) and not rest[i + 1].startswith("--"):
                value, i = rest[i + 1], i + 1
            else:
                value = "True"
        if key in out and out[key] != value:
            raise SystemExit(f"recbole-mm: --{key} given twice with different values")
        out[key] = value
        i += 1
    return out


def main(argv=None) -> int:
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):  # a worker of torchrun / --nproc: report errors to its agent
        from torch.distributed.elastic.multiprocessing.errors import record

        return record(_main)(argv)
    return _main(argv)


def _without_nproc(argv: list[str]) -> list[str]:
    """``argv`` less ``--nproc N`` / ``--nproc=N``: what each of the N processes runs."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def _main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command not in ("finetune", "pretrain"):
        from recbole_mm.pipeline.cli import run_command

        if getattr(args, "config_overrides", False):  # leaderboard: --key=value overrides for every run
            args.overrides, args.argv, rest = parse_overrides(rest), argv, []
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return run_command(args)
    overrides = parse_overrides(rest)

    from recbole_mm.config import ConfigError
    from recbole_mm.data import DataValidationError
    from recbole_mm.quick_start import UsageError, run
    from recbole_mm.trainer.checkpoint import CheckpointError

    try:
        if args.command == "finetune":
            result = run(args.model, args.dataset, "finetune", mode=args.mode, pretrained=args.pretrained,
                         resume=args.resume, config_files=args.config_files, overrides=overrides, saved=args.saved,
                         strict_config=args.strict_config)
            _say_where(result)
        elif args.command == "pretrain":
            if args.nproc < 1:
                parser.error("--nproc must be >= 1")
            if args.nproc > 1:  # relaunch this command in N processes under torch.distributed.elastic
                from recbole_mm.distributed import launch

                return launch(args.nproc, "recbole_mm.cli", _without_nproc(argv))
            _say_where(run(args.model, args.dataset, "pretrain", resume=args.resume,
                           config_files=args.config_files, overrides=overrides, saved=args.saved,
                           strict_config=args.strict_config))
    except (DataValidationError, FileNotFoundError, UsageError, ConfigError, CheckpointError) as e:
        print(f"recbole-mm: error: {e}", file=sys.stderr)
        return 2
    return 0


def _say_where(result: dict) -> None:
    """The last lines of a run: where its checkpoint and result file went (one process prints)."""
    if result.get("checkpoint") and int(os.environ.get("RANK", "0") or 0) == 0:
        print(f"checkpoint: {result['checkpoint']}\nresult: {result.get('result_file')}")


if __name__ == "__main__":
    sys.exit(main())
