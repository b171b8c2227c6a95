"""Command line: ``recbole-mm finetune|pretrain ...`` (also ``run_finetune.py`` / ``run_pretrain.py``)."""

from __future__ import annotations

import argparse
import sys

OVERRIDES_HELP = """
config overrides:
  Any other --key=value or --key value sets a config key (highest precedence), e.g.
  --data_path=../shared/data --epochs 20 --learning_rate=0.003 --use_gpu=False
  Layering, lowest first: RecBole defaults < props/overall.yaml < props/{stage}.yaml
  < props/<Model>.yaml < props/<dataset>.yaml < --config_files < overrides.
"""


def _common(p: argparse.ArgumentParser, datasets_help: str) -> None:
    p.add_argument("-m", "--model", required=True, help="model name: UniSRec, MISSRec, ... or any RecBole sequential model (SASRec, GRU4Rec, BERT4Rec, ...)")
    p.add_argument("-d", "--dataset", required=True, help=datasets_help)
    p.add_argument("--config_files", nargs="+", default=None, metavar="YAML", help="extra YAML config files, applied after props/")
    p.add_argument("--resume", default=None, metavar="CKPT", help="continue an interrupted run from its checkpoint (<run>.pth or <run>.resume.pth)")
    p.add_argument("--no-save", dest="saved", action="store_false", help="do not write checkpoints or the result JSON")


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
        epilog=OVERRIDES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(pt, "comma-separated domain folders under data_path (default data_path: dataset/pretrain/), e.g. A,B")
    pt.add_argument("--nproc", type=int, default=1, help="processes on this machine (distributed pre-training; 1 = single process)")

    from recbole_mm.pipeline.cli import add_commands

    add_commands(sub)  # preprocess, extract-text, extract-image, merge
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
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command not in ("finetune", "pretrain"):
        from recbole_mm.pipeline.cli import run_command

        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return run_command(args)
    overrides = parse_overrides(rest)

    from recbole_mm.data import DataValidationError
    from recbole_mm.quick_start import UsageError, run

    try:
        if args.command == "finetune":
            run(args.model, args.dataset, "finetune", mode=args.mode, pretrained=args.pretrained,
                resume=args.resume, config_files=args.config_files, overrides=overrides, saved=args.saved)
        elif args.command == "pretrain":
            if args.nproc != 1:
                raise SystemExit("recbole-mm: --nproc > 1 (distributed pre-training) is not available in this version")
            run(args.model, args.dataset, "pretrain", resume=args.resume,
                config_files=args.config_files, overrides=overrides, saved=args.saved)
    except (DataValidationError, FileNotFoundError, UsageError) as e:
        print(f"recbole-mm: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
