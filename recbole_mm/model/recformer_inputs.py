"""Recformer's inputs: item sentences (key-value attribute pairs from ``<d>.attr`` or the item
texts), their tokenisation into :class:`Tokens`, the catalogue fingerprint, and the local backbone
(a BERT/RoBERTa-type folder, never downloaded) with its MLM head; :mod:`recbole_mm.model.recformer`
holds the model."""

from __future__ import annotations

import os
import re
import zlib
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recbole_mm.encoders import default_encoder, local_model_type, quiet_transformers

CLS_TYPE, KEY_TYPE, VALUE_TYPE, PAD_TYPE, IMAGE_TYPE = 0, 1, 2, 3, 4

# MLM head weights in a backbone folder, when it has them (BERT / RoBERTa naming)
_MLM_HEAD_NAMES = {
    "transform.weight": ("cls.predictions.transform.dense.weight", "lm_head.dense.weight"),
    "transform.bias": ("cls.predictions.transform.dense.bias", "lm_head.dense.bias"),
    "norm.weight": ("cls.predictions.transform.LayerNorm.weight", "lm_head.layer_norm.weight"),
    "norm.bias": ("cls.predictions.transform.LayerNorm.bias", "lm_head.layer_norm.bias"),
    "bias": ("cls.predictions.bias", "lm_head.bias"),
}


# --------------------------------------------------------------------------------------
# Item sentences


_SENTENCE_END = re.compile(r"(?<=\.)\s+")


def split_text(text: str) -> dict[str, str]:
    """Attributes of an atomic ``.text`` line (``title. categories. brand.``, as written by
    ``recbole-mm preprocess`` and the UniSRec/MISSRec pipelines).

    The text is cut after every ``.`` followed by a space: with 3 or more pieces the last is
    the brand, the one before the category, the rest the title (titles may contain periods);
    2 pieces are title and category; 1 piece is the title.  Trailing periods are dropped.
    """
    parts = [p.strip() for p in _SENTENCE_END.split(text.strip()) if p.strip()]
    clean = [p.rstrip(".").strip() for p in parts]
    if len(clean) >= 3:
        title = " ".join(parts[:-2]).rstrip(".").strip()
        out = {"title": title, "category": clean[-2], "brand": clean[-1]}
    elif len(clean) == 2:
        out = {"title": clean[0], "category": clean[1]}
    elif clean:
        out = {"title": clean[0]}
    else:
        out = {}
    return {k: v for k, v in out.items() if v}


def item_attribute_dicts(dataset) -> list[dict[str, str]]:
    """``{key: value}`` of every item id (``{}`` for padding): ``dataset.item_attributes``
    where the ``.attr`` file lists the item, the parsed ``.text`` otherwise."""
    texts = getattr(dataset, "item_text", None)
    attrs = getattr(dataset, "item_attributes", None)
    n = dataset.item_num
    if texts is None and attrs is None:
        raise ValueError("Recformer / Reo-LM need item texts: the dataset has no .text (nor .attr) file")
    out: list[dict[str, str]] = [{}]
    for i in range(1, n):
        row = attrs[i] if attrs is not None else None
        out.append(dict(row) if row is not None else split_text(texts[i] if texts is not None else ""))
    return out


@dataclass
class Sentences:
    """Every item's tokens, flattened: item ``i`` is ``ids[offsets[i] : offsets[i] + lengths[i]]``."""

    ids: torch.Tensor  # [N] token ids
    types: torch.Tensor  # [N] KEY_TYPE / VALUE_TYPE / IMAGE_TYPE
    word_start: torch.Tensor  # [N] bool: first token of a word (whole-word masking)
    offsets: torch.Tensor  # [n_items]
    lengths: torch.Tensor  # [n_items]


def _word_starts(word_ids: list) -> list[bool]:
    out, prev = [], object()
    for w in word_ids:
        out.append(w is None or w != prev)
        prev = w
    return out


def build_sentences(dataset, tokenizer, keys, max_attr_num: int, max_attr_length: int,
                    image_token_id: int | None = None, image_last: bool = False) -> Sentences:
    """Tokenise every item once (cached on the dataset per tokenizer and caps).

    An item is, for each of its first ``max_attr_num`` non-empty attributes in ``keys``
    order, the tokens of the key then of the value, cut together to ``max_attr_length``
    (Recformer's tokenizer); with ``image_token_id`` (Reo-LM) one image token comes first, or
    last with ``image_last``.
    Padding (item 0) is empty.
    """
    cache = dataset.__dict__.setdefault("_sentence_cache", {})
    ck = (getattr(tokenizer, "name_or_path", ""), type(tokenizer).__name__, len(tokenizer), tuple(keys),
          int(max_attr_num), int(max_attr_length), image_token_id, bool(image_last))
    if ck in cache:
        return cache[ck]
    attrs = item_attribute_dicts(dataset)
    n = len(attrs)
    tok = {}
    for k in keys:  # one batched tokenizer call per attribute
        key_enc = tokenizer(k.replace("_", " "), add_special_tokens=False)
        key_ids = list(key_enc["input_ids"])[:max_attr_length]
        key_ws = _word_starts(key_enc.word_ids())[: len(key_ids)]
        budget = max_attr_length - len(key_ids)
        rows = [i for i in range(n) if attrs[i].get(k)]
        values = {}
        if rows and budget > 0:
            enc = tokenizer([attrs[i][k] for i in rows], add_special_tokens=False, truncation=True, max_length=budget)
            for j, i in enumerate(rows):
                ids = list(enc["input_ids"][j])[:budget]
                values[i] = (ids, _word_starts(enc.word_ids(j))[: len(ids)])
        tok[k] = (key_ids, key_ws, values)
    all_ids, all_types, all_ws, lengths = [], [], [], np.zeros(n, dtype=np.int64)
    for i in range(1, n):
        ids, types, ws = [], [], []
        if image_token_id is not None and not image_last:
            ids.append(image_token_id), types.append(IMAGE_TYPE), ws.append(True)
        used = 0
        for k in keys:
            if used >= max_attr_num:
                break
            key_ids, key_ws, values = tok[k]
            if not attrs[i].get(k):
                continue
            used += 1
            v_ids, v_ws = values.get(i, ([], []))
            ids += key_ids + v_ids
            types += [KEY_TYPE] * len(key_ids) + [VALUE_TYPE] * len(v_ids)
            ws += key_ws + v_ws
        if image_token_id is not None and image_last:
            ids.append(image_token_id), types.append(IMAGE_TYPE), ws.append(True)
        all_ids += ids
        all_types += types
        all_ws += ws
        lengths[i] = len(ids)
    lengths_t = torch.from_numpy(lengths)
    out = Sentences(
        ids=torch.tensor(all_ids, dtype=torch.long),
        types=torch.tensor(all_types, dtype=torch.long),
        word_start=torch.tensor(all_ws, dtype=torch.bool),
        offsets=torch.cumsum(lengths_t, 0) - lengths_t,
        lengths=lengths_t,
    )
    cache[ck] = out
    return out


@dataclass
class Tokens:
    """A batch of token sequences, packed (sequence-major, no padding): ``lengths [B]``."""

    ids: torch.Tensor
    types: torch.Tensor
    positions: torch.Tensor  # token position in its sequence (0 = <s>)
    item_positions: torch.Tensor  # 0 = <s>, k = k-th most recent item
    word_start: torch.Tensor
    items: torch.Tensor  # item id of each token (<s>: the sequence's most recent item)
    lengths: torch.Tensor

    def replace(self, **kw) -> "Tokens":
        return Tokens(**{f.name: kw.get(f.name, getattr(self, f.name)) for f in fields(self)})

    @staticmethod
    def cat(parts: list["Tokens"]) -> "Tokens":
        return Tokens(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(Tokens)})


# --------------------------------------------------------------------------------------
# Backbone


def default_backbone() -> str:
    return default_encoder()


def load_backbone(path: str | None):
    """``(model, tokenizer, extra weights)`` of a local BERT/RoBERTa-type folder (nothing is downloaded)."""
    path = str(path or default_backbone())
    local_model_type(path, "backbone_path")  # a local folder (hub downloads off)
    from transformers import AutoModel, AutoTokenizer

    with quiet_transformers():
        try:
            model = AutoModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False, dtype=torch.float32)
        except TypeError:  # a model class without a pooler argument
            model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer, _checkpoint_tensors(path, [n for names in _MLM_HEAD_NAMES.values() for n in names])


def _checkpoint_tensors(path: str, names: list[str]) -> dict:
    """The tensors ``names`` of the folder's weight file that exist there (e.g. an MLM head)."""
    st = os.path.join(path, "model.safetensors")
    out = {}
    if os.path.isfile(st):
        from safetensors import safe_open

        with safe_open(st, framework="pt") as f:
            have = set(f.keys())
            out = {n: f.get_tensor(n) for n in names if n in have}
    elif os.path.isfile(os.path.join(path, "pytorch_model.bin")):
        sd = torch.load(os.path.join(path, "pytorch_model.bin"), map_location="cpu", weights_only=True)
        out = {n: sd[n] for n in names if n in sd}
    return out


def native_bf16(device) -> bool:
    """Whether ``device`` computes bfloat16 natively (CUDA with bf16; a CPU with AVX512-BF16 or AMX)."""
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def _check_layers(layers: nn.ModuleList, model_type: str) -> None:
    need = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
            "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm")
    have = {n for n, _ in layers[0].named_modules()}
    missing = [n for n in need if n not in have]
    if missing:
        raise ValueError(f"backbone model_type {model_type!r} is not a BERT/RoBERTa-type encoder (its layers lack {missing})")


class MLMHead(nn.Module):
    """``LN(act(W h)) @ word_embeddings^T + b`` (BERT/RoBERTa's head, decoder tied to the word embeddings)."""

    def __init__(self, hidden: int, vocab: int, act: str, eps: float):
        super().__init__()
        from transformers.activations import ACT2FN

        self.transform = nn.Linear(hidden, hidden)
        self.act = ACT2FN[act]
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab))
        nn.init.normal_(self.transform.weight, std=0.02)
        nn.init.zeros_(self.transform.bias)

    def forward(self, h, word_embeddings):
        return F.linear(self.norm(self.act(self.transform(h))), word_embeddings, self.bias)


def catalogue_key(sentences: Sentences) -> int:
    """A fingerprint of the item catalogue as the model reads it (every item's token ids)."""
    crc = zlib.crc32(sentences.lengths.numpy().tobytes())
    crc = zlib.crc32(sentences.ids.numpy().tobytes(), crc)
    return int(zlib.crc32(sentences.types.numpy().tobytes(), crc))
