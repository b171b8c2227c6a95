"""RecBole 1.2.1 on today's numpy / pandas / torch / setuptools, fixed in one place.

RecBole 1.2.1 (Feb 2025) is the newest release and is frozen.  On the current stack it
breaks in six places; each fix below is small, scoped to RecBole, idempotent, and has its
own test in ``tests/test_compat.py``.  :func:`apply` is called on ``import recbole_mm``.

1. **numpy >= 2** removed ``np.float_``/``np.unicode_``/``np.complex_``.
   ``recbole.config.Config.compatibility_settings`` assigns them to the old aliases
   (``np.float = np.float_`` ...) and so every ``Config(...)`` raises ``AttributeError``;
   other RecBole modules still use the old aliases (``np.float`` in ``_fill_nan``...).
   Fix: define the old aliases from the builtins (what they always meant) and replace
   ``compatibility_settings`` with a numpy-2-safe version.
2. **torch >= 2.6** ``torch.load`` defaults to ``weights_only=True``; RecBole pickles its whole
   ``Config`` (enums, ``torch.device``) into its own checkpoints, so
   ``Trainer.resume_checkpoint`` and ``Trainer.evaluate(load_best_model=True)`` fail.
   Fix: inside ``recbole.trainer.trainer`` only, ``torch.load`` defaults to
   ``weights_only=False`` (RecBole only loads files it wrote itself there).  Our own
   checkpoints never need this: they hold tensors and plain data and load with
   ``weights_only=True`` (see ``recbole_mm.trainer.checkpoint``).
3. **setuptools >= 81** no longer ships ``pkg_resources``; ``recbole.quick_start`` does
   ``from ray import tune`` at import time and ray <= 2.6.3 (RecBole's pin) imports
   ``pkg_resources``, so ``import recbole.quick_start`` dies.  recbole_mm never imports it.
   The same when ray is not installed at all (an environment that installed RecBole without
   its dependencies, e.g. a prebuilt image).
   Fix: when ``pkg_resources`` or ray itself is missing, ``ray`` is registered as a stand-in module whose
   ``tune`` raises a clear ``ImportError`` only when hyper-parameter tuning is actually
   used, so the rest of ``recbole.quick_start`` imports and runs.
4. **pandas >= 3** makes copy-on-write the only mode: RecBole's chained
   ``df[field].fillna(..., inplace=True)`` (in ``Dataset._load_feat`` and ``_fill_nan``) is a
   silent no-op, so an empty sequence field stays NaN and crashes on ``.split``, and NaN
   floats are never imputed.  Fix: sequence columns read by RecBole get ``""`` for empty
   cells right after ``read_csv``, and ``_fill_nan`` first fills token/float columns by
   assignment (what RecBole meant), then runs the original.
5. **Autograd anomaly detection left on.** ``recbole/model/sequential_recommender/sine.py``
   calls ``torch.autograd.set_detect_anomaly(True)`` at import time, and importing *any*
   RecBole sequential model (``get_model("SASRec")`` imports the whole package) runs it: every
   later backward pass in the process is checked for NaN and records forward traces (slow),
   and a harmless NaN that a model masks out aborts training.  Fix: the module is imported
   here once with the process's anomaly setting restored afterwards.
6. **Directory creation races between processes.** ``recbole.utils.ensure_dir`` checks
   ``os.path.exists`` and then calls ``os.makedirs``: when several torchrun ranks build their
   ``Trainer`` (or logger) at the same moment, the slower rank raises ``FileExistsError``.
   Fix: every RecBole module that imported it gets ``os.makedirs(path, exist_ok=True)``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import types
import warnings

import numpy as np

_APPLIED = False

# numpy aliases that RecBole 1.2.1 still uses; values are what numpy 1.x aliased them to.
_NUMPY_ALIASES = {
    "bool": bool,
    "int": int,
    "float": float,
    "complex": complex,
    "object": object,
    "str": str,
    "long": int,
    "unicode": str,
}


def numpy_aliases() -> None:
    """Define the numpy < 1.24 aliases RecBole relies on, without touching removed names."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, value in _NUMPY_ALIASES.items():
            try:
                getattr(np, name)
            except AttributeError:
                setattr(np, name, value)


def _compatibility_settings(self) -> None:  # replaces recbole Config.compatibility_settings
    numpy_aliases()


class _ModuleView(types.ModuleType):
    """A module as seen from one RecBole module: the same attributes, except those a subclass overrides."""

    def __init__(self, module):
        super().__init__(module.__name__)
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, name)


class _TorchLoadDefaultsToFullPickle(_ModuleView):
    """``torch`` as seen from ``recbole.trainer.trainer``: same module, but ``load``
    defaults to ``weights_only=False`` because RecBole's checkpoints pickle its Config."""

    def load(self, *args, **kwargs):
        kwargs.setdefault("weights_only", False)
        return self._module.load(*args, **kwargs)


class _RayUnavailable(types.ModuleType):
    """Stand-in for ``ray`` when it cannot be imported (not installed, or no ``pkg_resources``)."""

    __path__: list = []  # behave like a package so ``from ray import tune`` reaches __getattr__

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _RayTuneUnavailable()


class _RayTuneUnavailable:
    def __getattr__(self, name):
        raise ImportError(
            "ray.tune is unavailable: RecBole's hyper-parameter tuning needs ray<=2.6.3 (RecBole "
            "1.2.1's pin), which imports pkg_resources, removed in setuptools>=81. Install "
            "'ray<=2.6.3' and 'setuptools<81' in this environment to use it."
        )


def _ray_stand_in() -> None:
    if "ray" in sys.modules:
        return
    if importlib.util.find_spec("ray") is not None and importlib.util.find_spec("pkg_resources") is not None:
        return  # the real ray imports fine (installed, and pkg_resources is there for it)
    sys.modules["ray"] = _RayUnavailable("ray")
    sys.modules["ray.tune"] = _RayTuneUnavailable()  # type: ignore[assignment]


class _PandasSeqNaNSafe(_ModuleView):
    """``pandas`` as seen from ``recbole.data.dataset.dataset``: ``read_csv`` returns
    ``""`` instead of NaN in ``*:token_seq`` / ``*:float_seq`` columns (an empty sequence)."""

    def read_csv(self, *args, **kwargs):
        df = self._module.read_csv(*args, **kwargs)
        for col in list(kwargs.get("usecols") or []):
            if isinstance(col, str) and col.endswith("seq") and col in df.columns:
                df[col] = df[col].fillna("")
        return df


def _wrap_fill_nan(original):
    @functools.wraps(original)
    def _fill_nan(self):
        from recbole.utils import FeatureType

        for feat_name in self.feat_name_list:
            feat = getattr(self, feat_name)
            for field in list(feat.columns):
                ftype = self.field2type[field]
                if ftype == FeatureType.TOKEN:
                    feat[field] = feat[field].fillna(0)
                elif ftype == FeatureType.FLOAT:
                    feat[field] = feat[field].fillna(feat[field].mean())
        return original(self)

    _fill_nan.__recbole_mm_patched__ = True
    return _fill_nan


# modules that bound ``ensure_dir`` by name at import time
_ENSURE_DIR_USERS = (
    "recbole.utils.utils",
    "recbole.utils",
    "recbole.utils.logger",
    "recbole.data.utils",
    "recbole.data.dataset.dataset",
    "recbole.trainer.trainer",
)


def ensure_dir(dir_path) -> None:
    """RecBole's ``ensure_dir`` without the check-then-create race between processes."""
    os.makedirs(dir_path, exist_ok=True)


def apply() -> None:
    """Apply every fix once (idempotent)."""
    global _APPLIED
    if _APPLIED:
        return
    numpy_aliases()
    _ray_stand_in()

    import pandas as pd
    import torch
    import recbole.config.configurator as configurator
    import recbole.data.dataset.dataset as rb_dataset
    import recbole.trainer.trainer as rb_trainer

    configurator.Config.compatibility_settings = _compatibility_settings
    anomaly = torch.is_anomaly_enabled()
    import recbole.model.sequential_recommender.sine  # noqa: F401  (sets anomaly detection on)

    torch.autograd.set_detect_anomaly(anomaly)
    for name in _ENSURE_DIR_USERS:
        module = importlib.import_module(name)
        if hasattr(module, "ensure_dir"):
            module.ensure_dir = ensure_dir
    if not isinstance(rb_trainer.torch, _TorchLoadDefaultsToFullPickle):
        rb_trainer.torch = _TorchLoadDefaultsToFullPickle(torch)
    if not isinstance(rb_dataset.pd, _PandasSeqNaNSafe):
        rb_dataset.pd = _PandasSeqNaNSafe(pd)
    if not getattr(rb_dataset.Dataset._fill_nan, "__recbole_mm_patched__", False):
        rb_dataset.Dataset._fill_nan = _wrap_fill_nan(rb_dataset.Dataset._fill_nan)
    # RecBole's trainer builds torch.cuda.amp.GradScaler (deprecated): silence the warning.
    warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.GradScaler.*")
    # the chained inplace fillna calls are made harmless above; hide pandas' notice about them
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"recbole\.data\..*")
    warnings.filterwarnings("ignore", message=r"A value is trying to be set on a copy", module=r"recbole\.data\..*")
    _APPLIED = True
