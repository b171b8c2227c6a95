"""Our trainer: RecBole's Trainer with safe checkpoints, exact resume and cached item tables.

Files written for a run named ``<base>`` in ``checkpoint_dir``:

* ``<base>.pth``: the best model so far (by ``valid_metric``; the latest epoch when there is no
  validation data), used for the test evaluation and for transfer (``-p``);
* ``<base>.resume.pth``: the state after the last complete epoch (model, optimizer, early
  stopping, every RNG): ``--resume`` continues from it and ends where an uninterrupted run ends;
* ``<base>-<epoch>.pth`` every ``save_step`` epochs when ``save_step`` is set (pre-training).

All are written atomically and hold tensors and plain data only.

Distributed (``recbole_mm.distributed``; torchrun or ``--nproc``), the same code path: the
training forward goes through ``DistributedDataParallel`` (gradients averaged over ranks),
each rank's loss is scaled so that the average is the global batch's gradient, the model's
``on_epoch_start`` hook (MISSRec's k-means) runs on rank 0 and its buffers are broadcast,
evaluation runs on rank 0 and its result is broadcast, rank 0 writes checkpoints and logs
(with every rank's RNG state in ``.resume.pth``) and the others wait at a barrier.
"""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager, nullcontext
from time import perf_counter

import recbole.trainer.trainer as recbole_trainer
import torch
from recbole.trainer import Trainer
from recbole.utils import early_stopping, get_local_time, set_color
from torch.nn.utils import clip_grad_norm_
from tqdm import tqdm

from recbole_mm import distributed
from recbole_mm.config import config_to_plain, to_plain
from recbole_mm.model.abstract import epoch_hook
from recbole_mm.trainer.checkpoint import (
    CheckpointError,
    capture_rng,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)

# config keys a resume may change: they do not alter what was trained so far (the length of
# training, evaluation batching, where files are, devices and processes, logging); any other
# changed key is refused (check_resume_checkpoint)
RESUME_FREE_KEYS = frozenset({
    "epochs", "stopping_step", "eval_step", "eval_batch_size", "show_progress", "state", "checkpoint_dir",
    "data_path", "data_root", "use_gpu", "gpu_id", "device", "local_rank", "world_size", "single_spec", "nproc",
    "offset", "ip", "port", "log_wandb", "wandb_project", "dist_timeout", "run_name", "save_step", "worker",
    "ddp_find_unused_parameters", "tensorboard",
})


def check_resume_checkpoint(resume_file: str, config) -> tuple[str, dict]:
    """The training state to resume (``<run>.resume.pth``, also found from ``<run>.pth``), checked
    before anything is built: our checkpoint, a training state, the same model, the same config
    up to :data:`RESUME_FREE_KEYS`, and its best model (if written) from the same run.  Returns
    ``(resume file, checkpoint)``; anything else is one :class:`CheckpointError`."""
    resume_file = str(resume_file)
    if not resume_file.endswith(".resume.pth") and resume_file.endswith(".pth"):
        sibling = resume_file[: -len(".pth")] + ".resume.pth"
        if os.path.isfile(sibling):
            resume_file = sibling
    ckpt = load_checkpoint(resume_file)
    if "trainer" not in ckpt:
        raise CheckpointError(f"{resume_file}: holds no training state to resume from (expected <run>.resume.pth)")
    if ckpt["model"] != config["model"]:
        raise CheckpointError(f"{resume_file}: written by {ckpt['model']}, cannot resume {config['model']}")
    old, new = ckpt.get("config") or {}, config_to_plain(config)
    changed = [k for k in new if k in old and k not in RESUME_FREE_KEYS and new[k] != old[k]]
    if changed:
        diffs = ", ".join(f"{k}: {old[k]!r} -> {new[k]!r}" for k in changed[:4]) + (" ..." if len(changed) > 4 else "")
        raise CheckpointError(
            f"{resume_file}: --resume continues the same run, but {len(changed)} config key(s) changed ({diffs}); "
            f"its optimizer and state follow the old values: drop the changes or start a new run "
            f"(keys a resume may change: epochs, stopping_step, eval_step, eval_batch_size, paths, devices, logging)"
        )
    best = resolve_run_file(resume_file, ckpt["trainer"]["saved_model_file"])
    if os.path.isfile(best):
        check_same_run(best, load_checkpoint(best), ckpt.get("run_id"))
    return resume_file, ckpt


def resolve_run_file(resume_file: str, recorded: str) -> str:
    """A file of the run recorded in its resume state (``saved/<run>.pth``, relative to wherever
    the run started) -> the same file next to the resume file."""
    return os.path.join(os.path.dirname(resume_file), os.path.basename(recorded))


def check_same_run(path: str, ckpt: dict, run_id: str | None) -> None:
    if run_id is not None and ckpt.get("run_id") != run_id:
        raise CheckpointError(
            f"{path}: written by another run (run id {ckpt.get('run_id')}, expected {run_id}): "
            f"the best model of this run was replaced or is missing"
        )


class MMTrainer(Trainer):
    def __init__(self, config, model, dataset=None, run_name: str | None = None):
        with nullcontext() if distributed.is_main() else _no_tensorboard():
            super().__init__(config, model)
        iid = config["ITEM_ID_FIELD"]
        self.item_tokens = [str(t) for t in dataset.field2id_token[iid]] if dataset is not None else None
        name = run_name or config["run_name"] or f"{config['model']}-{config['dataset']}-{get_local_time()}"
        name = distributed.broadcast_object(name)  # rank 0's (the time differs between ranks)
        base = os.path.join(self.checkpoint_dir, name)
        self.saved_model_file = base + ".pth"
        self.resume_file = base + ".resume.pth"
        self.result_file = base + ".json"
        self.save_step = config["save_step"] if config["run_stage"] == "pretrain" else None
        self.best_epoch = None
        self.global_step = 0  # optimiser steps so far
        self.best_step = None
        self.min_steps = int(config["stopping_min_steps"] or 0)
        self.run_id = distributed.broadcast_object(uuid.uuid4().hex)  # in every checkpoint of this run
        self.history: list[dict] = []  # one entry per epoch: loss, seconds, validation
        self._train_loader = None
        self.lr_schedule = config["lr_schedule"] or None
        if self.lr_schedule not in (None, "linear_warmup"):
            raise ValueError(f"lr_schedule must be ~ or linear_warmup, got {self.lr_schedule!r}")
        self.warmup_steps = int(config["warmup_steps"] or 0)
        self.ddp = distributed.wrap_model(  # None in a single process
            model, self.device, find_unused_parameters=config["ddp_find_unused_parameters"] is not False)

    # -- training -----------------------------------------------------------------------
    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        """One epoch; returns the sum over batches of the (global) batch loss."""
        (self.ddp or self.model).train()
        loss_func = loss_func or self.ddp or self.model.calculate_loss
        world = distributed.world_size()
        sampler = getattr(train_data, "batch_sampler", None)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.enable_scaler)
        limit = int(self.config["steps_per_epoch"] or 0)  # 0: the whole data
        n_steps = min(len(train_data), limit) if limit > 0 else len(train_data)
        batches = (
            tqdm(train_data, total=n_steps, ncols=100, desc=set_color(f"Train {epoch_idx:>5}", "pink"))
            if show_progress
            else train_data
        )
        total = None
        for step, interaction in enumerate(batches):
            if step >= n_steps:
                break
            interaction = interaction.to(self.device)
            # this rank's share of the global batch: its loss (a mean over its rows) weighs
            # local/global rows of the global mean; x world as DDP averages the gradients
            share = 1.0
            if world > 1:
                n_global = sampler.global_size(step) if hasattr(sampler, "global_size") else len(interaction) * world
                share = len(interaction) / n_global
            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type=self.device.type, enabled=self.enable_amp):
                losses = loss_func(interaction)
            if isinstance(losses, tuple):
                loss = sum(losses)
                parts = tuple(share * float(p.item()) for p in losses)
                total = parts if total is None else tuple(a + b for a, b in zip(total, parts))
            else:
                loss = losses
                total = share * float(loss.item()) if total is None else total + share * float(loss.item())
            self._check_nan(loss)
            if world > 1:
                loss = loss * (share * world)
            scaler.scale(loss).backward()
            if self.lr_schedule:  # a function of the global step: a resumed run follows the same schedule
                self._schedule_lr(epoch_idx * n_steps + step + 1, n_steps * self.epochs)
            if self.clip_grad_norm:
                scaler.unscale_(self.optimizer)
                clip_grad_norm_(self.model.parameters(), **self.clip_grad_norm)
            scaler.step(self.optimizer)
            scaler.update()
            self.global_step += 1
        return distributed.all_reduce_sum(total)  # the global batches' losses

    def _schedule_lr(self, step: int, total: int) -> None:
        """``lr_schedule: linear_warmup`` (Recformer's / ROMA's ``get_linear_schedule_with_warmup``):
        update ``step`` (1-based) uses ``lr * step / warmup_steps`` during the warm-up, then
        ``lr * max(0, 1 - step / total)``."""
        w = self.warmup_steps
        factor = step / max(1, w) if step < w else max(0.0, 1.0 - step / max(1, total))
        for group in self.optimizer.param_groups:
            group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        self._train_loader = train_data
        self.eval_collector.data_collect(train_data)
        sampler = getattr(train_data, "batch_sampler", None)
        for epoch in range(self.start_epoch, self.epochs):
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            hook_s = None
            hook = epoch_hook(self.model)  # the model's on_epoch_start, e.g. MISSRec's interest clustering
            if hook is not None:
                th = perf_counter()
                if distributed.is_main():  # once, on rank 0; what it computed goes to every rank
                    hook(epoch, train_data)
                distributed.broadcast_buffers(self.model)
                hook_s = perf_counter() - th
            t0 = perf_counter()
            loss = self._train_epoch(train_data, epoch, show_progress=show_progress)
            train_s = perf_counter() - t0
            record = {"epoch": epoch, "train_loss": sum(loss) if isinstance(loss, tuple) else loss, "train_seconds": train_s,
                      "steps": self.global_step}
            if hook_s is not None:
                record["epoch_start_seconds"] = hook_s
                if verbose:
                    self.logger.info(f"epoch {epoch} start hook [time: {hook_s:.2f}s]")
            if verbose:
                self.logger.info(self._generate_train_loss_output(epoch, t0, t0 + train_s, loss))
            stop = False
            if valid_data is not None and self.eval_step > 0 and (epoch + 1) % self.eval_step == 0:
                t1 = perf_counter()
                score, result = self._valid_epoch(valid_data, show_progress=show_progress)
                record.update(valid_seconds=perf_counter() - t1, valid_score=float(score), valid=result)
                self.best_valid_score, self.cur_step, stop, improved = early_stopping(
                    score, self.best_valid_score, self.cur_step, max_step=self.stopping_step, bigger=self.valid_metric_bigger
                )
                # stopping_min_steps: the run goes on (patience still counted) until that many steps
                stop = stop and self.global_step >= self.min_steps
                if verbose:
                    self.logger.info(
                        set_color("epoch %d evaluating", "green") % epoch
                        + f" [time: {record['valid_seconds']:.2f}s, valid_score: {score:f}]"
                    )
                    self.logger.info(set_color("valid result", "blue") + ": " + _fmt(result))
                if improved:
                    self.best_valid_result, self.best_epoch, self.best_step = result, epoch, self.global_step
                    if saved:
                        self._save_checkpoint(epoch, verbose=verbose)
                if callback_fn:
                    callback_fn(epoch, score)
            elif valid_data is None and saved:
                self.best_epoch, self.best_step = epoch, self.global_step
                self._save_checkpoint(epoch, verbose=verbose)
            self.history.append(record)
            if saved and self.save_step and (epoch + 1) % int(self.save_step) == 0:
                self._save_checkpoint(epoch, verbose=verbose, saved_model_file=self._numbered_file(epoch + 1))
            if saved:
                self._save_resume_state(epoch, stopped=bool(stop))
            distributed.barrier()  # rank 0 has written this epoch's checkpoints
            if stop:
                if verbose:
                    self.logger.info(f"Finished training, best eval result in epoch {self.best_epoch}")
                break
        return self.best_valid_score, self.best_valid_result

    def _numbered_file(self, n):
        return self.saved_model_file[: -len(".pth")] + f"-{n}.pth"

    # -- checkpoints -----------------------------------------------------------------
    def _payload(self, epoch):
        return {
            "model": self.config["model"],
            "dataset": self.config["dataset"],
            "run_id": self.run_id,
            "epoch": epoch,
            "state_dict": self.model.state_dict(),
            "config": config_to_plain(self.config),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None,
            "metrics": to_plain({"valid": self.best_valid_result, "best_epoch": self.best_epoch,
                                 "best_step": self.best_step}),
            "item_tokens": self.item_tokens,
            # modalities no item had (text-only data): a transfer leaves their weights fresh
            "untrained_modalities": getattr(self.model, "untrained_modalities", list)(),
        }

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        if not distributed.is_main():
            return
        path = kwargs.pop("saved_model_file", self.saved_model_file)
        save_checkpoint(self._payload(epoch), path)
        if verbose:
            self.logger.info(set_color("Saving current", "blue") + f": {path}")

    def _save_resume_state(self, epoch, stopped=False):
        generator = getattr(self._train_loader, "generator", None)
        rngs = distributed.gather_objects(capture_rng(generator))  # every rank's (collective)
        if not distributed.is_main():
            return
        payload = self._payload(epoch)
        payload["trainer"] = {
            "cur_step": self.cur_step,
            "global_step": self.global_step,
            "stopped": stopped,  # early stopping ended the run here: a resume trains no further
            "best_valid_score": float(self.best_valid_score),
            "history": to_plain(self.history),
            "saved_model_file": self.saved_model_file,
            "result_file": self.result_file,
        }
        payload["rng"] = rngs[0]
        if len(rngs) > 1:
            payload["rng_ranks"] = rngs
        save_checkpoint(payload, self.resume_file)

    def resume_checkpoint(self, resume_file, train_data=None):
        """Continue the run that wrote ``resume_file`` (its ``.resume.pth`` or its best ``.pth``)."""
        resume_file, ckpt = check_resume_checkpoint(resume_file, self.config)
        self.model.load_state_dict(ckpt["state_dict"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        state = ckpt["trainer"]
        self.start_epoch = ckpt["epoch"] + 1
        self.cur_step = state["cur_step"]
        self.best_valid_score = state["best_valid_score"]
        self.best_valid_result = ckpt["metrics"]["valid"]
        self.best_epoch = ckpt["metrics"]["best_epoch"]
        self.best_step = ckpt["metrics"].get("best_step")
        self.global_step = int(state.get("global_step", 0))
        self.history = list(state["history"])
        self.saved_model_file = resolve_run_file(resume_file, state["saved_model_file"])
        self.resume_file = resume_file
        self.result_file = resolve_run_file(resume_file, state["result_file"])
        self.run_id = ckpt.get("run_id")  # None: written before run ids, not checked
        generator = getattr(train_data, "generator", None)
        world, rank = distributed.world_size(), distributed.rank()
        per_rank = ckpt.get("rng_ranks") or [ckpt["rng"]]
        if len(per_rank) == world:
            restore_rng(per_rank[rank], generator)
        else:  # another world size: same data order everywhere, fresh per-rank random streams
            restore_rng(ckpt["rng"], generator)
            if rank:
                torch.manual_seed(int(self.config["seed"]) + 7919 * rank + self.start_epoch)
            self.logger.warning(f"{resume_file}: written by {len(per_rank)} process(es), resumed by {world}: "
                                "the data order is kept, random draws (dropout) differ from an uninterrupted run")
        if state.get("stopped", False):
            self.start_epoch = max(self.start_epoch, self.epochs)
            self.logger.info(f"{resume_file}: the run stopped early after epoch {ckpt['epoch']} "
                             f"(best epoch {self.best_epoch}); nothing left to train")
            return
        self.logger.info(f"Checkpoint loaded. Resume training from epoch {self.start_epoch}")

    # -- evaluation --------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        """Metrics on ``eval_data``; distributed: computed on rank 0 (all of the data, RecBole's
        evaluator) and broadcast, so that every rank returns the same result."""
        if not eval_data:
            return None
        result = self._evaluate(eval_data, load_best_model, model_file, show_progress) if distributed.is_main() else None
        return distributed.broadcast_object(result)

    def _evaluate(self, eval_data, load_best_model, model_file, show_progress):
        if load_best_model:
            path = model_file or self.saved_model_file
            ckpt = load_checkpoint(path, map_location=self.device)
            if model_file is None:  # this run's own best model
                check_same_run(path, ckpt, self.run_id)
            self.model.load_state_dict(ckpt["state_dict"])
            self.logger.info(f"Loading model parameters from {path}")
        cache = getattr(self.model, "item_table_cache", None)
        with cache() if cache is not None else nullcontext():
            result = super().evaluate(eval_data, load_best_model=False, show_progress=show_progress)
        return {k: float(v) for k, v in result.items()}


@contextmanager
def _no_tensorboard():
    """RecBole's Trainer opens a TensorBoard writer (a log_tensorboard/ folder) on creation:
    ranks other than 0 get one that writes nothing."""
    real = recbole_trainer.get_tensorboard
    recbole_trainer.get_tensorboard = lambda logger: _NullWriter()
    try:
        yield
    finally:
        recbole_trainer.get_tensorboard = real


class _NullWriter:
    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def _fmt(result):
    return "    ".join(f"{k} : {v:.4f}" for k, v in result.items())

