"""Command line: ``recbole-mm <command>``, the one dispatcher of every sub-command (also
``run_finetune.py`` / ``run_pretrain.py``).

``finetune`` and ``pretrain`` are defined here; every other command is registered by its own
module's ``register(subparsers)`` (the data pipeline's ``preprocess``, ``merge``,
``extract-text``, ``extract-image``, ``download-images``, ``prepare``; ``recommend``,
``leaderboard``, ``transfer``, ``import-checkpoint``) and run by :func:`run_subcommand`, which
turns the package's usage errors into one line and exit status 2.  Library modules never
import this one."""

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


class _CommandParser(argparse.ArgumentParser):
    def __init__(self, *args, formatter_class=argparse.RawDescriptionHelpFormatter, **kw):
        super().__init__(*args, formatter_class=formatter_class, **kw)


def _registrations():
    """The ``register(subparsers)`` of every module with sub-commands, in ``--help`` order; each
    sets ``func`` (``func(args) -> exit status``), run by :func:`run_subcommand`."""
    from recbole_mm.transfer import cli as transfer
    from recbole_mm.leaderboard import cli as leaderboard
    from recbole_mm.pipeline import images, merge, prepare, preprocess, text
    from recbole_mm.recommend import cli as recommend
    from recbole_mm.trainer import import_reference

    return [preprocess.register, merge.register, text.register, images.register, prepare.register,
            recommend.register, leaderboard.register, transfer.register, import_reference.register]


def _usage_errors() -> tuple[type[BaseException], ...]:
    """The package's errors that mean "this input cannot be used": one line, exit status 2."""
    from recbole_mm.config import ConfigError
    from recbole_mm.data.readers import DataValidationError
    from recbole_mm.leaderboard import LeaderboardError
    from recbole_mm.pipeline.common import PipelineError
    from recbole_mm.quick_start import UsageError
    from recbole_mm.recommend.errors import RecommendError
    from recbole_mm.trainer.checkpoint import CheckpointError

    return (PipelineError, DataValidationError, FileNotFoundError, LeaderboardError, RecommendError, UsageError,
            ConfigError, CheckpointError)


def run_subcommand(func, args, prog: str | None = None, catch_interrupt: bool = True) -> int:
    """``func(args)`` as a command: its exit status, or one line ``<prog>: error: <message>`` on
    stderr and status 2 for the package's usage errors (``catch_interrupt``: 130 on Ctrl-C)."""
    prog = prog or f"recbole-mm {args.command}"
    try:
        return int(func(args) or 0)
    except _usage_errors() as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if not catch_interrupt:
            raise
        print(f"{prog}: interrupted (outputs are left as they were)", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recbole-mm",
        description="Transferable multi-modal sequential recommenders on RecBole.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # every sub-command's parser shows its description and epilog as written
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)

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

    for register in _registrations():
        register(sub)
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
        if getattr(args, "config_overrides", False):  # leaderboard: --key=value overrides for every run
            args.overrides, args.argv, rest = parse_overrides(rest), argv, []
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return run_subcommand(args.func, args)
    overrides = parse_overrides(rest)
    if args.command == "pretrain" and args.nproc < 1:
        parser.error("--nproc must be >= 1")
    if args.command == "pretrain" and args.nproc > 1:  # relaunch this command in N processes (torch.distributed.elastic)
        from recbole_mm.distributed import launch

        return launch(args.nproc, "recbole_mm.cli", _without_nproc(argv))
    return run_subcommand(lambda a: _train(a, overrides), args, prog="recbole-mm", catch_interrupt=False)


def _train(args, overrides) -> int:
    from recbole_mm.quick_start import run

    stage_args = {"mode": args.mode, "pretrained": args.pretrained} if args.command == "finetune" else {}
    _say_where(run(args.model, args.dataset, args.command, **stage_args, resume=args.resume,
                   config_files=args.config_files, overrides=overrides, saved=args.saved,
                   strict_config=args.strict_config))
    return 0


def _say_where(result: dict) -> None:
    """The last lines of a run: where its checkpoint and result file went (one process prints)."""
    if result.get("checkpoint") and int(os.environ.get("RANK", "0") or 0) == 0:
        print(f"checkpoint: {result['checkpoint']}\nresult: {result.get('result_file')}")


if __name__ == "__main__":
    sys.exit(main())
