#!/usr/bin/env python
"""MISSRec vs its reference, two cheap checks on one dataset (docs/fidelity.md):

1. how many interest clusters the k-means uses: ours vs the reference's CPU path;
2. the diversity regulariser on the first training batch at initialisation:
   ``diversity_reg: reference`` (the reference's scale) vs ``mean`` (ours before).

The reference (gimpong/MM23-MISSRec ``cluster_utils.cluster_kmeans`` on its vendored TorchPQ
``MinibatchKMeans``, CPU branch) behaves as follows (read in its code, re-stated here, not
copied):

* ``euc_sim(..., inplace=True)`` squares the data and the centroids in place and takes the
  square root afterwards: both become their absolute values after the first distance
  computation (the data of ``fit_minibatch`` is a copy, the centroids are the model's);
* the new centroids are the per-cluster means of those absolute values, with weight
  ``1 / n_points_in_clusters`` = 1 on the first batch, so a cluster that got no point
  becomes the zero vector;
* ``error`` compares the updated centroids with themselves (0), so the loop stops after the
  first pass; with ``k = ceil(0.5 N)`` the batch is ``int(1.1 k)`` and the short rest is merged,
  so that pass is one batch of all ``N`` points;
* ``predict`` assigns the (signed) vectors to the nearest centroid, where the zero centroids
  of the empty clusters are the nearest for most vectors (the first of them on ties).

Usage: python benchmarks/missrec_reference_checks.py --data_path ../shared/data [-d Scientific_mm] [--seed 2020]
Prints one JSON line: vectors, k, clusters used by ours and by the reference's behaviour, the
regulariser under both scales and their ratio.
"""

from __future__ import annotations

import argparse
import json
import math

import torch


def reference_cpu_kmeans(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Assignments the reference's CPU path produces for ``x [N, D]`` (module docstring)."""
    n = x.size(0)
    init = x[torch.randperm(n, generator=generator)[:k]]
    labels = torch.cdist(x, init).argmin(1)  # the one correct distance computation
    centroids = torch.zeros(k, x.size(1)).index_add_(0, labels, x.abs())
    counts = torch.bincount(labels, minlength=k).clamp_min(1).unsqueeze(1)
    centroids = centroids / counts  # empty clusters stay 0 (weight 1 on the first batch)
    return torch.cdist(x, centroids).argmin(1)  # argmin keeps the first of equal distances


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--dataset", default="Scientific_mm")
    p.add_argument("--data_path", required=True)
    p.add_argument("--seed", type=int, default=2020)
    args = p.parse_args(argv)

    from recbole.utils import init_seed

    from recbole_mm.data import create_dataset, data_preparation
    from recbole_mm.model.missrec import MISSRec
    from recbole_mm.quick_start import build_config

    reg = {}
    for scale in ("reference", "mean"):
        cfg = build_config("MISSRec", args.dataset, mode="inductive",
                           overrides={"data_path": args.data_path, "seed": args.seed, "use_gpu": False,
                                      "state": "WARNING", "diversity_reg": scale})
        init_seed(cfg["seed"], cfg["reproducibility"])
        train, _, _ = data_preparation(cfg, create_dataset(cfg))
        model = MISSRec(cfg, train._dataset).eval()
        model.on_epoch_start(0)  # our k-means on the freshly initialised adaptors (what epoch 0 clusters)
        batch = next(iter(train))
        with torch.no_grad():
            reg[scale] = float(model.encode(batch["item_id_list"], batch["item_length"], model.compute_item_table())[1])
    ours = torch.unique(torch.cat([getattr(model, f"{m}_interest")[1:] for m in model.modalities])).numel()
    with torch.no_grad():
        x = torch.cat([model._adapted(m, torch.arange(1, model.n_items)) for m in model.modalities])
    k = max(1, math.ceil(model.interest_ratio * x.size(0)))
    ref = reference_cpu_kmeans(x, k, torch.Generator().manual_seed(args.seed))
    print(json.dumps({"dataset": args.dataset, "seed": args.seed, "vectors": x.size(0), "k": k,
                      "clusters_used_ours": int(ours), "clusters_used_reference_cpu_path": int(ref.unique().numel()),
                      "batch_rows": int(batch["item_length"].numel()), "gamma": float(cfg["gamma"]),
                      "regulariser_reference_scale": reg["reference"], "regulariser_mean_scale": reg["mean"],
                      "ratio": reg["reference"] / reg["mean"]}))


if __name__ == "__main__":
    main()
