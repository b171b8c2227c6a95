"""How a :class:`~recbole_mm.recommend.api.Recommender` scores: through the model's own methods.

* Our models (:class:`~recbole_mm.model.abstract.MMSequentialRecommender`): a catalogue of at
  most ``chunk_size`` items is scored by ``full_sort_predict`` on the whole table, exactly as the
  evaluator; a larger one ``chunk_size`` items at a time with the model's serving methods
  ``sequence_output`` (the histories' vectors), ``item_table_range(start, end)`` (the chunk's
  rows of its item table) and ``score_items`` (their scores, equal to ``full_sort_predict``'s
  columns), so memory is bounded by one chunk and one score block (``batch_size x
  chunk_size``) plus what the model keeps of its table (UniSRec inductive: nothing, its
  adaptor runs on each chunk's features).
* Any other model (RecBole ID models such as SASRec, Popularity): ``full_sort_predict`` on
  batches of histories, the batch sized so that a score block holds at most ``batch_size x
  chunk_size`` values.
"""

from __future__ import annotations

import contextlib

import torch

from recbole_mm.recommend.errors import RecommendError


def scorer_for(model):
    from recbole_mm.model.abstract import MMSequentialRecommender

    return ModelScorer(model) if isinstance(model, MMSequentialRecommender) else FullSortScorer(model)


class FullSortScorer:
    """Any model: the evaluator's own ``full_sort_predict`` on a batch of histories."""

    chunked = False

    def __init__(self, model):
        self.model = model

    def session(self, one_chunk: bool):
        cache = getattr(self.model, "item_table_cache", None)
        return cache() if cache is not None else contextlib.nullcontext()

    def prepare(self, interaction):
        return interaction

    def item_chunk(self, start, end):
        return None

    def scores(self, interaction, chunk, start, end):
        scores = self.model.full_sort_predict(interaction).view(len(interaction), -1)
        return scores[:, start:end].clone() if (start, end) != (0, scores.size(1)) else scores

    def sequence_embeddings(self, interaction):
        m = self.model
        try:
            out = m.forward(interaction[m.ITEM_SEQ], interaction[m.ITEM_SEQ_LEN])
        except TypeError:  # e.g. BERT4Rec: forward(item_seq) over every position
            raise RecommendError(f"{type(m).__name__}.forward is not (item_seq, item_seq_len) -> one vector "
                                 f"per sequence: no sequence embeddings to export") from None
        if isinstance(out, tuple):
            out = out[0]
        if out.dim() != 2:
            raise RecommendError(f"{type(m).__name__}.forward returns {tuple(out.shape)}, not one vector per sequence")
        return out

    def item_embeddings(self, n_items, chunk_size):
        emb = getattr(self.model, "item_embedding", None)
        if emb is None:
            raise RecommendError(f"{type(self.model).__name__} has no item embedding table to export")
        return emb.weight[1 : n_items + 1].detach().cpu()


class ModelScorer(FullSortScorer):
    """Our models: ``full_sort_predict`` for one chunk, the model's serving methods chunk by chunk."""

    chunked = True

    def session(self, one_chunk: bool):
        self.one_chunk = one_chunk
        return self.model.item_table_cache()

    def prepare(self, interaction):
        return interaction if self.one_chunk else self.model.sequence_output(interaction)

    def item_chunk(self, start, end):
        return None if self.one_chunk else self.model.item_table_range(start, end)

    def scores(self, state, chunk, start, end):
        if self.one_chunk:
            return super().scores(state, chunk, start, end)
        return self.model.score_items(state, chunk, start, end)

    def sequence_embeddings(self, interaction):
        out = self.model.sequence_output(interaction)
        return out[0] if isinstance(out, tuple) else out

    def item_embeddings(self, n_items, chunk_size):
        """Rows 1..n of ``item_table_range`` (a dict table: ``{name: [n, H]}``), ``chunk_size`` at a time."""
        with self.model.item_table_cache():
            parts = [self.model.item_table_range(s, min(s + chunk_size, n_items + 1))
                     for s in range(0, n_items + 1, chunk_size)]
        if isinstance(parts[0], dict):
            return {k: torch.cat([p[k] for p in parts])[1:].detach().cpu() for k in parts[0]}
        return torch.cat(parts)[1:].detach().cpu()
