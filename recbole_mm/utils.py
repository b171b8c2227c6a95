"""Model / trainer lookup: recbole_mm first, then RecBole."""

from __future__ import annotations

import importlib
import importlib.util

import recbole.utils as rb_utils

# Our models: class name -> module under recbole_mm.model (one model per file).
_MODEL_MODULES = {
    "UniSRec": "unisrec",
    "MISSRec": "missrec",
    "PMMRec": "pmmrec",
    "Recformer": "recformer",
    "ReoLM": "reolm",
    "VQRec": "vqrec",
    "Popularity": "popularity",  # the baseline every model must beat (items by training count)
}


def _our_model(name: str):
    for cls_name, module in _MODEL_MODULES.items():
        if cls_name.lower() == name.lower():
            if importlib.util.find_spec(f"recbole_mm.model.{module}") is None:
                return None
            return getattr(importlib.import_module(f"recbole_mm.model.{module}"), cls_name)
    return None


def get_model(name: str):
    """Return the model class named ``name`` (case-insensitive: ``unisrec``, ``sasrec`` work too)."""
    cls = _our_model(name)
    if cls is not None:
        return cls
    # RecBole's sequential models (its get_model would also import exlib_recommender, which
    # needs lightgbm/xgboost, just to say that a name is unknown)
    module = f"recbole.model.sequential_recommender.{name.lower()}"
    if importlib.util.find_spec(module) is not None:
        # the class whose name matches case-insensitively ("sasrec" -> SASRec)
        found = importlib.import_module(module)
        for attr in dir(found):
            if attr.lower() == name.lower() and isinstance(getattr(found, attr), type):
                return rb_utils.get_model(attr)
        return rb_utils.get_model(name)
    known = sorted(_MODEL_MODULES)
    raise ValueError(
        f"unknown model '{name}': not a recbole_mm model ({', '.join(known)}) "
        f"nor a RecBole sequential model ({', '.join(recbole_sequential_models())})"
    )


def recbole_sequential_models() -> list[str]:
    """Names of RecBole's sequential models (its module names, case-insensitive for ``get_model``)."""
    import pkgutil

    import recbole.model.sequential_recommender as seq

    return sorted((m.name for m in pkgutil.iter_modules(seq.__path__)), key=str.lower)


def available_models() -> list[str]:
    return [n for n in _MODEL_MODULES if _our_model(n) is not None]


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (another user's counts as alive)."""
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
