#!/usr/bin/env python
"""Full-ranking evaluation at catalogue scale: 10k, 100k and 1M items.

For each size, in a fresh process (so that peak RSS is that size's own), writes a synthetic
dataset in a temporary folder -- ``--items`` items with random float32 text features of the
real dimension (``--dim``, 512 as Scientific_mm's CLIP features), a ``.text`` line per item,
``--users`` users with random histories (lengths uniform in 1..``--max-len``) -- loads it with
``create_dataset`` / ``data_preparation`` (validation included), builds a randomly initialised
UniSRec (``--mode``, default inductive: features only) and times RecBole's full-ranking
evaluator over the test users: ``MMTrainer.evaluate``, i.e. the model's item table once per
evaluation (``item_table_cache``), ``full_sort_predict`` per batch of ``--eval-batch-size``
users (a ``[batch, items]`` score block), RecBole's top-k collector and metrics.

Reported per size: seconds (dataset load, model, item table, evaluation), evaluation seconds
per 1k users, peak RSS during the evaluation (sampled every 20 ms) and of the process, and
the largest tensor created during the evaluation (a ``TorchDispatchMode`` sees every aten
op's outputs): with ``items x items`` never allocated it stays at ``batch x items`` (or the
item-table intermediate ``items x n_exps x hidden``), i.e. linear in the item count.
Each size is evaluated ``--repeat`` times (the least CPU time is reported).  Between sizes: the
growth of the CPU time per 1k users (``linear``: at most the item ratio, within the spread
between the repeats; ``linear_strict``: without it) -- CPU time rather than wall time, which on
a shared machine measures the other processes too (both are in the JSON).

Item table: UniSRec's ``compute_item_table`` runs its MoE adaptor on all items at once, which
materialises ``[items, n_exps, hidden]`` (twice: the projection and its bias-shifted copy),
~19 GB at 1M items with the reference config (8 experts x 300).  ``--item-table auto``
(default) uses the model's own method while that transient fits in ``--table-mem-gb`` and
otherwise computes the same table through the model's own adaptor in ``--table-chunk``-item
chunks (checked equal to ``compute_item_table`` at the first size), as what the model's
item-table cache computes once per evaluation; the JSON says which path each size took.

    OMP_NUM_THREADS=1 python benchmarks/eval_scaling.py --users 1000 --repeat 2 \\
        --out benchmarks/results/eval-scaling.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from contextlib import nullcontext
from time import perf_counter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))


from measure import RssSampler, cpu_s, peak_mb, rss_mb, sys_s  # noqa: E402


def write_dataset(folder, name, n_items, n_users, dim, max_len, seed, block=100_000):
    import numpy as np

    os.makedirs(folder, exist_ok=True)
    p = lambda ext: os.path.join(folder, f"{name}.{ext}")  # noqa: E731
    with open(p("item2index"), "w") as f:
        for s in range(0, n_items, block):
            f.write("".join(f"I{i:08d}\t{i}\n" for i in range(s, min(s + block, n_items))))
    with open(p("text"), "w") as f:
        f.write("item_id:token\ttext:token_seq\n")
        for s in range(0, n_items, block):
            f.write("".join(f"I{i:08d}\tsynthetic item {i}\n" for i in range(s, min(s + block, n_items))))
    rng = np.random.default_rng(seed)
    with open(p("feat1CLS"), "wb") as f:
        for s in range(0, n_items, block):
            rng.standard_normal((min(block, n_items - s), dim), dtype=np.float32).tofile(f)
    with open(p("user2index"), "w") as f:
        f.writelines(f"U{u:07d}\t{u}\n" for u in range(n_users))
    header = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
    rows = {"train": [header], "valid": [header], "test": [header]}
    lengths = rng.integers(1, max_len + 1, size=n_users)
    for u, n in enumerate(lengths):
        seq = [str(i) for i in rng.integers(0, n_items, size=int(n) + 3)]  # indices of .item2index
        rows["train"].append(f"{u}\t{seq[0]}\t{seq[1]}\n")
        rows["valid"].append(f"{u}\t{' '.join(seq[:-2][-max_len:])}\t{seq[-2]}\n")
        rows["test"].append(f"{u}\t{' '.join(seq[:-1][-max_len:])}\t{seq[-1]}\n")
    for split, lines in rows.items():
        with open(p(f"{split}.inter"), "w") as f:
            f.writelines(lines)
    return float(lengths.mean())


def chunked_item_table(model, chunk):
    """UniSRec's ``compute_item_table`` (adapted text features + ID embedding in transductive
    mode) through the model's own adaptor, ``chunk`` items at a time."""
    import torch

    n = model.text_features.size(0)
    parts = []
    for s in range(0, n, chunk):
        t = model.moe_adaptor(model.text_features[s:s + chunk])
        if model.item_embedding is not None:
            t = t + model.item_embedding.weight[s:s + chunk]
        parts.append(t)
    return torch.cat(parts)


def one_size(args) -> dict:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from recbole_mm.data import create_dataset, data_preparation
    from recbole_mm.quick_start import build_config
    from recbole_mm.trainer import MMTrainer
    from recbole_mm.utils import get_model

    class LargestTensor(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.numel, self.shape, self.op = 0, None, None

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                    self.numel, self.shape, self.op = t.numel(), list(t.shape), str(func)
            return out

    n = args.items
    tmp = tempfile.mkdtemp(prefix="eval-scaling-", dir=args.tmp)
    old_cwd = os.getcwd()
    try:
        os.chdir(tmp)  # RecBole writes log/, log_tensorboard/, saved/ into the working directory
        t0 = perf_counter()
        mean_len = write_dataset(os.path.join(tmp, "Synth"), "Synth", n, args.users, args.dim, args.max_len, seed=0)
        write_s = perf_counter() - t0

        config = build_config("UniSRec", "Synth", mode=args.mode, overrides={
            "data_path": tmp, "use_gpu": "False", "show_progress": "False", "state": "WARNING",
            "eval_batch_size": str(args.eval_batch_size), "epochs": "0"})
        t0 = perf_counter()
        ds = create_dataset(config)
        _, _, test = data_preparation(config, ds)
        load_s = perf_counter() - t0
        rss_data = rss_mb()
        torch.manual_seed(0)
        t0 = perf_counter()
        model = get_model("UniSRec")(config, test._dataset).eval()
        model_s = perf_counter() - t0
        hidden, n_exps = model.hidden_size, model.moe_adaptor.n_exps
        if args.drop_dataset_features:  # the model holds its own copy (a registered buffer)
            for d in (ds, test._dataset):  # (dataset copies share these dicts)
                d.features.clear()
                d.feature_presence.clear()
            gc.collect()
        trainer = MMTrainer(config, model, ds, run_name="eval-scaling")
        rss_model = rss_mb()

        transient_gb = 2 * (n + 1) * n_exps * hidden * 4 / 2**30
        path = args.item_table
        if path == "auto":
            path = "model" if transient_gb <= args.table_mem_gb else "chunked"
        check = None
        with torch.no_grad():
            if args.check_chunked:
                a = model.compute_item_table()
                b = chunked_item_table(model, max(1, n // 7))
                check = float((a - b).abs().max())
                del a, b

        # the item table as the evaluation computes it (once, in the model's item-table cache), timed
        own_table = model.compute_item_table if path == "model" else (lambda: chunked_item_table(model, args.table_chunk))
        table_in_eval = {}

        def timed_table():
            t, c = perf_counter(), cpu_s()
            out = own_table()
            table_in_eval["seconds"], table_in_eval["cpu_seconds"] = perf_counter() - t, cpu_s() - c
            table_in_eval["calls"] = table_in_eval.get("calls", 0) + 1
            return out

        model.compute_item_table = timed_table
        largest = LargestTensor()
        repeats = []
        with RssSampler() as sampler:
            for r in range(args.repeat):  # the fastest (least disturbed) of --repeat evaluations is reported
                table_in_eval.clear()
                t0, c0, s0 = perf_counter(), cpu_s(), sys_s()
                with largest if r == 0 else nullcontext():
                    result = trainer.evaluate(test, load_best_model=False)
                eval_s, eval_c = perf_counter() - t0, cpu_s() - c0
                repeats.append({"seconds": eval_s, "cpu_seconds": eval_c, "sys_seconds": sys_s() - s0,
                                "item_table": dict(table_in_eval)})
        best = min(repeats, key=lambda x: x["cpu_seconds"])
        eval_s, eval_c, table_in_eval = best["seconds"], best["cpu_seconds"], best["item_table"]
        users = len(test._dataset)
        return {
            "items": n,
            "users": users,
            "mean_history_length": mean_len,
            "eval_batch_size": args.eval_batch_size,
            "item_table_path": path,
            "item_table_transient_gb_model_path": round(transient_gb, 2),
            "chunked_vs_model_max_abs_diff": check,
            "seconds": {
                "write_synthetic_data": round(write_s, 2),
                "load_dataset": round(load_s, 2),
                "build_model": round(model_s, 2),
                "evaluate": round(eval_s, 3),
                "evaluate_item_table": round(table_in_eval["seconds"], 3),
                "evaluate_scoring": round(eval_s - table_in_eval["seconds"], 3),
                "evaluate_per_1k_users": round(eval_s / users * 1000, 3),
                "evaluate_scoring_per_1k_users": round((eval_s - table_in_eval["seconds"]) / users * 1000, 3),
            },
            # CPU time of this process (user + sys): what the work costs when the machine is shared
            "cpu_seconds": {
                "evaluate": round(eval_c, 3),
                "evaluate_user": round(eval_c - best["sys_seconds"], 3),
                "evaluate_system": round(best["sys_seconds"], 3),  # page faults of fresh allocations, reclaim
                "evaluate_user_per_1k_users": round((eval_c - best["sys_seconds"]) / users * 1000, 3),
                "evaluate_item_table": round(table_in_eval["cpu_seconds"], 3),
                "evaluate_scoring": round(eval_c - table_in_eval["cpu_seconds"], 3),
                "evaluate_per_1k_users": round(eval_c / users * 1000, 3),
                "evaluate_scoring_per_1k_users": round((eval_c - table_in_eval["cpu_seconds"]) / users * 1000, 3),
            },
            "item_table_computations_per_evaluation": table_in_eval["calls"],
            "repeats": [{"seconds": round(x["seconds"], 3), "cpu_seconds": round(x["cpu_seconds"], 3),
                         "of_which_system_seconds": round(x["sys_seconds"], 3),
                         "item_table_cpu_seconds": round(x["item_table"]["cpu_seconds"], 3)} for x in repeats],
            "memory_mb": {
                "feature_table": round((n + 1) * args.dim * 4 / 2**20, 1),
                "item_table": round((n + 1) * hidden * 4 / 2**20, 1),
                "score_block": round(args.eval_batch_size * (n + 1) * 4 / 2**20, 1),
                "rss_after_dataset": round(rss_data, 1),
                "rss_after_model": round(rss_model, 1),
                "peak_rss_during_evaluate": round(sampler.peak, 1),
                "peak_rss_process": round(peak_mb(), 1),
                "items_x_items_float32_would_be": round((n + 1) ** 2 * 4 / 2**20, 1),
            },
            "largest_tensor_during_evaluate": {"shape": largest.shape, "numel": largest.numel, "op": largest.op,
                                               "numel_per_item": round(largest.numel / (n + 1), 2)},
            "metrics": result,
            "model": {"hidden_size": hidden, "n_exps": n_exps, "train_stage": config["train_stage"],
                      "params": sum(p.numel() for p in model.parameters())},
        }
    finally:
        os.chdir(old_cwd)
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,100000,1000000", help="catalogue sizes (default 10k,100k,1M)")
    p.add_argument("--users", type=int, default=1000, help="test users evaluated per size (default 1000)")
    p.add_argument("--dim", type=int, default=512, help="feature size (default 512, Scientific_mm's CLIP)")
    p.add_argument("--max-len", type=int, default=20, help="history lengths uniform in 1..max-len (default 20)")
    p.add_argument("--mode", default="inductive", choices=["inductive", "transductive"], help="UniSRec mode")
    p.add_argument("--eval-batch-size", type=int, default=128,
                   help="users per evaluation batch, the same at every size (default 128: a 512 MB score "
                        "block at 1M items; RecBole's evaluator holds [batch, items] scores + an int mask)")
    p.add_argument("--item-table", default="auto", choices=["auto", "model", "chunked"],
                   help="how the item table is computed (see above; default auto)")
    p.add_argument("--table-mem-gb", type=float, default=4.0,
                   help="auto: the model's own compute_item_table while its transient fits in this (default 4)")
    p.add_argument("--table-chunk", type=int, default=100_000, help="items per chunk of the chunked table")
    p.add_argument("--keep-dataset-features", dest="drop_dataset_features", action="store_false",
                   help="keep the dataset's copy of the features next to the model's (default: dropped once "
                        "the model has its own)")
    p.add_argument("--repeat", type=int, default=2,
                   help="evaluations per size; the one with the least CPU time is reported (default 2)")
    p.add_argument("--tmp", default=None, help="folder for the synthetic data (default: system temp)")
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("--one-size", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--check-chunked", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.one_size is not None:  # a child: one catalogue size
        args.items = args.one_size
        res = one_size(args)
        with open(args.result_file, "w") as f:
            json.dump(res, f)
        return 0

    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    results = []
    for i, n in enumerate(sizes):
        with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as f:
            res_file = f.name
        cmd = [sys.executable, os.path.abspath(__file__), "--one-size", str(n), "--result-file", res_file,
               "--users", str(args.users), "--dim", str(args.dim), "--max-len", str(args.max_len),
               "--mode", args.mode, "--eval-batch-size", str(args.eval_batch_size),
               "--item-table", args.item_table, "--table-mem-gb", str(args.table_mem_gb),
               "--table-chunk", str(args.table_chunk), "--repeat", str(args.repeat)]
        if not args.drop_dataset_features:
            cmd.append("--keep-dataset-features")
        if args.tmp:
            cmd += ["--tmp", args.tmp]
        if i == 0:
            cmd.append("--check-chunked")
        print(f"== {n:,} items", flush=True)
        t0 = perf_counter()
        proc = subprocess.run(cmd)
        wall = perf_counter() - t0
        if proc.returncode != 0:
            results.append({"items": n, "error": f"exit status {proc.returncode}", "wall_seconds": round(wall, 1)})
            print(f"   failed: exit status {proc.returncode}", flush=True)
            continue
        with open(res_file) as f:
            res = json.load(f)
        os.unlink(res_file)
        res["wall_seconds"] = round(wall, 1)
        results.append(res)
        s, m = res["seconds"], res["memory_mb"]
        print(f"   evaluate {s['evaluate']:.1f} s for {res['users']} users ({s['evaluate_per_1k_users']:.2f} s / 1k users; "
              f"item table {s['evaluate_item_table']:.2f} s ({res['item_table_path']}), scoring "
              f"{s['evaluate_scoring_per_1k_users']:.2f} s / 1k users), peak RSS {m['peak_rss_during_evaluate']:.0f} MB, "
              f"largest tensor {res['largest_tensor_during_evaluate']['shape']}", flush=True)

    scaling, linear, linear_strict = summarize(results)
    report = {
        "what": "RecBole full-ranking evaluation (MMTrainer.evaluate: item table once, full_sort_predict per batch, "
                "top-k collector) of a randomly initialised UniSRec over synthetic catalogues with random "
                f"{args.dim}-d features",
        "sizes": results,
        "scaling": scaling,
        "criterion": "CPU time (user + system) of the evaluation per 1k users grows at most as the item count, "
                     "within the spread between the --repeat evaluations of the two sizes (wall time is "
                     "listed but not used: on a shared machine it measures the other processes too)",
        "linear": linear,
        "linear_strict": linear_strict,
        "threads": int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or None,
        "load_average_at_end": os.getloadavg(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "command": "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "?") + " python benchmarks/eval_scaling.py "
                   + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    try:
        import torch

        report["machine"] += f", torch {torch.__version__}"
    except ImportError:  # pragma: no cover
        pass
    print(json.dumps({k: report[k] for k in ("scaling", "linear", "linear_strict")}, indent=1))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0 if all("error" not in r for r in results) else 1


def _spread(size_result) -> float:
    """Relative spread of the CPU time between the repeated evaluations of one size."""
    cpu = [x["cpu_seconds"] for x in size_result.get("repeats") or []]
    return (max(cpu) - min(cpu)) / min(cpu) if len(cpu) > 1 and min(cpu) > 0 else 0.0


def summarize(results):
    """Growth from each size to the next: (pairs, linear within the repeats' spread, linear strictly)."""
    ok = [r for r in results if "error" not in r]
    scaling = []
    for a, b in zip(ok, ok[1:]):
        item_ratio = b["items"] / a["items"]
        time_ratio = b["seconds"]["evaluate_per_1k_users"] / a["seconds"]["evaluate_per_1k_users"]
        cpu_ratio = b["cpu_seconds"]["evaluate_per_1k_users"] / a["cpu_seconds"]["evaluate_per_1k_users"]
        user_ratio = b["cpu_seconds"]["evaluate_user_per_1k_users"] / a["cpu_seconds"]["evaluate_user_per_1k_users"]
        spread = max(_spread(a), _spread(b))
        scaling.append({"from_items": a["items"], "to_items": b["items"], "items_ratio": item_ratio,
                        "time_per_1k_users_ratio": round(time_ratio, 3),
                        "cpu_time_per_1k_users_ratio": round(cpu_ratio, 3),
                        "user_cpu_time_per_1k_users_ratio": round(user_ratio, 3),
                        "item_table_cpu_ratio": round(b["cpu_seconds"]["evaluate_item_table"]
                                                      / a["cpu_seconds"]["evaluate_item_table"], 3),
                        "scoring_cpu_per_1k_users_ratio": round(b["cpu_seconds"]["evaluate_scoring_per_1k_users"]
                                                                / a["cpu_seconds"]["evaluate_scoring_per_1k_users"], 3),
                        "peak_rss_ratio": round(b["memory_mb"]["peak_rss_during_evaluate"]
                                                / a["memory_mb"]["peak_rss_during_evaluate"], 3),
                        "repeat_spread": round(spread, 3),
                        "at_most_linear_strict": cpu_ratio <= item_ratio,
                        "at_most_linear": cpu_ratio <= item_ratio * (1 + spread)})
    if not scaling:
        return scaling, None, None
    return scaling, all(x["at_most_linear"] for x in scaling), all(x["at_most_linear_strict"] for x in scaling)


if __name__ == "__main__":
    sys.exit(main())
