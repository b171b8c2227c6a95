"""Shared helpers of the data pipeline: atomic outputs, dataset folders, errors, progress."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import uuid

from recbole_mm.data.readers import read_index_file, require_file
from recbole_mm.utils import pid_alive


class PipelineError(RuntimeError):
    """A pipeline step cannot go on; the message says which file/filter and why."""


def progress(iterable=None, **kw):
    """tqdm on stderr, disabled when stderr is not a terminal unless forced by the caller."""
    from tqdm.auto import tqdm

    kw.setdefault("file", sys.stderr)
    kw.setdefault("disable", None)  # None: only on a TTY
    kw.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kw)


def dataset_name(folder: str) -> str:
    """``OUT/<name>`` -> ``<name>`` (files are ``OUT/<name>/<name>.*``)."""
    return os.path.basename(os.path.normpath(folder))


def dataset_file(folder: str, suffix: str) -> str:
    return os.path.join(folder, f"{dataset_name(folder)}.{suffix}")


def read_items(folder: str) -> list[str]:
    """Raw item ids in index order (``<name>.item2index``), validated."""
    if not os.path.isdir(folder):
        raise PipelineError(f"{folder}: dataset folder not found")
    return read_index_file(require_file(dataset_file(folder, "item2index"), "item index (.item2index)"))


def remove_stale_partials(final: str, say=None) -> list[str]:
    """Remove the ``.<name>.partial-<pid>-*`` / ``.<name>.old-*`` folders that an interrupted
    (killed) run of the same output left next to ``final``, saying so; a folder whose process is
    still running is left alone.  Returns the removed paths."""
    say = say or (lambda msg: print(msg, file=sys.stderr))
    parent, name = os.path.dirname(os.path.abspath(final)), os.path.basename(os.path.normpath(final))
    removed = []
    for entry in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
        for kind in ("partial", "old"):
            head = f".{name}.{kind}-"
            if not entry.startswith(head):
                continue
            pid = entry[len(head):].split("-")[0]
            if kind == "partial" and pid.isdigit() and int(pid) != os.getpid() and pid_alive(int(pid)):
                continue  # another process is writing it now
            path = os.path.join(parent, entry)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            say(f"recbole-mm: removed {path}, left by an interrupted run of {name}")
    return removed


@contextlib.contextmanager
def staged_folder(final: str, overwrite: bool = False):
    """Yield a temporary sibling folder; on success it replaces ``final`` in one rename.

    On any error the temporary folder is removed and ``final`` is left as it was, so an output
    folder is never half-written.
    """
    final = os.path.abspath(final)
    parent = os.path.dirname(final)
    if os.path.exists(final) and not overwrite:
        raise PipelineError(f"{final}: already exists (use --overwrite to replace it)")
    os.makedirs(parent, exist_ok=True)
    remove_stale_partials(final)
    tmp = os.path.join(parent, f".{os.path.basename(final)}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        yield tmp
        old = None
        if os.path.exists(final):
            old = os.path.join(parent, f".{os.path.basename(final)}.old-{uuid.uuid4().hex[:8]}")
            os.rename(final, old)
        os.rename(tmp, final)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
