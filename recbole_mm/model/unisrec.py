"""UniSRec (Hou et al., KDD'22): universal text-based sequence representations.

Items are frozen text features (``plm_suffix``, any dimension) turned into ``hidden_size``
vectors by a mixture of parametric-whitening experts (:class:`MoEAdaptor`); a causal
SASRec-style transformer encodes the sequence.  Stages (``train_stage``):

* ``pretrain``: in-batch sequence-item and sequence-sequence contrastive losses on merged
  domains (``L = L_SI + lambda * L_SS``), the second view made by item drop or feature drop;
* ``inductive_ft``: text only, CE over all items with cosine logits / temperature;
* ``transductive_ft``: text + an item ID embedding added to the text vector.

Transfer (``-p CKPT``): the checkpoint's weights are loaded; with ``fix_enc`` (default) the
position embedding and the transformer stay frozen, as in the reference; the adaptor, the
input LayerNorm and the ID embedding train.  Without a checkpoint everything trains.

Differences from the reference implementation, each deliberate:

* same-target negatives are removed from the contrastive softmax (``contrastive_mask: inf``);
  ``contrastive_mask: zero`` reproduces the reference (logit set to 0, still counted);
* item drop keeps the surviving items in order (the reference's scatter with repeated
  indices lets a dropped item overwrite the kept one before it);
* the padding item is not a candidate in the fine-tuning softmax (it never is at evaluation);
* only non-padding tokens go through the transformer (exact, see ``layers.packed_encoder``)
  and the adapted item table is computed once per batch (once per evaluation when cached),
  so in training every occurrence of an item in a batch shares one adaptor dropout draw.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from recbole_mm.distributed import gather_in_batch
from recbole_mm.model.abstract import MMSequentialRecommender, one_of, required
from recbole_mm.model.layers import (MoEAdaptor, Packing, config_transformer_encoder, info_nce, packed_encoder,
                                     same_target_mask)

STAGES = ("pretrain", "inductive_ft", "transductive_ft")


class UniSRec(MMSequentialRecommender):
    STAGES = STAGES

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.train_stage = one_of(config, "train_stage", self.STAGES, self)
        self.hidden_size = config["hidden_size"]
        self.temperature = float(config["temperature"])
        self.lam = float(config["lambda"])
        self.item_drop_ratio = float(config["item_drop_ratio"])
        self.item_drop_coefficient = float(config["item_drop_coefficient"])
        self.feature_drop_ratio = float(required(config, "feature_drop_ratio"))
        self.contrastive_mask = required(config, "contrastive_mask")
        self.fix_enc = bool(config["fix_enc"])
        self.adaptor_per_token = bool(config["adaptor_per_token"])
        self.initializer_range = config["initializer_range"]

        self.register_features(dataset, ["text"])
        if "text_aug" in dataset.features:
            self.register_buffer("text_aug_features", dataset.features["text_aug"].clone(), persistent=False)
        else:
            self.text_aug_features = None
        plm_size = self.text_features.shape[1]

        self.position_embedding = nn.Embedding(self.max_seq_length, self.hidden_size)
        self.trm_encoder = config_transformer_encoder(config, self.hidden_size)
        self.LayerNorm = nn.LayerNorm(self.hidden_size, eps=config["layer_norm_eps"])
        self.dropout = nn.Dropout(config["hidden_dropout_prob"])
        if self.train_stage == "transductive_ft":
            self.item_embedding = nn.Embedding(self.n_items, self.hidden_size, padding_idx=0)
        else:
            self.item_embedding = None
        self.apply(self._init_weights)  # SASRec's init, before the adaptor (which has its own)
        self.moe_adaptor = MoEAdaptor(
            config["n_exps"], [plm_size, self.hidden_size], config["adaptor_dropout_prob"]
        )

    # -- transfer ---------------------------------------------------------------------
    def frozen_on_transfer(self) -> list[str]:
        """Parameters frozen when fine-tuning from a checkpoint with ``fix_enc`` (the reference's list)."""
        return [n for n, _ in self.named_parameters() if n.startswith(("position_embedding.", "trm_encoder."))]

    # -- representations -----------------------------------------------------------------
    def compute_item_table(self) -> torch.Tensor:
        """Adapted text vector (+ ID embedding in transductive mode) of every item, ``[n_items, H]``."""
        table = self.moe_adaptor(self.text_features)
        if self.item_embedding is not None:
            table = table + self.item_embedding.weight
        return table

    def encode(self, item_seq, item_seq_len, text_table=None, replace=None):
        """Sequence representation (last position) ``[B, H]``.

        ``text_table``: adapted text vectors of all items, gathered per token.  Without it
        (pre-training) the raw features go through the adaptor: once per distinct item of the
        batch, or once per token with ``adaptor_per_token`` (the reference);
        ``replace`` ``[B, L]`` then marks the tokens whose features are swapped for their
        word-dropped (``plm_suffix_aug``) or feature-dropped version.
        """
        packing = Packing(item_seq_len, item_seq.size(1))
        items = packing.pack(item_seq)
        if text_table is not None:
            x = text_table.index_select(0, items)
        elif self.adaptor_per_token:  # the reference: one adaptor pass (own dropout draw) per token
            feats = self.text_features.index_select(0, items)
            if replace is not None:
                swap = packing.pack(replace).unsqueeze(-1)
                if self.text_aug_features is not None:
                    other = self.text_aug_features.index_select(0, items)
                else:
                    other = F.dropout(feats, self.feature_drop_ratio, True)
                feats = torch.where(swap, other, feats)
            x = self.moe_adaptor(feats)
        else:  # one adaptor pass per distinct item of the batch (+ one per augmented token)
            uniq, inverse = torch.unique(items, return_inverse=True)
            x = self.moe_adaptor(self.text_features.index_select(0, uniq)).index_select(0, inverse)
            if replace is not None:
                where = packing.pack(replace).nonzero().squeeze(1)
                if where.numel():
                    swapped = items.index_select(0, where)
                    if self.text_aug_features is not None:
                        other = self.text_aug_features.index_select(0, swapped)
                    else:
                        other = F.dropout(self.text_features.index_select(0, swapped), self.feature_drop_ratio, True)
                    x = x.index_copy(0, where, self.moe_adaptor(other))
        x = x + self.position_embedding(packing.positions)
        if self.item_embedding is not None:
            x = x + self.item_embedding(items)
        x = self.dropout(self.LayerNorm(x))
        return packed_encoder(self.trm_encoder, x, packing, last_only=True)

    def forward(self, item_seq, item_seq_len):
        return self.encode(item_seq, item_seq_len, self.moe_adaptor(self.text_features))

    # -- fine-tuning -------------------------------------------------------------------
    def calculate_loss(self, interaction):
        if self.train_stage == "pretrain":
            return self.pretrain_loss(interaction)
        item_seq, item_seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        text_table = self.moe_adaptor(self.text_features)
        if self.adaptor_per_token:  # the reference: a fresh adaptor pass (own dropout) per sequence token
            seq_output = self.encode(item_seq, item_seq_len)
        else:  # one adaptor pass per item per batch, shared by the sequences and the candidates
            seq_output = self.encode(item_seq, item_seq_len, text_table)
        table = text_table + self.item_embedding.weight if self.item_embedding is not None else text_table
        logits = F.normalize(seq_output, dim=-1) @ F.normalize(table, dim=-1).T / self.temperature
        logits[:, 0] = float("-inf")
        return F.cross_entropy(logits, interaction[self.POS_ITEM_ID])

    def _scores(self, interaction):
        item_seq, item_seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        table = self.item_table()
        text_table = (
            self.cached("text_table", lambda: table - self.item_embedding.weight)
            if self.item_embedding is not None
            else table
        )
        seq_output = self.encode(item_seq, item_seq_len, text_table)
        return F.normalize(seq_output, dim=-1), self.cached("normalized_table", lambda: F.normalize(table, dim=-1))

    def full_sort_predict(self, interaction):
        seq, table = self._scores(interaction)
        return seq @ table.T

    def predict(self, interaction):
        seq, table = self._scores(interaction)
        return (seq * table[interaction[self.ITEM_ID]]).sum(-1)

    # -- pre-training ------------------------------------------------------------------
    def pretrain_loss(self, interaction):
        item_seq, item_seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        pos_items = interaction[self.POS_ITEM_ID]
        seq_output = self.encode(item_seq, item_seq_len)
        pos_emb = self.moe_adaptor(self.text_features.index_select(0, pos_items))
        aug_seq, aug_len, replace = self.augment(item_seq, item_seq_len)
        aug_output = self.encode(aug_seq, aug_len, replace=replace)
        # negatives: the whole (global) batch; distributed, every rank's keys are gathered
        (pos_keys, aug_keys, targets), batch = gather_in_batch(pos_emb, aug_output, pos_items, enabled=self.gather_negatives)
        same = same_target_mask(pos_items, targets, batch.offset)
        loss_si = info_nce(seq_output, pos_keys, self.temperature, same, self.contrastive_mask, batch.offset)
        loss_ss = info_nce(seq_output, aug_keys, self.temperature, same, self.contrastive_mask, batch.offset)
        return loss_si + self.lam * loss_ss

    def augment(self, item_seq, item_seq_len):
        """Second view of each sequence, one coin flip per batch as in the reference:
        item drop (probability ``item_drop_coefficient``: each item but the first kept with
        probability ``1 - item_drop_ratio``, survivors shifted left in order), otherwise word
        drop (``plm_suffix_aug`` features; feature dropout when there are none) on a random
        ``item_drop_ratio`` of the positions.  Returns ``(seq, lengths, replace mask or None)``."""
        width = item_seq.size(1)
        pos = torch.arange(width, device=item_seq.device).unsqueeze(0)
        valid = pos < item_seq_len.unsqueeze(1)
        drop = (torch.rand(item_seq.shape, device=item_seq.device) < self.item_drop_ratio) & valid
        if torch.rand(()).item() < self.item_drop_coefficient:
            keep = valid & ~(drop & (pos > 0))
            order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
            new_len = keep.sum(1)
            aug_seq = item_seq.gather(1, order) * (pos < new_len.unsqueeze(1))
            return aug_seq, new_len, None
        return item_seq, item_seq_len, drop

    # -- serving (recbole_mm.recommend): cosine scores, the table built in pieces -----------
    ADAPTOR_ROWS = 8192  # items per adaptor pass (its experts' intermediate is rows x n_exps x H)

    def sequence_output(self, interaction):
        """The L2-normalised sequence vector of ``full_sort_predict``; inductive: from the adapted
        vectors of the batch's own items only (no full item table)."""
        seq, lens = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        if self.item_embedding is not None:  # as _scores: the text part of the full table
            out = self.encode(seq, lens, self.cached("text_table", lambda: self.item_table() - self.item_embedding.weight))
        else:
            uniq, local = torch.unique(seq, return_inverse=True)
            out = self.encode(local, lens, self.moe_adaptor(self.text_features.index_select(0, uniq)))
        return F.normalize(out, dim=-1)

    def item_table_range(self, start: int, end: int) -> torch.Tensor:
        """L2-normalised item vectors ``start..end-1`` (inductive: the adaptor on their features only)."""
        if self.item_embedding is not None:
            table = self.item_table()[start:end]
        else:
            parts = [self.moe_adaptor(self.text_features[s : min(s + self.ADAPTOR_ROWS, end)])
                     for s in range(start, end, self.ADAPTOR_ROWS)]
            table = parts[0] if len(parts) == 1 else torch.cat(parts)
        return F.normalize(table, dim=-1)
