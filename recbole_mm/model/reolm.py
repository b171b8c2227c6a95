"""Reo-LM / ROMA (Lu et al., KDD'25, "Recommendation-Oriented Language Model Adaptation Using
Multi-Modal Multi-Domain Item Sequences"): a Recformer-style language model whose items also
carry an image, adapted by mixtures of LoRA adapters.

On top of :class:`~recbole_mm.model.recformer.Recformer` (item sentences, sequence layout,
embeddings, packed encoder, two-stage item table, checkpoints), as the released code
(Nipers/ROMA: ``model/MOARecRoberta.py``, ``model/RecRoberta.py``, ``model/litwrapper.py``,
``finetune.py``, ``data/RecRobertaCollator.py``) does it; our former choices stay available:

* **image soft-token** (``image_token``): ``last`` (released) = one image token ends each item
  of a *sequence*; an item encoded alone (the item table, stage-1 candidates, pre-training
  targets) has none.  ``first`` (ours) = first token of each item, on both sides.  Its word
  embedding is replaced by ``img_proj(feature)`` (``Linear(d, 2d) - GELU - Linear(2d, H)``) of
  the item's frozen image feature (``img_suffix``); an item without an image (all-zero row)
  gets the learnable ``void_img_emb``.  ``img_suffix: ~`` (a corpus without images) gives
  every item the placeholder; ``img_size`` then sets ``d`` so that ``img_proj`` fits the
  fine-tuning data.
* **adapters** on every layer (:class:`AdapterMixture`, released ``LoRAAdapter`` /
  ``LoRA_MD_Adapter``): ``dropout -> Linear(+bias) -> GELU -> Linear(+bias, zero-init)``
  on the feed-forward input, ``x scaling``, added after the feed-forward output LayerNorm.
  Bottom half: ``num_adapters`` adapters, token-level gate, ``bottom_gate: topk_mean``
  (released: mean of the top-``adapter_top_k`` adapters) or ``topk_softmax`` (ours).  Top
  half: ``num_domain_adapters`` adapters, one per pre-training domain chosen by the item's
  domain index in pre-training, mixed by the softmax of the gate's top-k logits in fine-tuning.
* **pre-training images** (``pretrain_images``): ``False`` (released: ``MOARecRobertaForPretrain``
  never passes ``use_img``) = the image token is a learned word on both sides (the targets
  carry it too) and ``img_proj`` is not trained; ``True`` (ours) = images as in fine-tuning.
* **sequences** (``whole_items``, released ``RecRobertaTokenizer.encode``): an item that does
  not fit whole into ``max_tokens`` ends the sequence.
* **losses**: pre-training = sequence-item contrastive (temperature 0.05) with the sequence
  vector and ``mlm_weight`` x MLM from one masked forward of the sequence (MLM read at
  ``hidden_states[n/2 - 1]``), the target clean and without MLM.  Fine-tuning stage 1 = the
  same masked forward scored against the label and ``num_negatives`` (released 1000) random
  items re-encoded with gradient, + MLM; ``num_negatives: 0`` (ours) scores all items against
  the frozen table.  Stage 2 = the clean sequence against the frozen table, no MLM.
* **transfer** (``-p``): every parameter trains (released ``REFinetuneWrapper``);
  ``fix_enc: True`` trains only the adapters (and their gates), the image projection and the
  placeholder (:meth:`ReoLM.trainable_on_transfer`).

Remaining differences from the released code are listed in docs/fidelity.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recbole_mm.model.abstract import one_of, required
from recbole_mm.model.recformer import IMAGE_TYPE, Recformer, Tokens

TRANSFER_TRAINABLE = ("adapters.", "img_proj.", "void_img_emb")
IMAGE_PLACES = ("last", "first")
BOTTOM_GATES = ("topk_mean", "topk_softmax")


class AdapterMixture(nn.Module):
    """``n`` adapters of one layer, as released (``LoRAAdapter`` / ``LoRA_MD_Adapter`` of
    ``model/MOARecRoberta.py``): ``a_e(x) = up_e(GELU(down_e(dropout(x))))`` (both Linear with
    bias; ``down`` as one ``Linear(H, n*size)`` with PyTorch's default init and zero bias,
    every ``up`` zero-initialised), combined and scaled: ``scaling * sum_e w_e(x) a_e(x)``.

    ``mode``: ``topk_mean`` (released bottom half: the gate's top-``k`` adapters averaged, the
    gate itself gets no gradient), ``topk_softmax`` (released top half in fine-tuning: softmax
    of the gate's top-``k`` logits), ``route`` (released top half in pre-training: the adapter
    of the token's domain).
    """

    def __init__(self, hidden: int, size: int, n: int, scaling: float, mode: str, top_k: int | None = None,
                 dropout: float = 0.1, act: str = "gelu"):
        super().__init__()
        from transformers.activations import ACT2FN

        self.n, self.size, self.scaling, self.mode = n, size, float(scaling), mode
        self.top_k = n if not top_k or top_k <= 0 else min(int(top_k), n)
        self.dropout = nn.Dropout(dropout)
        self.act = ACT2FN[act]
        self.down = nn.Linear(hidden, n * size)
        nn.init.zeros_(self.down.bias)
        self.up_weight = nn.Parameter(torch.zeros(n, size, hidden))
        self.up_bias = nn.Parameter(torch.zeros(n, hidden))
        self.gate = nn.Linear(hidden, n) if mode != "route" else None
        if self.gate is not None:
            nn.init.zeros_(self.gate.bias)

    def weights(self, x: torch.Tensor, route: torch.Tensor | None) -> torch.Tensor:
        """``[T, n]`` weight of each adapter for each token."""
        if self.gate is None:
            if route is None:
                raise ValueError("domain-routed adapters need a route (domain index) per token")
            return F.one_hot(route, self.n).to(x.dtype)
        val, idx = self.gate(x).float().topk(self.top_k, dim=-1)
        w = val.new_full(val.shape, 1.0 / self.top_k) if self.mode == "topk_mean" else torch.softmax(val, dim=-1)
        return torch.zeros(x.size(0), self.n, device=x.device).scatter(1, idx, w).to(x.dtype)

    def forward(self, x: torch.Tensor, route: torch.Tensor | None = None) -> torch.Tensor:
        x = self.dropout(x)
        w = self.weights(x, route)  # [T, n]
        z = self.act(self.down(x)).view(-1, self.n, self.size) * w.unsqueeze(-1)
        H = x.size(-1)
        y = z.reshape(-1, self.n * self.size) @ self.up_weight.reshape(self.n * self.size, H).to(x.dtype)
        return self.scaling * (y + w @ self.up_bias.to(x.dtype))


class ReoLM(Recformer):
    MODALITY_PREFIXES = {"image": ("img_proj.",)}  # a text-only checkpoint: image projection fresh
    MLM_IN_FINETUNE = True

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.fix_enc = bool(required(config, "fix_enc"))  # frozen_on_transfer (Recformer freezes nothing)
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
        self.num_negatives = int(required(config, "num_negatives"))
        # released pre-training never passes use_img: the image token is a learned word there
        self.pretrain_images = bool(required(config, "pretrain_images"))
        bottom_gate = str(one_of(config, "bottom_gate", BOTTOM_GATES, "ReoLM"))
        size = int(required(config, "adapter_rank"))
        scaling = float(required(config, "adapter_scaling"))
        top_k = int(required(config, "adapter_top_k"))
        n_bottom_adapters = int(required(config, "num_adapters"))
        n_domain = int(required(config, "num_domain_adapters"))
        domains = getattr(dataset, "item_domain", None)
        if domains is None:
            domains = torch.zeros(self.n_items, dtype=torch.long)
        self.register_buffer("item_domain", domains.clone().long(), persistent=False)
        n_seen = int(domains.max()) + 1 if domains.numel() else 1
        if self.train_stage == "pretrain" and n_seen > n_domain:
            raise ValueError(f"ReoLM: {n_seen} pre-training domains but num_domain_adapters={n_domain}")
        top_mode = "route" if self.train_stage == "pretrain" else "topk_softmax"
        p = self.embed_dropout.p
        self.adapters = nn.ModuleList(
            [AdapterMixture(self.hidden_size, size, n_bottom_adapters, scaling, bottom_gate, top_k, p)
             for _ in range(self.n_bottom)]
            + [AdapterMixture(self.hidden_size, size, n_domain, scaling, top_mode, top_k, p)
               for _ in range(n_layers - self.n_bottom)]
        )

    def image_token(self, config) -> str:
        return str(one_of(config, "image_token", IMAGE_PLACES, "ReoLM"))

    def _mlm_layer(self) -> int:
        """Released: ``hidden_states[n/2 - 1]`` (``hidden_states[0]`` = the embeddings), i.e. the
        output of layer ``n/2 - 2`` (-1: the embedding output, for a 2-layer backbone)."""
        return len(self.layers) // 2 - 2

    # -- image soft-token ---------------------------------------------------------------
    def image_vectors(self, items: torch.Tensor) -> torch.Tensor:
        """Image soft-token of each item: projected feature, or the placeholder when it has no image."""
        proj = self.img_proj(self.image_features.index_select(0, items))
        present = self.image_presence.index_select(0, items).unsqueeze(1)
        return torch.where(present, proj, self.void_img_emb.to(proj.dtype).expand_as(proj))

    def images_in_use(self) -> bool:
        return self.train_stage != "pretrain" or self.pretrain_images

    def item_tokens(self, items: torch.Tensor) -> Tokens:
        """Released pre-training (images not in use) gives its targets the image token too."""
        if self.images_in_use():
            return super().item_tokens(items)
        return self._tokens(items.unsqueeze(1))

    def embed_words(self, tok: Tokens) -> torch.Tensor:
        w = self.word_embeddings(tok.ids)
        if not self.images_in_use():  # the image token keeps its word embedding
            return w
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

    # -- losses -------------------------------------------------------------------------
    def pretrain_vectors(self, seq_tok: Tokens, item_tok: Tokens):
        """Released ``splited_VE_mlm_seq_item_contrast``: the sequence vectors and MLM (read at
        :meth:`_mlm_layer`) come from one masked forward of the sequence; the target is clean
        and has no MLM."""
        if not self.uses_mlm:
            return Recformer.pretrain_vectors(self, seq_tok, item_tok)
        B, n_seq = seq_tok.lengths.numel(), int(seq_tok.lengths.sum())
        masked, where = self.mask_tokens(seq_tok)
        cls, hidden = self.encode_tokens(Tokens.cat([masked, item_tok]), hidden_at=self.mlm_layer)
        return cls[:B], cls[B:], self.mlm_loss(hidden[:n_seq], seq_tok.ids, where)

    def finetune_loss(self, interaction):
        """Stage 1 (released ``MOARecRobertaForSeqRec`` with ``REFinetuneWrapper``): one forward of
        the masked sequence gives the sequence vector and MLM (``mlm_weight``, read at
        :meth:`_mlm_layer`); the label and ``num_negatives`` random items are re-encoded with
        gradient and scored by cos / temperature (``num_negatives: 0``: all items against the
        frozen table instead).  Stage 2: the clean sequence against the frozen table, no MLM."""
        tok = self.sequence_tokens(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        pos = interaction[self.POS_ITEM_ID]
        stage2 = bool(self.table_frozen)
        if self.uses_mlm and not stage2:
            masked, where = self.mask_tokens(tok)
            seq, hidden = self.encode_tokens(masked, hidden_at=self.mlm_layer)
            mlm = self.mlm_weight * self.mlm_loss(hidden, tok.ids, where)
        else:
            seq, mlm = self.encode_tokens(tok)[0], 0.0
        if stage2 or self.stage1_uses_table():
            if not bool(self.table_ready):
                self.refresh_item_table()
            return self.table_loss(seq, pos) + mlm
        return self.sampled_loss(seq, pos) + mlm

    def stage1_uses_table(self) -> bool:
        return self.num_negatives <= 0

    def sampled_loss(self, seq: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over the label (column 0) and ``num_negatives`` items drawn uniformly
        per sequence (with replacement, as released: a draw may hit the label), every
        candidate encoded alone with gradient (each distinct item once)."""
        cand = torch.cat([pos.unsqueeze(1), torch.randint(1, self.n_items, (pos.numel(), self.num_negatives),
                                                          device=pos.device)], 1)
        items, inverse = torch.unique(cand, return_inverse=True)
        vec = self.candidate_vectors(items)
        logits = self._logits(seq, vec)  # [B, distinct items]
        return F.cross_entropy(logits.gather(1, inverse), torch.zeros_like(pos))

    def candidate_vectors(self, items: torch.Tensor) -> torch.Tensor:
        """``<s>`` vectors of ``items`` encoded alone, with gradient (stage-1 candidates)."""
        return self.encode_tokens(self.item_tokens(items))[0]

    # -- transfer -----------------------------------------------------------------------
    def trainable_on_transfer(self) -> list[str]:
        return [n for n, _ in self.named_parameters() if n.startswith(TRANSFER_TRAINABLE)]

    def frozen_on_transfer(self) -> list[str]:
        """Released fine-tuning (``REFinetuneWrapper``) trains every parameter; with ``fix_enc``
        everything but the adapters, gates and image projection is frozen."""
        if not self.fix_enc:
            return []
        keep = set(self.trainable_on_transfer())
        return [n for n, _ in self.named_parameters() if n not in keep]
