"""Plugin Config: our models first, then RecBole's; YAML layered from ``props/``.

Precedence, lowest first:

1. RecBole's internal defaults (its ``overall.yaml``, its ``<Model>.yaml`` for RecBole models);
2. ``props/overall.yaml``;
3. ``props/pretrain.yaml`` or ``props/finetune.yaml`` (the run stage), then, for RecBole's own
   models (SASRec & co.), ``props/recbole_models.yaml`` (what keeps them identical to plain RecBole);
4. ``props/<Model>.yaml`` (if present), then ``props/<Model>.<stage>.yaml`` (if present:
   a model's stage-specific defaults, e.g. MISSRec's pre-training batch size);
5. ``props/<dataset>.yaml`` (if present; for a pre-training run, each domain's, in order);
6. ``config_file_list`` (``--config_files``), in order;
7. ``config_dict`` (Python callers);
8. command-line overrides (``--key=value`` / ``--key value``), given explicitly, never read
   from ``sys.argv`` behind the caller's back.
"""

from __future__ import annotations

import enum
import os
from pathlib import Path

import torch
from recbole.config import Config as RecBoleConfig

from recbole_mm import compat
from recbole_mm.utils import get_model

STAGES = ("finetune", "pretrain")


def props_dir() -> Path:
    """Directory holding the layered YAML files (``RECBOLE_MM_PROPS`` overrides it)."""
    env = os.environ.get("RECBOLE_MM_PROPS")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "props"


def layered_prop_files(model_name: str, dataset: str, stage: str, recbole_model: bool = False) -> list[str]:
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got '{stage}'")
    root = props_dir()
    names = ["overall.yaml", f"{stage}.yaml"] + (["recbole_models.yaml"] if recbole_model else [])
    names += [f"{model_name}.yaml", f"{model_name}.{stage}.yaml"]
    names += [f"{d}.yaml" for d in split_domains(dataset)]
    return [str(root / n) for n in names if (root / n).is_file()]


def split_domains(dataset: str) -> list[str]:
    """``"A,B"`` or ``"A+B"`` -> ``["A", "B"]``."""
    return [d for d in str(dataset).replace("+", ",").split(",") if d]


class Config(RecBoleConfig):
    """RecBole Config with plugin model lookup, ``props/`` layering and explicit overrides.

    Args:
        model: model name (ours or RecBole's) or class.
        dataset: dataset name; for pre-training several domains ``"A,B"`` (stored as ``"A+B"``
            with ``pretrain_domains: [A, B]``).
        stage: ``"finetune"`` or ``"pretrain"``.
        config_file_list: extra YAML files, applied after ``props/``.
        config_dict: programmatic overrides.
        cmd_overrides: command-line overrides (strings are converted as RecBole does).
    """

    def __init__(
        self,
        model,
        dataset,
        stage: str = "finetune",
        config_file_list=None,
        config_dict=None,
        cmd_overrides=None,
    ):
        compat.apply()
        model_class = get_model(model) if isinstance(model, str) else model
        domains = split_domains(dataset)
        if not domains:
            raise ValueError("a dataset name is required")
        self._stage = stage
        self._cmd_overrides = dict(cmd_overrides or {})
        recbole_model = model_class.__module__.split(".")[0] == "recbole"
        files = layered_prop_files(model_class.__name__, dataset, stage, recbole_model)
        for f in config_file_list or []:
            if not os.path.isfile(f):
                raise FileNotFoundError(f"config file not found: {f}")
            files.append(str(f))
        config_dict = dict(config_dict or {})
        config_dict.setdefault("run_stage", stage)
        if len(domains) > 1 or stage == "pretrain":
            config_dict.setdefault("pretrain_domains", domains)
        self.prop_files = files
        super().__init__(
            model=model_class,
            dataset="+".join(domains),
            config_file_list=files,
            config_dict=config_dict,
        )

    # -- RecBole hooks ---------------------------------------------------------------
    def compatibility_settings(self):
        compat.numpy_aliases()

    def _load_cmd_line(self):
        return self._convert_config_dict(
            {k: (v if isinstance(v, str) else v) for k, v in self._cmd_overrides.items()}
        )

    def _set_default_parameters(self):
        self.final_config_dict["data_root"] = self.final_config_dict["data_path"]
        super()._set_default_parameters()

    def _init_device(self):
        from recbole_mm import distributed

        use_gpu = bool(self.final_config_dict.get("use_gpu", True)) and torch.cuda.is_available()
        world, local_rank = distributed.env_world_size(), distributed.env_local_rank()
        self.final_config_dict["gpu_id"] = str(self.final_config_dict.get("gpu_id", "0"))
        # RecBole's own DDP (tcp init, its sampler and trainer wrapper) stays off: a distributed
        # job runs through recbole_mm.distributed (torchrun's env://, one GPU per local rank)
        self.final_config_dict["single_spec"] = True
        self.final_config_dict["local_rank"] = local_rank
        self.final_config_dict["world_size"] = world
        if use_gpu:
            self.final_config_dict["device"] = torch.device(f"cuda:{local_rank}" if world > 1 else "cuda")
        else:
            self.final_config_dict["device"] = torch.device("cpu")


def to_plain(value):
    """Convert a config value to plain data (dict/list/str/int/float/bool/None)."""
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [to_plain(v) for v in value]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return value.item()
    return str(value)


def config_to_plain(config) -> dict:
    return to_plain(dict(config.final_config_dict))
