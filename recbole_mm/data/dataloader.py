"""RecBole dataloaders that trim every batch to its longest sequence.

RecBole pads every batch to the dataset's longest list (35 on Scientific_mm, whose average
is 3.4).  Sequences are left-aligned with right padding, so cutting the padded columns past
the batch's longest sequence changes no result for models that mask padding; it removes
most of the attention/FFN work.  Models that need the full width (e.g. Caser's vertical
convolution) set ``trim_batch_seq: False`` in their props.
"""

from __future__ import annotations

import numpy as np
import torch
from recbole.data.dataloader import FullSortEvalDataLoader, TrainDataLoader


def trim_batch(dataset, interaction, config):
    """Cut the ``*_list`` fields of ``interaction`` to its longest ``item_length`` (in place)."""
    if not config["trim_batch_seq"]:
        return interaction
    len_field = config["ITEM_LIST_LENGTH_FIELD"]
    if len_field not in interaction.interaction:
        return interaction
    longest = max(int(interaction[len_field].max()), 1)
    suffix = config["LIST_SUFFIX"]
    for field, value in interaction.interaction.items():
        if field.endswith(suffix) and value.dim() >= 2 and value.size(1) > longest:
            interaction.interaction[field] = value[:, :longest]
    return interaction


class MMTrainDataLoader(TrainDataLoader):
    def collate_fn(self, index):
        data = trim_batch(self._dataset, self._dataset[np.array(index)], self.config)
        return self._neg_sampling(self.transform(self._dataset, data))


class MMFullSortEvalDataLoader(FullSortEvalDataLoader):
    def collate_fn(self, index):
        if not self.is_sequential:
            return super().collate_fn(index)
        data = trim_batch(self._dataset, self._dataset[np.array(index)], self.config)
        data = self.transform(self._dataset, data)
        return data, None, torch.arange(len(data)), data[self.iid_field]
