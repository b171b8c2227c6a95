"""Distributed (multi-process, multi-machine) training on ``torch.distributed``.

One code path: a job started by ``torchrun`` (or by ``run_pretrain.py --nproc N``, which is
``torchrun --standalone --nproc_per_node N`` run for you through ``torch.distributed.elastic``)
finds ``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT`` in its
environment; ``quick_start.run`` then opens the process group (``env://``; NCCL when the
run's device is CUDA, one GPU per local rank; gloo on CPU) and :class:`MMTrainer` wraps the
model in ``DistributedDataParallel``.  Without those variables (or with ``WORLD_SIZE=1``)
everything here is a no-op and a run is the plain single-process run.

Semantics kept equal to a single process with the same ``train_batch_size``:

* ``train_batch_size`` is the *global* batch.  The global batches are drawn exactly as a
  single process draws them (RecBole's seeded shuffle, identical on every rank) and rank ``r``
  takes every ``world_size``-th sample of each (:class:`GlobalBatchSampler`), so the per-rank
  batch is ``global / world_size`` (it must divide; a last global batch smaller than the world
  size is skipped, so no rank gets an empty batch).
* In-batch contrastive losses see the whole global batch: :func:`gather_in_batch` gathers
  every rank's keys with a gradient-preserving all-gather (backward: sum over ranks, own rows).
* The trainer multiplies each rank's loss (a mean over its rows) by
  ``world_size * local_rows / global_rows``: DDP's gradient *average* is then exactly the
  gradient of the global batch's mean loss.

Faults: the elastic agent (torchrun / ``--nproc``) watches the local workers and ends the job,
non-zero, when one exits or dies, reporting the failing rank's error; ``dist_timeout`` (a
config key, seconds) bounds how long a collective waits for a peer that is gone (another
machine).
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

DEFAULT_TIMEOUT_S = 1800
FAILURE_GRACE_S = 2.0  # a failing rank waits this long before it exits (see process_group)

_gather_group = None  # process group of the in-batch gathers (apart from DDP's gradient all-reduces)


# --------------------------------------------------------------------------------------
# Environment and ranks


def env_world_size() -> int:
    """World size announced by the launcher (``WORLD_SIZE``); 1 when not launched distributed."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def env_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0) if env_world_size() > 1 else 0


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


# --------------------------------------------------------------------------------------
# Process group


def init_process_group(config) -> bool:
    """Open the process group when the launcher asked for one (``WORLD_SIZE > 1``).

    Backend: NCCL when ``config["device"]`` is CUDA (``cuda:LOCAL_RANK``), gloo otherwise.
    ``dist_timeout`` (seconds, default 1800) bounds every collective.  Returns whether a
    group was opened here.
    """
    global _gather_group
    if env_world_size() <= 1 or dist.is_initialized():
        return False
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise RuntimeError(f"WORLD_SIZE={env_world_size()} but {key} is not set: launch with torchrun "
                               "or run_pretrain.py --nproc N (see docs/distributed.md)")
    device = torch.device(config["device"])
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=float(config["dist_timeout"] or DEFAULT_TIMEOUT_S))
    dist.init_process_group(backend, init_method="env://", timeout=timeout)
    _gather_group = dist.new_group(backend=backend, timeout=timeout)
    return True


def teardown() -> None:
    global _gather_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _gather_group = None


@contextmanager
def process_group(config):
    """Open the process group for the block (if launched distributed) and close it after a
    clean exit.  After an error the group is left alone (waiting on peers could hang): the
    process exits and the launcher stops the other ranks.  The error leaves the block only
    after ``FAILURE_GRACE_S``: when a rank fails, the others fail too in their next
    collective ("connection reset by peer"); the grace lets the launcher observe the rank
    that failed first (and stop the others) so it reports that rank's error as the cause."""
    opened = init_process_group(config)
    try:
        yield
    except Exception:
        if opened:
            time.sleep(FAILURE_GRACE_S)
        raise
    if opened:
        barrier()
        teardown()


def setup_rank_logging() -> None:
    """Ranks other than 0 write no log file: warnings and errors only, to stderr, prefixed."""
    root = logging.getLogger()
    for handler in root.handlers[:]:
        root.removeHandler(handler)
        handler.close()
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"[rank {rank()}] %(asctime)s %(levelname)s %(message)s", "%d %b %H:%M"))
    root.addHandler(handler)
    root.setLevel(logging.WARNING)


# --------------------------------------------------------------------------------------
# Collectives (no-ops in a single process)


def _device_ids():
    return [torch.cuda.current_device()] if dist.get_backend() == "nccl" else None


def barrier() -> None:
    if is_distributed():
        dist.barrier(device_ids=_device_ids())


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (picklable data)."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj) -> list | None:
    """Every rank's ``obj`` (rank order) on rank 0; ``None`` elsewhere; ``[obj]`` in a single process."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_reduce_sum(values):
    """Sum over ranks of a float or a tuple of floats."""
    if not is_distributed() or values is None:
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flat = torch.tensor(values if isinstance(values, tuple) else [values], dtype=torch.float64, device=device)
    dist.all_reduce(flat)
    out = tuple(float(v) for v in flat.tolist())
    return out if isinstance(values, tuple) else out[0]


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Give every rank rank ``src``'s persistent buffers (e.g. what a model's ``on_epoch_start``
    hook computed on rank 0 only); shapes may change (a buffer is replaced, not copied into)."""
    if not is_distributed():
        return
    payload = None
    if rank() == src:
        state = module.state_dict()
        payload = {n: state[n].detach().cpu() for n, _ in module.named_buffers() if n in state}
    payload = broadcast_object(payload, src)
    if rank() == src:
        return
    for name, value in payload.items():
        owner_path, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        setattr(owner, leaf, value.to(getattr(owner, leaf).device))


# --------------------------------------------------------------------------------------
# In-batch negatives across ranks


class InBatch(NamedTuple):
    """Where this rank's rows sit in the gathered (global) batch."""

    offset: int  # index of this rank's first row
    local: int  # this rank's rows
    total: int  # rows of the global batch


class _AllGather(torch.autograd.Function):
    """All-gather of ``[n_r, ...]`` rows (``n_r`` may differ by rank), concatenated in rank
    order.  Backward: each rank's loss gives a gradient for every gathered row; they are summed
    over ranks (all-reduce) and each rank keeps its own rows, so every rank's graph receives
    the gradient of all the losses that used its rows."""

    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.sizes, ctx.group, ctx.rank = sizes, group, dist.get_rank(group)
        x = x.contiguous()
        pad = max(sizes) - x.size(0)
        if pad:
            x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
        parts = [torch.empty_like(x) for _ in sizes]
        dist.all_gather(parts, x, group=group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None


def gather_in_batch(*tensors: torch.Tensor, enabled: bool = True) -> tuple[list[torch.Tensor], InBatch]:
    """Every rank's rows of each ``[n, ...]`` tensor, concatenated in rank order: the global
    batch, for in-batch contrastive negatives.  Gradients flow back to the rank that computed
    each row.  One all-gather per dtype (plus one for the row counts).  Returns the tensors
    and this rank's :class:`InBatch` placement; identity (offset 0) in a single process or
    with ``enabled=False`` (config ``gather_negatives: False``: per-rank negatives only).
    """
    n = tensors[0].size(0)
    if not enabled or not is_distributed():
        return list(tensors), InBatch(0, n, n)
    group = _gather_group
    count = torch.tensor([n], dtype=torch.long, device=tensors[0].device)
    counts = [torch.empty_like(count) for _ in range(dist.get_world_size(group))]
    dist.all_gather(counts, count, group=group)
    sizes = [int(c) for c in counts]
    me = dist.get_rank(group)
    out: list[torch.Tensor | None] = [None] * len(tensors)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        if t.size(0) != n:
            raise ValueError(f"gather_in_batch: all tensors need {n} rows, got {t.size(0)}")
        by_dtype.setdefault(t.dtype, []).append(i)
    for idx in by_dtype.values():
        flat = [tensors[i].reshape(n, -1) for i in idx]
        widths = [f.size(1) for f in flat]
        gathered = _AllGather.apply(torch.cat(flat, dim=1) if len(flat) > 1 else flat[0], sizes, group)
        for i, part in zip(idx, gathered.split(widths, dim=1)):
            out[i] = part.reshape(-1, *tensors[i].shape[1:])
    return out, InBatch(sum(sizes[:me]), n, sum(sizes))


def global_mean_weights(counts, rows: int) -> tuple[list[float], list[float]]:
    """Weights for losses that average over other units than the batch's rows (tokens,
    anchors): ``(weights, global_counts)``, one per entry of ``counts`` (this rank's units).

    The trainer weighs each rank's loss by its share ``rows / global rows`` of the global batch
    (a mean over rows).  ``weights[i] * (this rank's sum over its count_i units)`` is, in that
    weighting, the global batch's mean over all ranks' units:
    ``weights[i] = global rows / (rows * global count_i)``; 0 where no rank has a unit.  In a
    single process: ``1 / count_i``.  Every rank must call it (one all-reduce)."""
    local = tuple(float(c) for c in counts) + (float(rows),)
    total = all_reduce_sum(local)
    *count_g, rows_g = total
    scale = rows_g / float(rows) if rows else 0.0
    return [scale / c if c > 0 else 0.0 for c in count_g], count_g


# --------------------------------------------------------------------------------------
# Global batches


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Batch sampler of one rank's share of each global batch.

    The global batches are those of ``BatchSampler(sampler, batch_size)`` in a single process
    (``sampler``: RecBole's shuffle, a ``RandomSampler`` on the loader's generator seeded by
    ``seed``, so every rank draws the same order, and ``--resume`` restores it); rank ``r``
    takes samples ``r, r + W, r + 2W, ...`` of each, ``batch_size / W`` of them.  A last
    global batch with fewer than ``W`` samples is skipped (no rank may get an empty batch);
    with ``W = 1`` the batches are exactly the single-process ones.  ``set_epoch`` is called
    by the trainer before every epoch, as for ``DistributedSampler``.
    """

    def __init__(self, sampler, batch_size: int, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(
                f"train_batch_size={batch_size} is the global batch and must be divisible by the "
                f"world size {world_size} (per-rank batch = global / world_size)"
            )
        self.sampler, self.batch_size, self.rank, self.world_size = sampler, int(batch_size), rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        for batch in torch.utils.data.BatchSampler(self.sampler, self.batch_size, drop_last=False):
            if len(batch) < self.world_size:
                return
            yield batch[self.rank :: self.world_size]

    def __len__(self) -> int:
        full, rest = divmod(len(self.sampler), self.batch_size)
        return full + (1 if rest >= self.world_size else 0)

    def global_size(self, step: int) -> int:
        """Samples in global batch ``step`` (all ranks together)."""
        return min(self.batch_size, len(self.sampler) - step * self.batch_size)


# --------------------------------------------------------------------------------------
# Model wrapper


class LossForward(nn.Module):
    """``forward(interaction) = model.calculate_loss(interaction)``: what DDP wraps, so the
    training forward runs through ``DistributedDataParallel.__call__`` (its gradient hooks)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, interaction):
        return self.model.calculate_loss(interaction)


def wrap_model(model: nn.Module, device, find_unused_parameters: bool = True) -> nn.Module | None:
    """``DistributedDataParallel(LossForward(model))``, or ``None`` in a single process.

    Buffers are not re-broadcast at every forward (the feature tables are large and loaded
    from data on every rank; buffers a model changes are broadcast by the trainer).
    ``find_unused_parameters`` (config ``ddp_find_unused_parameters``, default True): a model
    may leave parameters out of a loss (MISSRec's fusion scalar with one modality); DDP then
    finds them at every step (their gradient stays None, as in one process).  False saves
    that graph traversal for models that use every parameter in every step."""
    if not is_distributed():
        return None
    device = torch.device(device)
    kwargs = {"device_ids": [device.index if device.index is not None else torch.cuda.current_device()]} if device.type == "cuda" else {}
    params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    kwargs["forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"] = False
    return nn.parallel.DistributedDataParallel(LossForward(model), find_unused_parameters=find_unused_parameters, **kwargs)


# --------------------------------------------------------------------------------------
# Launcher (``--nproc``)


def launch(nproc: int, module: str, args: list[str]) -> int:
    """Run ``python -m module *args`` in ``nproc`` processes on this machine under the
    ``torch.distributed.elastic`` agent, as ``torchrun --standalone --nproc_per_node nproc
    --max_restarts 0 -m module *args`` does.  The agent watches the workers: when one exits
    with an error or dies, it stops the others and this prints the failed rank's error and
    returns non-zero.  Returns the job's exit status."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if env_world_size() > 1:
        raise RuntimeError("--nproc inside an already distributed job (WORLD_SIZE is set): use one launcher")
    ns = torchrun.parse_args(["--standalone", f"--nproc_per_node={nproc}", "--max_restarts=0", "-m", module, *args])
    try:
        torchrun.run(ns)
    except ChildFailedError as e:
        print(e.format_msg(), file=sys.stderr, flush=True)
        code = e.get_first_failure()[1].exitcode
        return code if code > 0 else 1  # the failed rank's status (2: a usage or data error), 1 for a signal
    except SignalException as e:
        print(f"recbole-mm: stopped by {e.sigval.name}", file=sys.stderr, flush=True)
        return 128 + int(e.sigval)
    return 0
