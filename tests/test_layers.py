"""The blocks the models share (recbole_mm/model/layers.py): the packed encoder against RecBole's
padded one, the mixture-of-experts adaptor, InfoNCE's masking modes, mini-batch k-means."""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F
from recbole.model.layers import TransformerEncoder

from recbole_mm.model.layers import MoEAdaptor, Packing, info_nce, minibatch_kmeans, packed_encoder, same_target_mask


def _padded_reference(encoder, x_padded, lengths):
    """RecBole's own path: padded batch, SASRec's causal + padding mask, gather at len-1."""
    b, l, _ = x_padded.shape
    seq = (torch.arange(l).unsqueeze(0) < lengths.unsqueeze(1)).long()
    mask = (seq > 0).unsqueeze(1).unsqueeze(2) & torch.tril(torch.ones(l, l, dtype=torch.bool)).view(1, 1, l, l)
    ext = torch.where(mask, 0.0, -10000.0)
    out = encoder(x_padded, ext, output_all_encoded_layers=True)[-1]
    return out, out[torch.arange(b), lengths - 1]


@pytest.mark.parametrize("last_only", [True, False])
def test_packed_encoder_equals_recbole_padded_encoder(last_only):
    torch.manual_seed(0)
    enc = TransformerEncoder(n_layers=2, n_heads=2, hidden_size=12, inner_size=16, hidden_act="gelu").eval()
    lengths = torch.tensor([1, 4, 2, 7, 3])
    x = torch.randn(5, 7, 12)
    full, ref_last = _padded_reference(enc, x, lengths)
    packing = Packing(lengths, 7)
    out = packed_encoder(enc, packing.pack(x), packing, last_only=last_only)
    if last_only:
        torch.testing.assert_close(out, ref_last, atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(out, packing.pack(full), atol=1e-5, rtol=1e-5)


def test_moe_adaptor_matches_the_per_expert_formula():
    torch.manual_seed(0)
    moe = MoEAdaptor(4, [10, 6], dropout=0.0)
    with torch.no_grad():
        moe.w_gate.normal_()
        for e in moe.experts:
            e.bias.normal_()
    x = torch.randn(9, 10)
    gates = F.softmax(x @ moe.w_gate, dim=-1)
    expected = sum(gates[:, k : k + 1] * moe.experts[k](x) for k in range(4))
    moe.eval()
    torch.testing.assert_close(moe(x), expected, atol=1e-5, rtol=1e-5)
    moe.train()
    moe.noisy_gating = False  # training path (batched, per-expert dropout) with p=0 == formula
    torch.testing.assert_close(moe(x), expected, atol=1e-5, rtol=1e-5)


def test_moe_adaptor_uses_one_dropout_mask_per_expert():
    torch.manual_seed(0)
    moe = MoEAdaptor(2, [64, 3], dropout=0.5).train()
    moe.noisy_gating = False
    x = torch.ones(1, 64)
    with torch.no_grad():  # identical experts: outputs differ only through their dropout masks
        moe.experts[1].lin.weight.copy_(moe.experts[0].lin.weight)
        moe.w_gate[:, 0] = 50.0  # all weight on expert 0
    a = moe(x)
    with torch.no_grad():
        moe.w_gate[:, 0] = -50.0  # all weight on expert 1
    torch.manual_seed(0)
    b = moe(x)
    assert not torch.allclose(a, b)


def test_info_nce_masking_modes():
    torch.manual_seed(0)
    q, k = torch.randn(6, 5), torch.randn(6, 5)
    targets = torch.tensor([3, 1, 3, 2, 1, 0])
    same = same_target_mask(targets)
    assert same.sum() == 4 and not same.diagonal().any()
    qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    logits = qn @ kn.T / 0.07
    # the reference: masked logit set to 0, still counted in the denominator
    ref = -(torch.exp(logits.diagonal()) / torch.exp(torch.where(same, 0.0, logits)).sum(1)).log().mean()
    torch.testing.assert_close(info_nce(q, k, 0.07, same, "zero"), ref)
    # ours: masked pairs leave the softmax
    fixed = -(torch.exp(logits.diagonal()) / (torch.exp(logits) * ~same).sum(1)).log().mean()
    torch.testing.assert_close(info_nce(q, k, 0.07, same, "inf"), fixed)
    assert info_nce(q, k, 0.07, same, "inf") < info_nce(q, k, 0.07, same, "zero")
    with pytest.raises(ValueError):
        info_nce(q, k, 0.07, same, "bogus")


def _planted(seed, n_clusters=20, per=100, dim=16):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_clusters, dim, generator=g) * 10
    x = torch.cat([centers[i] + torch.randn(per, dim, generator=g) for i in range(n_clusters)])
    return x, torch.arange(n_clusters).repeat_interleave(per)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_recovers_planted_clusters(seed):
    x, truth = _planted(seed)
    _, assign = minibatch_kmeans(x, 20, generator=torch.Generator().manual_seed(seed))
    for c in range(20):  # each planted cluster is one k-means cluster, and vice versa
        assert len(set(assign[truth == c].tolist())) == 1
    assert len(set(assign.tolist())) == 20
    # also through several mini-batches per pass (batch smaller than the data)
    _, assign = minibatch_kmeans(x, 20, batch_size=512, n_iter=10, generator=torch.Generator().manual_seed(seed))
    purity = sum(collections.Counter(assign[truth == c].tolist()).most_common(1)[0][1] for c in range(20)) / len(x)
    assert purity > 0.95


def test_kmeans_is_deterministic_under_a_seed():
    x = torch.randn(3000, 32)
    for init in ("k-means++", "random"):
        a = minibatch_kmeans(x, 300, generator=torch.Generator().manual_seed(7), init=init)
        b = minibatch_kmeans(x, 300, generator=torch.Generator().manual_seed(7), init=init)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = minibatch_kmeans(x, 300, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(a[1], c[1])
    centroids, assign = minibatch_kmeans(x[:5], 10, generator=torch.Generator().manual_seed(0))
    assert centroids.shape[0] == 5 and sorted(assign.tolist()) == list(range(5))  # k capped at N
