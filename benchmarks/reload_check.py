#!/usr/bin/env python
"""Reload a finished run's best checkpoint with ``torch.load(weights_only=True)`` and re-evaluate it.

    python benchmarks/reload_check.py saved/<run>.json [--key=value ...]

Rebuilds the dataset and a fresh model from the run's own config (overrides, e.g. --data_path,
apply on top), loads ``<run>.pth``, evaluates the test split and compares with the test metrics
stored in ``<run>.json``.  Exit status 0 only when every metric is identical.
"""

from __future__ import annotations

import json
import sys

import torch


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    from recbole.utils import init_seed

    from recbole_mm.cli import parse_overrides
    from recbole_mm.data import create_dataset, data_preparation
    from recbole_mm.quick_start import build_config
    from recbole_mm.trainer import MMTrainer
    from recbole_mm.utils import get_model

    with open(argv[0]) as f:
        run = json.load(f)
    ckpt = torch.load(run["checkpoint"], map_location="cpu", weights_only=True)
    cfg = dict(run["config"])
    keep = {"data_path", "train_stage", "seed", "topk", "metrics", "valid_metric", "eval_batch_size",
            "MAX_ITEM_LIST_LENGTH", "plm_suffix", "img_suffix", "hidden_size", "n_layers", "n_heads",
            "inner_size", "n_exps", "temperature"}
    overrides = {k: v for k, v in cfg.items() if k in keep and v is not None}
    overrides["data_path"] = cfg.get("data_root") or overrides.get("data_path")  # before the dataset was appended
    overrides.update(parse_overrides(argv[1:]), show_progress=False, state="WARNING")
    config = build_config(run["model"], run["dataset"], run["stage"], overrides=overrides)
    init_seed(config["seed"], config["reproducibility"])
    ds = create_dataset(config)
    _, _, test = data_preparation(config, ds)
    model = get_model(config["model"])(config, test._dataset)
    model.load_state_dict(ckpt["state_dict"])
    trainer = MMTrainer(config, model, ds, run_name="reload-check")
    again = trainer.evaluate(test, load_best_model=False)
    same = again == run["test"]
    print(json.dumps({"checkpoint": run["checkpoint"], "weights_only": True, "stored_test": run["test"],
                      "reloaded_test": again, "identical": same}, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
