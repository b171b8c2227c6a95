#!/usr/bin/env python
"""Seconds per training epoch, full-ranking evaluation users/s and peak RSS for any model/dataset.

Example:
    python benchmarks/speed.py -m SASRec -d Scientific_mm --data_path ../shared/data --epochs 3 \
        --out benchmarks/out/SASRec-Scientific_mm.json

Trains ``--epochs`` epochs (no early stopping, nothing saved), then times a full-ranking pass
over the test users.  Extra ``--key=value`` pairs are config overrides, as in run_finetune.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
from time import perf_counter

import torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", required=True, help="model name")
    p.add_argument("-d", "--dataset", required=True, help="dataset folder under data_path")
    p.add_argument("--stage", default="finetune", choices=["finetune", "pretrain"], help="props stage to layer")
    p.add_argument("--mode", default=None, choices=["inductive", "transductive"], help="transfer mode for feature models")
    p.add_argument("--epochs", type=int, default=3, help="training epochs to time (default 3)")
    p.add_argument("--out", default=None, help="write the JSON report here (default: print only)")
    args, rest = p.parse_known_args(argv)

    from recbole.utils import init_seed

    from recbole_mm.cli import parse_overrides
    from recbole_mm.data import create_dataset, data_preparation
    from recbole_mm.quick_start import build_config, write_json
    from recbole_mm.trainer import MMTrainer
    from recbole_mm.utils import get_model

    overrides = parse_overrides(rest)
    overrides.update(epochs=args.epochs, show_progress=False, state="WARNING")
    config = build_config(args.model, args.dataset, args.stage, args.mode, overrides=overrides)
    init_seed(config["seed"], config["reproducibility"])
    t0 = perf_counter()
    ds = create_dataset(config)
    train, valid, test = data_preparation(config, ds)
    load_s = perf_counter() - t0
    model = get_model(config["model"])(config, train._dataset).to(config["device"])
    trainer = MMTrainer(config, model, ds, run_name="benchmark")
    epochs = []
    for e in range(args.epochs):
        t = perf_counter()
        trainer._train_epoch(train, e)
        epochs.append(perf_counter() - t)
    eval_data = test or valid
    t = perf_counter()
    result = trainer.evaluate(eval_data, load_best_model=False) if eval_data else None
    eval_s = perf_counter() - t
    n_users = len(eval_data._dataset) if eval_data else 0
    report = {
        "model": config["model"],
        "dataset": config["dataset"],
        "device": str(config["device"]),
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "load_seconds": load_s,
        "train_seconds_per_epoch": epochs,
        "mean_train_seconds_per_epoch": sum(epochs[1:] or epochs) / len(epochs[1:] or epochs),
        "train_rows": len(train._dataset),
        "eval_users": n_users,
        "eval_seconds": eval_s,
        "eval_users_per_second": n_users / eval_s if eval_s else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "params": sum(p.numel() for p in model.parameters()),
        "metrics_after_training": result,
        "command": " ".join([os.path.basename(sys.argv[0]), *(argv if argv is not None else sys.argv[1:])]),
    }
    print(json.dumps(report, indent=1))
    if args.out:
        write_json(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
