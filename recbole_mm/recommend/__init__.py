"""Recommend from a checkpoint: top-k items for raw item histories, embeddings for export, and
zero-shot scoring of another catalogue with inductive (feature-based) models.

    import recbole_mm
    rec = recbole_mm.load("saved/UniSRec-Scientific_mm.pth")          # device="cuda" for a GPU
    recs = rec.recommend([["B0001", "B0002"], ["B0003"]], k=10)      # raw ids (ASINs), oldest first
    recs[0].items, recs[0].scores, recs[0].unknown
    zs = rec.with_catalogue("dataset/downstream/Scientific")         # inductive models only

What a checkpoint holds (``trainer/checkpoint.py``): the model name, its ``state_dict``, the
run's whole config as plain data, the epoch, optimizer state, metrics and the dataset's item
tokens.  It holds no feature tables (they are data, shared by the models, not weights), so
:func:`load` rebuilds the model from the checkpoint's config plus the item index
(``<d>.item2index``) and feature files (``<d>.<plm_suffix>``, ``<d>.<img_suffix>``) of the
dataset folder the config names (``data_root`` / ``dataset``, or each ``pretrain_domains``
folder, prefixed ``"<domain>:"`` as in pre-training); ``data_path=`` overrides the folder root.
Interactions are never read.  The model is built by its own class on a catalogue-only stand-in
of the dataset, loaded with the checkpoint's weights (strictly) and put in eval mode.

Scores are the model's own: the evaluator calls ``full_sort_predict`` on a batch and masks the
padding item only (RecBole 1.2.1 does not mask a sequential model's history items), so
``recommend(..., exclude_seen=False)`` reproduces the evaluator's ranking.
``exclude_seen=True`` (the default) also drops every item of the given history.

* Our models: a catalogue of at most ``chunk_size`` items is scored by ``full_sort_predict``
  on the whole table, exactly as the evaluator.  A larger one is scored ``chunk_size`` items at a
  time through the model's serving methods (``sequence_output``, ``item_table_range``,
  ``score_items`` of ``model/abstract.py``), each chunk against every history with a running
  top-k, so memory is bounded by one chunk (``chunk_size x hidden``) and one score block
  (``batch_size x chunk_size``) plus what the model keeps of its table (UniSRec inductive:
  nothing; its adaptor runs on each chunk's features and the sequence encoder on each batch's
  own items).
* Any other model (RecBole ID models such as SASRec): ``full_sort_predict`` on batches of
  histories, the batch sized so that a score block holds at most ``batch_size x chunk_size``
  values.

Modules: :mod:`.api` (:func:`load`, :class:`Recommender`), :mod:`.scoring` (the scorers),
:mod:`.errors`, :mod:`.cli` (``recbole-mm recommend``); the catalogue (item index, features, the
stand-in dataset a model is rebuilt on) is :mod:`recbole_mm.data.catalogue`.

Inductive models (UniSRec / MISSRec with ``train_stage`` ``pretrain`` or ``inductive_ft``: no
item ID parameters) can score any catalogue whose features exist: :meth:`Recommender.with_catalogue`
rebuilds the model on another dataset folder's ``.item2index`` and feature files (zero-shot
transfer, or new items the moment their features are extracted).  MISSRec's interest tokens
belong to a catalogue: on a swap they are re-discovered by its own k-means on the new items'
adapted features (what MISSRec does when it transfers), nothing else is trained.
Transductive models (an item ID embedding: ``transductive_ft``, SASRec & co.) refuse a swap.

Unknown ids in a history are skipped with an :class:`UnknownItemWarning` listing them
(``Recommendation.unknown`` keeps them), or refused with ``strict=True``
(:class:`UnknownItemError`), never mapped to padding.  A history left empty is an
:class:`EmptyHistoryError` naming it (``on_empty="skip"``: an empty recommendation instead):
a checkpoint holds no interaction counts (a zero-shot catalogue has none), so there is no
popularity to fall back on, and a model cannot encode an empty sequence.
"""

from recbole_mm.data.catalogue import Catalogue
from recbole_mm.recommend.api import DEFAULT_BATCH, DEFAULT_CHUNK, CheckpointConfig, Recommendation, Recommender, load
from recbole_mm.recommend.errors import (CatalogueError, EmptyHistoryError, RecommendError, UnknownItemError,
                                         UnknownItemWarning)

__all__ = [
    "Catalogue",
    "CatalogueError",
    "CheckpointConfig",
    "DEFAULT_BATCH",
    "DEFAULT_CHUNK",
    "EmptyHistoryError",
    "Recommendation",
    "RecommendError",
    "Recommender",
    "UnknownItemError",
    "UnknownItemWarning",
    "load",
]
