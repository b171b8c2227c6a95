#!/usr/bin/env python
"""VQRec vs UniSRec seconds per training epoch in one run, plus VQ code fitting time.

Example (1 thread, pinned):
    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/vqrec_speed.py --data_path ../shared/data \
        --fit_sizes 5000 --out benchmarks/results/VQRec-speed.json

Each model is timed by ``benchmarks/speed.py`` (same data, same settings, ``--mode inductive``);
VQRec's codes are fitted (or loaded from their cache) before its epochs are timed.  Code fitting:
``--fit_sizes`` synthetic ``N x --fit_dim`` float32 Gaussian features, ``OPQ32,IVF1,PQ32x8``
fitted on all N rows (faiss's OPQ/PQ training sample at most 65,536 of them) then all N encoded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from time import perf_counter

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import speed  # noqa: E402


def fit_seconds(n: int, dim: int, code_dim: int, code_cap: int) -> dict:
    from recbole_mm.data.codes import encode, fit_quantiser

    x = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
    t = perf_counter()
    quantiser = fit_quantiser(x, code_dim, code_cap)
    fit = perf_counter() - t
    t = perf_counter()
    encode(torch.from_numpy(x), quantiser)
    return {"items": n, "dim": dim, "fit_seconds": fit, "encode_seconds": perf_counter() - t}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", required=True)
    p.add_argument("-d", "--dataset", default="Scientific_mm")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--fit_sizes", default="5000", help="comma-separated item counts for the fitting time ('' to skip)")
    p.add_argument("--fit_dim", type=int, default=384)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    report = {"threads": torch.get_num_threads(), "models": {}, "code_fitting": []}
    with tempfile.TemporaryDirectory() as tmp:
        for model in ("UniSRec", "VQRec"):
            out = os.path.join(tmp, f"{model}.json")
            speed.main(["-m", model, "-d", args.dataset, "--data_path", args.data_path, "--mode", "inductive",
                        "--epochs", str(args.epochs), "--out", out])
            with open(out) as f:
                report["models"][model] = json.load(f)
    uni, vq = (report["models"][m]["mean_train_seconds_per_epoch"] for m in ("UniSRec", "VQRec"))
    report["vqrec_over_unisrec_epoch"] = vq / uni
    for n in [int(s) for s in args.fit_sizes.split(",") if s]:
        report["code_fitting"].append(fit_seconds(n, args.fit_dim, 32, 256))
        print(report["code_fitting"][-1], flush=True)
    report["command"] = " ".join(["vqrec_speed.py", *(argv if argv is not None else sys.argv[1:])])
    print(json.dumps({k: v for k, v in report.items() if k != "models"}, indent=1))
    if args.out:
        from recbole_mm.utils import write_json

        write_json(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
