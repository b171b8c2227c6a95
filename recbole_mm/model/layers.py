"""Blocks shared by the recbole_mm models.

* :class:`PWLayer`, :class:`MoEAdaptor`: UniSRec's parametric-whitening experts and their
  mixture (also used by the other text/image adaptors).  Parameter names follow the
  reference (``experts.<k>.bias``, ``experts.<k>.lin.weight``, ``w_gate``, ``w_noise``) so its
  checkpoints load; the forward pass runs all experts in one batched matmul.
* :func:`packed_encoder`: runs a RecBole ``TransformerEncoder`` (its own weights, its own
  dropout semantics) on the non-padding tokens only.  RecBole pads every row of a batch to
  a common width; on Amazon data (3.4 items per list on average, 35 at most) ~90% of the
  tokens are padding.  With causal attention, the output at position ``len-1`` depends on
  positions ``0..len-1`` only, so dropping the padding tokens is exact.
* :func:`info_nce`: in-batch contrastive loss with same-target masking (``-inf``: a masked
  pair leaves the softmax; ``"zero"`` reproduces UniSRec's reference, where the masked logit
  is set to 0 and still adds ``exp(0)`` to the denominator).  In distributed training the
  keys are the whole global batch (``recbole_mm.distributed.gather_in_batch``) and a rank's
  queries are rows ``offset ...`` of it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PWLayer(nn.Module):
    """Parametric whitening: ``W (dropout(x) - b)`` (no bias in ``W``)."""

    def __init__(self, input_size: int, output_size: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(p=dropout)
        self.bias = nn.Parameter(torch.zeros(input_size))
        self.lin = nn.Linear(input_size, output_size, bias=False)
        nn.init.normal_(self.lin.weight, mean=0.0, std=0.02)

    def forward(self, x):
        return self.lin(self.dropout(x) - self.bias)


class MoEAdaptor(nn.Module):
    """Mixture of ``n_exps`` whitening experts with a (noisy, in training) softmax gate.

    ``v = sum_k softmax(x W_g + eps * (softplus(x W_n) + 1e-2))_k * W_k (drop_k(x) - b_k)``,
    each expert with its own dropout mask, as in UniSRec.
    """

    EVAL_CHUNK_ROWS = 65536  # rows adapted at once outside training dropout

    def __init__(self, n_exps: int, layers: list[int], dropout: float = 0.0, noise: bool = True):
        super().__init__()
        if len(layers) != 2:
            raise ValueError(f"adaptor_layers must be [input_size, output_size], got {layers}")
        self.n_exps, self.noisy_gating, self.dropout_p = n_exps, noise, dropout
        self.experts = nn.ModuleList([PWLayer(layers[0], layers[1], dropout) for _ in range(n_exps)])
        self.w_gate = nn.Parameter(torch.zeros(layers[0], n_exps))
        self.w_noise = nn.Parameter(torch.zeros(layers[0], n_exps))

    def gates(self, x):
        logits = x @ self.w_gate
        if self.noisy_gating and self.training:
            noise_std = F.softplus(x @ self.w_noise) + 1e-2
            logits = logits + torch.randn_like(logits) * noise_std
        return F.softmax(logits, dim=-1)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, in]
        gates = self.gates(x)  # [N, E]
        weight = torch.stack([e.lin.weight for e in self.experts])  # [E, out, in]
        bias = torch.stack([e.bias for e in self.experts])  # [E, in]
        if self.training and self.dropout_p > 0:
            # independent dropout mask per expert, as E separate nn.Dropout modules
            xe = F.dropout(x.unsqueeze(0).expand(self.n_exps, -1, -1), self.dropout_p, True)
            out = torch.baddbmm(
                -torch.bmm(bias.unsqueeze(1), weight.transpose(1, 2)), xe, weight.transpose(1, 2)
            )  # [E, N, out]
            out = torch.einsum("eno,ne->no", out, gates)
        else:
            # W_k (x - b_k) = x W_k^T - W_k b_k: one matmul for all experts, in row chunks so
            # that the [rows, E, out] temporary stays bounded for a 1M-item table
            w_all = weight.reshape(-1, shape[-1]).T  # [in, E*out]
            shift = torch.einsum("eoi,ei->eo", weight, bias).unsqueeze(0)  # [1, E, out]
            parts = []
            for s in range(0, x.size(0), self.EVAL_CHUNK_ROWS):
                xs = x[s : s + self.EVAL_CHUNK_ROWS]
                o = (xs @ w_all).view(xs.size(0), self.n_exps, -1) - shift  # [n, E, out]
                parts.append(torch.einsum("neo,ne->no", o, gates[s : s + self.EVAL_CHUNK_ROWS]))
            out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out.reshape(*shape[:-1], -1)


# --------------------------------------------------------------------------------------
# Transformer on packed (non-padding) tokens


class Packing:
    """Index bookkeeping for left-aligned, right-padded sequences ``[B, L]`` with lengths ``[B]``.

    Tokens are packed in ``(sequence, position)`` order.  For attention, sequences are
    grouped in length buckets ``(w/2, w]`` (``w`` = 1, 2, 4, ...): each bucket is gathered to
    a ``[n, w]`` block, so the attention work and memory stay within twice the real tokens
    instead of ``B x L`` (a handful of buckets per batch, never a loop over sequences).
    """

    def __init__(self, lengths: torch.Tensor, width: int):
        lengths = lengths.clamp(min=1, max=width)
        device = lengths.device
        self.batch, self.width = lengths.numel(), width
        self.lengths = lengths
        valid = torch.arange(width, device=device).unsqueeze(0) < lengths.unsqueeze(1)
        self.flat = valid.reshape(-1).nonzero().squeeze(1)  # packed token -> flat index b*L+t
        self.positions = self.flat % width  # packed token -> position t
        starts = torch.cumsum(lengths, 0) - lengths
        self.last = starts + lengths - 1  # packed index of each sequence's last token
        self.buckets = []  # (sequence ids [n], token index [n, w] (clamped), valid [n, w])
        token_order, seq_order = [], []
        lo, w = 0, 1
        while lo < width:
            w = min(w, width)
            seqs = ((lengths > lo) & (lengths <= w)).nonzero().squeeze(1)
            if seqs.numel():
                ln = lengths[seqs].unsqueeze(1)
                t = torch.arange(w, device=device).unsqueeze(0)
                ok = t < ln
                index = starts[seqs].unsqueeze(1) + torch.minimum(t, ln - 1)
                self.buckets.append((seqs, index, ok))
                token_order.append(index[ok])
                seq_order.append(seqs)
            lo, w = w, w * 2
        # bucket-major order -> packed / batch order
        self.token_restore = torch.argsort(torch.cat(token_order))
        self.seq_restore = torch.argsort(torch.cat(seq_order))

    @property
    def n_tokens(self) -> int:
        return self.flat.numel()

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """``[B, L, ...]`` -> ``[T, ...]``."""
        return padded.reshape(self.batch * self.width, *padded.shape[2:]).index_select(0, self.flat)


def _block(x, index, n_heads):
    """packed ``[T, H]`` gathered at ``index [n, w]`` -> ``[n, heads, w, H/heads]``."""
    n, w = index.shape
    return x.index_select(0, index.reshape(-1)).view(n, w, n_heads, -1).transpose(1, 2)


def packed_attention(q, k, v, packing: Packing, n_heads: int, dropout_p: float, queries_last: bool,
                     causal: bool = True):
    """Multi-head attention of packed tokens, bucket by bucket (causal, or bidirectional
    within each sequence with ``causal=False``).

    ``queries_last``: ``q`` is ``[B, H]`` (one query per sequence, attending to all of its
    tokens, as its last token does) and the result is ``[B, H]``; otherwise ``q`` is
    ``[T, H]`` and so is the result.
    """
    outs = []
    for seqs, index, ok in packing.buckets:
        kb, vb = _block(k, index, n_heads), _block(v, index, n_heads)
        if queries_last:
            qb = q.index_select(0, seqs).view(seqs.numel(), n_heads, 1, -1)
            ctx = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=ok[:, None, None, :], dropout_p=dropout_p)
            outs.append(ctx.reshape(seqs.numel(), -1))
        elif causal:
            qb = _block(q, index, n_heads)
            # padding slots repeat the last real token and come after it: causality hides them
            ctx = F.scaled_dot_product_attention(qb, kb, vb, dropout_p=dropout_p, is_causal=True)
            outs.append(ctx.transpose(1, 2).reshape(*index.shape, -1)[ok])
        else:
            qb = _block(q, index, n_heads)
            ctx = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=ok[:, None, None, :], dropout_p=dropout_p)
            outs.append(ctx.transpose(1, 2).reshape(*index.shape, -1)[ok])
    restore = packing.seq_restore if queries_last else packing.token_restore
    return torch.cat(outs).index_select(0, restore)


def packed_encoder(encoder, x: torch.Tensor, packing: Packing, last_only: bool = True) -> torch.Tensor:
    """Causal forward of RecBole's ``TransformerEncoder`` ``encoder`` on packed tokens.

    ``x``: ``[T, H]`` input of every non-padding token (already embedded, normalised and
    dropped out).  Returns the last layer's output at each sequence's last token ``[B, H]``
    when ``last_only`` (the last layer then computes queries, projections and the
    feed-forward block for those tokens only), else every token ``[T, H]``.
    Equal to ``encoder(padded, causal_mask)`` gathered at the same tokens (see the tests).
    """
    layers = list(encoder.layer)
    for i, layer in enumerate(layers):
        att, ffn = layer.multi_head_attention, layer.feed_forward
        n_heads = att.num_attention_heads
        p_drop = att.attn_dropout.p if att.training else 0.0
        final = last_only and i == len(layers) - 1
        k, v = att.key(x), att.value(x)
        if final:
            x = x.index_select(0, packing.last)  # [B, H]
        ctx = packed_attention(att.query(x), k, v, packing, n_heads, p_drop, queries_last=final)
        h = att.LayerNorm(att.out_dropout(att.dense(ctx)) + x)
        inner = ffn.intermediate_act_fn(ffn.dense_1(h))
        x = ffn.LayerNorm(ffn.dropout(ffn.dense_2(inner)) + h)
    return x


# --------------------------------------------------------------------------------------
# Contrastive loss


def info_nce(
    query: torch.Tensor,
    keys: torch.Tensor,
    temperature: float,
    same_target: torch.Tensor | None = None,
    mask_mode: str = "inf",
    offset: int = 0,
) -> torch.Tensor:
    """Mean in-batch InfoNCE of ``query[i]`` against ``keys[offset + i]`` (positive) and the
    other keys (``keys`` may hold more rows than ``query``: the global batch gathered from
    every rank, this rank's rows starting at ``offset``).

    Both inputs are L2-normalised here.  ``same_target[i, j]`` (``j != offset + i``) marks pairs that
    are not negatives (same next item).  ``mask_mode="inf"`` removes them from the softmax;
    ``"zero"`` sets their logit to 0 as UniSRec's reference does (they then still count
    ``exp(0) = 1`` in the denominator).
    """
    query, keys = F.normalize(query, dim=-1), F.normalize(keys, dim=-1)
    logits = query @ keys.T / temperature
    if same_target is not None:
        if mask_mode == "inf":
            logits = logits.masked_fill(same_target, float("-inf"))
        elif mask_mode == "zero":
            logits = logits.masked_fill(same_target, 0.0)
        else:
            raise ValueError(f"contrastive mask mode must be 'inf' or 'zero', got {mask_mode!r}")
    target = torch.arange(query.size(0), device=query.device) + offset
    return F.cross_entropy(logits, target)


def same_target_mask(targets: torch.Tensor, all_targets: torch.Tensor | None = None, offset: int = 0) -> torch.Tensor:
    """``[B, B]``: True where ``targets[i] == targets[j]`` and ``i != j``.  With
    ``all_targets`` (the global batch's, this rank's at ``offset ...``): ``[B, N]``, True where
    ``targets[i] == all_targets[j]`` and ``j != offset + i``."""
    if all_targets is None:
        all_targets = targets
    same = targets.unsqueeze(1) == all_targets.unsqueeze(0)
    own = torch.arange(targets.numel(), device=targets.device)
    same[own, own + offset] = False
    return same


# --------------------------------------------------------------------------------------
# Mini-batch k-means (plain torch: CPU and GPU alike, no cupy; a working one, not the reference's)


def _nearest(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Index of the nearest centroid (Euclidean) of every row of ``x``."""
    c_sq = (centroids * centroids).sum(1)
    out = []
    for start in range(0, x.size(0), chunk):
        b = x[start : start + chunk]
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; ||x||^2 is constant per row
        out.append((c_sq.unsqueeze(0) - 2.0 * (b @ centroids.T)).argmin(1))
    return torch.cat(out)


def _kmeanspp(x: torch.Tensor, k: int, generator) -> torch.Tensor:
    """Greedy k-means++ seeding (as scikit-learn): at each step ``2 + log k`` candidates are
    drawn with probability proportional to the squared distance to the nearest centre so far,
    and the one that lowers the total squared distance most is kept."""
    n = x.size(0)
    n_local = 2 + int(math.log(k))
    x_sq = (x * x).sum(1)
    first = int(torch.randint(n, (1,), generator=generator))
    idx = torch.empty(k, dtype=torch.long)
    idx[0] = first
    d = (x_sq - 2.0 * (x @ x[first]) + x_sq[first]).clamp_min_(0)
    for j in range(1, k):
        total = d.sum()
        if float(total) <= 0:  # fewer distinct points than k
            rest = torch.ones(n, dtype=torch.bool)
            rest[idx[:j]] = False
            idx[j:] = torch.nonzero(rest).squeeze(1)[: k - j]
            break
        u = torch.rand(n_local, generator=generator, dtype=torch.float64).to(x.device) * float(total)
        cand = torch.searchsorted(torch.cumsum(d.double(), 0), u).clamp_max_(n - 1)
        dc = (x_sq.unsqueeze(0) - 2.0 * (x[cand] @ x.T) + x_sq[cand].unsqueeze(1)).clamp_min_(0)  # [L, n]
        new = torch.minimum(dc, d.unsqueeze(0))
        best = int(new.sum(1).argmin())
        idx[j] = cand[best]
        d = new[best]
    return x[idx.to(x.device)].clone()


@torch.no_grad()
def minibatch_kmeans(
    x: torch.Tensor,
    k: int,
    n_iter: int = 5,
    batch_size: int = 2048,
    tol: float = 1e-5,
    generator: torch.Generator | None = None,
    init: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mini-batch k-means (Sculley 2010) for MISSRec's interest discovery.

    Not the reference's algorithm as it runs: MM23-MISSRec calls its vendored TorchPQ
    ``MinibatchKMeans``, whose CPU path overwrites the data and the centroids with their
    absolute values and stops after one pass (on Scientific_mm all 3,170 vectors end up in 1
    of 1,585 clusters; ours uses ~1,570; ``benchmarks/missrec_reference_checks.py``,
    docs/fidelity.md).  This is a real mini-batch k-means with the same schedule (passes,
    batch size, the running-mean update ``c += (sum - n_b c) / n_c``).

    Centroids start at ``k`` points chosen by greedy k-means++ (``init="k-means++"``) or at
    ``k`` distinct random points (``"random"``, as the reference; cheaper, but it merges
    clusters more often).  ``"auto"`` uses k-means++ when ``k * N <= 2e6`` (its cost grows
    with ``k * N * log k``) and random points otherwise (then ``k`` is a large fraction of
    ``N``, as in fine-tuning, where the seeding matters little).  Each of ``n_iter`` passes visits the
    points in a random order in batches of ``max(batch_size, 1.1 k)`` (a short last batch
    is merged into the one before) and moves every centroid to the running mean of the
    points assigned to it so far (``c += (sum - n_b c) / n_c``); a pass that moves no
    centroid by more than ``tol`` stops early.  Returns ``(centroids [k, D], assignment [N])``.
    Deterministic for a given ``generator`` state.
    """
    n = x.size(0)
    if n == 0:
        raise ValueError("k-means needs at least one point")
    k = max(1, min(int(k), n))
    x = x.float()
    dev = x.device
    rand = lambda m: torch.randperm(m, generator=generator).to(dev)  # noqa: E731  (CPU generator)
    if init == "auto":
        init = "k-means++" if k * n <= 2e6 else "random"
    if init == "random":
        centroids = x[rand(n)[:k]].clone()
    elif init == "k-means++":
        centroids = _kmeanspp(x, k, generator)
    else:
        raise ValueError(f"k-means init must be 'k-means++' or 'random', got {init!r}")
    counts = torch.zeros(k, device=dev)
    bs = max(int(batch_size), int(1.1 * k))
    for _ in range(n_iter):
        order = rand(n)
        starts = list(range(0, n, bs))
        if len(starts) > 1 and n - starts[-1] < bs:
            starts.pop()  # merge the short last batch into the previous one
        bounds = starts[1:] + [n]
        old = centroids.clone()
        for start, end in zip(starts, bounds):
            b = x[order[start:end]]
            assign = _nearest(b, centroids)
            sums = torch.zeros_like(centroids).index_add_(0, assign, b)
            cnt = torch.bincount(assign, minlength=k).to(x.dtype)
            counts += cnt
            hit = cnt > 0
            centroids[hit] += (sums[hit] - cnt[hit, None] * centroids[hit]) / counts[hit, None]
        if (centroids - old).norm(dim=1).max() < tol:
            break
    return centroids, _nearest(x, centroids)


def config_transformer_encoder(config, hidden_size: int):
    """RecBole's ``TransformerEncoder`` sized by the SASRec-style config keys (``n_layers``,
    ``n_heads``, ``inner_size``, dropouts, ``hidden_act``, ``layer_norm_eps``)."""
    from recbole.model.layers import TransformerEncoder

    return TransformerEncoder(
        n_layers=config["n_layers"],
        n_heads=config["n_heads"],
        hidden_size=hidden_size,
        inner_size=config["inner_size"],
        hidden_dropout_prob=config["hidden_dropout_prob"],
        attn_dropout_prob=config["attn_dropout_prob"],
        hidden_act=config["hidden_act"],
        layer_norm_eps=config["layer_norm_eps"],
    )
