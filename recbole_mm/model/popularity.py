"""Popularity: every user gets the items ranked by how often they are a training target.

The reference point that every sequential model must beat, run through the same dataset,
trainer and full-ranking evaluator as the other models (RecBole's own ``Pop`` is a general
recommender, which the sequential pipeline does not load).  One training epoch counts the
targets of the training rows (with ``train_fraction``, of the kept users only); more epochs
scale every count alike and leave the ranking unchanged.  No parameter is learned: the
counts are a buffer, saved in the checkpoint.
"""

from __future__ import annotations

import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType
from torch import nn


class Popularity(SequentialRecommender):
    input_type = InputType.POINTWISE

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.register_buffer("item_count", torch.zeros(self.n_items))
        # RecBole's trainer needs a parameter to build its optimiser; it never changes
        self.fake_loss = nn.Parameter(torch.zeros(1))

    def calculate_loss(self, interaction):
        items = interaction[self.POS_ITEM_ID]
        self.item_count += torch.bincount(items, minlength=self.n_items).to(self.item_count.dtype)
        return (self.fake_loss * 0).sum()

    def predict(self, interaction):
        return self.item_count[interaction[self.ITEM_ID]]

    def full_sort_predict(self, interaction):
        n = interaction[self.ITEM_SEQ].shape[0]
        return self.item_count.unsqueeze(0).expand(n, -1).clone()
