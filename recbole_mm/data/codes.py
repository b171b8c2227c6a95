"""Discrete item codes for VQ-Rec: OPQ rotation + product quantisation of the text features.

The reference (RUCAIBox/VQ-Rec ``pq.py``, ``--strict 1``) trains the faiss index
``OPQ32,IVF1,PQ32x8`` (inner-product metric) on the features of the items that occur in the
training file only, then encodes every item of the catalogue with it.  Here faiss (``pip install
faiss-cpu``, the ``vq`` extra) only *fits* the quantiser; its parameters are extracted as plain
tensors (OPQ rotation ``A``/``b``, the single IVF centroid, the PQ codebooks) and encoding is a
few lines of torch (:func:`encode`), so a model carries its quantiser in its checkpoint and encodes
new items (a catalogue swap) without faiss.

:func:`item_codes` caches the fit next to the dataset in ``<d>.<plm_suffix>.OPQ<M>,IVF1,PQ<M>x<b>.codes.pt``
(tensors and plain data, written atomically), keyed by the sha256 of the feature table, the
training items and the code settings: it is refitted only when one of them changes.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import stat
import warnings
from logging import getLogger

import numpy as np
import torch

from recbole_mm.data.readers import DataValidationError
from recbole_mm.utils import atomic_write

FORMAT = "recbole_mm.vq_codes/1"
QUANTISER_KEYS = ("rotation", "bias", "coarse", "centroids")


class CodesError(DataValidationError):
    """Codes cannot be fitted with these settings (one line saying which key to change; the CLI
    reports it with exit code 2)."""


class FaissMissing(CodesError, ImportError):
    """faiss is not installed (the ``vq`` extra)."""


def _faiss():
    try:
        import faiss
    except ImportError:
        raise FaissMissing("VQRec needs faiss to fit its item codes: pip install faiss-cpu (or recbole_mm[vq])") from None
    return faiss


def factory_string(n_sub: int, n_bits: int) -> str:
    return f"OPQ{n_sub},IVF1,PQ{n_sub}x{n_bits}"


def check_settings(n_sub: int, code_cap: int, dim: int, n_train: int | None = None) -> int:
    """Bits per sub-code (``log2(code_cap)``), after checking the settings against the data."""
    n_bits = int(round(math.log2(code_cap))) if code_cap > 0 else 0
    if code_cap < 2 or 2**n_bits != code_cap or n_bits > 16:
        raise CodesError(f"code_cap must be a power of two between 2 and 65536, got {code_cap}")
    if n_sub < 1 or dim % n_sub:
        raise CodesError(f"code_dim {n_sub} must divide the text feature size {dim} (e.g. --code_dim={_divisor(dim)})")
    if n_train is not None and n_train < code_cap:
        fit = 2 ** int(math.log2(max(n_train, 2)))
        raise CodesError(
            f"only {n_train} training items for code_cap {code_cap} codewords per sub-code: "
            f"pass --code_cap={fit} (a power of two, at most the number of training items)"
        )
    return n_bits


def _divisor(dim: int) -> int:
    return max(d for d in (1, 2, 4, 8, 16, 32) if dim % d == 0)


def fit_quantiser(x: np.ndarray, n_sub: int, code_cap: int) -> dict[str, torch.Tensor]:
    """Train ``OPQ<n_sub>,IVF1,PQ<n_sub>x<log2 code_cap>`` (inner product, as the reference) on
    ``x`` ``[n, d]`` and return its parameters as tensors (see :func:`encode`)."""
    faiss = _faiss()
    x = np.ascontiguousarray(x, dtype=np.float32)
    n_bits = check_settings(n_sub, code_cap, x.shape[1], x.shape[0])
    if x.shape[0] < 39 * code_cap:
        warnings.warn(
            f"VQ codes: {x.shape[0]} training items for {code_cap} codewords per sub-code (faiss advises "
            f"{39 * code_cap}); the codebooks are fitted anyway", stacklevel=2)
    index = faiss.index_factory(x.shape[1], factory_string(n_sub, n_bits), faiss.METRIC_INNER_PRODUCT)
    opq = faiss.downcast_VectorTransform(index.chain.at(0))
    if n_bits != 8:  # OPQ trains with its own 8-bit PQ unless given one (needs >= 256 points)
        opq_pq = faiss.ProductQuantizer(opq.d_out, n_sub, n_bits)
        opq.pq = opq_pq
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    # faiss's polysemous training only relabels each sub-quantiser's codewords (Hamming-friendly
    # order) and dominates the fitting time; codes are categorical tokens here, so it is skipped
    ivf.do_polysemous_training = False
    index.train(x)
    rotation = faiss.vector_to_array(opq.A).reshape(opq.d_out, opq.d_in)
    bias = faiss.vector_to_array(opq.b) if opq.have_bias else np.zeros(opq.d_out, dtype=np.float32)
    coarse = ivf.quantizer.reconstruct(0) if ivf.by_residual else np.zeros(opq.d_out, dtype=np.float32)
    pq = ivf.pq
    centroids = faiss.vector_to_array(pq.centroids).reshape(pq.M, pq.ksub, pq.dsub)
    out = {"rotation": rotation, "bias": bias, "coarse": coarse, "centroids": centroids}
    return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in out.items()}


@torch.no_grad()
def encode(x: torch.Tensor, quantiser: dict[str, torch.Tensor], chunk: int = 65536) -> torch.Tensor:
    """Codes ``[n, M]`` (0..code_cap-1) of features ``x`` ``[n, d]``: rotate (``A x + b``), subtract
    the IVF centroid (faiss encodes residuals) and take the nearest codeword of every sub-vector
    (L2), as faiss's ``IndexIVFPQ`` does."""
    rot, bias, coarse, cent = (quantiser[k].to(x.device) for k in QUANTISER_KEYS)
    m, k, dsub = cent.shape
    c2 = (cent * cent).sum(-1)  # [M, K]
    out = []
    for s in range(0, x.size(0), chunk):
        y = (x[s : s + chunk].float() @ rot.T + bias - coarse).view(-1, m, dsub)
        dist = c2.unsqueeze(0) - 2 * torch.einsum("nmd,mkd->nmk", y, cent)
        out.append(dist.argmin(-1))
    return torch.cat(out) if out else torch.zeros(0, m, dtype=torch.long)


def training_items(dataset) -> torch.Tensor:
    """Internal ids of the items occurring in the training split (targets and histories).

    ``dataset`` is the whole dataset (pre-split files: the first ``file_size_list[0]`` rows) or
    the training split that RecBole built from it."""
    inter = dataset.inter_feat
    n = len(inter)
    sizes = getattr(dataset, "file_size_list", None)
    if sizes:
        n = min(n, int(sizes[0]))
    iid = dataset.iid_field
    fields = [iid, iid + dataset.config["LIST_SUFFIX"]]
    parts = [_flat(inter[f][:n]) for f in fields if f in inter]
    items = torch.unique(torch.cat(parts).long())
    return items[items > 0]


def _flat(column) -> torch.Tensor:
    """A built split's tensor column, or a loaded DataFrame's column (ids or id arrays), flat."""
    if isinstance(column, torch.Tensor):
        return column.reshape(-1)
    values = column.to_numpy() if hasattr(column, "to_numpy") else np.asarray(column)
    if len(values) and isinstance(values[0], np.ndarray):
        values = np.concatenate(values)
    return torch.as_tensor(np.asarray(values, dtype=np.int64)).reshape(-1)


def settings_key(features: torch.Tensor, train_items: torch.Tensor, n_sub: int, code_cap: int) -> str:
    h = hashlib.sha256()
    h.update(f"{FORMAT}|{factory_string(n_sub, int(math.log2(code_cap)))}|{tuple(features.shape)}|".encode())
    h.update(features.contiguous().numpy().tobytes())
    h.update(train_items.contiguous().numpy().astype(np.int64).tobytes())
    return h.hexdigest()


def codes_file(folder: str, name: str, suffix: str, n_sub: int, code_cap: int) -> str:
    n_bits = int(math.log2(code_cap))
    return os.path.join(folder, f"{name}.{suffix}.{factory_string(n_sub, n_bits)}.codes.pt")


def _writable_folder(folder: str, fallback: str) -> str:
    """``folder`` unless it is read-only: no write permission bit (as root too, who could write
    anyway) or no write access."""
    if os.stat(folder).st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH) and os.access(folder, os.W_OK):
        return folder
    warnings.warn(f"VQ codes: {folder} is not writable, caching the codes in {fallback} (codes_dir)", stacklevel=3)
    return fallback


def _atomic_save(payload: dict, path: str) -> None:
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write(path, buf.getvalue())


def load_cached(path: str, key: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # truncated or foreign file: refit
        return None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or payload.get("key") != key:
        return None
    return payload


def item_codes(features: torch.Tensor, train_items: torch.Tensor, n_sub: int, code_cap: int, path: str) -> dict:
    """The quantiser fitted on ``features[train_items]`` and the codes ``[n_items, M]`` of every
    row of ``features`` (row 0, padding, included), cached in ``path`` (refitted only when the
    features, the training items or the settings change).  Returns ``{"quantiser", "codes",
    "path", "fitted"}``."""
    check_settings(n_sub, code_cap, features.shape[1], int(train_items.numel()))
    key = settings_key(features, train_items, n_sub, code_cap)
    cached = load_cached(path, key)
    if cached is not None:
        quantiser = {k: cached[k] for k in QUANTISER_KEYS}
        return {"quantiser": quantiser, "codes": cached["codes"].long(), "path": path, "fitted": False}
    log = getLogger()
    log.info(f"fitting VQ codes ({factory_string(n_sub, int(math.log2(code_cap)))}) on {train_items.numel()} training items")
    quantiser = fit_quantiser(features[train_items].numpy(), n_sub, code_cap)
    codes = encode(features, quantiser)
    payload = dict(quantiser, format=FORMAT, key=key, codes=codes.to(torch.int32), train_items=train_items.clone(),
                   code_dim=n_sub, code_cap=code_cap)
    _atomic_save(payload, path)
    log.info(f"VQ codes written to {path}")
    return {"quantiser": quantiser, "codes": codes, "path": path, "fitted": True}


def dataset_codes(dataset, n_sub: int, code_cap: int, suffix: str, fallback_dir: str) -> dict:
    """:func:`item_codes` for a recbole_mm dataset: its ``text`` features, its training items,
    cached next to its (first) domain folder, or ``codes_dir`` / ``fallback_dir`` when that
    folder is read-only."""
    config = dataset.config
    domains = dataset.domains()
    name = "+".join(d.name for d in domains)
    folder = config["codes_dir"] or _writable_folder(domains[0].path, fallback_dir)
    path = codes_file(folder, name, suffix, n_sub, code_cap)
    return item_codes(dataset.features["text"], training_items(dataset), n_sub, code_cap, path)
