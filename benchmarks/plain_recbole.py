#!/usr/bin/env python
"""Plain RecBole 1.2.1 on our atomic files: the reference point for the ID baselines.

Runs RecBole's own ``create_dataset`` / ``data_preparation`` / ``Trainer`` (only our
``recbole_mm.compat`` fixes applied, without which RecBole 1.2.1 does not start on numpy 2 /
torch >= 2.6) with the same data and training config as ``run_finetune.py``:

    python benchmarks/plain_recbole.py -m SASRec -d Scientific_mm --data_path ../shared/data \
        [--seed 2020] [--epochs 300] [--out benchmarks/out/plain-SASRec.json]

and prints/writes the best-validation epoch and the test metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from time import perf_counter


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default="SASRec", help="a RecBole sequential model (default: %(default)s)")
    p.add_argument("-d", "--dataset", default="Scientific_mm", help="dataset folder under --data_path")
    p.add_argument("--data_path", default="../shared/data", help="folder holding the dataset folder")
    p.add_argument("--seed", type=int, default=2020, help="random seed (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=300, help="maximum epochs (early stop after 10 without improvement)")
    p.add_argument("--out", default=None, help="write the result JSON here")
    a = p.parse_args(argv)

    import recbole_mm.compat as compat

    compat.apply()
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.trainer import Trainer
    from recbole.utils import get_model, init_logger, init_seed

    cfg = {
        "data_path": a.data_path, "seed": a.seed, "reproducibility": True, "use_gpu": False,
        "benchmark_filename": ["train", "valid", "test"], "alias_of_item_id": ["item_id_list"],
        "load_col": {"inter": ["user_id", "item_id_list", "item_id"]}, "MAX_ITEM_LIST_LENGTH": 50,
        "train_neg_sample_args": None, "loss_type": "CE", "epochs": a.epochs, "train_batch_size": 2048,
        "learning_rate": 0.001, "stopping_step": 10, "eval_step": 1, "eval_batch_size": 2048,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
        "metrics": ["Recall", "NDCG", "MRR"], "topk": [10, 50], "valid_metric": "NDCG@10",
        "show_progress": False, "checkpoint_dir": os.path.join("saved", "plain"),
    }
    config = Config(model=a.model, dataset=a.dataset, config_dict=cfg)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    dataset = create_dataset(config)
    train, valid, test = data_preparation(config, dataset)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train._dataset).to(config["device"])
    trainer = Trainer(config, model)
    t0 = perf_counter()
    best_valid, valid_result = trainer.fit(train, valid, saved=True, show_progress=False)
    test_result = trainer.evaluate(test, load_best_model=True, show_progress=False)
    res = {"model": a.model, "dataset": a.dataset, "seed": a.seed, "best_valid": dict(valid_result),
           "test": dict(test_result), "seconds": perf_counter() - t0,
           "command": "plain_recbole.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    print(json.dumps(res))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
