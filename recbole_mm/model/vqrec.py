"""VQ-Rec (Hou et al., WWW'23): vector-quantised item codes for transferable recommenders.

Text ==> code ==> representation: every item's text feature is quantised into ``code_dim``
discrete codes (OPQ + PQ, ``recbole_mm.data.codes``; fitted on the training items only), and an
item is the mean of its codes' embeddings (``pq_code_embedding``: ``code_dim`` blocks of
``code_cap + 1`` rows, row 0 of each block unused, as the reference).  A causal SASRec-style
transformer encodes the sequence; logits are cosines / ``temperature``.  Stages (``train_stage``):

* ``pretrain``: in-batch contrastive loss over (mixed-domain) batches plus one semi-synthetic
  hard negative per sequence: the target's codes, each replaced by a random code with
  probability ``fake_idx_ratio``;
* ``inductive_ft``: codes only (the reference's fine-tuning), CE over all items;
* ``transductive_ft``: codes + an item ID embedding (not in the reference; as UniSRec's).

Fine-tuning from a checkpoint (``-p``): the downstream codes come from the downstream
quantiser, so the pre-trained code embeddings are re-assigned: for the first ``reassign_steps``
epochs only a permutation per sub-code is learned (``trans_matrix`` ``[code_dim, code_cap,
code_cap]``, Gumbel-Sinkhorn with ``sinkhorn_iter`` iterations, temperature 0.7 as the
reference); then it is hardened into a permutation (Hungarian assignment), the code embedding
table is permuted once and everything but (with ``fix_enc``) the position embedding and the
transformer trains.

The quantiser (rotation, IVF centroid, codebooks) is a persistent buffer: a checkpoint carries
it, so ``recbole_mm.load(ckpt).with_catalogue(DIR)`` encodes another catalogue's features with
it (no faiss needed); the codes themselves are recomputed from the features after every load.

Differences from the reference (docs/fidelity.md, section VQ-Rec, each with its config key):

* the permutation gets a gradient (straight-through: forward with the hard permutation,
  backward through the Sinkhorn matrix); the reference's ``ceil`` has zero gradient, so its
  ``trans_matrix`` never moves (``permutation: reference`` restores it: row argmax, no gradient);
* the hardened assignment is a permutation (Hungarian on the noise-free Sinkhorn matrix) of the
  ``code_cap`` real codes; the reference takes each row's argmax of a noisy sample (two codes may
  share one embedding) over ``code_cap + 1`` slots including the unused one;
* without a checkpoint there is no re-assignment phase and nothing is frozen
  (``scratch_reassign: True``: the reference, which also spends ``reassign_steps`` epochs on the
  (gradient-free) permutation from scratch and then freezes the randomly initialised encoder);
* same-target negatives leave the pre-training softmax (``contrastive_mask: zero``: the
  reference's logit 0); the padding item is not a fine-tuning candidate.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from recbole_mm.data.codes import QUANTISER_KEYS, dataset_codes, encode
from recbole_mm.distributed import gather_in_batch
from recbole_mm.errors import CheckpointError
from recbole_mm.model.abstract import MMSequentialRecommender, one_of, required
from recbole_mm.model.layers import Packing, config_transformer_encoder, packed_encoder, same_target_mask

STAGES = ("pretrain", "inductive_ft", "transductive_ft")
GUMBEL_TEMPERATURE = 0.7  # the reference's gumbel_sinkhorn default
EPS = 1e-6  # the reference's log / Gumbel epsilon


def sinkhorn(log_alpha: torch.Tensor, n_iters: int) -> torch.Tensor:
    """Doubly-stochastic ``exp`` of ``log_alpha`` ``[..., n, n]`` by alternate row/column
    normalisation in log space (the reference's ``sinkhorn_sorting_operator``)."""
    for _ in range(n_iters):
        log_alpha = log_alpha - torch.logsumexp(log_alpha, dim=-1, keepdim=True)
        log_alpha = log_alpha - torch.logsumexp(log_alpha, dim=-2, keepdim=True)
    return log_alpha.exp()


def gumbel_sinkhorn(logits: torch.Tensor, n_iters: int, temperature: float = GUMBEL_TEMPERATURE,
                    noise: bool = True) -> torch.Tensor:
    if noise:
        u = torch.rand_like(logits)
        logits = logits - torch.log(-torch.log(u + EPS) + EPS)
    return sinkhorn(logits / temperature, n_iters)


def harden(soft: torch.Tensor) -> torch.Tensor:
    """Permutation matrices ``[..., n, n]`` maximising ``sum log soft`` (Hungarian, per matrix)."""
    cost = -torch.log(soft.detach().double() + EPS).cpu().numpy()
    flat = cost.reshape(-1, cost.shape[-2], cost.shape[-1])
    hard = np.zeros_like(flat)
    for k, c in enumerate(flat):
        rows, cols = linear_sum_assignment(c)
        hard[k, rows, cols] = 1.0
    return torch.from_numpy(hard.reshape(cost.shape)).to(soft)


def row_argmax(soft: torch.Tensor) -> torch.Tensor:
    """The reference's hardening: one-hot of each row's argmax (not always a permutation)."""
    return F.one_hot(soft.argmax(-1), soft.size(-1)).to(soft)


class VQRec(MMSequentialRecommender):
    STAGES = STAGES

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.train_stage = one_of(config, "train_stage", self.STAGES, self)
        self.code_dim, self.code_cap = int(config["code_dim"]), int(config["code_cap"])
        self.hidden_size = config["hidden_size"]
        self.temperature = float(config["temperature"])
        self.fake_idx_ratio = float(config["fake_idx_ratio"])
        self.sinkhorn_iter = int(config["sinkhorn_iter"])
        self.reassign_steps = int(required(config, "reassign_steps"))
        self.permutation = required(config, "permutation")
        if self.permutation not in ("straight_through", "reference"):
            raise ValueError(f"VQRec: permutation must be 'straight_through' or 'reference', got {self.permutation!r}")
        self.scratch_reassign = bool(config["scratch_reassign"])
        self.transfer_codes = one_of(config, "transfer_codes", ("target", "pretrained"), self)
        self.contrastive_mask = required(config, "contrastive_mask")
        self.fix_enc = bool(config["fix_enc"])
        self.initializer_range = config["initializer_range"]

        self.register_features(dataset, ["text"])
        self._init_quantiser(config, dataset)

        self.pq_code_embedding = nn.Embedding(self.code_dim * (self.code_cap + 1), self.hidden_size, padding_idx=0)
        self.position_embedding = nn.Embedding(self.max_seq_length, self.hidden_size)
        self.trm_encoder = config_transformer_encoder(config, self.hidden_size)
        self.LayerNorm = nn.LayerNorm(self.hidden_size, eps=config["layer_norm_eps"])
        self.dropout = nn.Dropout(config["hidden_dropout_prob"])
        self.item_embedding = (
            nn.Embedding(self.n_items, self.hidden_size, padding_idx=0) if self.train_stage == "transductive_ft" else None
        )
        # log-potentials of the code permutation (the reference: randn, exp'd then log'd)
        self.trans_matrix = nn.Parameter(torch.randn(self.code_dim, self.code_cap, self.code_cap), requires_grad=False)
        self.apply(self._init_weights)
        self.reassigning = False  # in the re-assignment phase (code embeddings seen through the permutation)
        self.pretrained = False

    # -- codes ------------------------------------------------------------------------
    def _init_quantiser(self, config, dataset):
        dim = self.text_features.shape[1]
        if hasattr(dataset, "inter_feat") and hasattr(dataset, "domains"):  # training: fit or load the cached codes
            fallback = os.path.join(required(config, "checkpoint_dir"), "codes")
            fitted = dataset_codes(dataset, self.code_dim, self.code_cap, config["plm_suffix"], fallback)
            quantiser = fitted["quantiser"]
            self.codes_path = fitted["path"]
        else:  # a catalogue (recommend.load): the checkpoint's quantiser is loaded into these
            dsub = dim // self.code_dim
            quantiser = {"rotation": torch.zeros(dim, dim), "bias": torch.zeros(dim), "coarse": torch.zeros(dim),
                         "centroids": torch.zeros(self.code_dim, self.code_cap, dsub)}
            self.codes_path = None
        for k in QUANTISER_KEYS:
            self.register_buffer(f"quantiser_{k}", quantiser[k].float().clone())
        self.register_buffer("pq_codes", torch.zeros(self.n_items, self.code_dim, dtype=torch.long), persistent=False)
        self.refresh_codes()
        self.register_load_state_dict_post_hook(lambda module, _keys: module.refresh_codes())

    def quantiser(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, f"quantiser_{k}") for k in QUANTISER_KEYS}

    @torch.no_grad()
    def refresh_codes(self) -> None:
        """``pq_codes`` ``[n_items, code_dim]`` (flat rows of ``pq_code_embedding``; padding 0)
        from the text features and the current quantiser."""
        raw = encode(self.text_features, self.quantiser())
        flat = raw + 1 + torch.arange(self.code_dim, device=raw.device) * (self.code_cap + 1)
        flat[0] = 0
        self.pq_codes.copy_(flat)

    def code_weight(self) -> torch.Tensor:
        """The code embedding table, seen through the permutation during re-assignment."""
        weight = self.pq_code_embedding.weight
        if not self.reassigning:
            return weight
        blocks = weight.view(self.code_dim, self.code_cap + 1, -1)
        perm = self.permutation_matrix(noise=self.training)
        real = torch.bmm(perm, blocks[:, 1:])
        return torch.cat([blocks[:, :1], real], dim=1).reshape_as(weight)

    def permutation_matrix(self, noise: bool) -> torch.Tensor:
        """``[code_dim, code_cap, code_cap]``: row ``i`` of block ``d`` picks the pre-trained
        embedding that code ``i`` takes.  Hard in the forward pass; straight-through gradient."""
        soft = gumbel_sinkhorn(self.trans_matrix, self.sinkhorn_iter, noise=noise)
        if self.permutation == "reference":  # the reference's ceil: a graph, but zero gradient
            return row_argmax(soft) + (soft - soft.detach()) * 0.0
        hard = harden(soft)
        return hard + (soft - soft.detach())  # exactly hard forward, Sinkhorn gradient

    def item_vectors(self, items: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Mean code embedding of ``items`` (any shape) ``[..., H]``."""
        codes = self.pq_codes[items.reshape(-1)]
        return F.embedding_bag(codes, weight, mode="mean").view(*items.shape, -1)

    # -- re-assignment (fine-tuning from a checkpoint) --------------------------------------
    def load_transferable(self, state_dict: dict) -> None:
        """The pre-trained weights.  ``transfer_codes: target`` (the reference's default): not the
        quantiser, the downstream data keeps its own codes and the code embeddings are re-assigned.
        ``pretrained`` (the reference's ``index_pretrain_dataset``): the checkpoint's quantiser
        encodes the downstream items, so each code keeps its pre-trained meaning: no re-assignment,
        and the model scores a new catalogue zero-shot."""
        own_codes = self.transfer_codes == "target"
        keep = {k: v for k, v in state_dict.items()
                if k != "trans_matrix" and not (own_codes and k.startswith("quantiser_"))}
        if not own_codes and not any(k.startswith("quantiser_") for k in keep):
            raise CheckpointError("VQRec: transfer_codes: pretrained needs a checkpoint that holds its quantiser "
                                  "(quantiser_* buffers); this one has none")
        super().load_transferable(keep)
        self.pretrained = True

    def fixes_on_transfer(self) -> bool:
        """With a re-assignment, the freezing waits for its end (``on_epoch_start``)."""
        return super().fixes_on_transfer() and not self._uses_reassignment()

    def frozen_on_transfer(self) -> list[str]:
        return [n for n, _ in self.named_parameters() if n.startswith(("position_embedding.", "trm_encoder."))]

    def _uses_reassignment(self) -> bool:
        if self.train_stage == "pretrain" or self.reassign_steps <= 0:
            return False
        if self.pretrained:  # the checkpoint's own codes need no re-assignment
            return self.transfer_codes == "target"
        return self.scratch_reassign

    def on_epoch_start(self, epoch: int, train_data=None) -> None:
        """Epochs ``< reassign_steps``: only the permutation trains; at ``reassign_steps`` the
        permutation is hardened into the code embedding table and the model trains."""
        if not self._uses_reassignment():
            return
        if epoch < self.reassign_steps:
            self.reassigning = True
            for name, p in self.named_parameters():
                p.requires_grad_(name == "trans_matrix")
        elif self.reassigning or epoch == self.reassign_steps:
            self.apply_permutation()
            for name, p in self.named_parameters():
                p.requires_grad_(name != "trans_matrix")
            if self.fix_enc or self.scratch_reassign:
                self.freeze(self.frozen_on_transfer())

    @torch.no_grad()
    def apply_permutation(self) -> None:
        """Write the hardened permutation into ``pq_code_embedding`` (once) and leave the phase."""
        self.reassigning = True
        self.pq_code_embedding.weight.copy_(self.code_weight_hard())
        self.pq_code_embedding.weight[0].zero_()
        self.reassigning = False

    def code_weight_hard(self) -> torch.Tensor:
        was = self.training
        self.eval()
        weight = self.code_weight().detach().clone()
        self.train(was)
        return weight

    # -- representations ---------------------------------------------------------------
    def compute_item_table(self) -> torch.Tensor:
        weight = self.cached("code_weight", self.code_weight)
        table = self.item_vectors(torch.arange(self.n_items, device=self.pq_codes.device), weight)
        if self.item_embedding is not None:
            table = table + self.item_embedding.weight
        return table

    def encode(self, item_seq, item_seq_len, weight=None):
        packing = Packing(item_seq_len, item_seq.size(1))
        items = packing.pack(item_seq)
        x = self.item_vectors(items, self.code_weight() if weight is None else weight)
        x = x + self.position_embedding(packing.positions)
        if self.item_embedding is not None:
            x = x + self.item_embedding(items)
        x = self.dropout(self.LayerNorm(x))
        return packed_encoder(self.trm_encoder, x, packing, last_only=True)

    def forward(self, item_seq, item_seq_len):
        return self.encode(item_seq, item_seq_len)

    def _logits(self, seq_output, table):
        if self.temperature > 0:
            return F.normalize(seq_output, dim=-1) @ F.normalize(table, dim=-1).T / self.temperature
        return seq_output @ table.T

    # -- fine-tuning -------------------------------------------------------------------
    def calculate_loss(self, interaction):
        if self.train_stage == "pretrain":
            return self.pretrain_loss(interaction)
        weight = self.code_weight()  # one permutation draw per batch, shared by sequences and candidates
        seq_output = self.encode(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN], weight)
        table = self.item_vectors(torch.arange(self.n_items, device=weight.device), weight)
        if self.item_embedding is not None:
            table = table + self.item_embedding.weight
        logits = self._logits(seq_output, table)
        logits[:, 0] = float("-inf")
        return F.cross_entropy(logits, interaction[self.POS_ITEM_ID])

    def full_sort_predict(self, interaction):
        table = self.item_table()
        weight = self.cached("code_weight", self.code_weight)
        seq_output = self.encode(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN], weight)
        if self.temperature > 0:
            norm = self.cached("normalized_table", lambda: F.normalize(table, dim=-1))
            return F.normalize(seq_output, dim=-1) @ norm.T
        return seq_output @ table.T

    def predict(self, interaction):
        return self.full_sort_predict(interaction).gather(1, interaction[self.ITEM_ID].unsqueeze(1)).squeeze(1)

    # -- pre-training ------------------------------------------------------------------
    def fake_negatives(self, codes: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Semi-synthetic negatives: each code replaced by a random code of its sub-code with
        probability ``fake_idx_ratio`` (the reference's ``generate_fake_neg_item_emb``)."""
        base = torch.arange(self.code_dim, device=codes.device) * (self.code_cap + 1) + 1
        rand = torch.randint_like(codes, self.code_cap) + base
        mask = torch.rand(codes.shape, device=codes.device) < self.fake_idx_ratio
        return F.embedding_bag(torch.where(mask, rand, codes), weight, mode="mean")

    def pretrain_loss(self, interaction):
        weight = self.pq_code_embedding.weight
        pos_items = interaction[self.POS_ITEM_ID]
        seq_output = F.normalize(self.encode(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN], weight), dim=-1)
        pos_emb = F.normalize(self.item_vectors(pos_items, weight), dim=-1)
        fake = F.normalize(self.fake_negatives(self.pq_codes[pos_items], weight), dim=-1)
        (keys, targets), batch = gather_in_batch(pos_emb, pos_items, enabled=self.gather_negatives)
        logits = seq_output @ keys.T / self.temperature
        same = same_target_mask(pos_items, targets, batch.offset)
        if self.contrastive_mask == "inf":
            logits = logits.masked_fill(same, float("-inf"))
        elif self.contrastive_mask == "zero":
            logits = logits.masked_fill(same, 0.0)
        else:
            raise ValueError(f"contrastive_mask must be 'inf' or 'zero', got {self.contrastive_mask!r}")
        fake_logit = (seq_output * fake).sum(-1, keepdim=True) / self.temperature
        target = torch.arange(seq_output.size(0), device=logits.device) + batch.offset
        return F.cross_entropy(torch.cat([logits, fake_logit], dim=1), target)

    # -- serving (recbole_mm.recommend) -----------------------------------------------------
    def sequence_output(self, interaction):
        weight = self.cached("code_weight", self.code_weight)
        return self.encode(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN], weight)

    def score_items(self, seq_output, items, start: int, end: int) -> torch.Tensor:
        """As ``full_sort_predict``: cosine with ``temperature > 0`` (not divided by it), else dot product."""
        if self.temperature > 0:
            return F.normalize(seq_output, dim=-1) @ F.normalize(items, dim=-1).T
        return seq_output @ items.T
