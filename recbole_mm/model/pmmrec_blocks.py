"""PMMRec's building blocks: the modality towers (frozen features through an adapter, or a
transformers text / CLIP vision encoder trained end to end from a local folder), the fusions of the
towers' tokens, and the item and user encoders (:mod:`recbole_mm.model.pmmrec` assembles them)."""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from recbole.model.layers import TransformerEncoder
from torch import nn

from recbole_mm.encoders import BICUBIC, CLIP_MEAN, CLIP_STD, decode_image, local_model_type, preprocess_image, quiet_transformers
from recbole_mm.model.layers import MoEAdaptor, Packing, PWLayer, packed_encoder

MODALITIES = ("text", "image")


def _sasrec_init(module: nn.Module, std: float) -> None:
    """RecBole's SASRec init: normal(0, std) weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            m.weight.data.normal_(mean=0.0, std=std)
        elif isinstance(m, nn.LayerNorm):
            m.bias.data.zero_()
            m.weight.data.fill_(1.0)
        if isinstance(m, nn.Linear) and m.bias is not None:
            m.bias.data.zero_()


def _xavier_linear(in_dim: int, out_dim: int) -> nn.Linear:
    lin = nn.Linear(in_dim, out_dim)
    nn.init.xavier_normal_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin


# --------------------------------------------------------------------------------------
# Modality towers: (inputs) -> tokens [N, T, H], mask [N, T], first token [N, H]


class FeatureTower(nn.Module):
    """``features`` mode: one token per item from its frozen feature row, through a trainable
    whitening adapter ``W (x - b)``: UniSRec's mixture of experts (``moe``) or one expert
    (``linear``).

    ``b`` starts at ``mean`` (the feature mean over the items that have this modality).
    Precomputed CLIP/BERT features share a large common direction (mean pairwise cosine
    0.5-0.6 on Scientific_mm); left in, the first Adam steps turn it into a common direction
    of every item vector, which the fusion's LayerNorms then amplify until all items look
    alike (observed: adapter cosine 0.47 -> 0.94 in 5 steps, the loss stuck at uniform).
    """

    def __init__(self, in_dim: int, hidden: int, adapter: str, n_exps: int, dropout: float,
                 mean: torch.Tensor | None = None):
        super().__init__()
        if adapter == "moe":
            self.adaptor = MoEAdaptor(n_exps, [in_dim, hidden], dropout)
            experts = list(self.adaptor.experts)
        elif adapter == "linear":
            self.adaptor = PWLayer(in_dim, hidden, dropout)
            experts = [self.adaptor]
        else:
            raise ValueError(f"PMMRec: feature_adapter must be 'moe' or 'linear', got {adapter!r}")
        if mean is not None:
            for e in experts:
                e.bias.data.copy_(mean)

    def forward(self, feats: torch.Tensor, present: torch.Tensor):
        x = self.adaptor(feats)
        return x.unsqueeze(1), present.unsqueeze(1), x


def _layer_list(model: nn.Module) -> nn.ModuleList:
    """The encoder's block list (the longest ``ModuleList``: BERT ``encoder.layer``, CLIP ``encoder.layers``)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"PMMRec end_to_end: cannot find the transformer blocks of {type(model).__name__}")
    return max(lists, key=len)


def _freeze_bottom(model: nn.Module, trainable_layers: int) -> None:
    """Freeze everything but the top ``trainable_layers`` blocks (``-1``: train everything)."""
    if trainable_layers < 0:
        return
    for p in model.parameters():
        p.requires_grad_(False)
    if trainable_layers:
        for block in list(_layer_list(model))[-trainable_layers:]:
            for p in block.parameters():
                p.requires_grad_(True)


class TextTower(nn.Module):
    """``end_to_end``: a transformers text encoder (local folder) + a linear projection of every token."""

    def __init__(self, path: str, hidden: int, trainable_layers: int):
        super().__init__()
        from transformers import AutoModel, CLIPModel

        kind = local_model_type(path, "PMMRec end_to_end: text_encoder_path")
        with quiet_transformers():
            if kind == "clip":
                self.encoder = CLIPModel.from_pretrained(path, local_files_only=True).text_model
            else:
                self.encoder = AutoModel.from_pretrained(path, local_files_only=True)
        _freeze_bottom(self.encoder, trainable_layers)
        self.proj = _xavier_linear(self.encoder.config.hidden_size, hidden)
        self.max_positions = int(getattr(self.encoder.config, "max_position_embeddings", 512))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor):
        width = max(int(mask.sum(1).max()), 1)  # trim the batch to its longest text
        ids, mask = ids[:, :width], mask[:, :width]
        h = self.proj(self.encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state)
        return h, mask.bool(), h[:, 0]


class VisionTower(nn.Module):
    """``end_to_end``: a CLIP vision tower (local folder) + a linear projection of CLS + patch states."""

    def __init__(self, path: str, hidden: int, trainable_layers: int):
        super().__init__()
        from transformers import CLIPModel, CLIPVisionModel

        kind = local_model_type(path, "PMMRec end_to_end: image_encoder_path")
        with quiet_transformers():
            if kind == "clip":
                self.encoder = CLIPModel.from_pretrained(path, local_files_only=True).vision_model
            elif kind == "clip_vision_model":
                self.encoder = CLIPVisionModel.from_pretrained(path, local_files_only=True)
            else:
                raise ValueError(f"PMMRec end_to_end: image_encoder_path {path!r} holds a {kind!r} model, "
                                 "expected a CLIP model (clip or clip_vision_model)")
        _freeze_bottom(self.encoder, trainable_layers)
        cfg = self.encoder.config
        self.proj = _xavier_linear(cfg.hidden_size, hidden)
        self.image_size = int(cfg.image_size)
        self.n_tokens = (cfg.image_size // cfg.patch_size) ** 2 + 1
        self.hidden = hidden
        # CLIP preprocessing (the folder's preprocessor_config.json when present)
        self.size = self.crop = self.image_size
        self.mean, self.std, self.resample = CLIP_MEAN, CLIP_STD, BICUBIC
        pp = os.path.join(path, "preprocessor_config.json")
        if os.path.isfile(pp):
            with open(pp, encoding="utf-8") as f:
                conf = json.load(f)
            size, crop = conf.get("size"), conf.get("crop_size")
            size = size.get("shortest_edge") if isinstance(size, dict) else size
            crop = (crop.get("height") if isinstance(crop, dict) else crop) or size
            self.size, self.crop = int(size or self.size), int(crop or self.size)
            self.mean = tuple(conf.get("image_mean") or self.mean)
            self.std = tuple(conf.get("image_std") or self.std)
            self.resample = conf.get("resample", self.resample)

    def load_pixels(self, files: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Image files (``None`` = missing) -> ``uint8 [N, 3, crop, crop]`` (resized, centre-cropped,
        not normalised: 4x smaller than float) and a presence mask; unreadable files count as missing."""
        pixels = torch.zeros(len(files), 3, self.crop, self.crop, dtype=torch.uint8)
        present = torch.zeros(len(files), dtype=torch.bool)
        for i, path in enumerate(files):
            if not path:
                continue
            try:
                img = decode_image(path)
            except Exception:  # noqa: BLE001 - an unreadable file only costs this item its image
                continue
            arr = preprocess_image(img, self.size, self.crop, (0.0, 0.0, 0.0), (1 / 255,) * 3, self.resample)
            pixels[i] = torch.from_numpy(np.rint(arr).clip(0, 255).astype(np.uint8))
            present[i] = True
        return pixels, present

    def forward(self, pixels: torch.Tensor, present: torch.Tensor):
        n = pixels.size(0)
        tokens = self.proj.weight.new_zeros(n, self.n_tokens, self.hidden)
        idx = present.nonzero().squeeze(1)
        if idx.numel():
            x = pixels.index_select(0, idx).to(tokens.dtype) / 255.0
            mean = x.new_tensor(self.mean).view(1, 3, 1, 1)
            std = x.new_tensor(self.std).view(1, 3, 1, 1)
            h = self.encoder(pixel_values=(x - mean) / std).last_hidden_state
            tokens = tokens.index_copy(0, idx, self.proj(h))
        mask = present.unsqueeze(1).expand(n, self.n_tokens)
        return tokens, mask, tokens[:, 0]


# --------------------------------------------------------------------------------------
# Fusion: per-modality tokens -> one item vector


def _pool(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * m).sum(1) / m.sum(1).clamp_min(1.0)


class AttentionFusion(nn.Module):
    """Transformer layer(s) over ``[text tokens; image tokens]`` (+ modality-type embeddings),
    masked mean pooling (the released code's merged attention), then a linear projection.

    The projection is ours and starts at zero: the pooled post-LN output has norm ~sqrt(H)
    whatever the input, and so has the user vector, so without it the dot-product logits
    start in the hundreds, the softmax saturates and training stalls (Scientific_mm: valid
    NDCG@10 0.01 after 8 epochs).  From zero, item vectors grow to the scale the loss needs,
    as SASRec's small-initialised item embeddings do.
    """

    def __init__(self, hidden, n_layers, n_heads, inner, dropout, eps):
        super().__init__()
        self.type_embedding = nn.Embedding(len(MODALITIES), hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.encoder = TransformerEncoder(n_layers=n_layers, n_heads=n_heads, hidden_size=hidden, inner_size=inner,
                                          hidden_dropout_prob=dropout, attn_dropout_prob=dropout,
                                          hidden_act="gelu", layer_norm_eps=eps)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, tokens: list, masks: list) -> torch.Tensor:
        x = torch.cat([t + self.type_embedding.weight[i] for i, t in enumerate(tokens)], dim=1)
        mask = torch.cat(masks, dim=1)
        x = self.dropout(self.LayerNorm(x))
        ext = torch.where(mask[:, None, None, :], 0.0, -10000.0).to(x.dtype)
        out = self.encoder(x, ext, output_all_encoded_layers=False)[-1]
        return self.proj(_pool(out, mask))


class SumFusion(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.proj = nn.ModuleList([nn.Linear(hidden, hidden) for _ in MODALITIES])

    def forward(self, tokens, masks):
        out = 0.0
        for lin, t, m in zip(self.proj, tokens, masks):
            out = out + lin(_pool(t, m)) * m.any(1, keepdim=True).to(t.dtype)
        return out


class ConcatFusion(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.proj = nn.Linear(len(MODALITIES) * hidden, hidden)

    def forward(self, tokens, masks):
        return self.proj(torch.cat([_pool(t, m) for t, m in zip(tokens, masks)], dim=-1))


class GatedFusion(nn.Module):
    """Gated multimodal unit: ``g tanh(W_t t) + (1 - g) tanh(W_v v)``, ``g = sigmoid(W_g [t; v])``
    (``g`` = 1 without an image, 0 without a text)."""

    def __init__(self, hidden):
        super().__init__()
        self.proj = nn.ModuleList([nn.Linear(hidden, hidden) for _ in MODALITIES])
        self.gate = nn.Linear(len(MODALITIES) * hidden, hidden)

    def forward(self, tokens, masks):
        (tt, tv), (mt, mv) = tokens, masks
        t, v = _pool(tt, mt), _pool(tv, mv)
        g = torch.sigmoid(self.gate(torch.cat([t, v], dim=-1)))
        has_t, has_v = mt.any(1, keepdim=True), mv.any(1, keepdim=True)
        g = torch.where(~has_v, torch.ones_like(g), torch.where(~has_t, torch.zeros_like(g), g))
        return g * torch.tanh(self.proj[0](t)) + (1 - g) * torch.tanh(self.proj[1](v))


class ItemEncoder(nn.Module):
    """Modality towers + fusion.  ``forward(inputs)`` -> fused ``[N, H]`` and the per-modality
    first tokens ``{modality: [N, H]}`` (NICL's vectors)."""

    def __init__(self, text: nn.Module, image: nn.Module, fusion: nn.Module):
        super().__init__()
        self.text, self.image, self.fusion = text, image, fusion

    def forward(self, text_inputs: tuple, image_inputs: tuple):
        tt, mt, ct = self.text(*text_inputs)
        tv, mv, cv = self.image(*image_inputs)
        return self.fusion([tt, tv], [mt, mv]), {"text": ct, "image": cv}


class UserEncoder(nn.Module):
    """SASRec-style: ``dropout(LN(e + position))`` -> causal post-LN transformer (packed tokens)."""

    def __init__(self, max_len, hidden, n_layers, n_heads, inner, hidden_dropout, attn_dropout, act, eps):
        super().__init__()
        self.position_embedding = nn.Embedding(max_len, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(hidden_dropout)
        self.trm_encoder = TransformerEncoder(n_layers=n_layers, n_heads=n_heads, hidden_size=hidden, inner_size=inner,
                                              hidden_dropout_prob=hidden_dropout, attn_dropout_prob=attn_dropout,
                                              hidden_act=act, layer_norm_eps=eps)

    def forward(self, x: torch.Tensor, packing: Packing, last_only: bool) -> torch.Tensor:
        x = self.dropout(self.LayerNorm(x + self.position_embedding(packing.positions)))
        return packed_encoder(self.trm_encoder, x, packing, last_only=last_only)
