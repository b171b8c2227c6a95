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
  is set to 0 and still adds ``exp(0)`` to the denominator).
"""

from __future__ import annotations

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
            # W_k (x - b_k) = x W_k^T - W_k b_k: one matmul for all experts
            out = (x @ weight.reshape(-1, shape[-1]).T).view(x.size(0), self.n_exps, -1)  # [N, E, out]
            out = out - torch.einsum("eoi,ei->eo", weight, bias).unsqueeze(0)
            out = torch.einsum("neo,ne->no", out, gates)
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


def packed_attention(q, k, v, packing: Packing, n_heads: int, dropout_p: float, queries_last: bool):
    """Causal multi-head attention of packed tokens, bucket by bucket.

    ``queries_last``: ``q`` is ``[B, H]`` (one query per sequence, at its last token) and the
    result is ``[B, H]``; otherwise ``q`` is ``[T, H]`` and so is the result.
    """
    outs = []
    for seqs, index, ok in packing.buckets:
        kb, vb = _block(k, index, n_heads), _block(v, index, n_heads)
        if queries_last:
            qb = q.index_select(0, seqs).view(seqs.numel(), n_heads, 1, -1)
            ctx = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=ok[:, None, None, :], dropout_p=dropout_p)
            outs.append(ctx.reshape(seqs.numel(), -1))
        else:
            qb = _block(q, index, n_heads)
            # padding slots repeat the last real token and come after it: causality hides them
            ctx = F.scaled_dot_product_attention(qb, kb, vb, dropout_p=dropout_p, is_causal=True)
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
) -> torch.Tensor:
    """Mean in-batch InfoNCE of ``query[i]`` against ``keys[i]`` (positive) and ``keys[j]``.

    Both inputs are L2-normalised here.  ``same_target[i, j]`` (``i != j``) marks pairs that
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
    target = torch.arange(query.size(0), device=query.device)
    return F.cross_entropy(logits, target)


def same_target_mask(targets: torch.Tensor) -> torch.Tensor:
    """``[B, B]``: True where ``targets[i] == targets[j]`` and ``i != j``."""
    same = targets.unsqueeze(1) == targets.unsqueeze(0)
    return same & ~torch.eye(targets.numel(), dtype=torch.bool, device=targets.device)
