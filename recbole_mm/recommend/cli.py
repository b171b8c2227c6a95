"""``recbole-mm recommend``: top-k items from a checkpoint for one history or a file of histories."""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
import warnings

from recbole_mm.utils import atomic_write

DESCRIPTION = """\
Recommend the top-k items for raw item histories with a trained checkpoint.

A history is a list of raw item ids (the ASINs of <dataset>.item2index), oldest first. The
model is rebuilt from the checkpoint and the item index + feature files of the dataset folder
its config names (--data_path to point elsewhere). Output: one JSON object per history,
{"line": N, "history": [...], "items": [...], "scores": [...], "unknown": [...]}, best item
first ("line" only with --histories). Items of the history are not recommended again unless
--include-seen is given (the evaluator's ranking does not exclude them).

Unknown ids are skipped with a warning naming them (--strict: an error). A history with no
known id is an error naming its line (--skip-empty: an empty "items" list): nothing can be
recommended from it, and there is no popularity fallback (a checkpoint holds no counts).
"""

EPILOG = """\
examples:
  recbole-mm recommend saved/UniSRec-Scientific_mm.pth --history B0001,B0002 -k 5
  recbole-mm recommend saved/UniSRec-Scientific_mm.pth --histories users.txt --output recs.jsonl
  # zero-shot: an inductive (or pre-trained) checkpoint scoring another domain's items
  recbole-mm recommend saved/UniSRec-Office-pt.pth --catalogue dataset/downstream/Scientific \\
      --histories scientific_users.txt --output recs.jsonl
"""


def register(sub) -> None:
    p = sub.add_parser("recommend", description=DESCRIPTION, epilog=EPILOG,
                       help="top-k items for raw item histories from a checkpoint (zero-shot with --catalogue)")
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint written by finetune or pretrain (<run>.pth)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--history", metavar="ID1,ID2,...",
                     help="one history: raw item ids, oldest first, separated by commas (or spaces, quoted)")
    src.add_argument("--histories", metavar="FILE",
                     help="a file with one history per line, ids separated by commas or spaces; "
                     "blank lines and lines starting with # are ignored ('-' reads stdin)")
    p.add_argument("-k", "--top-k", dest="k", type=int, default=10, metavar="K", help="items per history (default: 10)")
    p.add_argument("--output", metavar="FILE.jsonl",
                   help="write the JSON lines to this file (atomically) instead of stdout")
    p.add_argument("--catalogue", metavar="DIR",
                   help="recommend the items of this dataset folder (its <name>.item2index and feature "
                   "files) instead of the checkpoint's own; inductive models only (UniSRec/MISSRec "
                   "pre-trained or --mode inductive); histories are then in this catalogue's ids")
    p.add_argument("--plm_suffix", "--plm-suffix", dest="plm_suffix", metavar="SUFFIX",
                   help="text feature file of --catalogue when not named as in the checkpoint (e.g. feat1CLS)")
    p.add_argument("--img_suffix", "--img-suffix", dest="img_suffix", metavar="SUFFIX",
                   help="image feature file of --catalogue when not named as in the checkpoint (e.g. feat3CLS)")
    p.add_argument("--data_path", "--data-path", dest="data_path", metavar="DIR",
                   help="folder that holds the checkpoint's dataset folder (default: the data_path it was trained with)")
    p.add_argument("--include-seen", dest="exclude_seen", action="store_false",
                   help="may recommend items of the history itself (default: they are excluded)")
    p.add_argument("--strict", action="store_true", help="an unknown item id is an error (default: skipped with a warning)")
    p.add_argument("--skip-empty", action="store_true",
                   help="output an empty recommendation for a history with no known id (default: error)")
    p.add_argument("--device", default=None, metavar="DEV", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=256, metavar="N", help="histories scored together (default: 256)")
    p.add_argument("--chunk-size", type=int, default=100_000, metavar="N",
                   help="catalogue items scored per block; memory ~ batch-size x chunk-size scores (default: 100000)")
    p.set_defaults(func=main)


def split_history(text: str) -> list[str]:
    return [t for t in re.split(r"[,\s]+", text.strip()) if t]


def read_histories(path: str) -> list[tuple[int, list[str]]]:
    """``(line number, ids)`` for each non-blank, non-comment line (UTF-8, checked as every input
    file: a byte-order mark is stripped, an undecodable byte is an error naming its line)."""
    from recbole_mm.data.readers import check_utf8, open_text

    if path == "-":
        data = sys.stdin.buffer.read()
        check_utf8("<stdin>", io.BytesIO(data))
        lines = data.decode("utf-8-sig").split("\n")
    else:
        with open_text(path) as f:
            lines = f.read().split("\n")
    return [(n, split_history(line)) for n, line in enumerate(lines, 1)
            if line.strip() and not line.lstrip().startswith("#")]


def main(args: argparse.Namespace) -> int:
    from recbole_mm.data.readers import DataValidationError
    from recbole_mm.recommend import RecommendError, UnknownItemWarning, load

    def fail(msg):
        print(f"recbole-mm recommend: error: {msg}", file=sys.stderr)
        return 2

    if args.k < 1:
        return fail(f"-k must be >= 1, got {args.k}")
    try:
        if args.history is not None:
            rows = [(None, split_history(args.history))]
        else:
            rows = read_histories(args.histories)
        if not rows:
            return fail(f"{args.histories}: no histories")
        rec = load(args.checkpoint, data_path=args.data_path, device=args.device, catalogue=args.catalogue,
                   plm_suffix=args.plm_suffix, img_suffix=args.img_suffix)
        lookup = rec.catalogue.lookup
        where = lambda n: "--history" if n is None else f"{args.histories}:{n}"  # noqa: E731
        unknown = [(n, [t for t in h if t not in lookup]) for n, h in rows]
        unknown = [(n, u) for n, u in unknown if u]
        if unknown:
            lines = [f"{where(n)}: {', '.join(u[:20])}{' ...' if len(u) > 20 else ''}" for n, u in unknown[:20]]
            more = f"\n  ... and {len(unknown) - 20} more histories" if len(unknown) > 20 else ""
            head = f"item ids not in the catalogue ({rec.catalogue.source})"
            if args.strict:
                return fail(f"{head}:\n  " + "\n  ".join(lines) + more)
            print(f"recbole-mm recommend: warning: {head}, skipped:\n  " + "\n  ".join(lines) + more, file=sys.stderr)
        empty = [n for n, h in rows if not any(t in lookup for t in h)]
        if empty and not args.skip_empty:
            shown = ", ".join(where(n) for n in empty[:20]) + (" ..." if len(empty) > 20 else "")
            return fail(f"no known item id in {len(empty)} history(ies): {shown} (--skip-empty to output empty lists)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnknownItemWarning)  # reported above, by line
            recs = rec.recommend([h for _, h in rows], k=args.k, exclude_seen=args.exclude_seen, strict=False,
                                 on_empty="skip", batch_size=args.batch_size, chunk_size=args.chunk_size)
    except (RecommendError, DataValidationError, FileNotFoundError, ValueError) as e:
        return fail(str(e))
    out_lines = []
    for (n, h), r in zip(rows, recs):
        obj = {"line": n} if n is not None else {}
        obj.update(history=h, items=r.items, scores=r.scores, unknown=r.unknown)
        out_lines.append(json.dumps(obj))
    text = "\n".join(out_lines) + "\n"
    if args.output:
        atomic_write(args.output, text)
        print(f"recbole-mm recommend: {len(recs)} histories -> {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
