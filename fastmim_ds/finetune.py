"""Fine-tuning with top-1/top-5 evaluation on a DeepSpeed engine: wiring only.

Recipe (FastMIM/MAE ``main_finetune.py``, METHODS.md section 2): AdamW (0.9, 0.999), layer-wise lr decay, drop
path, timm Mixup/CutMix with label smoothing (SoftTargetCrossEntropy), RandomErasing, per-iteration warmup +
cosine, evaluation every ``train.eval_every`` epochs. Best and last top-1 go to ``metrics.jsonl`` and the log.
The run itself (loaders, resume, evaluation, best top-1) is :mod:`fastmim_ds.classify`, shared with the linear
probe; this module holds what is fine-tuning's own (model, optimizer, augmentation, loss).

Launch: ``deepspeed --num_gpus 8 --module fastmim_ds finetune --config configs/....yaml --pretrained <run>``.
"""
from __future__ import annotations

import logging

import torch
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from .classify import start_run, train_and_evaluate
from .config import FinetuneCfg
from .ds_engine import build_ds_config, create_engine
from .engine import evaluate
from .models.classifier import create_classifier
from .optim import build_optimizer, build_scheduler
from .validate import check_finetune

logger = logging.getLogger(__name__)


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


def main(cfg: FinetuneCfg, *, resume: str | None = None) -> dict:
    """Fine-tunes and evaluates ``cfg``; returns ``{"top1": last, "best_top1": ..., "run_dir": ...}``."""
    run = start_run(cfg, task="finetune", check=check_finetune, create_model=create_classifier, resume=resume)
    dist, derived, report = run.dist, run.derived, run.report
    logger.info("run %s | %s, %d classes | world %d | effective batch %d | lr %.3g | layer decay %.2f",
                run.dir, run.name, run.num_classes, dist.world_size, derived.eff_batch, derived.lr,
                cfg.optim.layer_decay)
    if report.loaded:
        logger.info("pre-trained: %d tensors loaded, not pre-trained: %s", len(report.loaded), report.missing or "none")

    optimizer = build_optimizer(run.model, cfg.optim, derived)
    engine = create_engine(run.model, optimizer, build_ds_config(cfg.train, clip_grad=cfg.optim.clip_grad,
                                                                 world_size=dist.world_size, run_dir=run.dir),
                           compile=cfg.train.compile, compile_backend=cfg.train.compile_backend)
    dtype = next(engine.module.parameters()).dtype
    criterion, mixup = _criterion_and_mixup(cfg, run.num_classes)
    erase = RandomErasing(cfg.aug.reprob, mode="pixel", device=str(dist.device)) if cfg.aug.reprob > 0 else None

    def step_fn(eng, images, labels):
        if mixup is not None:
            images, labels = mixup(images, labels)
        if erase is not None:
            images = erase(images)
        logits = eng(images.to(dtype)).float()
        return {"loss": criterion(logits, labels), "logits": logits}

    return train_and_evaluate(
        cfg, run, engine=engine, scheduler=build_scheduler(optimizer, cfg.optim, derived, epochs=cfg.train.epochs),
        step_fn=step_fn, log=logger, resume=resume,
        evaluate_fn=lambda loader: evaluate(engine.module, loader, dtype=dtype, show_progress=dist.is_main),
        summary="fine-tuned top-1: {top1:.2f}% (best {best_top1:.2f}% at epoch {best_epoch}), run: {run_dir}",
    )
