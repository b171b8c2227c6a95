"""MISSRec (Wang et al., ACM MM'23): multi-modal interest-aware sequence representations.

Items are frozen text (``plm_suffix``) and image (``img_suffix``) features, each mapped to
``hidden_size`` by a linear adaptor.  Before every training epoch the adapted text and image
vectors of all items are clustered by mini-batch k-means (``layers.minibatch_kmeans``, plain
torch; ``k = ceil(interest_ratio * #vectors)``): the centroids are the *interest tokens*, and
every item points to the interest of its text and of its image.

A sequence becomes (1) its set of distinct interests, encoded by a 1-layer bidirectional
transformer encoder into a memory, and (2) its item tokens (sum of the adapted modalities +
position [+ ID]), which a 1-layer transformer decoder runs through bidirectional
self-attention and cross-attention to the memory; the output at the last item is the
sequence vector ``s``.  An item's score is the dynamic fusion of its per-modality cosines,
``sum_m cos(s, a_m) * softmax_m(w * cos(s, a_m))`` with one learnable scalar ``w``
(``(cos(s, e_ID) + 2 * fusion) / 3`` in transductive mode), divided by the temperature.
The interest-diversity regulariser ``gamma * sum_b ||m_b * sum_l memory_bl||^2 / d`` (``m_b``:
the sequence's share of real interest slots) is added to every loss.

Stages (``train_stage``): ``pretrain`` (in-batch sequence-item + ``lambda`` x
sequence-sequence contrastive losses, item-drop / word-drop second view), ``inductive_ft``
(features only) and ``transductive_ft`` (+ item IDs).  With ``-p`` (``fix_enc``), the
position embedding and the whole encoder-decoder are frozen: the adaptors, the input
LayerNorm, the fusion scalar (and the ID embedding) train.  ``modal_type``: ``img_text``,
``text`` or ``img``.

Deliberate differences from the reference code:

* k-means is a real mini-batch k-means in torch (CPU or GPU, no cupy/TorchPQ, seeded from the
  run's seed; k-means++ seeding when cheap, ``kmeans_init``).  The reference's vendored TorchPQ
  ``MinibatchKMeans`` (CPU path) squares and square-roots the data and the centroids in place
  (both become their absolute values), leaves empty clusters at zero and stops after one pass
  (its convergence error compares the centroids with themselves): on Scientific_mm at epoch
  0 it puts all 3,170 item vectors into 1 of 1,585 clusters, ours into ~1,570
  (``benchmarks/missrec_reference_checks.py``).  Kept: one interest for every item makes the
  interest encoder a constant;
* a missing modality (all-zero feature row) is left out: not clustered, no interest token,
  not added to the item token, not part of the item's score (the reference feeds the
  adaptor's bias for it);
* interest sets are built with tensor ops, not a Python loop per sequence;
* the second pre-training view drops the same items from both modalities (the reference
  keeps the image tokens of the original sequence, misaligned), and ``text`` / ``img``
  pre-training works (the reference crashes);
* same-target in-batch negatives are removed from the pre-training softmax
  (``contrastive_mask: inf``; ``none`` keeps them, as the reference);
* the diversity regulariser (``diversity_reg``): ``reference`` (default) is the reference's
  formula, ``(n_b / W) sum_l memory_bl`` over the ``W`` padded interest slots, padding outputs
  included (computed once per sequence, as all padding slots share one input; one dropout
  draw for them instead of one each); ``mean`` (ours before) pools only the real interests,
  ~90x smaller at initialisation on Scientific_mm (``benchmarks/missrec_reference_checks.py``);
* reference options we do not implement (``seq_mm_fusion: contextual``,
  ``item_mm_fusion: dynamic_instance``, ``id_type: none``) are errors naming them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from recbole_mm.distributed import gather_in_batch
from recbole_mm.model.abstract import MMSequentialRecommender, one_of, required
from recbole_mm.model.layers import Packing, info_nce, minibatch_kmeans, packed_attention, same_target_mask

STAGES = ("pretrain", "inductive_ft", "transductive_ft")
MODAL_TYPES = {"img_text": ("text", "image"), "text": ("text",), "img": ("image",)}


# reference options (MM23-MISSRec props/MISSRec.yaml) whose other values are not implemented:
# key -> (the value implemented, what the reference's other values do)
UNIMPLEMENTED = {
    "seq_mm_fusion": ("add", "'contextual' (modality tokens side by side in the item decoder)"),
    "item_mm_fusion": (("dynamic_shared", "static"), "'dynamic_instance' (one fusion factor per item)"),
    "id_type": ("id", "'none' (no ID term in transductive mode)"),
}


def _refuse_unimplemented(config) -> None:
    """An error naming a reference option set to a value we do not implement (not silence)."""
    for key, (ours, theirs) in UNIMPLEMENTED.items():
        value = config[key]
        allowed = ours if isinstance(ours, tuple) else (ours,)
        if value is not None and value not in allowed:
            raise ValueError(f"MISSRec: {key}: {value!r} is not implemented (the reference's {theirs}); "
                             f"implemented: {', '.join(allowed)}")


class MISSRec(MMSequentialRecommender):
    STAGES = STAGES
    # the interests (k-means over the catalogue's adapted features): recomputed, never transferred
    CATALOGUE_BUFFERS = ("text_interest", "image_interest", "interest_embeddings", "interests_ready")
    MODALITY_PREFIXES = {"image": ("img_adaptor.",)}  # a text-only checkpoint: image adaptor fresh

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.train_stage = one_of(config, "train_stage", self.STAGES, self)
        modal_type = one_of(config, "modal_type", MODAL_TYPES, self)
        self.modalities = MODAL_TYPES[modal_type]
        self.n_layers = int(config["n_layers"])
        if self.n_layers < 2 or self.n_layers % 2:
            raise ValueError("MISSRec: n_layers must be even (half encoder, half decoder layers)")
        self.hidden_size = int(config["hidden_size"])
        self.temperature = float(config["temperature"])
        self.lam = float(config["lambda"])
        self.gamma = float(config["gamma"])
        self.item_drop_ratio = float(config["item_drop_ratio"])
        self.item_drop_coefficient = float(config["item_drop_coefficient"])
        self.feature_drop_ratio = float(required(config, "feature_drop_ratio"))
        self.contrastive_mask = required(config, "contrastive_mask")
        self.interest_ratio = float(config["interest_ratio"])
        self.kmeans_iters = int(required(config, "kmeans_iters"))
        self.kmeans_batch = int(required(config, "kmeans_batch_size"))
        self.kmeans_init = required(config, "kmeans_init")
        self.diversity_reg = required(config, "diversity_reg")
        if self.diversity_reg not in ("reference", "mean"):
            raise ValueError(f"MISSRec: diversity_reg must be reference or mean, got {self.diversity_reg!r}")
        _refuse_unimplemented(config)
        self.item_fusion = required(config, "item_mm_fusion")
        if self.item_fusion not in ("dynamic_shared", "static"):
            raise ValueError(f"MISSRec: item_mm_fusion must be dynamic_shared or static, got {self.item_fusion!r}")
        self.fix_enc = bool(config["fix_enc"])
        self.seed = int(required(config, "seed"))
        self.initializer_range = config["initializer_range"]

        self.register_features(dataset, list(self.modalities))
        self.text_aug_features = None
        if "text" in self.modalities and "text_aug" in dataset.features:
            self.register_buffer("text_aug_features", dataset.features["text_aug"].clone(), persistent=False)

        H = self.hidden_size
        self.position_embedding = nn.Embedding(self.max_seq_length, H)
        self.trm_model = nn.Transformer(
            d_model=H,
            nhead=int(config["n_heads"]),
            num_encoder_layers=self.n_layers // 2,
            num_decoder_layers=self.n_layers // 2,
            dim_feedforward=int(config["inner_size"]),
            dropout=float(config["hidden_dropout_prob"]),
            activation=config["hidden_act"] if config["hidden_act"] in ("gelu", "relu") else "gelu",
            layer_norm_eps=float(config["layer_norm_eps"]),
            batch_first=True,
            norm_first=False,
        )
        self.LayerNorm = nn.LayerNorm(H, eps=float(config["layer_norm_eps"]))
        self.dropout = nn.Dropout(float(config["hidden_dropout_prob"]))
        self.item_embedding = (
            nn.Embedding(self.n_items, H, padding_idx=0) if self.train_stage == "transductive_ft" else None
        )
        self.fusion_factor = nn.Parameter(torch.zeros(()))
        self.apply(self._init_weights)
        # adaptors after the init, with PyTorch's default Linear init (as the reference)
        if "text" in self.modalities:
            self.text_adaptor = nn.Linear(self.text_features.shape[1], H)
        if "image" in self.modalities:
            self.img_adaptor = nn.Linear(self.image_features.shape[1], H)

        # interests (recomputed before every training epoch; saved with the model)
        self.register_buffer("interest_embeddings", torch.zeros(1, H))
        self.register_buffer("text_interest", torch.zeros(self.n_items, dtype=torch.long))
        self.register_buffer("image_interest", torch.zeros(self.n_items, dtype=torch.long))
        self.register_buffer("interests_ready", torch.zeros((), dtype=torch.bool))
        # k-means visits items in raw-id order, so interests do not depend on the internal
        # numbering (which follows the interactions; a zero-shot catalogue has none)
        raw = getattr(dataset, "item_raw_ids", None)
        order = sorted(range(1, self.n_items), key=raw.__getitem__) if raw else range(1, self.n_items)
        self.register_buffer("kmeans_order", torch.tensor(list(order), dtype=torch.long), persistent=False)
        self.last_clustering_seconds = None

    # -- transfer ---------------------------------------------------------------------
    def frozen_on_transfer(self) -> list[str]:
        """Frozen with ``-p`` and ``fix_enc``: position embedding + encoder-decoder (the reference)."""
        return [n for n, _ in self.named_parameters() if n.startswith(("position_embedding.", "trm_model."))]

    def load_state_dict(self, state_dict, strict=True, assign=False):
        # the interest table's size (k + 1) is data dependent: resize before loading
        emb = state_dict.get("interest_embeddings")
        if emb is not None and emb.shape != self.interest_embeddings.shape:
            self.interest_embeddings = torch.zeros_like(emb, device=self.interest_embeddings.device)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # -- item vectors ----------------------------------------------------------------------
    def _adapted(self, name: str, items: torch.Tensor | None = None, feats: torch.Tensor | None = None):
        adaptor = self.text_adaptor if name == "text" else self.img_adaptor
        if feats is None:
            table = self.text_features if name == "text" else self.image_features
            feats = table if items is None else table.index_select(0, items)
        return adaptor(feats)

    def _presence(self, name: str) -> torch.Tensor:
        return self.text_presence if name == "text" else self.image_presence

    def compute_item_table(self):
        """Per-modality adapted vectors ``{name: [n_items, H]}`` (+ ``"id"``), shared by all batches."""
        table = {m: self._adapted(m) for m in self.modalities}
        if self.item_embedding is not None:
            table["id"] = self.item_embedding.weight
        return table

    # -- interests ------------------------------------------------------------------------
    @torch.no_grad()
    def discover_interests(self, epoch: int = 0) -> None:
        """k-means over the adapted vectors of every present (item, modality)."""
        from time import perf_counter

        t0 = perf_counter()
        vectors, owners = [], []
        for m in self.modalities:
            present = self.kmeans_order[self._presence(m)[self.kmeans_order]]  # excludes padding (row 0)
            vectors.append(self._adapted(m, present))
            owners.append((m, present))
        x = torch.cat(vectors)
        k = max(1, math.ceil(self.interest_ratio * x.size(0)))
        gen = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
        centroids, assign = minibatch_kmeans(
            x, k, n_iter=self.kmeans_iters, batch_size=self.kmeans_batch, generator=gen, init=self.kmeans_init
        )
        self.interest_embeddings = torch.cat([centroids.new_zeros(1, centroids.size(1)), centroids])
        start = 0
        for m, present in owners:
            lookup = torch.zeros(self.n_items, dtype=torch.long, device=x.device)
            lookup[present] = assign[start : start + present.numel()] + 1
            start += present.numel()
            setattr(self, f"{m}_interest", lookup)
        self.interests_ready.fill_(True)
        self.last_clustering_seconds = perf_counter() - t0

    def on_epoch_start(self, epoch: int, train_data=None) -> None:
        was = self.training
        self.eval()  # adaptors without dropout
        self.discover_interests(epoch)
        self.train(was)

    def interest_ids(self, item_seq: torch.Tensor) -> torch.Tensor:
        """``[B, I]``: each sequence's distinct interest ids, ascending, right-padded with 0."""
        ids = torch.cat([getattr(self, f"{m}_interest")[item_seq] for m in self.modalities], dim=1)
        ids, _ = ids.sort(dim=1)
        dup = torch.zeros_like(ids, dtype=torch.bool)
        dup[:, 1:] = ids[:, 1:] == ids[:, :-1]
        big = ids.new_full((), self.interest_embeddings.size(0))
        ids = torch.where(dup | (ids == 0), big, ids).sort(dim=1).values
        width = int((ids != big).sum(1).max().clamp_min(1))
        ids = ids[:, :width]
        return ids.masked_fill(ids == big, 0)

    # -- sequence encoder -------------------------------------------------------------------
    def _item_inputs(self, items, positions, table=None, aug_text=None):
        """Decoder input of packed item tokens ``[T, H]``: the sum of the present adapted
        modalities + position (+ ID), LayerNorm, dropout."""
        x = self.position_embedding(positions)
        for m in self.modalities:
            if m == "text" and aug_text is not None:
                v = self._adapted(m, feats=aug_text)
            elif table is not None:
                v = table[m].index_select(0, items)
            else:
                v = self._adapted(m, items)
            x = x + v * self._presence(m).index_select(0, items).unsqueeze(-1).to(v.dtype)
        if self.item_embedding is not None:
            x = x + (table["id"].index_select(0, items) if table is not None else self.item_embedding(items))
        return self.dropout(self.LayerNorm(x))

    def encode(self, item_seq, item_seq_len, table=None, aug_text=None):
        """Sequence vectors ``[B, H]`` (L2-normalised) and the diversity regulariser.

        Only real tokens are computed (packed, as UniSRec's encoder): the interest encoder on
        each sequence's distinct interests, the item decoder's keys/values on its items, and
        its last layer's queries, cross-attention and feed-forward at the last item only (the
        one output used).  Equal to ``nn.Transformer`` on padded inputs (see the tests).
        """
        B, L = item_seq.shape
        ip = Packing(item_seq_len, L)
        items = ip.pack(item_seq)
        x = self._item_inputs(items, ip.positions, table, None if aug_text is None else ip.pack(aug_text))
        ids = self.interest_ids(item_seq)
        n_int = (ids != 0).sum(1)
        mp = Packing(n_int, ids.size(1))
        z = self.interest_embeddings.index_select(0, mp.pack(ids))
        pad = z.new_zeros(B, z.size(1)) if self.diversity_reg == "reference" else None  # interest 0's input row
        for layer in self.trm_model.encoder.layers:
            if pad is not None:
                pad = self._post_ln_block(layer, pad, mp, keys=z)
            z = self._post_ln_block(layer, z, mp)
        norm = self.trm_model.encoder.norm or nn.Identity()
        memory = norm(z)
        layers = list(self.trm_model.decoder.layers)
        for i, layer in enumerate(layers):
            x = self._decoder_block(layer, x, ip, memory, mp, final=i == len(layers) - 1)
        seq = self.trm_model.decoder.norm(x) if self.trm_model.decoder.norm is not None else x
        reg = self._diversity(memory, mp, ids.size(1), None if pad is None else norm(pad), item_seq_len)
        return F.normalize(seq, dim=-1), reg

    def _diversity(self, memory, mp, width, pad_out, item_seq_len):
        """Interest-diversity regulariser ``sum_b ||p_b||^2 / d`` of the pooled memory ``p_b``.

        ``diversity_reg: reference`` (default): the reference's ``p_b = (n_b / W) * sum_l
        memory_bl`` over all ``W`` slots of the batch's padded interest lists, as its code
        runs: RecBole 1.0.1 pads every item list to ``MAX_ITEM_LIST_LENGTH``, so a shorter
        sequence's distinct interests include the padding item's interest 0 (one more slot),
        ``W = max_b(n_b + [len_b < MAX_ITEM_LIST_LENGTH])``, and the ``W - n_b`` slots of id 0
        are masked as keys but still produce an output (``pad_out``: the encoder run on the
        zero input row, attending to the row's interests), which the sum includes.
        ``mean``: ``p_b`` = the mean over the ``n_b`` real interests (ours before; about 90x
        smaller at initialisation on Scientific_mm, docs/fidelity.md)."""
        B = mp.batch
        owner = torch.div(mp.flat, width, rounding_mode="floor")
        pooled = memory.new_zeros(B, memory.size(1)).index_add_(0, owner, memory)
        n = mp.lengths.to(memory.dtype).unsqueeze(1)
        if pad_out is None:
            pooled = pooled / n
        else:
            slots = n + (item_seq_len < self.max_seq_length).to(n.dtype).unsqueeze(1)
            (every,), _ = gather_in_batch(slots.detach(), enabled=self.gather_negatives)
            W = every.max()  # the global batch's width (distributed: over every rank's rows)
            pooled = (n / W) * (pooled + (W - n) * pad_out)
        return (pooled * pooled).sum() / self.hidden_size

    @staticmethod
    def _mha_proj(mha, x, which):
        H = mha.embed_dim
        sl = slice(which * H, (which + 1) * H)
        return F.linear(x, mha.in_proj_weight[sl], None if mha.in_proj_bias is None else mha.in_proj_bias[sl])

    def _attend(self, mha, q_in, kv_in, packing, queries_last):
        p = mha.dropout if self.training else 0.0
        q = self._mha_proj(mha, q_in, 0)
        k, v = self._mha_proj(mha, kv_in, 1), self._mha_proj(mha, kv_in, 2)
        ctx = packed_attention(q, k, v, packing, mha.num_heads, p, queries_last=queries_last, causal=False)
        return mha.out_proj(ctx)

    def _ffn(self, layer, x):
        return layer.linear2(layer.dropout(layer.activation(layer.linear1(x))))

    def _post_ln_block(self, layer, z, packing, keys=None):
        """``nn.TransformerEncoderLayer`` (post-LN), bidirectional within each sequence; with
        ``keys`` (the packed layer input), ``z [B, H]`` is one extra query per sequence that
        attends to the sequence's tokens and is no key itself (a padding slot's output)."""
        att = self._attend(layer.self_attn, z, z if keys is None else keys, packing, keys is not None)
        z = layer.norm1(z + layer.dropout1(att))
        return layer.norm2(z + layer.dropout2(self._ffn(layer, z)))

    def _decoder_block(self, layer, x, ip, memory, mp, final):
        """``nn.TransformerDecoderLayer`` (post-LN): bidirectional self-attention over the items,
        cross-attention to the interest memory; ``final``: at each sequence's last item only."""
        q_in = x.index_select(0, ip.last) if final else x
        h = layer.norm1(q_in + layer.dropout1(self._attend(layer.self_attn, q_in, x, ip, final)))
        if final:
            cross = self._attend(layer.multihead_attn, h, memory, mp, True)
        else:  # every item token attends to its own sequence's memory (padded, per token)
            cross = self._cross_all(layer.multihead_attn, h, ip, memory, mp)
        h = layer.norm2(h + layer.dropout2(cross))
        return layer.norm3(h + layer.dropout3(self._ffn(layer, h)))

    def _cross_all(self, mha, h, ip, memory, mp):
        B, I = mp.batch, mp.width
        k = memory.new_zeros(B * I, memory.size(1)).index_copy_(0, mp.flat, self._mha_proj(mha, memory, 1))
        v = memory.new_zeros(B * I, memory.size(1)).index_copy_(0, mp.flat, self._mha_proj(mha, memory, 2))
        owner = torch.div(ip.flat, ip.width, rounding_mode="floor")
        heads, d = mha.num_heads, memory.size(1) // mha.num_heads
        kb = k.view(B, I, heads, d).transpose(1, 2).index_select(0, owner)
        vb = v.view(B, I, heads, d).transpose(1, 2).index_select(0, owner)
        ok = (torch.arange(I, device=h.device).unsqueeze(0) < mp.lengths.unsqueeze(1)).index_select(0, owner)
        qb = self._mha_proj(mha, h, 0).view(-1, heads, 1, d)
        ctx = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=ok[:, None, None, :],
                                             dropout_p=mha.dropout if self.training else 0.0)
        return mha.out_proj(ctx.reshape(h.size(0), -1))

    def forward(self, item_seq, item_seq_len):
        self._ensure_interests()
        return self.encode(item_seq, item_seq_len, self.item_table())[0]

    def _ensure_interests(self):
        if not bool(self.interests_ready):
            self.on_epoch_start(0)

    # -- scores -----------------------------------------------------------------------------
    def fused_logits(self, seq, table, items=None, normalized=False):
        """``[B, N]`` (or ``[B]`` for ``items`` ``[B]``) fused cosine scores / temperature
        (``normalized``: the table's rows already have unit norm)."""
        def cos(vectors):
            v = vectors if items is None else vectors[items]
            v = v if normalized else F.normalize(v, dim=-1)
            return seq @ v.T if items is None else (seq * v).sum(-1)

        logits = [cos(table[m]) for m in self.modalities]
        present = [self._presence(m) if items is None else self._presence(m)[items] for m in self.modalities]
        if len(logits) == 1:
            agg = logits[0]
        else:
            lg = torch.stack(logits)  # [M, B, N]
            pr = torch.stack(present).unsqueeze(1) if items is None else torch.stack(present)
            w = self.fusion_factor if self.item_fusion == "dynamic_shared" else lg.new_zeros(())
            att = _presence_softmax(w * lg, pr)
            agg = (lg * att).sum(0)
        if self.item_embedding is not None:
            agg = (cos(table["id"]) + 2.0 * agg) / 3.0
        return agg / self.temperature

    def calculate_loss(self, interaction):
        self._ensure_interests()
        if self.train_stage == "pretrain":
            return self.pretrain_loss(interaction)
        item_seq, item_seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        table = self.compute_item_table()
        seq, reg = self.encode(item_seq, item_seq_len, table)
        logits = self.fused_logits(seq, table)
        logits[:, 0] = float("-inf")
        return F.cross_entropy(logits, interaction[self.POS_ITEM_ID]) + self.gamma * reg

    def full_sort_predict(self, interaction):
        self._ensure_interests()
        table = self.item_table()
        seq, _ = self.encode(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN], table)
        unit = self.cached("normalized_table", lambda: {m: F.normalize(t, dim=-1) for m, t in table.items()})
        return self.fused_logits(seq, unit, normalized=True)

    def predict(self, interaction):
        self._ensure_interests()
        table = self.item_table()
        seq, _ = self.encode(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN], table)
        return self.fused_logits(seq, table, interaction[self.ITEM_ID])

    # -- pre-training ------------------------------------------------------------------------
    def pretrain_loss(self, interaction):
        item_seq, item_seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        pos_items = interaction[self.POS_ITEM_ID]
        table = self.compute_item_table()
        seq, reg = self.encode(item_seq, item_seq_len, table)
        target_table = {m: t[pos_items] for m, t in table.items()}
        # sequence-sequence: a second view (item drop, or word/feature drop of the texts)
        aug_seq, aug_len, aug_text = self.augment(item_seq, item_seq_len)
        aug, aug_reg = self.encode(aug_seq, aug_len, table, aug_text)
        # negatives: the whole (global) batch; distributed, every rank's keys are gathered
        keys, batch = gather_in_batch(*target_table.values(), aug, pos_items, enabled=self.gather_negatives)
        *target_keys, aug_keys, targets = keys
        target_table = dict(zip(target_table, target_keys))
        same = same_target_mask(pos_items, targets, batch.offset) if self.contrastive_mask == "inf" else None
        # sequence-item: fused score of every sequence with every in-batch target
        logits = self._pair_logits(seq, target_table, targets)
        if same is not None:
            logits = logits.masked_fill(same, float("-inf"))
        loss_si = F.cross_entropy(logits, torch.arange(seq.size(0), device=seq.device) + batch.offset)
        loss_ss = info_nce(seq, aug_keys, self.temperature, same, "inf" if same is not None else "zero", batch.offset)
        # the regulariser sums over sequences: x total/local keeps the global batch's sum once
        # the trainer weighs this rank's loss as local/total of the global batch's mean
        return loss_si + self.lam * loss_ss + self.gamma * (reg + aug_reg) * (batch.total / batch.local)

    def _pair_logits(self, seq, target_table, targets):
        """``[B, N]`` fused logits of every sequence against every in-batch target item (``N``:
        the global batch's targets, gathered from every rank when distributed)."""
        logits = [seq @ F.normalize(target_table[m], dim=-1).T for m in self.modalities]
        if len(logits) == 1:
            agg = logits[0]
        else:
            lg = torch.stack(logits)
            pr = torch.stack([self._presence(m)[targets] for m in self.modalities]).unsqueeze(1)
            att = _presence_softmax(self.fusion_factor * lg, pr)
            agg = (lg * att).sum(0)
        return agg / self.temperature

    def augment(self, item_seq, item_seq_len):
        """Item drop (probability ``item_drop_coefficient`` per batch; survivors shifted left,
        in order, in every modality) or word drop of ``item_drop_ratio`` of the text tokens
        (``plm_suffix_aug`` features; feature dropout without them).  Returns
        ``(seq, lengths, text features [B, L, D] or None)``."""
        width = item_seq.size(1)
        pos = torch.arange(width, device=item_seq.device).unsqueeze(0)
        valid = pos < item_seq_len.unsqueeze(1)
        drop = (torch.rand(item_seq.shape, device=item_seq.device) < self.item_drop_ratio) & valid
        if "text" not in self.modalities or torch.rand(()).item() < self.item_drop_coefficient:
            keep = valid & ~(drop & (pos > 0))
            order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
            new_len = keep.sum(1)
            return item_seq.gather(1, order) * (pos < new_len.unsqueeze(1)), new_len, None
        feats = self.text_features[item_seq]
        if self.text_aug_features is not None:
            other = self.text_aug_features[item_seq]
        else:
            other = F.dropout(feats, self.feature_drop_ratio, True)
        return item_seq, item_seq_len, torch.where(drop.unsqueeze(-1), other, feats)

    def score_items(self, seq_output, items, start: int, end: int) -> torch.Tensor:
        """Serving (recbole_mm.recommend): ``full_sort_predict``'s fused scores of items
        ``start..end-1`` (``items``: their rows of each modality's table, as ``fused_logits``)."""
        logits = [seq_output @ F.normalize(items[m], dim=-1).T for m in self.modalities]
        if len(logits) == 1:
            agg = logits[0]
        else:
            lg = torch.stack(logits)  # [M, B, N]
            pr = torch.stack([self._presence(m)[start:end] for m in self.modalities]).unsqueeze(1)
            w = self.fusion_factor if self.item_fusion == "dynamic_shared" else lg.new_zeros(())
            agg = (lg * _presence_softmax(w * lg, pr)).sum(0)
        if self.item_embedding is not None:
            agg = (seq_output @ F.normalize(items["id"], dim=-1).T + 2.0 * agg) / 3.0
        return agg / self.temperature


def _presence_softmax(logits: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Softmax over the modality axis (0) restricted to the present modalities; all zeros
    for an item with none (the padding item).  No NaN in the forward or the backward pass
    (a softmax over all ``-inf`` would give NaN, which anomaly detection rightly flags)."""
    present = present.expand_as(logits)
    some = present.any(0, keepdim=True)
    x = logits.masked_fill(~present, float("-inf")).masked_fill(~some, 0.0)
    return torch.softmax(x, dim=0) * present
