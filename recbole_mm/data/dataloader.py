"""RecBole dataloaders that trim every batch to its longest sequence.

RecBole pads every batch to the dataset's longest list (35 on Scientific_mm, whose average
is 3.4).  Sequences are left-aligned with right padding, so cutting the padded columns past
the batch's longest sequence changes no result for models that mask padding; it removes
most of the attention/FFN work.  ``trim_batch_seq: False`` keeps RecBole's own width (the
dataset's longest list), so an ID model then trains bit for bit as in plain RecBole (dropout
draws depend on the width).  Models that need a fixed width (Caser's vertical convolution
spans ``MAX_ITEM_LIST_LENGTH``) also set ``pad_batch_seq_to_max: True`` in their props: their
batches are padded to exactly ``MAX_ITEM_LIST_LENGTH`` columns.
"""

from __future__ import annotations

import numpy as np
import torch
from recbole.data.dataloader import FullSortEvalDataLoader, TrainDataLoader

from recbole_mm import distributed


def trim_batch(dataset, interaction, config):
    """Cut the ``*_list`` fields of ``interaction`` to its longest ``item_length`` (in place),
    or pad them to ``MAX_ITEM_LIST_LENGTH`` with ``pad_batch_seq_to_max`` (module doc)."""
    len_field = config["ITEM_LIST_LENGTH_FIELD"]
    if len_field not in interaction.interaction:
        return interaction
    if config["pad_batch_seq_to_max"]:
        width = int(config["MAX_ITEM_LIST_LENGTH"])
    elif config["trim_batch_seq"]:
        width = max(int(interaction[len_field].max()), 1)
    else:
        return interaction
    suffix = config["LIST_SUFFIX"]
    for field, value in interaction.interaction.items():
        if not field.endswith(suffix) or value.dim() < 2 or value.size(1) == width:
            continue
        if value.size(1) > width:
            interaction.interaction[field] = value[:, :width]
        else:
            pad = value.new_zeros((value.size(0), width - value.size(1), *value.shape[2:]))
            interaction.interaction[field] = torch.cat([value, pad], dim=1)
    return interaction


class _GlobalBatches(torch.utils.data.DataLoader):
    """Sits between RecBole's ``AbstractDataLoader`` and torch's ``DataLoader`` (see the MRO
    of :class:`MMTrainDataLoader`): takes the ``shuffle`` / ``batch_size`` / ``generator``
    RecBole passes and builds the same global batches (``RandomSampler`` on the loader's
    seeded generator, ``batch_size`` = ``train_batch_size``), of which this rank loads its
    share (:class:`recbole_mm.distributed.GlobalBatchSampler`; all of it in one process)."""

    def __init__(self, dataset, batch_size, shuffle=False, sampler=None, generator=None, **kwargs):
        if sampler is None:
            sampler = (torch.utils.data.RandomSampler(dataset, generator=generator) if shuffle
                       else torch.utils.data.SequentialSampler(dataset))
        batches = distributed.GlobalBatchSampler(sampler, batch_size, distributed.rank(), distributed.world_size())
        super().__init__(dataset, batch_sampler=batches, generator=generator, **kwargs)


class MMTrainDataLoader(TrainDataLoader, _GlobalBatches):
    """RecBole's train loader (batches trimmed to their longest sequence) loading this rank's
    share of each global batch of ``train_batch_size``."""

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
