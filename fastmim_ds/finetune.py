"""Fine-tuning with top-1/top-5 evaluation on a DeepSpeed engine: wiring only.

Recipe (FastMIM/MAE ``main_finetune.py``, METHODS.md section 2): AdamW (0.9, 0.999), layer-wise lr decay, drop
path, timm Mixup/CutMix with label smoothing (SoftTargetCrossEntropy), RandomErasing, per-iteration warmup +
cosine, evaluation every ``train.eval_every`` epochs. Best and last top-1 go to ``metrics.jsonl`` and the log.

Launch: ``deepspeed --num_gpus 8 --module fastmim_ds finetune --config configs/....yaml --pretrained <run>``.
"""
from __future__ import annotations

import logging

import torch
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from .checkpoint import CKPT_SUBDIR, find_resume, load, save
from .config import FinetuneCfg, dump_yaml, to_dict
from .data.loaders import build_train_loader, build_val_loader
from .ds_engine import build_ds_config, create_engine
from .engine import evaluate, train_one_epoch
from .metrics import MetricsWriter
from .models.classifier import create_classifier
from .optim import build_optimizer, build_scheduler
from .runtime import git_sha, init_distributed, make_run_dir, seed_everything, setup_logging
from .validate import check_finetune, read_classes

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
    dist = init_distributed()
    derived = check_finetune(cfg, dist.world_size)
    classes = read_classes(cfg.data.train)
    num_classes = cfg.model.num_classes or len(classes)
    seed_everything(cfg.train.seed + dist.rank)
    model, report = create_classifier(cfg.model, num_classes=num_classes, img_size=cfg.data.img_size)
    name = report.pretrain_config.get("model", {}).get("encoder", cfg.model.name)
    run_dir = make_run_dir(cfg.train.output_dir, cfg.train.run_name, f"finetune-{name}-{cfg.data.img_size}",
                           resume=resume)
    ckpt_dir = run_dir / CKPT_SUBDIR
    if dist.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_yaml(cfg, derived))
    setup_logging(dist.rank, run_dir / "log.txt" if dist.is_main else None)
    logger.info("run %s | %s, %d classes | world %d | effective batch %d | lr %.3g | layer decay %.2f",
                run_dir, name, num_classes, dist.world_size, derived.eff_batch, derived.lr, cfg.optim.layer_decay)
    if report.loaded:
        logger.info("pre-trained: %d tensors loaded, not pre-trained: %s", len(report.loaded), report.missing or "none")

    optimizer = build_optimizer(model, cfg.optim, derived)
    engine = create_engine(model, optimizer, build_ds_config(cfg.train, clip_grad=cfg.optim.clip_grad,
                                                             world_size=dist.world_size))
    dtype = next(engine.module.parameters()).dtype
    common = dict(img_size=cfg.data.img_size, num_workers=cfg.data.num_workers, device=dist.device,
                  os_cache=cfg.data.os_cache)
    train_loader = build_train_loader(
        cfg.data.train, batch_size=cfg.train.micro_batch, scale=cfg.data.rrc_scale, ratio=cfg.data.rrc_ratio,
        hflip=cfg.data.hflip, seed=cfg.train.seed, distributed=dist.world_size > 1,
        batches_ahead=cfg.data.batches_ahead, **common,
    )
    val_loader = build_val_loader(cfg.data.val, batch_size=cfg.train.micro_batch, crop_ratio=cfg.data.val_crop_ratio,
                                  rank=dist.rank, world_size=dist.world_size, **common)
    updates = len(train_loader) // cfg.train.grad_accum
    if cfg.train.max_steps_per_epoch:
        updates = min(updates, cfg.train.max_steps_per_epoch)
    scheduler = build_scheduler(optimizer, cfg.optim, derived, epochs=cfg.train.epochs, updates_per_epoch=updates)
    criterion, mixup = _criterion_and_mixup(cfg, num_classes)
    erase = RandomErasing(cfg.aug.reprob, mode="pixel", device=str(dist.device)) if cfg.aug.reprob > 0 else None

    def step_fn(eng, images, labels):
        if mixup is not None:
            images, labels = mixup(images, labels)
        if erase is not None:
            images = erase(images)
        logits = eng(images.to(dtype)).float()
        return {"loss": criterion(logits, labels), "logits": logits}

    start_epoch, best = 0, {"top1": -1.0, "epoch": -1}
    found = find_resume(ckpt_dir, resume)
    if found:
        client = load(engine, *found)
        start_epoch, best = client["epoch"] + 1, client.get("best", best)
    metrics = MetricsWriter(run_dir / "metrics.jsonl", enabled=dist.is_main)
    ev: dict = {}
    for epoch in range(start_epoch, cfg.train.epochs):
        train_loader.set_epoch(epoch)
        stats = train_one_epoch(engine, train_loader, step_fn, scheduler=scheduler, epoch=epoch,
                                updates_per_epoch=updates, log_every=cfg.train.log_every, metrics=metrics,
                                show_progress=dist.is_main)
        last = epoch + 1 == cfg.train.epochs
        if last or (epoch + 1) % cfg.train.eval_every == 0:
            ev = evaluate(engine.module, val_loader, dtype=dtype, show_progress=dist.is_main)
            if ev["top1"] > best["top1"]:
                best = {"top1": ev["top1"], "top5": ev["top5"], "epoch": epoch}
            metrics.write(epoch_end=epoch, train_loss=stats["loss"], val_top1=ev["top1"], val_top5=ev["top5"],
                          val_loss=ev["loss"], best_top1=best["top1"], img_per_s=stats["img_per_s"])
            logger.info("epoch %d/%d | train loss %.4f | val top-1 %.2f top-5 %.2f (%d images) | best %.2f @%d",
                        epoch + 1, cfg.train.epochs, stats["loss"], ev["top1"], ev["top5"], ev["images"],
                        best["top1"], best["epoch"] + 1)
        if last or (epoch + 1) % cfg.train.ckpt_every == 0:
            client = {"epoch": epoch, "config": to_dict(cfg), "classes": classes, "best": best, "git_sha": git_sha(),
                      "pretrain_config": report.pretrain_config, "model_name": name, "num_classes": num_classes}
            save(engine, ckpt_dir, tag=f"epoch{epoch:04d}", client_state=client, keep_last=cfg.train.keep_last)
    result = {"top1": ev.get("top1"), "top5": ev.get("top5"), "best_top1": best["top1"], "run_dir": str(run_dir)}
    if dist.is_main:
        print(f"fine-tuned top-1: {result['top1']:.2f}% (best {best['top1']:.2f}% at epoch {best['epoch'] + 1}), "
              f"run: {run_dir}", flush=True)
    return result
