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
    "TextSim": "textsim",  # the content baseline: cosine of item features to the last history item(s)
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


def atomic_write(path, data, *, fsync: bool = True) -> None:
    """Replace ``path`` by ``data`` atomically: readers see the old file or the new one, never a part.

    ``data``: ``bytes``, ``str`` (written as UTF-8, newlines as given) or a callable ``writer(f)``
    that writes to a binary file object (``torch.save``, ``fig.savefig``...).  The data goes to a
    temporary file in the same folder, named ``.<name>.tmp-<pid>-<random>`` (unique, so that
    concurrent processes writing the same path never share one; ``trainer.checkpoint.
    remove_stale_temps`` recognises the name), created with the umask's permissions (as
    ``open(path, "w")`` would), then ``os.replace``-d onto ``path``.  ``fsync``: the file's data,
    then the folder's entry, reach the disk before returning (a crash leaves the old or the new
    file).  On any error (the writer's too) the temporary file is removed and ``path`` is left as
    it was.  The folder is created when missing."""
    import os
    import secrets

    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 & ~umask
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if fsync:
        try:
            dfd = os.open(folder, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(dfd)
        except OSError:  # some file systems do not fsync folders
            pass
        finally:
            os.close(dfd)


def json_default(o):
    """``json.dump``'s ``default`` for our result files: tensors as lists, anything else as text."""
    if hasattr(o, "tolist") and type(o).__module__.startswith("torch"):
        return o.tolist()
    return str(o)


def write_json(obj, path, *, fsync: bool = True) -> None:
    """``obj`` as indented JSON (``indent=1``), written atomically (:func:`atomic_write`)."""
    import json

    atomic_write(path, json.dumps(obj, indent=1, default=json_default), fsync=fsync)
