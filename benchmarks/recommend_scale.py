"""Recommending at catalogue scale: 10,000 histories over a synthetic 1M-item catalogue.

Builds, in a temporary folder, a catalogue of ``--items`` items (``<d>.item2index`` and a
``<d>.feat1CLS`` of random float32 features of dimension ``--dim``, the real CLIP size 512) and a
small seed dataset of the same feature size; saves a randomly initialised UniSRec
(``inductive_ft``: features only) checkpoint on the seed dataset; then times
``recbole_mm.load(ckpt, catalogue=<1M folder>)`` and ``recommend`` of ``--histories`` random
histories (lengths uniform in 1..``--max-len``), ``k=10``, history items excluded.

Scoring is chunked (``--chunk-size`` items per block, a running top-k merged across blocks), so
memory is the feature table held by the model plus one ``chunk x hidden`` item block and one
``batch x chunk`` score block: no ``[items x hidden]`` table, no ``[histories x items]`` scores.
Peak RSS is reported for the whole process (``ru_maxrss``; loading holds the features twice
for a moment: the file's table and the model's copy) and sampled during ``recommend`` alone.

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/recommend_scale.py \\
        --out benchmarks/results/recommend-1M.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from time import perf_counter

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import recbole_mm  # noqa: E402
from recbole_mm.config import config_to_plain  # noqa: E402
from recbole_mm.quick_start import build_config  # noqa: E402
from recbole_mm.data.catalogue import Catalogue, CatalogueDataset as _CatalogueDataset, feature_files as _suffixes  # noqa: E402
from recbole_mm.trainer.checkpoint import save_checkpoint  # noqa: E402
from recbole_mm.utils import get_model  # noqa: E402


from measure import RssSampler, cpu_s, peak_mb, rss_mb  # noqa: E402


def write_catalogue(folder: str, name: str, n: int, dim: int, seed: int, block: int = 100_000) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{name}.item2index"), "w") as f:
        for s in range(0, n, block):
            f.write("".join(f"S{i:08d}\t{i}\n" for i in range(s, min(s + block, n))))
    rng = np.random.default_rng(seed)
    with open(os.path.join(folder, f"{name}.feat1CLS"), "wb") as f:
        for s in range(0, n, block):
            rng.standard_normal((min(block, n - s), dim), dtype=np.float32).tofile(f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=1_000_000, help="catalogue size (default 1,000,000)")
    p.add_argument("--histories", type=int, default=10_000, help="histories to recommend for (default 10,000)")
    p.add_argument("--dim", type=int, default=512, help="feature size (default 512, CLIP)")
    p.add_argument("--max-len", type=int, default=20, help="history lengths are uniform in 1..max-len (default 20)")
    p.add_argument("-k", type=int, default=10, help="top-k (default 10)")
    p.add_argument("--chunk-size", type=int, default=100_000, help="items per scoring block (default 100,000)")
    p.add_argument("--batch-size", type=int, default=256, help="histories per scoring block (default 256)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--tmp", default=None, help="folder for the synthetic data (default: a new temp folder, removed)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    tmp = args.tmp or tempfile.mkdtemp(prefix="recommend-scale-")
    try:
        t0 = perf_counter()
        write_catalogue(os.path.join(tmp, "Big"), "Big", args.items, args.dim, seed=0)
        write_catalogue(os.path.join(tmp, "Seed"), "Seed", 100, args.dim, seed=1)
        write_s = perf_counter() - t0

        # a randomly initialised inductive UniSRec, saved as the trainer saves checkpoints
        config = build_config("UniSRec", "Seed", mode="inductive",
                              config_dict={"data_path": tmp, "use_gpu": False, "plm_size": args.dim})
        suffixes, sizes = _suffixes(config)
        torch.manual_seed(0)
        model = get_model("UniSRec")(config, _CatalogueDataset(config, Catalogue.from_folder(
            os.path.join(tmp, "Seed"), suffixes, sizes)))
        ckpt = os.path.join(tmp, "UniSRec-random.pth")
        save_checkpoint({"model": "UniSRec", "dataset": "Seed", "epoch": 0, "state_dict": model.state_dict(),
                         "config": config_to_plain(config), "optimizer": None, "scheduler": None,
                         "metrics": None, "item_tokens": None}, ckpt)
        del model

        rng = np.random.default_rng(1)
        lengths = rng.integers(1, args.max_len + 1, size=args.histories)
        histories = [[f"S{i:08d}" for i in rng.integers(0, args.items, size=n)] for n in lengths]
        rss_before = rss_mb()

        t0, c0 = perf_counter(), cpu_s()
        rec = recbole_mm.load(ckpt, catalogue=os.path.join(tmp, "Big"), device=args.device)
        load_s, load_c = perf_counter() - t0, cpu_s() - c0
        rss_loaded, peak_loaded = rss_mb(), peak_mb()

        t0, c0 = perf_counter(), cpu_s()
        rec.recommend(histories[:1], k=args.k, chunk_size=args.chunk_size, batch_size=args.batch_size)
        one_s, one_c = perf_counter() - t0, cpu_s() - c0

        with RssSampler(every=0.05) as sampler:
            t0, c0 = perf_counter(), cpu_s()
            recs = rec.recommend(histories, k=args.k, chunk_size=args.chunk_size, batch_size=args.batch_size)
            rec_s, rec_c = perf_counter() - t0, cpu_s() - c0
        assert len(recs) == args.histories and all(len(r.items) == args.k for r in recs)

        result = {
            "what": f"recommend top-{args.k} for {args.histories:,} histories over a synthetic catalogue of "
                    f"{args.items:,} items (random {args.dim}-d features), randomly initialised UniSRec "
                    f"(inductive, hidden {rec.model.hidden_size}), history items excluded",
            "items": args.items,
            "histories": args.histories,
            "mean_history_length": float(lengths.mean()),
            "dim": args.dim,
            "k": args.k,
            "chunk_size": args.chunk_size,
            "batch_size": args.batch_size,
            "device": args.device,
            "threads": torch.get_num_threads(),
            "seconds": {
                "write_synthetic_data": round(write_s, 2),
                "load_checkpoint_and_catalogue": round(load_s, 2),
                "recommend_one_history": round(one_s, 2),
                "recommend_all": round(rec_s, 2),
                "histories_per_second": round(args.histories / rec_s, 1),
            },
            # CPU time of this process (user + sys): what the work costs when the machine is shared
            "cpu_seconds": {
                "load_checkpoint_and_catalogue": round(load_c, 2),
                "recommend_one_history": round(one_c, 2),
                "recommend_all": round(rec_c, 2),
            },
            "load_average_at_end": os.getloadavg(),
            "memory_mb": {
                "feature_table": round((args.items + 1) * args.dim * 4 / 2**20, 1),
                "rss_before_load": round(rss_before, 1),
                "rss_after_load": round(rss_loaded, 1),
                "peak_rss_during_load": round(peak_loaded, 1),
                "peak_rss_during_recommend_all": round(sampler.peak, 1),
                "peak_rss_process": round(peak_mb(), 1),
                "unchunked_would_need": {
                    "item_table": round((args.items + 1) * rec.model.hidden_size * 4 / 2**20, 1),
                    "score_matrix": round(args.histories * (args.items + 1) * 4 / 2**20, 1),
                },
            },
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
            "command": "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "?") + " python " + " ".join(sys.argv),
        }
        print(json.dumps(result, indent=1))
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    finally:
        if not args.tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
