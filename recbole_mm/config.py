"""Plugin Config: our models first, then RecBole's; YAML layered from ``props/``.

Precedence, lowest first:

1. RecBole's internal defaults (its ``overall.yaml``, its ``<Model>.yaml`` for RecBole models);
2. ``props/overall.yaml``;
3. ``props/pretrain.yaml`` or ``props/finetune.yaml`` (the run stage), then, for RecBole's own
   models (SASRec & co.), ``props/recbole_models.yaml`` (what keeps them identical to plain RecBole);
4. ``props/<Model>.yaml`` (if present), then ``props/<Model>.<stage>.yaml`` (if present:
   a model's stage-specific defaults, e.g. MISSRec's pre-training batch size);
5. ``props/<dataset>.yaml`` (if present; for a pre-training run, each domain's, in order);
   then ``props/<Model>.<dataset>.yaml`` (if present: a model's settings for one dataset,
   e.g. PMMRec's batch on the small demo);
6. ``config_file_list`` (``--config_files``), in order;
7. ``config_dict`` (Python callers);
8. command-line overrides (``--key=value`` / ``--key value``), given explicitly, never read
   from ``sys.argv`` behind the caller's back.
"""

from __future__ import annotations

import difflib
import enum
import glob
import os
import sys
from functools import lru_cache
from pathlib import Path

import torch
from recbole.config import Config as RecBoleConfig

from recbole_mm import compat
from recbole_mm.errors import ConfigError  # noqa: F401 - defined in errors.py, importable from here too
from recbole_mm.utils import get_model

STAGES = ("finetune", "pretrain")

# keys the code sets or reads that no YAML file defines (RecBole's runtime keys, our own)
_RUNTIME_KEYS = {"model", "dataset", "config_files", "device", "MODEL_TYPE", "data_root", "pretrain_domains",
                 "run_stage", "local_rank", "world_size", "single_spec", "nproc", "ip", "port", "offset"}

# numeric keys checked once the layers are merged: key -> (kind, minimum, "what is expected")
_NUMERIC = {
    "epochs": (int, 0, "an integer >= 0 (0: evaluate without training; pre-training needs >= 1)"),
    "train_batch_size": (int, 1, "an integer >= 1"),
    "eval_batch_size": (int, 1, "an integer >= 1"),
    "learning_rate": (float, 0, "a number > 0"),
    "weight_decay": (float, 0, "a number >= 0"),
    "stopping_step": (int, 1, "an integer >= 1"),
    "stopping_min_steps": (int, 0, "an integer >= 0"),
    "train_fraction": (float, 0, "a number in (0, 1]"),
    "eval_step": (int, 0, "an integer >= 0"),
    "MAX_ITEM_LIST_LENGTH": (int, 1, "an integer >= 1"),
    "seed": (int, None, "an integer"),
    "steps_per_epoch": (int, 1, "an integer >= 1 or ~ (every batch)"),
    "save_step": (int, 1, "an integer >= 1 or ~"),
    "dist_timeout": (float, 0, "a number of seconds > 0"),
}
_MAXIMUM = {"train_fraction": 1.0}
_OPTIONAL = {"steps_per_epoch", "save_step", "weight_decay"}  # None allowed


def known_keys() -> frozenset:
    """Every key a user may set: RecBole's own (its overall, model and dataset YAML files), every
    ``props/*.yaml`` key and the runtime keys of :data:`_RUNTIME_KEYS`."""
    return _known_keys(str(props_dir()))


@lru_cache(maxsize=4)
def _known_keys(props: str) -> frozenset:  # per props folder (RECBOLE_MM_PROPS may point elsewhere)
    import yaml
    import recbole

    root = os.path.join(os.path.dirname(recbole.__file__), "properties")
    keys = set(_RUNTIME_KEYS)
    for f in glob.glob(os.path.join(root, "**", "*.yaml"), recursive=True) + glob.glob(os.path.join(props, "*.yaml")):
        with open(f, encoding="utf-8") as fh:
            keys |= set(yaml.safe_load(fh) or {})
    return frozenset(keys)


def check_keys(keys, where: str, strict: bool = False) -> list[str]:
    """Unknown ``keys`` (given in ``where``: the command line or a config file): a warning on stderr
    naming the closest known key, or with ``strict`` a :class:`ConfigError`.  Returns the unknown ones."""
    known = known_keys()
    unknown = [k for k in keys if k not in known]
    for k in unknown:
        close = difflib.get_close_matches(k, known, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        if strict:
            raise ConfigError(f"{where}: unknown config key {k!r}{hint}")
        print(f"recbole-mm: warning: {where}: unknown config key {k!r}{hint}; no model reads it "
              "(--strict-config makes this an error)", file=sys.stderr)
    return unknown


def check_values(config, where=lambda key: f"config key {key!r}") -> None:
    """Numeric keys of :data:`_NUMERIC` and ``topk``: type and range, one :class:`ConfigError` naming the key."""
    for key, (kind, low, expected) in _NUMERIC.items():
        value = config[key]
        if value is None and (key in _OPTIONAL or key not in config):
            continue
        ok = not isinstance(value, bool) and (isinstance(value, int) if kind is int else isinstance(value, (int, float)))
        if ok and low is not None:
            ok = value >= low if (kind is int or key == "weight_decay") else value > low
        if ok and kind is float:
            ok = value == value and value not in (float("inf"), float("-inf"))
        if ok and key in _MAXIMUM:
            ok = value <= _MAXIMUM[key]
        if ok and key == "epochs" and value == 0 and config["run_stage"] == "pretrain":
            ok = False  # fine-tuning: 0 evaluates the given weights (zero-shot); pre-training has nothing to do
        if not ok:
            raise ConfigError(f"{where(key)}: expected {expected}, got {value!r}")
    topk = config["topk"]
    topk = [topk] if isinstance(topk, int) and not isinstance(topk, bool) else topk
    if not isinstance(topk, list) or not topk or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in topk):
        raise ConfigError(f"{where('topk')}: expected a positive integer or a list of them, got {config['topk']!r}")
    metric, _, k = str(config["valid_metric"] or "").lower().partition("@")
    metrics = config["metrics"] or []
    computed = {str(m).lower() for m in ([metrics] if isinstance(metrics, str) else metrics)}
    if metric and (metric not in computed or (k and (not k.isdigit() or int(k) not in topk))):
        raise ConfigError(f"{where('valid_metric')}: {config['valid_metric']!r} is not computed by metrics "
                          f"{config['metrics']} at topk {topk}")


# the default YAML files ship inside the package (package data, so a wheel has them too); the
# top-level ``props/`` of a source checkout is a symlink to this folder (one source of truth)
PACKAGE_PROPS = Path(__file__).resolve().parent / "props"


def props_dir() -> Path:
    """Directory holding the layered YAML files: ``recbole_mm/props`` (``props/`` in a checkout
    links to it), found the same way in a source checkout, an editable and a wheel install;
    ``RECBOLE_MM_PROPS`` overrides it.  A missing folder is a :class:`FileNotFoundError`: running on
    RecBole's defaults alone would silently change every model."""
    env = os.environ.get("RECBOLE_MM_PROPS")
    root = Path(env) if env else PACKAGE_PROPS
    if not root.is_dir():
        where = "RECBOLE_MM_PROPS" if env else "the recbole_mm package (package data: recbole_mm/props/*.yaml)"
        raise FileNotFoundError(f"config defaults folder not found: {root} (from {where}); "
                                "reinstall recbole_mm or point RECBOLE_MM_PROPS at a props folder")
    return root


def layered_prop_files(model_name: str, dataset: str, stage: str, recbole_model: bool = False) -> list[str]:
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got '{stage}'")
    root = props_dir()
    names = ["overall.yaml", f"{stage}.yaml"] + (["recbole_models.yaml"] if recbole_model else [])
    names += [f"{model_name}.yaml", f"{model_name}.{stage}.yaml"]
    names += [f"{d}.yaml" for d in split_domains(dataset)]
    # a model's settings for one dataset (e.g. PMMRec.demo.yaml: its batch on the 360-user demo)
    names += [f"{model_name}.{d}.yaml" for d in split_domains(dataset)]
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
        strict_keys: bool = False,
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
        check_keys(self._cmd_overrides, "command line", strict_keys)
        for f in config_file_list or []:
            if not os.path.isfile(f):
                raise FileNotFoundError(f"config file not found: {f}")
            check_keys(_yaml_keys(f), f, strict_keys)
            files.append(str(f))
        config_dict = dict(config_dict or {})
        config_dict.setdefault("run_stage", stage)
        if len(domains) > 1 or stage == "pretrain":
            config_dict.setdefault("pretrain_domains", domains)
        self.prop_files = files
        try:
            super().__init__(
                model=model_class,
                dataset="+".join(domains),
                config_file_list=files,
                config_dict=config_dict,
            )
        except (TypeError, ValueError) as e:  # RecBole's own checks (topk, valid_metric, ...)
            raise ConfigError(f"config: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        given = lambda key: f"--{key}" if key in self._cmd_overrides else f"config key {key!r}"  # noqa: E731
        check_values(self, given)

    # -- RecBole hooks ---------------------------------------------------------------
    def compatibility_settings(self):
        compat.numpy_aliases()

    def _load_cmd_line(self):
        # ``--key=~`` / ``--key=null`` mean what ``~`` means in the YAML files (None), as the error
        # messages say; RecBole's converter would keep them as strings
        return self._convert_config_dict(
            {k: (None if isinstance(v, str) and v.strip().lower() in ("~", "null") else v)
             for k, v in self._cmd_overrides.items()}
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


def _yaml_keys(path) -> list[str]:
    """Top-level keys of a user's YAML config file (checked as UTF-8 first: one line on bad bytes)."""
    import yaml

    from recbole_mm.data.readers import DataValidationError, open_text

    with open_text(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise DataValidationError(f"{path}: not valid YAML ({' '.join(str(e).split())[:200]})") from None
    if data is None:
        return []
    if not isinstance(data, dict):
        raise DataValidationError(f"{path}: expected a YAML mapping of config keys, got {type(data).__name__}")
    return list(data)


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
