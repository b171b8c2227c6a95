"""``recbole-mm import-checkpoint REF.pth OUT.pth``: a RUCAIBox/UniSRec pre-trained file
(e.g. the released ``UniSRec-FHCKM-300.pth``) converted to our checkpoint format, without
executing anything from it.

The reference saves ``{'config': <RecBole Config>, 'epoch', 'state_dict', 'optimizer'}`` with
``torch.save``: its pickle names the RecBole ``Config`` class (and, inside the config's state,
RecBole enums, ``torch.device``, a YAML loader class and the reference's model class), so
``torch.load(weights_only=True)`` refuses it and a plain ``torch.load`` would run whatever
the pickle names.  Here the file's ``data.pkl`` goes through a restricted unpickler:

* tensors are rebuilt by our own functions from the raw storages of the zip archive
  (``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter`` and the ``torch.*Storage``
  types are the only torch names admitted, each mapped to our code);
* ``collections.OrderedDict`` is admitted;
* the ``Config`` class (RecBole's or the reference's ``config.Config`` subclass) and the few
  classes its state names (:data:`INERT`) become :class:`Inert` stand-ins that only record
  their name, arguments and state; nothing of theirs is imported or called;
* any other global (``os.system``, ``builtins.eval``, ...) stops the load with an error
  naming it, before anything from the file runs.

The state dict's names are mapped to ours (:data:`KEY_MAP`; UniSRec keeps the reference's
module names, so the map is the identity for every transferable weight), the frozen PLM
feature table (``plm_embedding.weight``, data, not weights) is left out, and the result is
written atomically with :func:`recbole_mm.trainer.checkpoint.save_checkpoint` (loadable with
``weights_only=True``; use it with ``-p``).
"""

from __future__ import annotations

import collections
import io
import pickle
import re
import sys
import zipfile

import torch

from recbole_mm.trainer.checkpoint import save_checkpoint

STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}

# classes a reference Config's state names: recorded, never imported or called
CONFIG_CLASSES = {("recbole.config.configurator", "Config"), ("recbole.config", "Config"), ("config", "Config")}
INERT = CONFIG_CLASSES | {
    ("torch", "device"),
    ("yaml.loader", "FullLoader"), ("yaml.loader", "Loader"), ("yaml.loader", "SafeLoader"),
    ("recbole.utils.enum_type", "ModelType"), ("recbole.utils.enum_type", "InputType"),
    ("recbole.utils.enum_type", "EvaluatorType"), ("recbole.utils.enum_type", "FeatureType"),
    ("recbole.utils.enum_type", "FeatureSource"), ("recbole.utils.enum_type", "KGDataLoaderState"),
    ("unisrec", "UniSRec"),
}

# reference state-dict names -> ours (regular expressions, first match wins); None: left out
KEY_MAP = [
    (r"^(position_embedding\.weight)$", r"\1"),
    (r"^(trm_encoder\.layer\.\d+\.(multi_head_attention|feed_forward)\..+)$", r"\1"),
    (r"^(LayerNorm\.(weight|bias))$", r"\1"),
    (r"^(moe_adaptor\.(w_gate|w_noise|experts\.\d+\.(bias|lin\.weight)))$", r"\1"),
    (r"^(item_embedding\.weight)$", r"\1"),
    (r"^plm_embedding\.weight$", None),  # the frozen feature table: data, read from the dataset here
]


class ImportRefused(ValueError):
    """The file is not a reference checkpoint this command can read safely."""


class Inert:
    """Stand-in for an admitted class: records what the pickle would have built, runs nothing."""

    def __init__(self, name: str, args=(), kwargs=None):
        self.name, self.args, self.kwargs, self.state = name, tuple(args), dict(kwargs or {}), None

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"{self.name}{self.args!r}" if self.args else self.name


def _inert_class(name: str):
    """A callable (class position in the pickle: ``NEWOBJ``/``REDUCE``) making :class:`Inert`."""

    class _Named(Inert):
        def __new__(cls, *args, **kwargs):
            obj = object.__new__(cls)
            Inert.__init__(obj, name, args, kwargs)
            return obj

        def __init__(self, *args, **kwargs):
            pass

    _Named.__name__ = _Named.__qualname__ = name.rsplit(".", 1)[-1]
    return _Named


def _rebuild_tensor(storage, offset, size, stride, *_ignored):
    return storage.as_strided(tuple(size), tuple(stride), int(offset)).clone()


def _rebuild_parameter(data, requires_grad, *_ignored):
    return data


class _StorageType:
    def __init__(self, dtype):
        self.dtype = dtype


SAFE_TORCH = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch", name): _StorageType(dtype) for name, dtype in STORAGE_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, storages):
        super().__init__(io.BytesIO(data))
        self._storages = storages

    def find_class(self, module, name):
        if (module, name) in SAFE_TORCH:
            return SAFE_TORCH[(module, name)]
        if (module, name) in INERT:
            return _inert_class(f"{module}.{name}")
        raise ImportRefused(f"the pickle references {module}.{name}, which is not admitted (not loaded, nothing run)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise ImportRefused(f"unexpected persistent id {pid!r:.80}")
        return self._storages(str(pid[2]), pid[1].dtype)


def read_reference(path: str) -> dict:
    """The unpickled reference payload (tensors rebuilt, Config as :class:`Inert`)."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ImportRefused(f"not a torch zip checkpoint ({e})") from None
    with archive:
        names = archive.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise ImportRefused("no data.pkl in the archive (not a torch.save file)")
        prefix = pkl[: -len("data.pkl")]

        cache = {}

        def storage(key, dtype):
            if (key, dtype) not in cache:
                raw = archive.read(f"{prefix}data/{key}")
                empty = torch.empty(0, dtype=dtype)
                cache[key, dtype] = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else empty
            return cache[key, dtype]

        try:
            payload = _RestrictedUnpickler(archive.read(pkl), storage).load()
        except ImportRefused:
            raise
        except Exception as e:  # noqa: BLE001 - a malformed pickle: one line
            raise ImportRefused(f"cannot read its pickle ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("state_dict"), dict):
        raise ImportRefused("no 'state_dict' dict in the payload (not a reference UniSRec checkpoint)")
    return payload


def map_state_dict(state: dict) -> dict:
    """The reference's names mapped to ours (:data:`KEY_MAP`); an unknown name is an error."""
    out = {}
    for key, value in state.items():
        rule = next(((pat, rep) for pat, rep in KEY_MAP if re.match(pat, key)), None)
        if rule is None:
            raise ImportRefused(f"state_dict key {key!r} is not a UniSRec weight this command knows")
        if rule[1] is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise ImportRefused(f"state_dict[{key!r}] is a {type(value).__name__}, not a tensor")
        out[re.sub(rule[0], rule[1], key)] = value
    return out


def _plain(x):
    """JSON-like data only (our checkpoints load with ``weights_only=True``)."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    return repr(x)


def reference_config(payload: dict) -> dict:
    """The reference Config's final settings as plain data (``{}`` when absent)."""
    cfg = payload.get("config")
    state = cfg.state if isinstance(cfg, Inert) else cfg
    if isinstance(state, dict):
        state = state.get("final_config_dict", state)
    return _plain(state) if isinstance(state, dict) else {}


def import_checkpoint(src: str, dst: str) -> dict:
    """Convert ``src`` (reference UniSRec checkpoint) to our checkpoint ``dst``; returns the payload."""
    payload = read_reference(src)
    config = reference_config(payload)
    ours = {
        "model": "UniSRec",
        "dataset": str(config.get("dataset", "")),
        "epoch": payload.get("epoch") if isinstance(payload.get("epoch"), int) else None,
        "state_dict": map_state_dict(payload["state_dict"]),
        "config": {"reference_config": config},
        "imported_from": {"file": src, "code": "RUCAIBox/UniSRec"},
    }
    save_checkpoint(ours, dst)
    return ours


def register(sub) -> None:
    p = sub.add_parser("import-checkpoint", description=__doc__,
                       help="convert a RUCAIBox/UniSRec pre-trained .pth to a recbole_mm checkpoint (nothing in it is "
                            "executed)")
    p.add_argument("reference", metavar="REF.pth", help="the reference's checkpoint (e.g. UniSRec-FHCKM-300.pth)")
    p.add_argument("out", metavar="OUT.pth", help="our checkpoint to write (use it with -p)")
    p.set_defaults(func=_main)


def _main(args) -> int:
    try:
        ours = import_checkpoint(args.reference, args.out)
    except (ImportRefused, OSError) as e:
        print(f"recbole-mm import-checkpoint: error: {args.reference}: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {len(ours['state_dict'])} UniSRec tensors from {args.reference} "
          f"(epoch {ours['epoch']}, dataset {ours['dataset'] or '?'})")
    return 0
