"""``run(...)``: config -> validated dataset -> model -> trainer -> evaluator -> result file.

Used by both command-line entry points and by the tests.  The dataset is loaded and
validated before anything is written (no log file, no checkpoint folder), so a bad input
fails with its one-line error and leaves nothing behind.

Launched distributed (torchrun or ``--nproc``: ``WORLD_SIZE > 1`` in the environment) every
rank runs this same function inside the process group (``recbole_mm.distributed``); rank 0
writes the log file, checkpoints and the result JSON, every rank returns the same result.
"""

from __future__ import annotations

import logging
import os
import resource
from logging import getLogger
from time import perf_counter

from recbole.utils import get_local_time, init_logger, init_seed

from recbole_mm import distributed
from recbole_mm.config import Config, config_to_plain
from recbole_mm.data import create_dataset, data_preparation
from recbole_mm.model.abstract import check_pretrained_checkpoint, model_stages, transfer
from recbole_mm.trainer import MMTrainer, load_checkpoint
from recbole_mm.trainer.checkpoint import RunLock, remove_stale_temps, run_base
from recbole_mm.trainer.trainer import check_resume_checkpoint
from recbole_mm.utils import get_model, write_json

MODES = ("inductive", "transductive")


class UsageError(ValueError):
    """A combination of model, stage and options that cannot run (reported without a traceback)."""


def build_config(model, dataset, stage="finetune", mode=None, config_files=None, config_dict=None, overrides=None,
                 strict_config=False):
    try:
        model_class = get_model(model) if isinstance(model, str) else model
    except ValueError as e:  # an unknown name: the message lists the known ones
        raise UsageError(str(e)) from None
    config_dict = dict(config_dict or {})
    stages = model_stages(model_class)  # the model contract (RecBole's S3Rec: pretrain / finetune)
    if mode is not None:
        if mode not in MODES:
            raise UsageError(f"--mode must be one of {MODES}, got '{mode}'")
        if any(s.endswith("_ft") for s in stages):  # a feature-based model: --mode picks its fine-tuning stage
            config_dict["train_stage"] = f"{mode}_ft"
        elif mode == "inductive":
            raise UsageError(
                f"{model_class.__name__} is an ID-based RecBole model: it has no inductive (feature-only) mode; "
                "ID models have one mode (their item IDs), so --mode can be dropped"
            )
    if stage == "pretrain" and "pretrain" in stages:
        config_dict.setdefault("train_stage", "pretrain")
    config = Config(model_class, dataset, stage, config_files, config_dict, overrides, strict_keys=strict_config)
    if config["model"] == "S3Rec" and config["train_stage"] == "finetune" and not config["pre_model_path"]:
        raise UsageError(
            "S3Rec fine-tuning needs --pre_model_path=<checkpoint> from "
            "'run_pretrain.py -m S3Rec -d <dataset>'"
        )
    return config


def run(
    model,
    dataset,
    stage="finetune",
    mode=None,
    pretrained=None,
    resume=None,
    config_files=None,
    config_dict=None,
    overrides=None,
    saved=True,
    strict_config=False,
):
    """Train and evaluate one model; returns the result dict (also written as JSON).

    Every check that can fail runs before anything is written (dataset, ``topk``, the ``-p``
    checkpoint's model and feature sizes, the ``--resume`` state and its config); the run then
    owns its name (:class:`RunLock`) until it returns."""
    t_start = perf_counter()
    config = build_config(model, dataset, stage, mode, config_files, config_dict, overrides, strict_config)
    world = distributed.env_world_size()
    if world > 1 and int(config["train_batch_size"]) % world:
        raise UsageError(
            f"train_batch_size={config['train_batch_size']} is the global batch: it must be divisible by "
            f"the number of processes ({world}); each process takes train_batch_size / {world}"
        )
    with distributed.process_group(config):
        return _run(config, stage, mode, pretrained, resume, saved, t_start)


def _run(config, stage, mode, pretrained, resume, saved, t_start):
    init_seed(config["seed"], config["reproducibility"])
    ds = create_dataset(config)  # validates every input file; writes nothing
    check_topk(config, ds)
    pretrained_state, untrained = None, []
    if pretrained:
        ckpt = load_checkpoint(pretrained)
        check_pretrained_checkpoint(ckpt, get_model(config["model"]), config, pretrained)
        pretrained_state = ckpt["state_dict"]
        untrained = ckpt.get("untrained_modalities") or []  # text-only pre-training: image side stays fresh
        del ckpt
    if resume:
        resume, _ = check_resume_checkpoint(resume, config)
        base = run_base(resume)
    else:
        name = config["run_name"] or f"{config['model']}-{config['dataset']}-{get_local_time()}"
        base = os.path.join(config["checkpoint_dir"], distributed.broadcast_object(name))  # rank 0's time
    lock = RunLock(base) if saved and distributed.is_main() else None
    if lock is not None:
        lock.acquire()  # refused while another process runs under the same name
    try:
        return _train(config, ds, stage, mode, pretrained, pretrained_state, untrained, resume, saved, t_start, base)
    finally:
        if lock is not None:
            lock.release()


def check_topk(config, ds) -> None:
    """``topk`` must fit the catalogue (RecBole fails after the first epoch otherwise)."""
    n_items = ds.item_num - 1  # without padding
    too_big = [k for k in config["topk"] if k > n_items]
    if too_big:
        raise UsageError(f"topk {config['topk']}: {too_big[0]} is larger than the catalogue of {config['dataset']} "
                         f"({n_items} items); every topk must be <= {n_items}")


def _train(config, ds, stage, mode, pretrained, pretrained_state, untrained, resume, saved, t_start, base):
    _reset_root_logger()  # so repeated runs in one process each get their own log file
    if distributed.is_main():
        init_logger(config)
    else:
        distributed.setup_rank_logging()  # no log file; warnings and errors to stderr
    logger = getLogger()
    if saved and distributed.is_main():
        for path in remove_stale_temps(base):
            logger.warning(f"removed {path}: a temporary file left by an interrupted run of {os.path.basename(base)}")
    logger.info(config)
    logger.info(ds)
    train_data, valid_data, test_data = data_preparation(config, ds)
    init_seed(config["seed"] + distributed.rank(), config["reproducibility"])  # own random draws per rank
    net = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    if pretrained_state is not None:
        transfer(net, pretrained_state, untrained)  # ours: load_pretrained (+ fix_enc); RecBole's: the same checks
        logger.info(f"pre-trained weights from {pretrained}")
    logger.info(net)
    trainer = MMTrainer(config, net, ds, run_name=os.path.basename(base))
    if resume:
        trainer.resume_checkpoint(resume, train_data)

    show = bool(config["show_progress"]) and distributed.is_main()  # one progress bar per job
    trained = int(config["epochs"]) > 0
    if trained:
        trainer.fit(train_data, valid_data, saved=saved, show_progress=show)
    else:  # epochs=0: evaluate the weights as they are (zero-shot after -p, or an untrained control)
        logger.info("epochs=0: no training; evaluating the " + ("pre-trained" if pretrained_state else "initial")
                    + " weights")
        trainer.best_valid_result = trainer.evaluate(valid_data, load_best_model=False) if valid_data else None
        if saved:
            trainer._save_checkpoint(-1, verbose=False)
    t_eval = perf_counter()
    test_result = trainer.evaluate(test_data, load_best_model=saved and trained, show_progress=show) if test_data else None
    eval_seconds = perf_counter() - t_eval

    context = history_context(net, test_data) if test_data is not None else None
    train_secs = [h["train_seconds"] for h in trainer.history]
    result = {
        "model": config["model"],
        "dataset": config["dataset"],
        "stage": stage,
        "mode": mode,
        "checkpoint": trainer.saved_model_file if saved else None,
        "pretrained": pretrained,
        "best_epoch": trainer.best_epoch,
        "steps": trainer.global_step,
        "best_step": trainer.best_step,
        "train_fraction": getattr(ds, "train_fraction_info", None),
        "valid": trainer.best_valid_result,
        "test": test_result,
        "timings": {
            "train_seconds_per_epoch": train_secs,
            "mean_train_seconds_per_epoch": sum(train_secs) / len(train_secs) if train_secs else None,
            "valid_seconds_per_epoch": [h.get("valid_seconds") for h in trainer.history],
            "test_seconds": eval_seconds,
            "total_seconds": perf_counter() - t_start,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        },
        "params": {
            "total": sum(p.numel() for p in net.parameters()),
            "trainable": sum(p.numel() for p in net.parameters() if p.requires_grad),
        },
        "history": trainer.history,
        "config": config_to_plain(config),
    }
    if context is not None:
        result["context"] = context
    if saved:
        if distributed.is_main():
            write_json(result, trainer.result_file)
        result["result_file"] = trainer.result_file
    table = metrics_table(result["valid"], result["test"])
    logger.info("\n" + table)
    return result


def history_context(model, data) -> dict | None:
    """For a model that reads a bounded context (``history_items_seen``: Recformer, ReoLM): the mean
    number of history items its sequence holds per user of ``data`` next to the users' mean history
    length (RecBole's list, at most ``MAX_ITEM_LIST_LENGTH``); None for the other models."""
    if not hasattr(model, "history_items_seen"):
        return None
    seen, total, n = 0.0, 0.0, 0
    for batch in data:
        inter = batch[0] if isinstance(batch, tuple) else batch
        seq_len = inter[model.ITEM_SEQ_LEN].to(model.device)
        seen += float(model.history_items_seen(inter[model.ITEM_SEQ].to(model.device), seq_len).sum())
        total += float(seq_len.sum())
        n += seq_len.numel()
    return {"history_items_seen": round(seen / n, 2) if n else None,
            "history_items": round(total / n, 2) if n else None, "users": n,
            "max_items": getattr(model, "max_items", None), "max_tokens": getattr(model, "max_tokens", None)}


def _reset_root_logger():
    root = logging.getLogger()
    for handler in root.handlers[:]:
        root.removeHandler(handler)
        handler.close()


def metrics_table(valid: dict | None, test: dict | None) -> str:
    keys = list((valid or test or {}).keys())
    rows = [f"{'metric':<12}{'valid':>10}{'test':>10}"]
    for k in keys:
        v = f"{valid[k]:.4f}" if valid and k in valid else "-"
        t = f"{test[k]:.4f}" if test and k in test else "-"
        rows.append(f"{k:<12}{v:>10}{t:>10}")
    return "\n".join(rows)


