"""Our trainer: RecBole's Trainer with safe checkpoints, exact resume and cached item tables.

Files written for a run named ``<base>`` in ``checkpoint_dir``:

* ``<base>.pth``: the best model so far (by ``valid_metric``; the latest epoch when there is no
  validation data), used for the test evaluation and for transfer (``-p``);
* ``<base>.resume.pth``: the state after the last complete epoch (model, optimizer, early
  stopping, every RNG): ``--resume`` continues from it and ends where an uninterrupted run ends;
* ``<base>-<epoch>.pth`` every ``save_step`` epochs when ``save_step`` is set (pre-training).

All are written atomically and hold tensors and plain data only.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from time import perf_counter

import torch
from recbole.trainer import Trainer
from recbole.utils import early_stopping, get_local_time, set_color
from torch.nn.utils import clip_grad_norm_
from tqdm import tqdm

from recbole_mm.config import config_to_plain, to_plain
from recbole_mm.trainer.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint


class MMTrainer(Trainer):
    def __init__(self, config, model, dataset=None, run_name: str | None = None):
        super().__init__(config, model)
        iid = config["ITEM_ID_FIELD"]
        self.item_tokens = [str(t) for t in dataset.field2id_token[iid]] if dataset is not None else None
        name = run_name or config["run_name"] or f"{config['model']}-{config['dataset']}-{get_local_time()}"
        base = os.path.join(self.checkpoint_dir, name)
        self.saved_model_file = base + ".pth"
        self.resume_file = base + ".resume.pth"
        self.result_file = base + ".json"
        self.save_step = config["save_step"] if config["run_stage"] == "pretrain" else None
        self.best_epoch = None
        self.history: list[dict] = []  # one entry per epoch: loss, seconds, validation
        self._train_loader = None

    # -- training -----------------------------------------------------------------------
    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        self.model.train()
        loss_func = loss_func or self.model.calculate_loss
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.enable_scaler)
        batches = (
            tqdm(train_data, total=len(train_data), ncols=100, desc=set_color(f"Train {epoch_idx:>5}", "pink"))
            if show_progress
            else train_data
        )
        total = None
        for interaction in batches:
            interaction = interaction.to(self.device)
            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type=self.device.type, enabled=self.enable_amp):
                losses = loss_func(interaction)
            if isinstance(losses, tuple):
                loss = sum(losses)
                parts = tuple(float(p.item()) for p in losses)
                total = parts if total is None else tuple(a + b for a, b in zip(total, parts))
            else:
                loss = losses
                total = float(loss.item()) if total is None else total + float(loss.item())
            self._check_nan(loss)
            scaler.scale(loss).backward()
            if self.clip_grad_norm:
                scaler.unscale_(self.optimizer)
                clip_grad_norm_(self.model.parameters(), **self.clip_grad_norm)
            scaler.step(self.optimizer)
            scaler.update()
        return total

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        self._train_loader = train_data
        self.eval_collector.data_collect(train_data)
        for epoch in range(self.start_epoch, self.epochs):
            if hasattr(self.model, "on_epoch_start"):
                self.model.on_epoch_start(epoch, train_data)
            t0 = perf_counter()
            loss = self._train_epoch(train_data, epoch, show_progress=show_progress)
            train_s = perf_counter() - t0
            record = {"epoch": epoch, "train_loss": sum(loss) if isinstance(loss, tuple) else loss, "train_seconds": train_s}
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
                if verbose:
                    self.logger.info(
                        set_color("epoch %d evaluating", "green") % epoch
                        + f" [time: {record['valid_seconds']:.2f}s, valid_score: {score:f}]"
                    )
                    self.logger.info(set_color("valid result", "blue") + ": " + _fmt(result))
                if improved:
                    self.best_valid_result, self.best_epoch = result, epoch
                    if saved:
                        self._save_checkpoint(epoch, verbose=verbose)
                if callback_fn:
                    callback_fn(epoch, score)
            elif valid_data is None and saved:
                self.best_epoch = epoch
                self._save_checkpoint(epoch, verbose=verbose)
            self.history.append(record)
            if saved and self.save_step and (epoch + 1) % int(self.save_step) == 0:
                self._save_checkpoint(epoch, verbose=verbose, saved_model_file=self._numbered_file(epoch + 1))
            if saved:
                self._save_resume_state(epoch)
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
            "epoch": epoch,
            "state_dict": self.model.state_dict(),
            "config": config_to_plain(self.config),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None,
            "metrics": to_plain({"valid": self.best_valid_result, "best_epoch": self.best_epoch}),
            "item_tokens": self.item_tokens,
        }

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        path = kwargs.pop("saved_model_file", self.saved_model_file)
        save_checkpoint(self._payload(epoch), path)
        if verbose:
            self.logger.info(set_color("Saving current", "blue") + f": {path}")

    def _save_resume_state(self, epoch):
        payload = self._payload(epoch)
        payload["trainer"] = {
            "cur_step": self.cur_step,
            "best_valid_score": float(self.best_valid_score),
            "history": to_plain(self.history),
            "saved_model_file": self.saved_model_file,
            "result_file": self.result_file,
        }
        generator = getattr(self._train_loader, "generator", None)
        payload["rng"] = capture_rng(generator)
        save_checkpoint(payload, self.resume_file)

    def resume_checkpoint(self, resume_file, train_data=None):
        """Continue the run that wrote ``resume_file`` (its ``.resume.pth`` or its best ``.pth``)."""
        resume_file = str(resume_file)
        if not resume_file.endswith(".resume.pth"):
            sibling = resume_file[: -len(".pth")] + ".resume.pth"
            if os.path.isfile(sibling):
                resume_file = sibling
        ckpt = load_checkpoint(resume_file, map_location=self.device)
        if "trainer" not in ckpt:
            raise ValueError(f"{resume_file}: holds no training state to resume from")
        if ckpt["model"] != self.config["model"]:
            raise ValueError(f"{resume_file}: written by {ckpt['model']}, cannot resume {self.config['model']}")
        self.model.load_state_dict(ckpt["state_dict"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        state = ckpt["trainer"]
        self.start_epoch = ckpt["epoch"] + 1
        self.cur_step = state["cur_step"]
        self.best_valid_score = state["best_valid_score"]
        self.best_valid_result = ckpt["metrics"]["valid"]
        self.best_epoch = ckpt["metrics"]["best_epoch"]
        self.history = list(state["history"])
        self.saved_model_file = state["saved_model_file"]
        self.resume_file = resume_file
        self.result_file = state["result_file"]
        generator = getattr(train_data, "generator", None)
        restore_rng(ckpt["rng"], generator)
        self.logger.info(f"Checkpoint loaded. Resume training from epoch {self.start_epoch}")

    # -- evaluation --------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if not eval_data:
            return None
        if load_best_model:
            path = model_file or self.saved_model_file
            self.model.load_state_dict(load_checkpoint(path, map_location=self.device)["state_dict"])
            self.logger.info(f"Loading model parameters from {path}")
        cache = getattr(self.model, "item_table_cache", None)
        with cache() if cache is not None else nullcontext():
            result = super().evaluate(eval_data, load_best_model=False, show_progress=show_progress)
        return {k: float(v) for k, v in result.items()}


def _fmt(result):
    return "    ".join(f"{k} : {v:.4f}" for k, v in result.items())

