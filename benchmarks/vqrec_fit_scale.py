"""VQ-Rec item codes at catalogue scale (issue 22): seconds to fit the OPQ + PQ quantiser
(recbole_mm.data.codes.fit_quantiser, the default 32 sub-codes x 256 codewords) and to encode
every item, on synthetic 384-d features (MiniLM's size) of N items.

    python benchmarks/vqrec_fit_scale.py [--items 1000000] [--dim 384] [--threads 2]

Synthetic features: a mixture of 1,000 Gaussian clusters on the unit sphere (text embeddings are
clustered), fixed seed.  Prints one JSON line; the figures are the machine's, not a target."""

from __future__ import annotations

import argparse
import json
import os
import resource
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=1_000_000, help="number of items (default: %(default)s)")
    p.add_argument("--dim", type=int, default=384, help="feature size (default: %(default)s)")
    p.add_argument("--n-sub", type=int, default=32, help="sub-codes per item (default: %(default)s)")
    p.add_argument("--code-cap", type=int, default=256, help="codewords per sub-code (default: %(default)s)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="faiss / torch threads (default: all)")
    a = p.parse_args()

    import numpy as np
    import torch

    from recbole_mm.data.codes import _faiss, encode, fit_quantiser

    torch.set_num_threads(a.threads)
    _faiss().omp_set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((1000, a.dim)).astype(np.float32)
    x = centres[rng.integers(0, 1000, a.items)] + 0.5 * rng.standard_normal((a.items, a.dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    t0 = time.perf_counter()
    q = fit_quantiser(x, a.n_sub, a.code_cap)
    t_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    codes = encode(torch.from_numpy(x), q)
    t_enc = time.perf_counter() - t0
    print(json.dumps({"items": a.items, "dim": a.dim, "n_sub": a.n_sub, "code_cap": a.code_cap,
                      "threads": a.threads, "fit_s": round(t_fit, 1), "encode_s": round(t_enc, 1),
                      "codes_shape": list(codes.shape), "distinct_codes_sub0": int(codes[:, 0].unique().numel()),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))


if __name__ == "__main__":
    main()
