"""TextSim: items ranked by the cosine similarity of their frozen features to the user's last items.

A parameter-free content baseline, the bar a zero-shot transfer must clear: the query is the sum
of the L2-normalised features of the last ``textsim_window`` items of the history (1: the last
item), and every item is scored by its cosine to that query.  With several modalities
(``textsim_modalities: [text, image]``) the score is the mean of the per-modality cosines
(an item without a modality's features scores 0 for it).  No parameter is learned and no
training row is read (``epochs: 0``): the same scores whatever the training data, so one run
per target serves every ``train_fraction``.

On Scientific with MiniLM text features the last item's text alone reaches test NDCG@10 0.0528
(Recall@10 0.0990), above an untrained UniSRec (0.0408) and popularity (0.0171): the signal a
text-based model inherits before any training (docs/transfer.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType
from torch import nn

from recbole_mm.model.abstract import required

_SUFFIX_KEY = {"text": "plm_suffix", "image": "img_suffix"}


class TextSim(SequentialRecommender):
    input_type = InputType.POINTWISE

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.window = int(required(config, "textsim_window", TextSim))
        if self.window < 1:
            raise ValueError(f"textsim_window must be >= 1 (the number of last history items), got {self.window}")
        modalities = required(config, "textsim_modalities", TextSim)
        if isinstance(modalities, str):  # from the command line: text,image or [text,image]
            modalities = [m.strip(" '\"") for m in modalities.strip("[]").split(",") if m.strip(" '\"")]
        modalities = list(modalities)
        bad = [m for m in modalities if m not in _SUFFIX_KEY]
        if not modalities or bad:
            raise ValueError(f"textsim_modalities: a list of {sorted(_SUFFIX_KEY)}, got {modalities}")
        features = getattr(dataset, "features", {})
        tables = []
        for m in modalities:
            if m not in features:
                raise ValueError(f"TextSim needs '{m}' features: set {_SUFFIX_KEY[m]} to a feature file of the "
                                 f"dataset (e.g. --{_SUFFIX_KEY[m]}={'feat1CLS' if m == 'text' else 'feat3CLS'})")
            # normalised rows (all-zero rows, e.g. missing features or the padding item, stay zero);
            # 1/sqrt(M) per modality: the dot product of two concatenations is the mean cosine
            tables.append(F.normalize(features[m].float(), dim=1) / len(modalities) ** 0.5)
        self.modalities = modalities
        self.register_buffer("item_features", torch.cat(tables, dim=1), persistent=False)
        self._dims = [t.shape[1] for t in tables]
        # RecBole's trainer needs a parameter to build its optimiser; it never changes
        self.fake_loss = nn.Parameter(torch.zeros(1))

    def calculate_loss(self, interaction):
        return (self.fake_loss * 0).sum()

    def forward(self, item_seq, item_seq_len):
        """``[B, sum of feature dims]``: per modality, the normalised sum of the last ``window``
        items' normalised features, scaled like the item table."""
        pos = torch.arange(item_seq.shape[1], device=item_seq.device).unsqueeze(0)
        lengths = item_seq_len.unsqueeze(1)
        keep = (pos < lengths) & (pos >= lengths - self.window)
        summed = (self.item_features[item_seq] * keep.unsqueeze(-1)).sum(dim=1)
        parts = summed.split(self._dims, dim=1)
        scale = len(parts) ** 0.5
        return torch.cat([F.normalize(p, dim=1) / scale for p in parts], dim=1)

    def full_sort_predict(self, interaction):
        return self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]) @ self.item_features.T

    def predict(self, interaction):
        query = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return (query * self.item_features[interaction[self.ITEM_ID]]).sum(dim=1)
