"""Multi-modal sequential datasets on top of RecBole's ``SequentialDataset``.

Vocabulary: tokens are checked against ``<d>.item2index`` (item token ``"i"`` is line ``i``
of the index, whose raw id and feature row ``i`` belong to it), and every item of the index
gets an internal id, including items that never occur in the interactions (they can still be
recommended from their features).  Internal ids follow RecBole's own numbering: items in
order of first appearance in the ``item_id`` column of train, valid, test (concatenated), then
in the item lists, then the items that never occur (index order); id 0 is ``[PAD]``.  An ID
model (SASRec & co.) therefore initialises and trains exactly as in plain RecBole on the same
files (``benchmarks/plain_recbole.py``), and every item-aligned table below (features, texts,
raw ids, domains) is permuted to match.  ``field2id_token[item_id]`` maps an internal id back
to its index token.  Users are mapped the same way through ``.user2index`` when it exists.

Pre-training (``pretrain_domains: [A, B, ...]``) concatenates the domains: tokens are
prefixed ``"<domain>:"``, the item vocabulary is domain A's items, then B's, ..., and the
feature tables are stacked in the same order.  Shuffled batches therefore mix domains.

What models get (shared by every model, frozen):

* ``dataset.features[name]``: ``FloatTensor [item_num, dim]``, row 0 zeros (``name`` is
  ``"text"`` for ``plm_suffix`` and ``"image"`` for ``img_suffix``);
* ``dataset.feature_presence[name]``: ``BoolTensor [item_num]``, False for an all-zero row
  (missing modality) and for padding; a domain without the ``img_suffix`` file has all-zero
  image rows (every image missing; one warning), so image models run on text-only data;
* ``dataset.item_text``: list of ``item_num`` strings (``""`` for padding), when ``.text`` exists;
* ``dataset.item_attributes``: list of ``item_num`` ``{key: value}`` dicts (``None`` for padding
  and for items the file does not list), when ``<d>.attr`` exists in some domain
  (``readers.read_attributes``; Recformer / Reo-LM item sentences);
* ``dataset.item_image_files``: list of ``item_num`` image paths (``None`` for padding and for
  items without an image), when ``image_path`` names a folder of raw images (models that
  encode images end to end, e.g. PMMRec's ``end_to_end`` mode); files are named
  ``<raw item id><ext>`` or, for a single domain, ``<item index><ext>``, as for
  ``recbole-mm extract-image``;
* ``dataset.item_domain``: ``LongTensor [item_num]``, the domain index of every item;
* ``dataset.item_raw_ids``: raw item ids (ASINs) aligned with internal ids.
"""

from __future__ import annotations

import os
import re
from logging import getLogger

import numpy as np
import pandas as pd
import torch
from recbole.data.dataset import SequentialDataset
from recbole.utils import FeatureSource, FeatureType

from recbole_mm.categories import prepare_hint
from recbole_mm.data.readers import (
    DataValidationError,
    check_utf8,
    open_text,
    read_attributes,
    read_features,
    read_index_file,
    read_presplit_inter,
    read_text,
    require_file,
)
from recbole_mm.encoders import IMAGE_EXTS, index_image_folder

# config key -> (features name, size key).  ``plm_suffix_aug``: optional text features of
# word-dropped texts (UniSRec's ``feat2CLS``), checked against ``plm_size``.
MODALITY_KEYS = {
    "plm_suffix": ("text", "plm_size"),
    "plm_suffix_aug": ("text_aug", "plm_size"),
    "img_suffix": ("image", "img_size"),
}
PAD = "[PAD]"
# image feature size of a dataset without an image feature file (CLIP ViT-B/32, as Scientific_mm)
DEFAULT_IMG_SIZE = 512


class Domain:
    """One domain folder: ``<path>/<name>.*``."""

    def __init__(self, name: str, path: str, prefix: str = ""):
        self.name, self.path, self.prefix = name, path, prefix

    def file(self, suffix: str) -> str:
        return os.path.join(self.path, f"{self.name}.{suffix}")


class MMSequentialDataset(SequentialDataset):
    """Pre-split (``.train/.valid/.test.inter``) or plain (``.inter``) sequential data with
    optional text/image feature tables.  See the module docstring for the attributes."""

    def __init__(self, config):
        self.features: dict[str, torch.Tensor] = {}
        self.feature_presence: dict[str, torch.Tensor] = {}
        self.item_text: list[str] | None = None
        self.item_attributes: list[dict[str, str] | None] | None = None
        self.item_image_files: list[str | None] | None = None
        self.item_raw_ids: list[str] | None = None
        self.item_domain: torch.Tensor | None = None
        self._premapped: set[str] = set()
        super().__init__(config)
        self._build_item_tables()

    # -- domains ------------------------------------------------------------------
    def domains(self) -> list[Domain]:
        return [Domain(self.dataset_name, self.dataset_path)]

    # -- loading --------------------------------------------------------------------
    def _load_data(self, token, dataset_path):
        domains = self.domains()
        for d in domains:
            if not os.path.isdir(d.path):
                raise DataValidationError(f"{d.path}: dataset folder not found (data_path/{d.name}); make it with: "
                                          f"{prepare_hint(d.name, self.config['data_root'])}")
        self._load_vocabularies(domains)
        if self.benchmark_filename_list is not None:
            self._load_presplit(domains)
            self.user_feat = None
            self.item_feat = None
        else:
            if len(domains) != 1:
                raise DataValidationError("pre-training needs pre-split <d>.train.inter files in every domain")
            super()._load_data(token, dataset_path)
            self._premap_plain_inter(domains[0])
        self._load_side_tables(domains)
        self._adopt_recbole_order()
        if self.config["text_as_item_feature"]:
            self._text_item_feat()

    def _load_feat(self, filepath, source):
        """RecBole's reader of a plain atomic file (``encoding: utf-8-sig`` strips a byte-order
        mark), after the same UTF-8 check as every other input file."""
        if os.path.isfile(filepath):
            check_utf8(filepath)
        return super()._load_feat(filepath, source)

    def _load_vocabularies(self, domains):
        item_tokens, item_raw, item_domain, user_tokens = [], [], [], []
        have_items = [os.path.isfile(d.file("item2index")) for d in domains]
        have_users = [os.path.isfile(d.file("user2index")) for d in domains]
        if any(have_items) and not all(have_items):
            missing = domains[have_items.index(False)]
            raise DataValidationError(f"{missing.file('item2index')}: missing (other domains have one)")
        self._item_vocab = self._user_vocab = None
        self._domain_raw: list[list[str]] = []
        if all(have_items):
            for di, d in enumerate(domains):
                raws = read_index_file(d.file("item2index"))
                self._domain_raw.append(raws)
                item_tokens += [f"{d.prefix}{i}" for i in range(len(raws))]
                item_raw += [f"{d.prefix}{r}" for r in raws]
                item_domain += [di] * len(raws)
            self._item_vocab = {t: i + 1 for i, t in enumerate(item_tokens)}
            self.item_raw_ids = [PAD] + item_raw
            if len(domains) == 1 and os.path.isfile(domains[0].file("pt_datasets")):
                item_domain = _merged_item_domains(domains[0].file("pt_datasets"), item_raw)
            self.item_domain = torch.tensor([0] + item_domain, dtype=torch.long)
            self._item_tokens = np.array([PAD] + item_tokens)
        if all(have_users):
            for d in domains:
                user_tokens += [f"{d.prefix}{i}" for i in range(len(read_index_file(d.file("user2index"))))]
            self._user_vocab = {t: i + 1 for i, t in enumerate(user_tokens)}
            self._user_tokens = np.array([PAD] + user_tokens)
        for needed in ("plm_suffix", "img_suffix"):
            if self.config[needed] and self._item_vocab is None:
                raise DataValidationError(
                    f"{domains[0].file('item2index')}: missing; needed to align {needed} features with items"
                )

    def _load_presplit(self, domains):
        max_len = int(self.config["MAX_ITEM_LIST_LENGTH"])
        uid, iid = self.uid_field, self.iid_field
        list_field = iid + self.config["LIST_SUFFIX"]
        if (uid, list_field, iid) != ("user_id", "item_id_list", "item_id"):
            raise ValueError("pre-split atomic files use the fields user_id, item_id_list, item_id")
        item_vocab = self._prefixed_vocab(self._item_vocab)
        user_vocab = self._prefixed_vocab(self._user_vocab)
        parts, sizes = [], []
        for split in self.benchmark_filename_list:
            frames = []
            for d in domains:
                path = require_file(d.file(f"{split}.inter"), f"{split} split")
                evaluation = split != self.benchmark_filename_list[0]  # valid / test: one row per user
                frames.append(read_presplit_inter(path, item_vocab(d), user_vocab(d), max_len, evaluation))
            df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
            if split == self.benchmark_filename_list[0]:
                df = self._train_users_subset(df, uid, path)
            parts.append(df)
            sizes.append(len(df))
        self.inter_feat = pd.concat(parts, ignore_index=True)
        self.file_size_list = sizes
        seqlen = int(self.inter_feat[list_field].map(len).max())
        for field, ftype, slen in ((uid, FeatureType.TOKEN, 1), (list_field, FeatureType.TOKEN_SEQ, seqlen), (iid, FeatureType.TOKEN, 1)):
            self.field2type[field] = ftype
            self.field2source[field] = FeatureSource.INTERACTION
            self.field2seqlen[field] = slen
        if self._item_vocab is not None:
            self._set_premapped([iid, list_field], self._item_tokens)
        if self._user_vocab is not None:
            self._set_premapped([uid], self._user_tokens)

    def _train_users_subset(self, df: pd.DataFrame, uid: str, path: str) -> pd.DataFrame:
        """``train_fraction`` < 1: every training row of a seeded subset of the training users
        (``round(fraction x users)``, at least 1), the others' training rows dropped; valid and
        test untouched (the low-resource protocol of Recformer).  The subset is drawn with
        ``train_fraction_seed`` (default: ``seed``) from the users in sorted order, so it does
        not depend on the file's row order, and a scratch and a pre-trained run with the same
        seed see the same users."""
        fraction = self.config["train_fraction"]
        if fraction is None:
            return df
        try:
            fraction = float(fraction)
        except (TypeError, ValueError):
            fraction = float("nan")
        if not 0.0 < fraction <= 1.0:
            raise DataValidationError(f"train_fraction must be in (0, 1], got {self.config['train_fraction']!r}")
        if fraction == 1.0:
            return df
        seed = self.config["train_fraction_seed"]
        seed = int(self.config["seed"] if seed is None else seed)
        users = np.sort(pd.unique(df[uid].to_numpy()))
        n_keep = max(1, int(round(fraction * len(users))))
        keep = np.random.default_rng(seed).permutation(len(users))[:n_keep]
        kept = df[df[uid].isin(users[keep])].reset_index(drop=True)
        self.train_fraction_info = {"fraction": fraction, "seed": seed, "users": int(n_keep),
                                    "of_users": int(len(users)), "rows": int(len(kept)), "of_rows": int(len(df))}
        self.logger.info(f"{path}: train_fraction {fraction:g} (seed {seed}): {n_keep:,} of {len(users):,} "
                         f"training users, {len(kept):,} of {len(df):,} rows")
        return kept

    @staticmethod
    def _prefixed_vocab(vocab):
        """Per-domain view: the domain's own token -> global internal id."""
        if vocab is None:
            return lambda d: None

        def view(d):
            if not d.prefix:
                return vocab
            n = len(d.prefix)
            return {t[n:]: i for t, i in vocab.items() if t.startswith(d.prefix)}

        return view

    def _premap_plain_inter(self, domain):
        """A plain ``<d>.inter`` read by RecBole: map its tokens through ``.item2index``."""
        df = self.inter_feat
        lines = np.arange(len(df)) + 2
        path = domain.file("inter")
        from recbole_mm.data.readers import _map_tokens

        if self._item_vocab is not None:
            df[self.iid_field] = _map_tokens(path, df[self.iid_field].astype(str), self._item_vocab, lines, self.iid_field, ".item2index")
            self._set_premapped([self.iid_field], self._item_tokens)
        if self._user_vocab is not None:
            df[self.uid_field] = _map_tokens(path, df[self.uid_field].astype(str), self._user_vocab, lines, self.uid_field, ".user2index")
            self._set_premapped([self.uid_field], self._user_tokens)

    def _adopt_recbole_order(self):
        """Renumber items and users as RecBole's ``pd.factorize`` remapping would (module doc).

        Everything is read in index order first; this permutes the ids of the interactions and
        every item-aligned table in one place."""
        df = self.inter_feat
        uid, iid = self.uid_field, self.iid_field
        list_field = iid + self.config["LIST_SUFFIX"]
        if self._item_vocab is not None:
            cols = [df[iid].to_numpy(dtype=np.int64)]
            if list_field in df:
                cols += [np.asarray(a, dtype=np.int64) for a in df[list_field].to_numpy()]
            perm, old_to_new = _first_appearance(np.concatenate(cols), len(self._item_tokens))
            df[iid] = old_to_new[df[iid].to_numpy(dtype=np.int64)]
            if list_field in df:
                lists = df[list_field].to_numpy()
                lengths = np.fromiter((len(a) for a in lists), dtype=np.int64, count=len(lists))
                flat = old_to_new[np.concatenate([np.asarray(a, dtype=np.int64) for a in lists])]
                df[list_field] = pd.Series(np.split(flat, np.cumsum(lengths)[:-1]), index=df.index)
            self._item_tokens = self._item_tokens[perm]
            self._item_vocab = {t: i for i, t in enumerate(self._item_tokens) if i}
            self._set_premapped(sorted(f for f in self._premapped if f in (iid, list_field)), self._item_tokens)
            self.item_raw_ids = [self.item_raw_ids[p] for p in perm]
            self.item_domain = self.item_domain[torch.from_numpy(perm)]
            for name in ("item_text", "item_attributes", "item_image_files"):
                table = getattr(self, name)
                if table is not None:
                    setattr(self, name, [table[p] for p in perm])
            for name, rows in self._feature_rows.items():
                self._feature_rows[name] = rows[perm[1:] - 1]
        if self._user_vocab is not None:
            perm, old_to_new = _first_appearance(df[uid].to_numpy(dtype=np.int64), len(self._user_tokens))
            df[uid] = old_to_new[df[uid].to_numpy(dtype=np.int64)]
            self._user_tokens = self._user_tokens[perm]
            self._user_vocab = {t: i for i, t in enumerate(self._user_tokens) if i}
            self._set_premapped([uid], self._user_tokens)

    def _set_premapped(self, fields, tokens):
        token_id = {t: i for i, t in enumerate(tokens)}
        for f in fields:
            self.field2id_token[f] = tokens
            self.field2token_id[f] = token_id
            self._premapped.add(f)

    def _remap(self, remap_list):
        """RecBole's remapping, skipping the fields we already mapped through the index files."""
        rest = [(feat, field, ftype) for feat, field, ftype in remap_list if field not in self._premapped]
        if len(rest) != len(remap_list) and rest:
            # a field sharing a premapped vocabulary (an alias) must use that vocabulary
            vocab = self.field2token_id[next(f for _, f, _ in remap_list if f in self._premapped)]
            tokens = self.field2id_token[next(f for _, f, _ in remap_list if f in self._premapped)]
            for feat, field, ftype in rest:
                feat[field] = _map_any(feat[field], vocab, field)
                self.field2id_token[field] = tokens
                self.field2token_id[field] = vocab
            return
        super()._remap(rest)

    def _load_side_tables(self, domains):
        """Text and feature files named by the config, aligned with the item vocabulary."""
        if self._item_vocab is None:
            return
        if all(os.path.isfile(d.file("text")) for d in domains):
            texts = []
            for d, raws in zip(domains, self._domain_raw):
                texts += read_text(d.file("text"), raws)
            self.item_text = [""] + texts
        if any(os.path.isfile(d.file("attr")) for d in domains):
            attrs: list[dict[str, str] | None] = [None]
            for d, raws in zip(domains, self._domain_raw):
                attrs += read_attributes(d.file("attr"), raws)[1] if os.path.isfile(d.file("attr")) else [None] * len(raws)
            self.item_attributes = attrs
        if self.config["image_path"]:
            self.item_image_files = [None] + _image_files(self.config["image_path"], domains, self._domain_raw)
        self._feature_rows: dict[str, np.ndarray] = {}
        for key, (name, size_key) in MODALITY_KEYS.items():
            suffix = self.config[key]
            if not suffix:
                continue
            dim = self.config[size_key]
            blocks = {}
            absent = [d for d in domains if name == "image" and not os.path.isfile(d.file(suffix))]
            for d, raws in zip(domains, self._domain_raw):
                if d in absent:
                    continue
                path = require_file(d.file(suffix), f"{name} feature file ({key}: {suffix})")
                blocks[d.name] = read_features(path, raws, dim)
                dim = blocks[d.name].shape[1]
            if absent:
                dim = dim or DEFAULT_IMG_SIZE
                _warn_no_images(absent, suffix, dim)
            rows = [blocks.get(d.name, np.zeros((len(raws), dim), dtype=np.float32)) for d, raws in zip(domains, self._domain_raw)]
            self._feature_rows[name] = np.concatenate(rows) if len(rows) > 1 else rows[0]
            self.config[size_key] = dim  # inferred or checked

    def _text_item_feat(self):
        """``.text`` words as an item ``token_seq`` feature ``item_text`` (for FDSA / S3Rec)."""
        if self.item_text is None:
            raise DataValidationError(
                f"{self.domains()[0].file('text')}: missing; text_as_item_feature needs the item texts"
            )
        n_words = int(self.config["text_max_words"])
        words = [np.array(re.findall(r"[a-z0-9]+", t.lower())[:n_words] or ["[EMPTY]"]) for t in self.item_text[1:]]
        self.item_feat = pd.DataFrame({self.iid_field: np.arange(1, len(self.item_text), dtype=np.int64)})
        self.item_feat["item_text"] = words
        self.field2type["item_text"] = FeatureType.TOKEN_SEQ
        self.field2source["item_text"] = FeatureSource.ITEM
        self.field2seqlen["item_text"] = max(map(len, words))
        self.field2type.setdefault(self.iid_field, FeatureType.TOKEN)
        self.field2source.setdefault(self.iid_field, FeatureSource.INTERACTION)

    # -- tables for the models ---------------------------------------------------------
    def _build_item_tables(self):
        rows = getattr(self, "_feature_rows", {})
        for name, arr in rows.items():
            table = torch.zeros(self.item_num, arr.shape[1], dtype=torch.float32)
            table[1 : 1 + arr.shape[0]] = torch.from_numpy(arr)
            self.features[name] = table
            self.feature_presence[name] = table.abs().sum(dim=1) > 0
        self._feature_rows = {}

    def __str__(self):
        info = [super().__str__()]
        for name, t in self.features.items():
            miss = int((~self.feature_presence[name][1:]).sum())
            info.append(f"{name} features: {tuple(t.shape)} ({miss} items without this modality)")
        return "\n".join(info)


def _warn_no_images(absent: list[Domain], suffix: str, dim: int) -> None:
    """One warning for the domains without an image feature file: their items have no image
    (all-zero rows, as an item without an image in a ``.feat3CLS``), so the models run text-only."""
    names = ", ".join(d.file(suffix) for d in absent)
    getLogger("recbole_mm").warning(
        f"warning: no image features ({names} not found): every item of {len(absent)} domain(s) is treated as "
        f"having no image (text-only, image size {dim}). To add images: 'recbole-mm download-images' then "
        f"'recbole-mm extract-image --dataset <folder>/<name> --images <dir>' (writes <name>.{suffix})"
    )


def _image_files(folder: str, domains, domain_raw) -> list[str | None]:
    """Image file of every item (``None`` when absent), in vocabulary order."""
    if not os.path.isdir(folder):
        raise DataValidationError(f"{folder}: image folder not found (image_path)")
    files = index_image_folder(folder)
    single = len(domains) == 1
    out = [files.get(raw) or (files.get(str(i)) if single else None) for raws in domain_raw for i, raw in enumerate(raws)]
    if not any(out):
        example = domain_raw[0][0] if domain_raw and domain_raw[0] else "B00XYZ"
        raise DataValidationError(
            f"{folder}: no image for any of the {len(out):,} items (image_path: files must be named "
            f"<raw item id><ext> or <item index><ext>, e.g. {example}.jpg or 0.jpg; extensions {', '.join(IMAGE_EXTS)})"
        )
    return out


def _merged_item_domains(path: str, item_raw: list[str]) -> list[int]:
    """Domain index of each item of a merged folder (``recbole-mm merge``): raw ids are
    ``"<domain>:<raw>"`` and ``<name>.pt_datasets`` lists the domains in order."""
    with open_text(path) as f:
        names = [n.strip() for n in f.readline().split(",") if n.strip()]
    index = {n: k for k, n in enumerate(names)}
    out = []
    for r, raw in enumerate(item_raw):
        k = index.get(raw.split(":", 1)[0])
        if k is None:
            raise DataValidationError(
                f"{path}: item index {r} ({raw!r}) has no '<domain>:' prefix from the domains {names}"
            )
        out.append(k)
    return out


def _first_appearance(ids: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``perm`` (new id -> old id) numbering the ids ``1..n-1`` by first appearance in ``ids``
    (never-seen ids last, in order; 0 stays 0) and its inverse ``old_to_new``."""
    seen = pd.unique(ids[ids > 0])
    rest = np.setdiff1d(np.arange(1, n, dtype=np.int64), seen, assume_unique=False)
    perm = np.concatenate([[0], seen, rest]).astype(np.int64)
    old_to_new = np.empty(n, dtype=np.int64)
    old_to_new[perm] = np.arange(n, dtype=np.int64)
    return perm, old_to_new


def _map_any(series: pd.Series, vocab: dict, field: str):
    def one(tok):
        if tok not in vocab:
            raise DataValidationError(f"{field}: token {tok!r} is not in the item vocabulary")
        return vocab[tok]

    if len(series) and isinstance(series.iloc[0], np.ndarray):
        return [np.array([one(t) for t in seq], dtype=np.int64) for seq in series]
    return series.map(one)


class MMPretrainDataset(MMSequentialDataset):
    """Several domains (``pretrain_domains``) merged into one dataset, tokens prefixed
    ``"<domain>:"``, each domain's own features stacked in vocabulary order."""

    def domains(self) -> list[Domain]:
        root = self.config["data_root"]
        names = list(self.config["pretrain_domains"])
        if len(names) == 1:
            return [Domain(names[0], os.path.join(root, names[0]))]
        return [Domain(n, os.path.join(root, n), prefix=f"{n}:") for n in names]


TRAIN_ROWS = ("all", "longest")


def longest_row_per_user(dataset, config):
    """``train_rows: longest``: the training split cut to one row per user, the user's longest
    prefix (the whole training sequence with its last item as target), so that a loss at every
    position counts each (user, position) once per epoch.  Pre-split and augmented data hold
    every prefix of a user as a row; with ``all`` (RecBole's way) position ``j`` of an
    ``n``-item sequence is a position of ``n - j`` rows.

    A sequence cut at ``MAX_ITEM_LIST_LENGTH`` has several rows of that length (sliding
    windows): the latest window is kept, the row that no other row of the user continues
    (``seq[1:] + [target]`` is no other row's sequence); the earlier positions are then not
    trained, as in the released PMMRec code, which keeps each user's latest items only."""
    mode = config["train_rows"] or "all"
    if mode not in TRAIN_ROWS:
        raise ValueError(f"train_rows must be one of {TRAIN_ROWS}, got {mode!r}")
    if mode == "all":
        return dataset
    feat = dataset.inter_feat
    uid_field, len_field = config["USER_ID_FIELD"], config["ITEM_LIST_LENGTH_FIELD"]
    if uid_field not in feat.interaction:
        raise ValueError(f"train_rows: longest needs the {uid_field} column in the training data")
    users = feat[uid_field].cpu().numpy()
    lengths = feat[len_field].cpu().numpy()
    order = np.lexsort((-lengths, users))  # by user, longest first (stable: file order within ties)
    first = np.r_[True, users[order][1:] != users[order][:-1]]
    longest = np.maximum.reduceat(lengths[order], np.flatnonzero(first))
    best = lengths == longest[np.cumsum(first) - 1][np.argsort(order)]
    keep = _latest_windows(feat, config, users, best)
    return dataset.copy(feat[torch.as_tensor(keep)])


def _latest_windows(feat, config, users: np.ndarray, best: np.ndarray) -> np.ndarray:
    """Row indices: each user's one row among its ``best`` rows (see :func:`longest_row_per_user`)."""
    rows = np.flatnonzero(best)
    uniq, first, counts = np.unique(users[rows], return_index=True, return_counts=True)
    keep = [rows[first[counts == 1]]]
    tied = uniq[counts > 1]
    if tied.size:
        seq_field = config["ITEM_ID_FIELD"] + config["LIST_SUFFIX"]
        seqs, lens = feat[seq_field].cpu().numpy(), feat[config["ITEM_LIST_LENGTH_FIELD"]].cpu().numpy()
        targets = feat[config["ITEM_ID_FIELD"]].cpu().numpy()
        for user in tied:
            mine = rows[users[rows] == user]
            windows = {tuple(seqs[r, : lens[r]]) for r in mine}
            latest = [r for r in mine if tuple(seqs[r, 1 : lens[r]]) + (targets[r],) not in windows]
            keep.append(np.array(latest[:1] or mine[:1]))
    return np.sort(np.concatenate(keep))
