"""Base class of the recbole_mm models."""

from __future__ import annotations

from contextlib import contextmanager
from logging import getLogger

import torch
from torch import nn
from recbole.model.abstract_recommender import SequentialRecommender


class MMSequentialRecommender(SequentialRecommender):
    """A RecBole ``SequentialRecommender`` with shared feature tables and an item-table cache.

    * ``register_features(dataset, names)`` registers the dataset's frozen feature tables as
      non-persistent buffers ``<name>_features`` / ``<name>_presence`` (shared data, not
      weights: checkpoints do not carry them, so a model transfers to another catalogue).
    * ``compute_item_table()`` returns the representation of every item; inside
      ``with model.item_table_cache():`` (what the trainer does around each evaluation) it is
      computed once and reused by every batch.
    * ``gather_negatives`` (config, default True): in distributed training, in-batch
      contrastive losses gather their keys from every rank (``distributed.gather_in_batch``).
    """

    # weights that only see one modality's features (``{modality: (name prefixes)}``): a
    # checkpoint trained without that modality leaves them fresh (``untrained_modalities``)
    MODALITY_PREFIXES: dict[str, tuple[str, ...]] = {}

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self._item_cache: dict = {}
        self._item_cache_on = False
        # distributed: in-batch contrastive negatives from every rank (distributed.gather_in_batch)
        self.gather_negatives = config["gather_negatives"] is not False

    def _init_weights(self, module):
        """SASRec's / BERT's initialisation (``self.initializer_range``), for ``self.apply``."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=self.initializer_range)
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    def register_features(self, dataset, names):
        for name in names:
            if name not in dataset.features:
                raise ValueError(
                    f"{self.__class__.__name__} needs '{name}' features: set "
                    f"{'plm_suffix' if name == 'text' else 'img_suffix'} to a feature file of the dataset"
                )
            self.register_buffer(f"{name}_features", dataset.features[name].clone(), persistent=False)
            self.register_buffer(f"{name}_presence", dataset.feature_presence[name].clone(), persistent=False)

    def untrained_modalities(self) -> list[str]:
        """Registered modalities that no item has (e.g. text-only data): their weights never
        saw a feature.  Saved with checkpoints, so a transfer re-initialises them."""
        return [m for m in ("text", "image") if hasattr(self, f"{m}_presence")
                and not bool(getattr(self, f"{m}_presence")[1:].any())]

    def keep_fresh(self, state_dict: dict, modalities) -> dict:
        """``state_dict`` with this model's own (fresh) weights for the modalities the checkpoint
        never saw (``MODALITY_PREFIXES``), for ``load_pretrained``."""
        prefixes = tuple(p for m in modalities for p in self.MODALITY_PREFIXES.get(m, ()))
        if not prefixes:
            return state_dict
        own = self.state_dict()
        fresh = {k: v for k, v in own.items() if k.startswith(prefixes)}
        getLogger().info(f"pre-trained without {'/'.join(modalities)}: {len(fresh)} tensors "
                         f"({', '.join(p.rstrip('.') for p in prefixes)}) start fresh")
        return {**{k: v for k, v in state_dict.items() if not k.startswith(prefixes)}, **fresh}

    def compute_item_table(self) -> torch.Tensor:
        raise NotImplementedError

    def item_table(self):
        return self.cached("item_table", self.compute_item_table)

    def cached(self, key: str, compute):
        """``compute()``, memoised under ``key`` inside ``item_table_cache()`` (one evaluation:
        the item table and whatever a model derives from it, e.g. its normalised rows);
        recomputed on every call outside it (training, where the weights change)."""
        if not self._item_cache_on:
            return compute()
        if key not in self._item_cache:
            self._item_cache[key] = compute()
        return self._item_cache[key]

    @contextmanager
    def item_table_cache(self):
        self._item_cache_on, self._item_cache = True, {}
        try:
            yield
        finally:
            self._item_cache_on, self._item_cache = False, {}

    def load_pretrained(self, state_dict: dict) -> None:
        """Load transferable weights from a pre-training checkpoint (missing keys stay fresh)."""
        own = self.state_dict()
        usable = {k: v for k, v in state_dict.items() if k in own and own[k].shape == v.shape}
        skipped = sorted(set(state_dict) - set(usable))
        missing = sorted(set(own) - set(usable))
        self.load_state_dict(usable, strict=False)
        log = getLogger()
        log.info(f"loaded {len(usable)} pre-trained tensors; fresh: {missing}; skipped: {skipped}")
