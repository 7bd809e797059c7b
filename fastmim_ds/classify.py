"""The wiring that fine-tuning and linear probing share: a classifier run from its folder to its best top-1.

:func:`start_run` sets a run up (distributed init, config checks, classes, seeding, the model, the run folder with
``config.yaml`` and ``log.txt``); the task then builds what is its own (optimizer, DeepSpeed engine, step function,
evaluation) and hands it to :func:`train_and_evaluate`, which builds the loaders, resumes, trains with
:func:`~fastmim_ds.engine.fit`, evaluates top-1/top-5 every ``train.eval_every`` epochs (and after the last),
tracks the best top-1, writes ``metrics.jsonl`` and the log, and prints the task's one-line summary.
Used by :mod:`fastmim_ds.finetune` (MAE ``main_finetune.py``) and :mod:`fastmim_ds.linprobe` (``main_linprobe.py``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch.nn as nn

from .checkpoint import CKPT_SUBDIR, find_resume, load, read_client_state
from .config import ClassifierCfg, FinetuneCfg, LinprobeCfg, Resolved, dump_yaml, to_dict
from .data import dataset_info, labeled_indices, train_loader, val_loader
from .engine import LoopState, StepFn, fit
from .metrics import MetricsWriter
from .models.classifier import LoadReport
from .runtime import Dist, Preemption, git_sha, init_distributed, make_run_dir, seed_everything, setup_logging
from .trackers import build_trackers
from .validate import check_resume_compatible

logger = logging.getLogger(__name__)

__all__ = ["ClassifierRun", "start_run", "train_and_evaluate"]

ClassifyCfg = FinetuneCfg | LinprobeCfg


@dataclass(frozen=True)
class ClassifierRun:
    """What :func:`start_run` set up for one rank."""

    dist: Dist
    derived: Resolved  # effective batch, lr
    classes: list[str]  # class names from the train set's classes.json ([] if absent)
    num_classes: int  # model.num_classes, or len(classes) when that is 0
    model: nn.Module
    report: LoadReport  # what the pre-trained load transferred
    name: str  # encoder name: model.name, else the pre-training run's model.encoder
    dir: Path  # the run folder; checkpoints go to dir / CKPT_SUBDIR


def start_run(
    cfg: ClassifyCfg,
    *,
    task: str,
    check: Callable[[ClassifyCfg, int], Resolved],
    create_model: Callable[..., tuple[nn.Module, LoadReport]],
    resume: str | None,
) -> ClassifierRun:
    """Initialises the ranks, checks ``cfg``, seeds, builds the model and opens the run folder.

    Args:
        cfg: the whole task config (``config.yaml`` and the resume check need it all).
        task: names the default run folder ``<task>-<encoder>-<img_size>``.
        check: ``check(cfg, world_size)`` validates and returns the derived values (``check_finetune``,
            ``check_linprobe``).
        create_model: ``create_model(cfg.model, num_classes=, img_size=) -> (model, LoadReport)``
            (``create_classifier``, ``create_probe``); called after seeding with ``train.seed + rank``.
        resume: ``--resume`` (a run folder, tag or ``auto``), or None.

    Raises:
        ConfigError: from ``check``.
        ValueError: from ``create_model``.
    """
    dist = init_distributed()
    derived = check(cfg, dist.world_size)
    classes = dataset_info(cfg.data.train).classes
    num_classes = cfg.model.num_classes or len(classes)
    seed_everything(cfg.train.seed + dist.rank)
    model, report = create_model(cfg.model, num_classes=num_classes, img_size=cfg.data.img_size)
    name = _encoder_name(cfg.model, report)
    run_dir = make_run_dir(cfg.train.output_dir, cfg.train.run_name, f"{task}-{name}-{cfg.data.img_size}",
                           resume=resume)
    if dist.is_main:
        (run_dir / CKPT_SUBDIR).mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_yaml(cfg, derived))
    setup_logging(dist.rank, run_dir / "log.txt" if dist.is_main else None)
    return ClassifierRun(dist=dist, derived=derived, classes=classes, num_classes=num_classes, model=model,
                         report=report, name=name, dir=run_dir)


def _encoder_name(model: ClassifierCfg, report: LoadReport) -> str:
    return model.name or report.pretrain_config.get("model", {}).get("encoder", "")  # create_classifier's rule


def train_and_evaluate(
    cfg: ClassifyCfg,
    run: ClassifierRun,
    *,
    engine,
    scheduler,
    step_fn: StepFn,
    evaluate_fn: Callable[[object], dict],
    summary: str,
    client_extra: dict | None = None,
    log: logging.Logger = logger,
    resume: str | None,
) -> dict:
    """Trains ``engine`` for ``train.epochs`` and evaluates it; resumes from ``run.dir`` when asked.

    Evaluation runs after every ``train.eval_every``-th epoch and the last; each writes a ``metrics.jsonl`` row
    (``epoch_end``, ``train_loss``, ``val_top1``, ``val_top5`` (%), ``val_loss``, ``best_top1``, ``img_per_s``,
    ``data_wait_s``, ``data_wait_frac``) and one log line; an epoch without evaluation writes its training fields.
    Checkpoints hold ``config``, ``classes``, ``git_sha``, ``client_extra``, ``pretrain_config``, ``model_name``,
    ``num_classes`` and ``best`` (``{"top1", "top5", "epoch"}``, epoch 0-based) besides the loop state.

    Args:
        engine: the DeepSpeed engine around ``run.model``.
        scheduler: the per-iteration lr schedule (timm scheduler, stepped by :func:`~fastmim_ds.engine.fit`).
        step_fn: ``step_fn(engine, images (B, 3, H, W), labels (B,)) -> {"loss", "logits" (B, K)}``.
        evaluate_fn: ``evaluate_fn(val_loader) -> {"top1", "top5", "loss", "images"}``, the same on every rank
            (:func:`~fastmim_ds.engine.evaluate`).
        summary: the line rank 0 prints at the end, a ``str.format`` template with fields ``top1``, ``top5``,
            ``best_top1`` (%), ``best_epoch`` (1-based) and ``run_dir``.
        client_extra: more checkpoint client-state keys (the linear probe's ``task``).
        log: the logger of the evaluation lines (the task's, so ``log.txt`` names the task's module).
        resume: as :func:`start_run`.

    Returns:
        ``{"top1": last, "top5": last, "best_top1", "run_dir"}``; after a preemption ``top1``/``top5`` are None
        and ``"preempted": True`` is added.

    Raises:
        ConfigError: the checkpoint to resume was trained with another model.
    """
    dist, ckpt_dir = run.dist, run.dir / CKPT_SUBDIR
    subset = labeled_indices(cfg.data)
    if subset is not None:
        log.info("labelled subset: %d images of %s (labels_fraction %g, labels_per_class %d, seed %d)", len(subset),
                 cfg.data.train, cfg.data.labels_fraction, cfg.data.labels_per_class, cfg.data.labels_seed)
    train = train_loader(cfg.data, batch_size=cfg.train.micro_batch, seed=cfg.train.seed, device=dist.device,
                         world_size=dist.world_size, indices=subset)
    val = val_loader(cfg.data, batch_size=cfg.train.micro_batch, device=dist.device, rank=dist.rank,
                     world_size=dist.world_size)
    updates = len(train) // cfg.train.grad_accum
    if cfg.train.max_steps_per_epoch:
        updates = min(updates, cfg.train.max_steps_per_epoch)

    state, best = LoopState(), {"top1": -1.0, "epoch": -1}
    found = find_resume(ckpt_dir, resume)
    if found:
        check_resume_compatible(cfg, read_client_state(found[0] / found[1]).get("config", {}), found[0] / found[1],
                                world_size=dist.world_size)
        client = load(engine, *found)
        state, best = LoopState.from_client(client), client.get("best", best)
    metrics = MetricsWriter(run.dir / "metrics.jsonl", enabled=dist.is_main, monitor=engine.monitor,
                            trackers=build_trackers(cfg.train, run.dir, config=to_dict(cfg), enabled=dist.is_main))
    ev: dict = {}

    def end_epoch(epoch: int, stats: dict) -> None:
        nonlocal ev
        wait = dict(data_wait_s=stats["data_wait_s"], data_wait_frac=stats["data_wait_frac"])
        if epoch + 1 == cfg.train.epochs or (epoch + 1) % cfg.train.eval_every == 0:
            ev = evaluate_fn(val)
            if ev["top1"] > best["top1"]:
                best.update(top1=ev["top1"], top5=ev["top5"], epoch=epoch)
            metrics.write(epoch_end=epoch, train_loss=stats["loss"], val_top1=ev["top1"], val_top5=ev["top5"],
                          val_loss=ev["loss"], best_top1=best["top1"], img_per_s=stats["img_per_s"], **wait)
            log.info("epoch %d/%d | train loss %.4f | val top-1 %.2f top-5 %.2f (%d images) | best %.2f @%d | "
                     "waited for data %.1f s (%.1f%%)", epoch + 1, cfg.train.epochs, stats["loss"], ev["top1"],
                     ev["top5"], ev["images"], best["top1"], best["epoch"] + 1, stats["data_wait_s"],
                     100 * stats["data_wait_frac"])
        else:  # no evaluation this epoch: the training side of the row still goes to metrics.jsonl and the log
            metrics.write(epoch_end=epoch, train_loss=stats["loss"], img_per_s=stats["img_per_s"], **wait)
            log.info("epoch %d/%d | train loss %.4f | %.1f img/s | waited for data %.1f s (%.1f%%)", epoch + 1,
                     cfg.train.epochs, stats["loss"], stats["img_per_s"], stats["data_wait_s"],
                     100 * stats["data_wait_frac"])

    client = {"config": to_dict(cfg), "classes": run.classes,
              "class_names": dataset_info(cfg.data.train).class_names, "git_sha": git_sha(), **(client_extra or {}),
              "pretrain_config": run.report.pretrain_config, "model_name": run.name, "num_classes": run.num_classes}
    try:
        stats = fit(
            engine, state=state, epochs=cfg.train.epochs, begin_epoch=lambda epoch: (train, updates),
            step_fn=step_fn, scheduler=scheduler, train=cfg.train, ckpt_dir=ckpt_dir,
            client_state=lambda: {**client, "best": dict(best)}, metrics=metrics, show_progress=dist.is_main,
            stop_requested=Preemption(dist.device).requested, end_epoch=end_epoch,
            last_checkpoint=found[0] / found[1] if found else None,
        )
    finally:
        metrics.close()
    if stats["preempted"]:
        return {"top1": None, "top5": None, "best_top1": best["top1"], "run_dir": str(run.dir), "preempted": True}
    if not ev:  # resumed from a checkpoint of the last epoch: nothing trained, report the model as it is
        ev = evaluate_fn(val)
    result = {"top1": ev.get("top1"), "top5": ev.get("top5"), "best_top1": best["top1"], "run_dir": str(run.dir)}
    if dist.is_main:
        print(summary.format(top1=result["top1"], top5=result["top5"], best_top1=best["top1"],
                             best_epoch=best["epoch"] + 1, run_dir=run.dir), flush=True)
    return result
