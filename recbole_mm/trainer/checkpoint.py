"""Checkpoint I/O: tensors and plain data only, ``weights_only=True`` loading, atomic writes."""

from __future__ import annotations

import fcntl
import os
import random
import re

import numpy as np
import torch

from recbole_mm.errors import CheckpointError  # noqa: F401 - defined in errors.py, importable from here too
from recbole_mm.utils import atomic_write

FORMAT = "recbole_mm.checkpoint/1"


def save_checkpoint(payload: dict, path: str) -> None:
    """Write ``payload`` to ``path`` atomically (:func:`recbole_mm.utils.atomic_write`: a
    ``.<name>.tmp-*`` file in the same folder, fsynced, then renamed; see remove_stale_temps)."""
    atomic_write(path, lambda f: torch.save(dict(payload, format=FORMAT), f))


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Load one of our checkpoints with ``torch.load(weights_only=True)``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: empty file, not a recbole_mm checkpoint (a run killed while writing it?)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickled objects, truncated files, ...
        why = " ".join(str(e).split())[:160]  # one line
        raise CheckpointError(
            f"{path}: not a recbole_mm checkpoint loadable with weights_only=True ({type(e).__name__}: {why})"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not a recbole_mm checkpoint (expected format {FORMAT!r})")
    return ckpt


def run_base(resume_file: str) -> str:
    """``saved/x.resume.pth`` or ``saved/x.pth`` -> ``saved/x``: the run a file belongs to."""
    for suffix in (".resume.pth", ".pth"):
        if resume_file.endswith(suffix):
            return resume_file[: -len(suffix)]
    return resume_file


def remove_stale_temps(base: str) -> list[str]:
    """Remove the temporary files (``.<run>.pth.tmp-*``, ``.<run>.resume.pth.tmp-*``,
    ``.<run>.json.tmp-*``, ``.<run>-<n>.pth.tmp-*``) that a killed run named ``base`` left in its
    folder.  Call it while holding the run's :class:`RunLock`: no other process writes them then.
    Returns the removed paths."""
    folder, name = os.path.split(base)
    pattern = re.compile(rf"^\.{re.escape(name)}(-\d+)?\.(pth|resume\.pth|json)\.tmp-")
    removed = []
    for entry in sorted(os.listdir(folder or ".")) if os.path.isdir(folder or ".") else []:
        if pattern.match(entry):
            path = os.path.join(folder, entry)
            try:
                os.unlink(path)
                removed.append(path)
            except OSError:
                pass
    return removed


class RunNameInUse(CheckpointError):
    """Another live process holds the run's lock."""


class RunLock:
    """Ownership of a run name: an exclusive ``flock`` on ``<checkpoint_dir>/<run>.lock`` for the
    whole run.  A second process with the same name (same ``run_name`` and ``checkpoint_dir``)
    is refused while the first runs; the lock dies with its process (``kill -9`` included), so a
    killed run never blocks the next one.  The file is removed on release."""

    def __init__(self, base: str):
        self.base, self.path, self.fd = base, base + ".lock", None

    def acquire(self) -> "RunLock":
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 64).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise RunNameInUse(
                    f"{self.base}: run name in use by another running process (pid {owner}); two runs with the "
                    "same run_name and checkpoint_dir would overwrite each other's checkpoints: choose another "
                    "--run_name or wait for it to finish"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a file its previous owner removed after we opened it
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)  # releases the flock
        self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def capture_rng(generator: torch.Generator | None = None) -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": _to_lists(random.getstate()),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if generator is not None:
        state["loader"] = generator.get_state()
    return state


def restore_rng(state: dict, generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate(_to_tuples(state["python"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "loader" in state:
        generator.set_state(state["loader"])


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x
