"""A catalogue of items without interactions: what serving (``recbole_mm.recommend``) scores.

Raw item ids from each dataset folder's ``<d>.item2index`` (several domains: prefixed
``"<domain>:"`` as in pre-training), their feature tables read on first use by the data
layer's feature reader (:func:`recbole_mm.data.readers.read_feature_table`), and
:class:`CatalogueDataset`, the stand-in of a dataset that a model's constructor reads when it
is rebuilt from a checkpoint (item count, features, item texts; nothing about users or
interactions).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from recbole_mm.data.dataset import PAD, Domain
from recbole_mm.data.readers import DataValidationError, read_feature_table, read_index_file, read_text, require_file

# feature name -> (config key of the file suffix, config key of the feature size), as the dataset
MODALITIES = {"text": ("plm_suffix", "plm_size"), "image": ("img_suffix", "img_size")}


class Catalogue:
    """The items a model scores: raw ids (internal id ``i + 1`` is ``raw_ids[i]``, 0 is padding)
    and, loaded on first use, their feature tables (``[n + 1, dim]``, row 0 zeros)."""

    def __init__(self, raw_ids: list[str], domains: list[Domain] | None, suffixes: dict, sizes: dict, source: str,
                 domain_sizes: list[int] | None = None):
        self.raw_ids = list(raw_ids)  # internal-id order
        self.index_raw_ids = self.raw_ids  # the files' order (domain by domain, index order)
        self.order: torch.Tensor | None = None  # internal id - 1 -> position in the files' order
        self.domains = domains or []
        self.domain_sizes = domain_sizes or ([len(self.raw_ids)] if len(self.domains) == 1 else [])
        self.suffixes = {k: v for k, v in suffixes.items() if v}  # feature name -> file suffix
        self.sizes = sizes  # feature name -> expected dim (None: inferred from the file)
        self.source = source
        self.size_mismatch: tuple[int, int] | None = None  # (trained on, found) for the own catalogue
        self._lookup: dict[str, int] | None = None
        self.features = _LazyFeatures(self)
        self.feature_presence = _LazyPresence(self)

    def __len__(self):
        return len(self.raw_ids)

    @classmethod
    def from_domains(cls, domains: list[Domain], suffixes: dict, sizes: dict) -> "Catalogue":
        raw, counts = [], []
        for d in domains:
            if not os.path.isdir(d.path):
                raise DataValidationError(f"{d.path}: dataset folder not found")
            ids = read_index_file(require_file(d.file("item2index"), "item index (.item2index)"))
            raw += [f"{d.prefix}{r}" for r in ids]
            counts.append(len(ids))
        return cls(raw, domains, suffixes, sizes, ", ".join(d.path for d in domains), counts)

    @classmethod
    def from_folder(cls, folder: str, suffixes: dict, sizes: dict) -> "Catalogue":
        folder = os.path.normpath(str(folder))
        return cls.from_domains([Domain(os.path.basename(folder), folder)], suffixes, sizes)

    def reorder(self, tokens: list[str]) -> None:
        """Put the items in the internal-id order of a trained dataset: ``tokens`` is its
        ``field2id_token`` (the checkpoint's ``item_tokens``: ``[PAD]`` then ``"<prefix><index>"``
        per internal id, see ``data/dataset.py``).  Raises ``ValueError`` when they are not a
        permutation of this catalogue's items."""
        pos, start = {}, 0
        for d, n in zip(self.domains, self.domain_sizes):
            pos.update({f"{d.prefix}{i}": start + i for i in range(n)})
            start += n
        order = [pos.get(str(t), -1) for t in tokens[1:]]
        if len(order) != len(self.index_raw_ids) or min(order, default=0) < 0 or len(set(order)) != len(order):
            raise ValueError("the item tokens are not a permutation of the catalogue's items")
        if order == list(range(len(order))):
            return
        self.order = torch.tensor(order, dtype=torch.long)
        self.raw_ids = [self.index_raw_ids[o] for o in order]
        self._lookup = None
        self.drop_features()

    def in_internal_order(self, rows):
        """``rows`` (``[n + 1, ...]`` tensor or list, row 0 padding) in the files' order ->
        internal-id order."""
        if self.order is None:
            return rows
        if isinstance(rows, torch.Tensor):
            return torch.cat([rows[:1], rows[1:][self.order]])
        return rows[:1] + [rows[1 + o] for o in self.order.tolist()]

    @property
    def lookup(self) -> dict[str, int]:
        """Raw id -> internal id."""
        if self._lookup is None:
            self._lookup = {r: i + 1 for i, r in enumerate(self.raw_ids)}
        return self._lookup

    def load_features(self, name: str) -> torch.Tensor:
        """``[n + 1, dim]`` table of modality ``name`` (each domain's file, stacked in order)."""
        suffix_key, size_key = MODALITIES[name]
        blocks, start = [], 0
        for d, n in zip(self.domains, self.domain_sizes):
            path = require_file(d.file(self.suffixes[name]), f"{name} feature file ({suffix_key}: {self.suffixes[name]})")
            dim = self.sizes.get(name)  # None: inferred from the file's size
            blocks.append(read_feature_table(path, self.index_raw_ids[start : start + n], dim, what=f"{size_key} of the model"))
            start += n
        if len(blocks) == 1:
            return self.in_internal_order(blocks[0])
        return self.in_internal_order(torch.cat([blocks[0]] + [b[1:] for b in blocks[1:]]))

    def drop_features(self) -> None:
        """Forget the loaded tables (the model holds its own copy)."""
        self.features = _LazyFeatures(self)
        self.feature_presence = _LazyPresence(self)



class _LazyFeatures(Mapping):
    """``dataset.features`` of a catalogue: a modality is read when a model asks for it."""

    def __init__(self, catalogue: Catalogue):
        self._cat, self._cache = catalogue, {}

    def __contains__(self, name):
        return name in self._cat.suffixes

    def __getitem__(self, name):
        if name not in self._cat.suffixes:
            raise KeyError(name)
        if name not in self._cache:
            self._cache[name] = self._cat.load_features(name)
        return self._cache[name]

    def __iter__(self):
        return iter(self._cat.suffixes)

    def __len__(self):
        return len(self._cat.suffixes)


class _LazyPresence(Mapping):
    def __init__(self, catalogue: Catalogue):
        self._cat = catalogue

    def __contains__(self, name):
        return name in self._cat.suffixes

    def __getitem__(self, name):
        table = self._cat.features[name]
        present = torch.zeros(table.size(0), dtype=torch.bool)
        for s in range(0, table.size(0), 65536):
            present[s : s + 65536] = table[s : s + 65536].abs().sum(dim=1) > 0
        return present

    def __iter__(self):
        return iter(self._cat.suffixes)

    def __len__(self):
        return len(self._cat.suffixes)


class NotInCatalogue(AttributeError):
    """A model constructor asked the dataset for something a catalogue does not have."""


class CatalogueDataset:
    """What a model's constructor reads from a dataset, for a catalogue without interactions:
    ``num(item field)``, ``features``, ``feature_presence``, ``item_raw_ids`` and, read on
    demand, ``item_text``.  Anything else (user counts, interaction or side-feature tables) is
    an error naming what the model asked for."""

    def __init__(self, config, catalogue: Catalogue):
        self.iid_field = config["ITEM_ID_FIELD"]
        self.uid_field = config["USER_ID_FIELD"]
        self._item_fields = {self.iid_field, self.iid_field + (config["LIST_SUFFIX"] or "_list")}
        self.catalogue = catalogue
        self.features = catalogue.features
        self.feature_presence = catalogue.feature_presence
        self.item_raw_ids = [PAD] + catalogue.raw_ids
        self.item_num = len(catalogue) + 1

    def num(self, field):
        if field in self._item_fields:
            return self.item_num
        raise NotInCatalogue(f"dataset.num({field!r})")

    @property
    def user_num(self):
        raise NotInCatalogue("dataset.user_num")

    def __getattr__(self, name):
        if name == "item_text":  # read on demand, as the dataset does: None without .text files
            cat = self.catalogue
            if cat.domains and all(os.path.isfile(d.file("text")) for d in cat.domains):
                texts, start = [""], 0
                for d, n in zip(cat.domains, cat.domain_sizes):
                    texts += read_text(d.file("text"), cat.index_raw_ids[start : start + n] if not d.prefix else
                                       [r[len(d.prefix):] for r in cat.index_raw_ids[start : start + n]])
                    start += n
                self.item_text = cat.in_internal_order(texts)
            else:
                self.item_text = None
            return self.item_text
        raise NotInCatalogue(f"dataset.{name}")


def checkpoint_domains(config) -> list[Domain]:
    root = config["data_root"] or os.path.dirname(os.path.normpath(config["data_path"]))
    domains = list(config["pretrain_domains"] or [])
    if len(domains) > 1:
        return [Domain(n, os.path.join(root, n), prefix=f"{n}:") for n in domains]
    name = domains[0] if domains else config["dataset"]
    return [Domain(name, os.path.join(root, name))]


def feature_files(config, overrides: dict | None = None) -> tuple[dict, dict]:
    overrides = overrides or {}
    suffixes, sizes = {}, {}
    for name, (suffix_key, size_key) in MODALITIES.items():
        suffix = overrides.get(suffix_key) or config[suffix_key]
        if suffix:
            suffixes[name] = suffix
            sizes[name] = int(config[size_key]) if config[size_key] else None
    return suffixes, sizes



def checkpoint_catalogue(config, ckpt) -> Catalogue:
    """The catalogue a checkpoint was trained on: its dataset folder(s)' items in the checkpoint's
    internal-id order (``ckpt["item_tokens"]``); ``size_mismatch`` set when the folder changed size."""
    suffixes, sizes = feature_files(config)
    domains = checkpoint_domains(config)
    for d in domains:
        if not os.path.isdir(d.path):
            raise DataValidationError(
                f"{d.path}: dataset folder of the checkpoint not found (its data_path is "
                f"{config['data_root']!r}, relative to the directory it was trained from); "
                f"pass data_path= (--data_path) to the folder that holds {d.name}/"
            )
    tokens = ckpt.get("item_tokens")
    own_index = all(os.path.isfile(d.file("item2index")) for d in domains)
    if own_index:
        cat = Catalogue.from_domains(domains, suffixes, sizes)
    elif suffixes:
        raise DataValidationError(f"{domains[0].file('item2index')}: missing; needed to align the features with items")
    elif tokens:  # an ID model on a plain .inter: the checkpoint's own token list is the catalogue
        cat = Catalogue(list(tokens[1:]), domains, {}, {}, f"{ckpt['model']} checkpoint item tokens")
    else:
        raise DataValidationError(f"{domains[0].file('item2index')}: missing and the checkpoint holds no item tokens")
    if tokens is not None and len(tokens) != len(cat) + 1:
        cat.size_mismatch = (len(tokens) - 1, len(cat))
    elif tokens is not None and own_index:
        try:
            cat.reorder(tokens)  # the internal ids the model was trained with
        except ValueError:
            raise DataValidationError(
                f"{', '.join(d.file('item2index') for d in domains)}: the items do not match the checkpoint's "
                f"item tokens (the dataset changed since training?)"
            ) from None
    return cat
