#!/usr/bin/env python
"""Recformer / Reo-LM context budget: seconds per training step and history items seen per user.

Example (what docs/fidelity.md reports):
    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/lm_context.py -m Recformer -d Scientific_mm \
        --data_path ../shared/data --steps 10 --max_tokens 128,256,512 --max_items=50

For every ``max_tokens`` budget: builds the model (fine-tuning props), times ``--steps``
training steps (after one warm-up step) and counts, over the test users, how many of their
history items (RecBole's list, at most ``MAX_ITEM_LIST_LENGTH``) have at least one token in the
sequence the model reads.  Extra ``--key=value`` pairs are config overrides.  Prints one JSON line
per budget.
"""

from __future__ import annotations

import argparse
import json
from time import perf_counter

import torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", required=True)
    p.add_argument("-d", "--dataset", required=True)
    p.add_argument("--steps", type=int, default=10, help="timed training steps per budget")
    p.add_argument("--max_tokens", default="128,256,512", help="comma-separated budgets")
    args, rest = p.parse_known_args(argv)

    from recbole.utils import init_seed

    from recbole_mm.cli import parse_overrides
    from recbole_mm.data import create_dataset, data_preparation
    from recbole_mm.quick_start import build_config, history_context
    from recbole_mm.trainer import MMTrainer
    from recbole_mm.utils import get_model

    for budget in [int(b) for b in args.max_tokens.split(",")]:
        overrides = parse_overrides(rest)
        overrides.update(max_tokens=budget, steps_per_epoch=args.steps + 1, show_progress=False, state="WARNING")
        config = build_config(args.model, args.dataset, "finetune", None, overrides=overrides)
        init_seed(config["seed"], config["reproducibility"])
        ds = create_dataset(config)
        train, valid, test = data_preparation(config, ds)
        model = get_model(config["model"])(config, train._dataset).to(config["device"])
        trainer = MMTrainer(config, model, ds, run_name="lm_context")
        if hasattr(model, "on_epoch_start"):
            model.on_epoch_start(0, train)
        t_step, it, n_tok, n_rows = [], iter(train), 0, 0
        model.train()
        for _ in range(args.steps + 1):
            inter = next(it).to(config["device"])
            n_tok += int(model.sequence_tokens(inter[model.ITEM_SEQ], inter[model.ITEM_SEQ_LEN]).lengths.sum())
            n_rows += len(inter)
            t = perf_counter()
            trainer.optimizer.zero_grad(set_to_none=True)
            model.calculate_loss(inter).backward()
            trainer.optimizer.step()
            t_step.append(perf_counter() - t)
        model.eval()
        ctx = history_context(model, test)
        print(json.dumps({
            "model": args.model, "max_tokens": budget, "max_items": model.max_items,
            "train_batch_size": config["train_batch_size"], "steps": args.steps,
            "s_per_step": round(sum(t_step[1:]) / args.steps, 3), "train_rows": len(train.dataset),
            "tokens_per_train_sequence": round(n_tok / n_rows, 1),
            "items_seen_per_test_user": ctx["history_items_seen"], "history_items_per_test_user": ctx["history_items"],
            "bf16": model.bf16, "threads": torch.get_num_threads(),
        }), flush=True)


if __name__ == "__main__":
    main()
