"""Reo-LM / ROMA (Lu et al., KDD'25, "Recommendation-Oriented Language Model Adaptation Using
Multi-Modal Multi-Domain Item Sequences"): a Recformer-style language model whose items also
carry an image, adapted by mixtures of LoRA adapters.

On top of :class:`~recbole_mm.model.recformer.Recformer` (item sentences, sequence layout,
embeddings, packed encoder, two-stage item table, checkpoints):

* **image soft-token**: every item's tokens start with one image token (token type 4).  Its
  word embedding is replaced by ``img_proj(feature)`` (``Linear(d, 2d) - GELU - Linear(2d,
  H)``) of the item's frozen image feature (``img_suffix``, e.g. ``feat3CLS``); an item
  without an image (all-zero feature row) gets the learnable ``void_img_emb``.  The image
  token goes through the backbone's bottom layers with the text tokens.  ``img_suffix: ~``
  (a corpus without images, e.g. text-only pre-training domains) gives every item the
  placeholder; ``img_size`` then sets ``d`` so that ``img_proj`` fits the fine-tuning data.
* **Mixture-of-LoRA adapters** on every layer's feed-forward output: ``y = FFN(h) +
  scaling * sum_e g_e up_e(down_e(h))`` (``h``: the feed-forward input; ``up`` starts at
  zero, so the untrained adapters leave the backbone unchanged).  Bottom half
  (representation level): a token-level gate with top-``adapter_top_k`` routing over
  ``num_adapters`` adapters.  Top half (task level): ``num_domain_adapters`` adapters, one
  per pre-training domain, chosen by the item's domain index in pre-training (``<s>``: its
  sequence's domain) and mixed by a learned token-level softmax gate (zero-initialised:
  the mean of the domain adapters at first) in fine-tuning.
* **losses**: pre-training = sequence-item contrastive (temperature 0.05) + ``mlm_weight``
  (0.1) x whole-word MLM read at the middle layer (the output of the bottom half), on the
  sequence and its target item; fine-tuning = cross-entropy over all items against the
  frozen item table (stage 1 / stage 2 as Recformer) + ``mlm_weight`` x MLM of a masked copy
  of the sequence through the bottom half.
* **transfer** (``-p``, ``fix_enc``): only the adapters (and their gates), the image
  projection and the placeholder train; the backbone, the new embeddings and the MLM head
  stay frozen (:meth:`ReoLM.trainable_on_transfer`).

Our choices where the released code was not available (see the design notes): the image
token's place (first token of each item), the adapter's input (the feed-forward input) and
output (added before the residual LayerNorm), which of down/up starts at zero, and the
top-half gate in fine-tuning (token level).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recbole_mm.model.recformer import IMAGE_TYPE, Recformer, Tokens, _get

TRANSFER_TRAINABLE = ("adapters.", "img_proj.", "void_img_emb")


class MoLoRA(nn.Module):
    """``scaling * sum_e g_e(x) up_e(down_e(x))`` over ``n`` LoRA adapters of rank ``rank``.

    ``gated``: ``g`` = softmax of a token-level gate restricted to its ``top_k`` largest
    logits; otherwise ``g`` is one-hot on the ``route`` given with the input (domain index).
    All adapters run as two matmuls (``[T, H] x [H, n*r]``, ``[T, n*r] x [n*r, H]``).
    """

    def __init__(self, hidden: int, rank: int, n: int, scaling: float, gated: bool, top_k: int | None = None,
                 zero_gate: bool = False):
        super().__init__()
        self.n, self.rank, self.scaling = n, rank, float(scaling)
        self.top_k = n if not top_k or top_k <= 0 else min(int(top_k), n)
        self.down = nn.Parameter(torch.randn(n, hidden, rank) * 0.02)
        self.up = nn.Parameter(torch.zeros(n, rank, hidden))
        self.gate = nn.Linear(hidden, n, bias=False) if gated else None
        if self.gate is not None:
            if zero_gate:
                nn.init.zeros_(self.gate.weight)
            else:
                nn.init.normal_(self.gate.weight, std=0.02)

    def gates(self, x: torch.Tensor, route: torch.Tensor | None) -> torch.Tensor:
        if self.gate is None:
            if route is None:
                raise ValueError("domain-routed adapters need a route (domain index) per token")
            return F.one_hot(route, self.n).to(x.dtype)
        logits = self.gate(x).float()
        if self.top_k < self.n:
            kth = logits.topk(self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.softmax(logits, dim=-1).to(x.dtype)

    def forward(self, x: torch.Tensor, route: torch.Tensor | None = None) -> torch.Tensor:
        g = self.gates(x, route)  # [T, n]
        H = x.size(-1)
        z = (x @ self.down.permute(1, 0, 2).reshape(H, self.n * self.rank).to(x.dtype)).view(-1, self.n, self.rank)
        z = (z * g.unsqueeze(-1)).reshape(-1, self.n * self.rank)
        return self.scaling * (z @ self.up.reshape(self.n * self.rank, H).to(x.dtype))


class ReoLM(Recformer):
    MODALITY_PREFIXES = {"image": ("img_proj.",)}  # a text-only checkpoint: image projection fresh
    IMAGE_TOKEN = True
    MLM_IN_FINETUNE = True

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        if config["img_suffix"]:
            self.register_features(dataset, ["image"])
        else:  # a corpus without images (e.g. text-only pre-training domains): every item has the placeholder
            d = int(config["img_size"] or 0)
            if d <= 0:
                raise ValueError(
                    "ReoLM without image features (img_suffix: ~) needs img_size: the image feature size of the "
                    "data it will be fine-tuned on (e.g. 512 for CLIP ViT-B/32), so that img_proj transfers"
                )
            self.register_buffer("image_features", torch.zeros(self.n_items, d), persistent=False)
            self.register_buffer("image_presence", torch.zeros(self.n_items, dtype=torch.bool), persistent=False)
        d = self.image_features.size(1)
        self.img_proj = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, self.hidden_size))
        self.void_img_emb = nn.Parameter(torch.randn(self.hidden_size) * 0.02)
        n_layers = len(self.layers)
        if n_layers < 2:
            raise ValueError("ReoLM needs a backbone with at least 2 layers (bottom and top halves)")
        self.n_bottom = n_layers // 2
        rank = int(_get(config, "adapter_rank", 128))
        scaling = float(_get(config, "adapter_scaling", 2.0))
        n_bottom_adapters = int(_get(config, "num_adapters", 8))
        n_domain = int(_get(config, "num_domain_adapters", 8))
        domains = getattr(dataset, "item_domain", None)
        if domains is None:
            domains = torch.zeros(self.n_items, dtype=torch.long)
        self.register_buffer("item_domain", domains.clone().long(), persistent=False)
        n_seen = int(domains.max()) + 1 if domains.numel() else 1
        if self.train_stage == "pretrain" and n_seen > n_domain:
            raise ValueError(f"ReoLM: {n_seen} pre-training domains but num_domain_adapters={n_domain}")
        finetune = self.train_stage != "pretrain"
        self.adapters = nn.ModuleList(
            [MoLoRA(self.hidden_size, rank, n_bottom_adapters, scaling, gated=True,
                    top_k=int(_get(config, "adapter_top_k", n_bottom_adapters))) for _ in range(self.n_bottom)]
            + [MoLoRA(self.hidden_size, rank, n_domain, scaling, gated=finetune, zero_gate=True)
               for _ in range(n_layers - self.n_bottom)]
        )

    def _mlm_layer(self) -> int:
        return len(self.layers) // 2 - 1  # the output of the bottom half

    # -- image soft-token ---------------------------------------------------------------
    def image_vectors(self, items: torch.Tensor) -> torch.Tensor:
        """Image soft-token of each item: projected feature, or the placeholder when it has no image."""
        proj = self.img_proj(self.image_features.index_select(0, items))
        present = self.image_presence.index_select(0, items).unsqueeze(1)
        return torch.where(present, proj, self.void_img_emb.to(proj.dtype).expand_as(proj))

    def embed_words(self, tok: Tokens) -> torch.Tensor:
        w = self.word_embeddings(tok.ids)
        img = torch.nonzero(tok.types == IMAGE_TYPE).squeeze(1)
        if img.numel():
            w = w.index_copy(0, img, self.image_vectors(tok.items.index_select(0, img)).to(w.dtype))
        return w

    # -- adapters -----------------------------------------------------------------------
    def ffn_adapter(self, i, h, tok, index):
        adapter = self.adapters[i]
        route = None
        if adapter.gate is None:  # pre-training, top half: the domain's own adapter
            route = self.item_domain.index_select(0, tok.items if index is None else tok.items.index_select(0, index))
        return adapter(h, route)

    # -- transfer -----------------------------------------------------------------------
    def trainable_on_transfer(self) -> list[str]:
        return [n for n, _ in self.named_parameters() if n.startswith(TRANSFER_TRAINABLE)]

    def frozen_on_transfer(self) -> list[str]:
        """With ``fix_enc`` (default): everything but the adapters, gates and image projection."""
        if not self.fix_enc:
            return []
        keep = set(self.trainable_on_transfer())
        return [n for n, _ in self.named_parameters() if n not in keep]
