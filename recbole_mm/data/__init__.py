"""Data layer: validated multi-modal atomic datasets and batch-trimming dataloaders."""

from __future__ import annotations

import os

from recbole.data.dataloader import NegSampleEvalDataLoader
from recbole.data.utils import create_samplers
from recbole.utils import ModelType

from recbole_mm.data.dataloader import MMFullSortEvalDataLoader, MMTrainDataLoader, trim_batch
from recbole_mm.categories import prepare_hint
from recbole_mm.data.dataset import MMPretrainDataset, MMSequentialDataset, longest_row_per_user
from recbole_mm.data.demo import ensure_demo
from recbole_mm.data.readers import DataValidationError

__all__ = [
    "DataValidationError",
    "MMPretrainDataset",
    "MMSequentialDataset",
    "create_dataset",
    "data_preparation",
    "trim_batch",
]


def create_dataset(config):
    """Build the dataset named by ``config`` (validated; raises :class:`DataValidationError`)."""
    if config["MODEL_TYPE"] != ModelType.SEQUENTIAL:
        raise ValueError(f"recbole_mm runs sequential recommenders; {config['model']} is {config['MODEL_TYPE'].name}")
    for name in config["pretrain_domains"] or [config["dataset"]]:
        ensure_demo(config["data_root"], name)  # the embedded demo, written on first use
    if config["pretrain_domains"]:
        return MMPretrainDataset(config)
    _select_split_mode(config)
    return MMSequentialDataset(config)


def _select_split_mode(config):
    """Pre-split files when present; otherwise a plain ``<d>.inter`` with RecBole's leave-one-out."""
    names = config["benchmark_filename"]
    path, name = config["data_path"], config["dataset"]
    if not os.path.isdir(path):
        raise DataValidationError(f"{path}: dataset folder not found (data_path/{name}); "
                                  f"make it with: {prepare_hint(name, config['data_root'])}  (or -d demo)")
    if names and all(os.path.isfile(os.path.join(path, f"{name}.{s}.inter")) for s in names):
        return
    plain = os.path.join(path, f"{name}.inter")
    if os.path.isfile(plain):
        config["benchmark_filename"] = None
        config["load_col"] = None  # every column of the plain file, timestamps included
        config["alias_of_item_id"] = None  # item_id_list is built by RecBole's augmentation
        return
    first_missing = next(
        (os.path.join(path, f"{name}.{s}.inter") for s in names or [] if not os.path.isfile(os.path.join(path, f"{name}.{s}.inter"))),
        plain,
    )
    raise DataValidationError(f"{first_missing}: missing; expected pre-split {name}.{{train,valid,test}}.inter or a plain {name}.inter")


def data_preparation(config, dataset):
    """Train / valid / test dataloaders (valid and test are ``None`` when absent)."""
    built = dataset.build()
    built[0] = longest_row_per_user(built[0], config)  # train_rows: all | longest
    if len(built) == 1:  # pre-training on train only
        train = MMTrainDataLoader(config, built[0], None, shuffle=config["shuffle"])
        return train, None, None
    if len(built) != 3:
        raise ValueError(f"expected train/valid/test splits, got {len(built)}")
    train_sampler, valid_sampler, test_sampler = create_samplers(config, dataset, built)
    train = MMTrainDataLoader(config, built[0], train_sampler, shuffle=config["shuffle"])
    loaders = []
    for phase, ds, sampler in (("valid", built[1], valid_sampler), ("test", built[2], test_sampler)):
        cls = MMFullSortEvalDataLoader if config["eval_args"]["mode"][phase] == "full" else NegSampleEvalDataLoader
        loaders.append(cls(config, ds, sampler, shuffle=False))
    return train, loaders[0], loaders[1]
