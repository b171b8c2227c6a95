"""The recommender API: :func:`load` a checkpoint, :class:`Recommender` (see :mod:`recbole_mm.recommend`)."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from recbole_mm.data.catalogue import (Catalogue, CatalogueDataset, NotInCatalogue, checkpoint_catalogue,
                                       feature_files)
from recbole_mm.model.abstract import catalogue_buffers
from recbole_mm.recommend.errors import CatalogueError, EmptyHistoryError, RecommendError, UnknownItemError, UnknownItemWarning
from recbole_mm.recommend.scoring import scorer_for

DEFAULT_BATCH = 256
DEFAULT_CHUNK = 100_000


@dataclass
class Recommendation:
    """Top-k of one history: raw item ids, best first, with the model's scores."""

    items: list[str]
    scores: list[float]
    unknown: list[str] = field(default_factory=list)  # history ids skipped as not in the catalogue

    def to_dict(self) -> dict:
        return {"items": self.items, "scores": self.scores, "unknown": self.unknown}


# -- config -----------------------------------------------------------------------------------
class CheckpointConfig:
    """The checkpoint's config (plain data) with RecBole ``Config``'s lookup semantics
    (``config[key]`` is ``None`` for a missing key), enums and the device restored."""

    def __init__(self, plain: Mapping, device: torch.device):
        from recbole.utils import EvaluatorType, InputType, ModelType

        d = dict(plain)
        for key, enum in (("MODEL_TYPE", ModelType), ("MODEL_INPUT_TYPE", InputType), ("eval_type", EvaluatorType)):
            if isinstance(d.get(key), str) and d[key] in enum.__members__:
                d[key] = enum[d[key]]
        d["device"] = device
        d["use_gpu"] = device.type == "cuda"
        self.final_config_dict = d

    def __getitem__(self, key):
        return self.final_config_dict.get(key)

    def __setitem__(self, key, value):
        self.final_config_dict[key] = value

    def __contains__(self, key):
        return key in self.final_config_dict

    def copy(self) -> "CheckpointConfig":
        out = CheckpointConfig.__new__(CheckpointConfig)
        out.final_config_dict = dict(self.final_config_dict)
        return out



# -- loading ----------------------------------------------------------------------------------
def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecommendError(f"device {device} requested but CUDA is not available")
    return device



def load(
    checkpoint: str,
    data_path: str | None = None,
    device=None,
    catalogue: str | None = None,
    plm_suffix: str | None = None,
    img_suffix: str | None = None,
) -> "Recommender":
    """Rebuild the model of ``checkpoint`` for recommending.

    Args:
        checkpoint: a ``.pth`` written by ``finetune`` / ``pretrain`` (best or resume file).
        data_path: folder holding the checkpoint's dataset folder(s) (default: the config's
            ``data_root``, as given at training time, relative to the current directory).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``... (default: CUDA when available).
        catalogue: score this dataset folder's items instead (inductive models only; the
            same as ``load(checkpoint).with_catalogue(catalogue)`` without reading the
            training catalogue).
        plm_suffix, img_suffix: feature files of ``catalogue`` when they differ from the
            checkpoint's (same feature sizes required).
    """
    from recbole_mm.trainer.checkpoint import load_checkpoint
    from recbole_mm.utils import get_model

    ckpt = load_checkpoint(str(checkpoint), map_location="cpu")
    model_class = get_model(ckpt["model"])
    config = CheckpointConfig(ckpt["config"], _device(device))
    if data_path is not None:
        config["data_root"] = str(data_path)
        config["data_path"] = os.path.join(str(data_path), config["dataset"])
    state = ckpt["state_dict"]
    info = {
        "checkpoint": str(checkpoint),
        "epoch": ckpt.get("epoch"),
        "metrics": ckpt.get("metrics"),
        "item_tokens": len(ckpt["item_tokens"]) if ckpt.get("item_tokens") is not None else None,
    }
    if catalogue is not None:
        _check_swappable(model_class, config)
        overrides = {"plm_suffix": plm_suffix, "img_suffix": img_suffix}
        suffixes, sizes = feature_files(config, overrides)
        cat = Catalogue.from_folder(catalogue, suffixes, sizes)
        return Recommender._build(model_class, config, state, cat, info, own=False)
    cat = checkpoint_catalogue(config, ckpt)
    return Recommender._build(model_class, config, state, cat, info, own=True)


def _check_swappable(model_class, config) -> None:
    """Refuse a catalogue swap early for models that cannot be inductive."""
    from recbole_mm.model.abstract import MMSequentialRecommender

    name = model_class.__name__
    if not issubclass(model_class, MMSequentialRecommender):
        raise CatalogueError(
            f"{name} is an ID-based model: its item embedding covers only the items it was trained on, "
            f"so it cannot score another catalogue; use an inductive (feature-based) checkpoint, e.g. "
            f"UniSRec or MISSRec trained with --mode inductive or pre-trained"
        )
    if config["train_stage"] == "transductive_ft":
        raise CatalogueError(
            f"{name} with train_stage transductive_ft has an item ID embedding that covers only the "
            f"items it was trained on, so it cannot score another catalogue; use a checkpoint trained "
            f"with --mode inductive (or a pre-training checkpoint)"
        )


# -- the recommender --------------------------------------------------------------------------
class Recommender:
    """A model rebuilt from a checkpoint, in eval mode, with its catalogue (see the module doc)."""

    def __init__(self, model, config, catalogue: Catalogue, state_dict: dict, info: dict, inductive: bool):
        self.model = model
        self.inductive = inductive  # no item ID parameters: with_catalogue() works
        self.config = config
        self.catalogue = catalogue
        self.info = info
        self._state = state_dict  # CPU tensors, to rebuild on another catalogue
        self.device = config["device"]

    # construction
    @classmethod
    def _build(cls, model_class, config, state_dict, catalogue: Catalogue, info: dict, own: bool):
        config = config.copy()
        mismatch = getattr(catalogue, "size_mismatch", None)
        dataset = CatalogueDataset(config, catalogue)
        try:
            model = model_class(config, dataset)
        except NotInCatalogue as e:
            raise RecommendError(
                f"{model_class.__name__} reads {e} when it is built: it needs the training dataset "
                f"(user IDs or item side features), not only item features, so it cannot recommend "
                f"for raw histories"
            ) from None
        inductive = _is_inductive(model)
        if not own and not inductive:
            raise CatalogueError(
                f"{model_class.__name__} has item ID parameters ({_id_parameters(model)}) that cover only "
                f"the items it was trained on, so it cannot score another catalogue"
            )
        if own and mismatch is not None and not inductive:
            raise CatalogueError(
                f"{catalogue.source}: {mismatch[1]} items, but the checkpoint was trained on {mismatch[0]}: "
                f"the data changed since training and {model_class.__name__}'s item ID embedding no longer "
                f"matches it"
            )
        if own and mismatch is not None:
            warnings.warn(
                f"{catalogue.source}: {mismatch[1]} items, the checkpoint was trained on {mismatch[0]}: "
                f"scoring the folder's items from their features", stacklevel=3,
            )
        if own and mismatch is None:
            model.load_state_dict(state_dict)
        else:  # another catalogue: every weight, but not the catalogue-sized recomputed buffers
            recomputed = catalogue_buffers(model_class)
            keep = {k: v for k, v in state_dict.items() if k.split(".")[-1] not in recomputed}
            missing, unexpected = model.load_state_dict(keep, strict=False)
            missing = [k for k in missing if k.split(".")[-1] not in recomputed]
            if missing or unexpected:
                raise CatalogueError(
                    f"{model_class.__name__}: checkpoint weights do not fit the model built on {catalogue.source} "
                    f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
                )
        catalogue.drop_features()  # the model holds its own copy (non-persistent buffers)
        model = model.to(config["device"]).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return cls(model, config, catalogue, state_dict, dict(info, catalogue=catalogue.source), inductive)

    def __repr__(self):
        return (
            f"Recommender({type(self.model).__name__}, train_stage={self.config['train_stage']}, "
            f"{len(self.catalogue)} items from {self.catalogue.source}, device={self.device})"
        )

    @property
    def item_ids(self) -> list[str]:
        """Raw ids of the catalogue, in internal-id order (``item_embeddings()`` rows)."""
        return self.catalogue.raw_ids

    def with_catalogue(self, dataset_dir: str, plm_suffix: str | None = None, img_suffix: str | None = None) -> "Recommender":
        """The same weights scoring the items of ``dataset_dir`` (its ``<name>.item2index`` and
        feature files): zero-shot on a new domain, or new items once their features exist.

        Only inductive models (no item ID parameters) can; histories are then in the new
        catalogue's raw ids.  ``plm_suffix`` / ``img_suffix``: the folder's feature files when
        they are not named as in the checkpoint's config (sizes must match).  The original
        recommender is left as it is."""
        if not self.inductive:
            _check_swappable(type(self.model), self.config)
            raise CatalogueError(
                f"{type(self.model).__name__} has item ID parameters ({_id_parameters(self.model)}): "
                f"it cannot score another catalogue"
            )
        suffixes, sizes = feature_files(self.config, {"plm_suffix": plm_suffix, "img_suffix": img_suffix})
        cat = Catalogue.from_folder(dataset_dir, suffixes, sizes)
        return Recommender._build(type(self.model), self.config, self._state, cat, self.info, own=False)

    # ids
    def _map(self, histories, strict: bool, on_empty: str):
        if isinstance(histories, (str, bytes)):
            histories = [histories]
        histories = list(histories)
        if any(isinstance(h, (str, bytes)) for h in histories):
            raise TypeError("histories must be a list of item-id lists, e.g. [['B0001', 'B0002']] for one history")
        lookup = self.catalogue.lookup
        ids, unknown = [], []
        for h in histories:
            known, bad = [], []
            for raw in h:
                i = lookup.get(str(raw))
                (known if i is not None else bad).append(i if i is not None else str(raw))
            ids.append(known)
            unknown.append(bad)
        bad_rows = [n for n, u in enumerate(unknown) if u]
        if bad_rows:
            every = sorted({r for n in bad_rows for r in unknown[n]})
            shown = ", ".join(every[:20]) + (f" and {len(every) - 20} more" if len(every) > 20 else "")
            where = ", ".join(str(n) for n in bad_rows[:10]) + (" ..." if len(bad_rows) > 10 else "")
            msg = f"{len(every)} item id(s) not in the catalogue ({self.catalogue.source}): {shown} (history index {where})"
            if strict:
                raise UnknownItemError(msg)
            warnings.warn(msg + "; skipped", UnknownItemWarning, stacklevel=4)
        empty = [n for n, h in enumerate(ids) if not h]
        if empty and on_empty != "skip":
            where = ", ".join(str(n) for n in empty[:10]) + (" ..." if len(empty) > 10 else "")
            raise EmptyHistoryError(
                f"{len(empty)} history(ies) with no item of the catalogue (index {where}): nothing to "
                f"recommend from (no popularity fallback: a checkpoint holds no interaction counts)"
            )
        return ids, unknown, empty

    def _batch(self, id_lists):
        """RecBole's layout: left-aligned, right-padded, last ``MAX_ITEM_LIST_LENGTH`` items."""
        from recbole.data.interaction import Interaction

        max_len = int(self.config["MAX_ITEM_LIST_LENGTH"])
        cut = [h[-max_len:] for h in id_lists]
        lens = torch.tensor([len(h) for h in cut], dtype=torch.long)
        pad = self.config["pad_batch_seq_to_max"]
        if pad is None:  # checkpoints older than the key: trim_batch_seq False meant that
            pad = self.config["trim_batch_seq"] is False
        width = max_len if pad else int(lens.max())  # masked models: any width gives the same scores
        seq = torch.zeros(len(cut), max(width, 1), dtype=torch.long)
        for r, h in enumerate(cut):
            seq[r, : len(h)] = torch.tensor(h, dtype=torch.long)
        m = self.model
        return Interaction({m.ITEM_SEQ: seq, m.ITEM_SEQ_LEN: lens}).to(self.device)

    def _scorer(self):
        return scorer_for(self.model)

    # public API
    @torch.no_grad()
    def recommend(
        self,
        histories,
        k: int = 10,
        exclude_seen: bool = True,
        strict: bool = False,
        on_empty: str = "error",
        batch_size: int = DEFAULT_BATCH,
        chunk_size: int = DEFAULT_CHUNK,
    ) -> list[Recommendation]:
        """Top-``k`` items for each history (a list of raw item-id lists, oldest first).

        ``exclude_seen``: drop the history's own items (``False`` ranks as the evaluator does);
        ``strict``: unknown ids are an error instead of a warning; ``on_empty``: ``"error"``
        or ``"skip"`` (an empty recommendation) for a history with no known item;
        ``batch_size`` histories x ``chunk_size`` items bound a score block."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if on_empty not in ("error", "skip"):
            raise ValueError(f"on_empty must be 'error' or 'skip', got {on_empty!r}")
        batch_size, chunk_size = max(1, int(batch_size)), max(1, int(chunk_size))
        ids, unknown, empty = self._map(histories, strict, on_empty)
        rows = [n for n, h in enumerate(ids) if h]
        out = [Recommendation([], [], unknown[n]) for n in range(len(ids))]
        if not rows:
            return out
        vals, idx = self._topk([ids[n] for n in rows], k, exclude_seen, batch_size, chunk_size)
        raw = self.catalogue.raw_ids
        for r, n in enumerate(rows):
            v, i = vals[r], idx[r]
            ok = torch.isfinite(v)
            out[n] = Recommendation([raw[j - 1] for j in i[ok].tolist()], v[ok].tolist(), unknown[n])
        return out

    def _topk(self, ids, k, exclude_seen, batch_size, chunk_size):
        scorer = self._scorer()
        n_total = len(self.catalogue) + 1  # internal ids 0 (padding) .. n
        k = min(k, n_total)
        if scorer.chunked and n_total > chunk_size:
            chunks = [(s, min(s + chunk_size, n_total)) for s in range(0, n_total, chunk_size)]
            hb = batch_size
        else:
            chunks = [(0, n_total)]
            hb = max(1, min(len(ids), batch_size * chunk_size // n_total)) if not scorer.chunked else batch_size
        batches = [ids[s : s + hb] for s in range(0, len(ids), hb)]
        with scorer.session(one_chunk=len(chunks) == 1):
            states = [scorer.prepare(self._batch(b)) for b in batches]
            seen = [_seen_pairs(b, self.device) for b in batches] if exclude_seen else None
            best_v = [torch.full((len(b), k), -math.inf, device=self.device) for b in batches]
            best_i = [torch.zeros((len(b), k), dtype=torch.long, device=self.device) for b in batches]
            for s, e in chunks:
                chunk = scorer.item_chunk(s, e)
                for bi, state in enumerate(states):
                    sc = scorer.scores(state, chunk, s, e)
                    if s == 0:
                        sc[:, 0] = -math.inf  # padding, as the evaluator
                    if seen is not None:
                        r, c = seen[bi]
                        sel = (c >= s) & (c < e)
                        sc[r[sel], c[sel] - s] = -math.inf
                    v, i = sc.topk(min(k, e - s), dim=1)
                    v = torch.cat([best_v[bi], v], dim=1)
                    i = torch.cat([best_i[bi], i + s], dim=1)
                    top = v.topk(k, dim=1)
                    best_v[bi], best_i[bi] = top.values, i.gather(1, top.indices)
                del chunk
        return torch.cat(best_v).cpu(), torch.cat(best_i).cpu()

    @torch.no_grad()
    def sequence_embeddings(self, histories, strict: bool = False, batch_size: int = DEFAULT_BATCH) -> torch.Tensor:
        """``[len(histories), H]`` (CPU) sequence vectors the model scores with (UniSRec, MISSRec:
        L2-normalised; RecBole models: ``forward``'s output).  Unknown ids as in :meth:`recommend`;
        an empty history is an error."""
        ids, _, _ = self._map(histories, strict, "error")
        scorer = self._scorer()
        outs = []
        with scorer.session(one_chunk=len(self.catalogue) + 1 <= DEFAULT_CHUNK):
            for s in range(0, len(ids), max(1, batch_size)):
                outs.append(scorer.sequence_embeddings(self._batch(ids[s : s + batch_size])).cpu())
        return torch.cat(outs) if outs else torch.zeros(0, 0)

    @torch.no_grad()
    def item_embeddings(self, chunk_size: int = DEFAULT_CHUNK):
        """Item vectors aligned with :attr:`item_ids` (no padding row), on CPU.

        UniSRec: ``[n, H]``, L2-normalised, so ``sequence_embeddings(h) @ item_embeddings().T``
        are its scores.  MISSRec: ``{modality: [n, H]}``, its adapted per-modality vectors
        (plus ``"id"`` when transductive); its score is a fused cosine of these.  RecBole ID
        models: the rows of their ``item_embedding``."""
        return self._scorer().item_embeddings(len(self.catalogue), max(1, int(chunk_size)))


def _seen_pairs(id_lists, device):
    rows = torch.tensor([r for r, h in enumerate(id_lists) for _ in h], dtype=torch.long)
    cols = torch.tensor([i for h in id_lists for i in h], dtype=torch.long)
    return rows.to(device), cols.to(device)


def _id_parameters(model) -> str:
    names = [n for n, _ in model.named_parameters() if n.startswith("item_embedding.")]
    return ", ".join(names) or "an item ID embedding"


def _is_inductive(model) -> bool:
    """A recbole_mm model without an item ID embedding scores items from their features only."""
    from recbole_mm.model.abstract import MMSequentialRecommender

    return isinstance(model, MMSequentialRecommender) and getattr(model, "item_embedding", None) is None
