"""Fine-tuning with top-1/top-5 evaluation on a DeepSpeed engine, and the classifier loop it shares with the linear
probe.

Recipe (FastMIM/MAE ``main_finetune.py``, docs/methods.md section 2): AdamW (0.9, 0.999), layer-wise lr decay, drop
path, timm Mixup/CutMix with label smoothing (SoftTargetCrossEntropy), RandomErasing, per-iteration warmup +
cosine, evaluation every ``train.eval_every`` epochs. Best and last top-1 go to ``metrics.jsonl`` and the log.

:class:`ClassifierLoop` is a classifier run's epochs (loaders, resume, evaluation, best top-1);
:class:`FinetuneLoop` adds fine-tuning's own step (Mixup/CutMix, RandomErasing, its loss); the linear probe
(:mod:`fastmim_ds.linprobe`) has its own subclass.

Launch: ``deepspeed --num_gpus 8 --module fastmim_ds finetune --config configs/....yaml --pretrained <run>``.
"""
from __future__ import annotations

import logging

import torch
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from .checks import check_finetune
from .config import FinetuneCfg, LinprobeCfg, to_dict
from .data import dataset_info, labeled_indices, train_loader, val_loader
from .ds_engine import build_ds_config, create_engine
from .loop import Loop, LoopState, evaluate
from .models.classifier import LoadReport, create_classifier
from .optim import build_optimizer, build_scheduler
from .run import Run, open_metrics, start_run
from .runtime import Preemption, git_sha
from .weights import classifier_arch, pretrain_config_of

logger = logging.getLogger(__name__)

__all__ = ["ClassifierLoop", "FinetuneLoop", "start_classifier_run", "main"]

ClassifierTaskCfg = FinetuneCfg | LinprobeCfg


def start_classifier_run(cfg: ClassifierTaskCfg, *, task: str, check, resume: str | None,
                         zero_stage: int | None = None) -> tuple[Run, str, int]:
    """:func:`~fastmim_ds.run.start_run` for a classifier task; returns (run, model name, number of classes).

    The run folder is ``<task>-<model name>-<img_size>``: ``model.name``, or the pre-trained encoder's
    (:func:`~fastmim_ds.weights.classifier_arch`, read without loading any weights).

    Raises:
        ConfigError: from ``check`` or the resume check.
    """
    name = classifier_arch({"name": cfg.model.name}, pretrain_config_of(cfg.model.pretrained))[0]
    run = start_run(cfg, check=check, default_name=f"{task}-{name}-{cfg.data.img_size}", resume=resume,
                    zero_stage=zero_stage)
    return run, name, cfg.model.num_classes or len(dataset_info(cfg.data.train).classes)


class ClassifierLoop(Loop):
    """A classifier run's epochs: the train loader (a seeded labelled subset when ``data.labels_*`` ask for one),
    top-1/top-5 on ``data.val`` after every ``train.eval_every``-th epoch and the last, the best top-1.

    Each evaluation writes a ``metrics.jsonl`` row (``epoch_end``, ``train_loss``, ``val_top1``, ``val_top5`` (%),
    ``val_loss``, ``best_top1``, ``img_per_s``, ``data_wait_s``, ``data_wait_frac``) and one log line; an epoch
    without evaluation writes its training fields. Checkpoints hold ``config``, ``classes``, ``class_names``,
    ``git_sha``, ``pretrain_config``, ``model_name``, ``num_classes``, ``best`` (``{"top1", "top5", "epoch"}``,
    epoch 0-based) and ``client_extra`` besides the loop state.

    Subclasses define :meth:`step` (``{"loss", "logits" (B, K)}``) and may replace :meth:`evaluate_val`.

    Args:
        cfg: the task config.
        run: from :func:`start_classifier_run`.
        engine: the DeepSpeed engine around the classifier.
        scheduler: the per-iteration lr schedule (timm scheduler in epochs).
        report: what the pre-trained load transferred (its ``pretrain_config`` goes into checkpoints).
        model_name, num_classes: as :func:`start_classifier_run` returned them.
        client_extra: more checkpoint keys (the linear probe's ``task``).
    """

    def __init__(self, cfg: ClassifierTaskCfg, run: Run, engine, *, scheduler, report: LoadReport, model_name: str,
                 num_classes: int, client_extra: dict | None = None):
        dist = run.dist
        client = run.load(engine)
        super().__init__(engine, state=LoopState.from_client(client), scheduler=scheduler, train=cfg.train,
                         ckpt_dir=run.ckpt_dir, metrics=open_metrics(cfg, run, engine), show_progress=dist.is_main,
                         stop_requested=Preemption(dist.device).requested, last_checkpoint=run.resume_tag)
        self.cfg, self.run_ = cfg, run
        self.best = client.get("best", {"top1": -1.0, "epoch": -1})
        self.last_eval: dict = {}
        subset = labeled_indices(cfg.data)
        if subset is not None:
            logger.info("labelled subset: %d images of %s (labels_fraction %g, labels_per_class %d, seed %d)",
                        len(subset), cfg.data.train, cfg.data.labels_fraction, cfg.data.labels_per_class,
                        cfg.data.labels_seed)
        self.train_loader = train_loader(cfg.data, batch_size=cfg.train.micro_batch, seed=cfg.train.seed,
                                         device=dist.device, world_size=dist.world_size, indices=subset)
        self.val_loader = val_loader(cfg.data, batch_size=cfg.train.micro_batch, device=dist.device, rank=dist.rank,
                                     world_size=dist.world_size)
        self.updates = len(self.train_loader) // cfg.train.grad_accum
        if cfg.train.max_steps_per_epoch:
            self.updates = min(self.updates, cfg.train.max_steps_per_epoch)
        info = dataset_info(cfg.data.train)
        self.client = {"config": to_dict(cfg), "classes": info.classes, "class_names": info.class_names,
                       "git_sha": git_sha(), **(client_extra or {}),
                       "pretrain_config": report.pretrain_config, "model_name": model_name, "num_classes": num_classes}

    def begin_epoch(self, epoch: int) -> tuple[object, int]:
        return self.train_loader, self.updates

    def evaluate_val(self) -> dict:
        """``{"top1", "top5", "loss", "images"}`` on the val set, the same on every rank."""
        dtype = next(self.engine.module.parameters()).dtype
        return evaluate(self.engine.module, self.val_loader, dtype=dtype, show_progress=self.show_progress)

    def end_epoch(self, epoch: int, stats: dict) -> None:
        epochs, best = self.cfg.train.epochs, self.best
        wait = dict(data_wait_s=stats["data_wait_s"], data_wait_frac=stats["data_wait_frac"])
        if epoch + 1 == epochs or (epoch + 1) % self.cfg.train.eval_every == 0:
            ev = self.last_eval = self.evaluate_val()
            if ev["top1"] > best["top1"]:
                best.update(top1=ev["top1"], top5=ev["top5"], epoch=epoch)
            self.metrics.write(epoch_end=epoch, train_loss=stats["loss"], val_top1=ev["top1"], val_top5=ev["top5"],
                               val_loss=ev["loss"], best_top1=best["top1"], img_per_s=stats["img_per_s"], **wait)
            logger.info("epoch %d/%d | train loss %.4f | val top-1 %.2f top-5 %.2f (%d images) | best %.2f @%d | "
                        "waited for data %.1f s (%.1f%%)", epoch + 1, epochs, stats["loss"], ev["top1"], ev["top5"],
                        ev["images"], best["top1"], best["epoch"] + 1, stats["data_wait_s"],
                        100 * stats["data_wait_frac"])
        else:  # no evaluation this epoch: the training side of the row still goes to metrics.jsonl and the log
            self.metrics.write(epoch_end=epoch, train_loss=stats["loss"], img_per_s=stats["img_per_s"], **wait)
            logger.info("epoch %d/%d | train loss %.4f | %.1f img/s | waited for data %.1f s (%.1f%%)", epoch + 1,
                        epochs, stats["loss"], stats["img_per_s"], stats["data_wait_s"], 100 * stats["data_wait_frac"])

    def client_state(self) -> dict:
        return {**self.client, "best": dict(self.best)}

    def train_and_evaluate(self, summary: str) -> dict:
        """Trains to ``train.epochs``; rank 0 prints ``summary`` (a ``str.format`` template with ``top1``, ``top5``,
        ``best_top1`` (%), ``best_epoch`` (1-based), ``run_dir``).

        Returns:
            ``{"top1": last, "top5": last, "best_top1", "run_dir"}``; after a preemption ``top1``/``top5`` are None
            and ``"preempted": True`` is added.
        """
        try:
            stats = self.run(self.cfg.train.epochs)
        finally:
            self.metrics.close()
        run_dir, best = self.run_.dir, self.best
        if stats["preempted"]:
            return {"top1": None, "top5": None, "best_top1": best["top1"], "run_dir": str(run_dir), "preempted": True}
        ev = self.last_eval or self.evaluate_val()  # resumed at the end: nothing trained, report the model as it is
        result = {"top1": ev.get("top1"), "top5": ev.get("top5"), "best_top1": best["top1"], "run_dir": str(run_dir)}
        if self.run_.dist.is_main:
            print(summary.format(top1=result["top1"], top5=result["top5"], best_top1=best["top1"],
                                 best_epoch=best["epoch"] + 1, run_dir=run_dir), flush=True)
        return result


def _criterion_and_mixup(cfg: FinetuneCfg, num_classes: int):
    mixup_on = cfg.aug.mixup > 0 or cfg.aug.cutmix > 0
    if mixup_on:
        mixup = Mixup(mixup_alpha=cfg.aug.mixup, cutmix_alpha=cfg.aug.cutmix, prob=cfg.aug.mixup_prob,
                      switch_prob=cfg.aug.switch_prob, mode="batch", label_smoothing=cfg.aug.smoothing,
                      num_classes=num_classes)
        return SoftTargetCrossEntropy(), mixup  # smoothing is inside the mixed targets
    if cfg.aug.smoothing > 0:
        return LabelSmoothingCrossEntropy(cfg.aug.smoothing), None
    return torch.nn.CrossEntropyLoss(), None


class FinetuneLoop(ClassifierLoop):
    """Fine-tuning's step: Mixup/CutMix and RandomErasing on the batch, then the (soft-target) cross-entropy."""

    def __init__(self, cfg: FinetuneCfg, run: Run, engine, **kwargs):
        super().__init__(cfg, run, engine, **kwargs)
        self.dtype = next(engine.module.parameters()).dtype
        self.criterion, self.mixup = _criterion_and_mixup(cfg, kwargs["num_classes"])
        self.erase = (RandomErasing(cfg.aug.reprob, mode="pixel", device=str(run.dist.device))
                      if cfg.aug.reprob > 0 else None)

    def step(self, images, labels) -> dict:
        if self.mixup is not None:
            images, labels = self.mixup(images, labels)
        if self.erase is not None:
            images = self.erase(images)
        logits = self.engine(images.to(self.dtype)).float()
        return {"loss": self.criterion(logits, labels), "logits": logits}


def main(cfg: FinetuneCfg, *, resume: str | None = None) -> dict:
    """Fine-tunes and evaluates ``cfg``; returns ``{"top1": last, "best_top1": ..., "run_dir": ...}``."""
    run, name, num_classes = start_classifier_run(cfg, task="finetune", check=check_finetune, resume=resume)
    dist, derived = run.dist, run.derived
    model, report = create_classifier(cfg.model, num_classes=num_classes, img_size=cfg.data.img_size)
    logger.info("run %s | %s, %d classes | world %d | effective batch %d | lr %.3g | layer decay %.2f",
                run.dir, name, num_classes, dist.world_size, derived.eff_batch, derived.lr, cfg.optim.layer_decay)
    if report.loaded:
        logger.info("pre-trained: %d tensors loaded, not pre-trained: %s", len(report.loaded), report.missing or "none")
    optimizer = build_optimizer(model, cfg.optim, derived)
    engine = create_engine(model, optimizer, build_ds_config(cfg.train, clip_grad=cfg.optim.clip_grad,
                                                             world_size=dist.world_size, run_dir=run.dir),
                           compile=cfg.train.compile, compile_backend=cfg.train.compile_backend)
    loop = FinetuneLoop(cfg, run, engine, scheduler=build_scheduler(optimizer, cfg.optim, derived,
                                                                    epochs=cfg.train.epochs),
                        report=report, model_name=name, num_classes=num_classes)
    return loop.train_and_evaluate(
        "fine-tuned top-1: {top1:.2f}% (best {best_top1:.2f}% at epoch {best_epoch}), run: {run_dir}")
