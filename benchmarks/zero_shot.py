"""Zero-shot recommendation: a model pre-trained on one domain ranks another domain's items
with no training there (``Recommender.with_catalogue``), against popularity and random.

Protocol: the target's pre-split test users (``<d>.test.inter``: each user's history and the
held-out last item), full ranking over every item of the target's ``.item2index``, the
evaluator's semantics (history items are not excluded, padding never ranked), NDCG@10,
Recall@10, MRR@10.  Baselines:

* popularity: items ranked by their count as targets in the target's *training* split (it
  uses in-domain interactions, which the zero-shot model never sees: a reference, not a peer);
* random: the exact expectation for a uniformly random ranking (plus one seeded draw);
* untrained (``--untrained-control``): the same architecture freshly initialised, scored
  the same way, to show what pre-training adds over a random projection of the text features.

Data and pre-training (MiniLM features, 384-d, on both sides; see docs/data.md):

    recbole-mm preprocess --input ../shared/data/raw/amazon2023/Office_Products \\
        --category Office_Products --output dataset/pretrain
    recbole-mm extract-text --dataset dataset/pretrain/Office_Products
    mkdir -p dataset/downstream/Scientific && cp ../shared/data/Scientific/* dataset/downstream/Scientific/
    recbole-mm extract-text --dataset dataset/downstream/Scientific
    OMP_NUM_THREADS=1 taskset -c 1 python run_pretrain.py -m UniSRec -d Office_Products \\
        --run_name=UniSRec-Office-pt-zs --epochs=3 --train_batch_size=1024 --show_progress=False --save_step=1

    OMP_NUM_THREADS=1 python benchmarks/zero_shot.py --target dataset/downstream/Scientific \\
        saved/UniSRec-Office-pt-zs-1.pth saved/UniSRec-Office-pt-zs-2.pth saved/UniSRec-Office-pt-zs-3.pth \\
        --untrained-control --out benchmarks/results/zero-shot-Office-to-Scientific.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
from collections import Counter
from time import perf_counter

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import recbole_mm  # noqa: E402
from recbole_mm.data.readers import read_index_file, read_presplit_inter  # noqa: E402


def split_rows(folder: str, split: str, raw: list[str]):
    name = os.path.basename(os.path.normpath(folder))
    vocab = {str(i): i for i in range(len(raw))}
    df = read_presplit_inter(os.path.join(folder, f"{name}.{split}.inter"), vocab, None, 50)
    histories = [[raw[i] for i in seq] for seq in df["item_id_list"]]
    targets = [raw[i] for i in df["item_id"]]
    return histories, targets


def metrics(ranked: list[list[str]], targets: list[str], k: int = 10) -> dict:
    ranks = [r[:k].index(t) if t in r[:k] else None for r, t in zip(ranked, targets)]
    return {
        f"ndcg@{k}": float(np.mean([1 / np.log2(j + 2) if j is not None else 0.0 for j in ranks])),
        f"recall@{k}": float(np.mean([j is not None for j in ranks])),
        f"mrr@{k}": float(np.mean([1 / (j + 1) if j is not None else 0.0 for j in ranks])),
    }


def random_expectation(n_items: int, k: int = 10) -> dict:
    ks = np.arange(min(k, n_items))
    return {
        f"ndcg@{k}": float(np.sum(1 / np.log2(ks + 2)) / n_items),
        f"recall@{k}": min(k, n_items) / n_items,
        f"mrr@{k}": float(np.sum(1 / (ks + 1)) / n_items),
    }


def untrained_checkpoint(checkpoint: str, target: str, seed: int, folder: str) -> str:
    """The checkpoint with freshly initialised weights (same config), for the control row."""
    from recbole_mm.data.catalogue import Catalogue, CatalogueDataset as _CatalogueDataset, feature_files as _suffixes
    from recbole_mm.recommend import CheckpointConfig
    from recbole_mm.trainer.checkpoint import load_checkpoint, save_checkpoint
    from recbole_mm.utils import get_model

    ckpt = load_checkpoint(checkpoint)
    config = CheckpointConfig(ckpt["config"], torch.device("cpu"))
    suffixes, sizes = _suffixes(config)
    cat = Catalogue.from_folder(target, suffixes, sizes)
    torch.manual_seed(seed)
    model = get_model(ckpt["model"])(config, _CatalogueDataset(config, cat))
    path = os.path.join(folder, "untrained.pth")
    save_checkpoint({k: v for k, v in ckpt.items() if k != "format"} | {"state_dict": model.state_dict()}, path)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="pre-trained (or inductive) checkpoints to evaluate zero-shot")
    p.add_argument("--target", required=True, help="target dataset folder (pre-split .inter, .item2index, features)")
    p.add_argument("-k", type=int, default=10, help="cut-off of the metrics (default 10)")
    p.add_argument("--untrained-control", action="store_true", help="also score a freshly initialised model")
    p.add_argument("--seed", type=int, default=2020, help="seed of the random draw and the untrained control")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    name = os.path.basename(os.path.normpath(args.target))
    raw = read_index_file(os.path.join(args.target, f"{name}.item2index"))
    histories, targets = split_rows(args.target, "test", raw)
    _, train_targets = split_rows(args.target, "train", raw)
    print(f"{name}: {len(raw)} items, {len(histories)} test users")
    rows = []

    counts = Counter(train_targets)
    popular = [i for i, _ in counts.most_common()] + [i for i in raw if i not in counts]
    rows.append({"method": "popularity (target train targets)", **metrics([popular] * len(targets), targets, args.k)})
    rows.append({"method": "random (expectation)", **random_expectation(len(raw), args.k)})
    rng = np.random.default_rng(args.seed)
    draw = [list(np.asarray(raw)[rng.permutation(len(raw))[: args.k]]) for _ in targets]
    rows.append({"method": f"random (one draw, seed {args.seed})", **metrics(draw, targets, args.k)})

    todo = [(c, c) for c in args.checkpoints]
    tmp = tempfile.TemporaryDirectory()
    if args.untrained_control:
        todo.append(("untrained (random init)", untrained_checkpoint(args.checkpoints[-1], args.target, args.seed, tmp.name)))
    for label, path in todo:
        t0 = perf_counter()
        rec = recbole_mm.load(path, catalogue=args.target, device=args.device)
        recs = rec.recommend(histories, k=args.k, exclude_seen=False)
        m = metrics([r.items for r in recs], targets, args.k)
        seconds = perf_counter() - t0
        ck = torch.load(path, map_location="cpu", weights_only=True)
        rows.append({"method": f"zero-shot {ck['model']} ({ck['config'].get('train_stage')})", "checkpoint": label,
                     "epoch": ck.get("epoch"), **m, "seconds": round(seconds, 2)})
        # excluding the history's own items (what a product would do), for reference
        rows[-1][f"ndcg@{args.k} (exclude seen)"] = metrics(
            [r.items for r in rec.recommend(histories, k=args.k)], targets, args.k)[f"ndcg@{args.k}"]
    tmp.cleanup()

    for r in rows:
        print(f"{r['method']:<42} {r.get('checkpoint', ''):<40} " + "  ".join(
            f"{k}={r[k]:.4f}" for k in (f"ndcg@{args.k}", f"recall@{args.k}", f"mrr@{args.k}")))
    result = {
        "target": args.target,
        "n_items": len(raw),
        "n_test_users": len(histories),
        "protocol": "full ranking of the target's items, history items not excluded (the evaluator's), last item held out",
        "rows": rows,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "command": "python " + " ".join(sys.argv),
    }
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
