"""Masked image modeling pre-training on a DeepSpeed engine: wiring only (see ``engine.py`` for the loop).

Launch: ``deepspeed --num_gpus 8 --module fastmim_ds pretrain --config configs/....yaml [--set k=v] [--resume auto]``
(``make pretrain`` wraps it). Writes ``<output_dir>/<run>/{config.yaml, metrics.jsonl, log.txt, ckpt/}``.
"""
from __future__ import annotations

import logging

from .checkpoint import CKPT_SUBDIR, find_resume, load, save
from .config import PretrainCfg, dump_yaml, to_dict
from .data.loaders import build_train_loader
from .ds_engine import build_ds_config, create_engine
from .engine import train_one_epoch
from .metrics import MetricsWriter
from .models import create_mim_model
from .optim import build_optimizer, build_scheduler
from .runtime import git_sha, init_distributed, make_run_dir, seed_everything, setup_logging
from .validate import check_pretrain

logger = logging.getLogger(__name__)


def run_name(cfg: PretrainCfg) -> str:
    return f"{cfg.method}-{cfg.model.encoder}-{cfg.data.img_size}"


def main(cfg: PretrainCfg, *, resume: str | None = None) -> dict:
    """Pre-trains ``cfg``; returns the last epoch's stats (with ``run_dir``)."""
    dist = init_distributed()
    derived = check_pretrain(cfg, dist.world_size)
    run_dir = make_run_dir(cfg.train.output_dir, cfg.train.run_name, run_name(cfg), resume=resume)
    ckpt_dir = run_dir / CKPT_SUBDIR
    if dist.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_yaml(cfg, derived))
    setup_logging(dist.rank, run_dir / "log.txt" if dist.is_main else None)
    logger.info("run %s | world %d | effective batch %d | lr %.3g (blr %.3g x %d / 256) | device %s",
                run_dir, dist.world_size, derived.eff_batch, derived.lr, cfg.optim.blr, derived.eff_batch, dist.device)
    seed_everything(cfg.train.seed + dist.rank)  # per-rank masks and drop-path differ, data order is seeded apart

    model = create_mim_model(cfg.method, cfg.model, cfg.mask, cfg.data.img_size)
    logger.info("%s: encoder %.2fM params, total %.2fM trainable", cfg.model.encoder,
                sum(p.numel() for p in model.encoder.parameters()) / 1e6,
                sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6)
    optimizer = build_optimizer(model, cfg.optim, derived)
    engine = create_engine(model, optimizer, build_ds_config(cfg.train, clip_grad=cfg.optim.clip_grad,
                                                             world_size=dist.world_size))
    loader = build_train_loader(
        cfg.data.train, img_size=cfg.data.img_size, batch_size=cfg.train.micro_batch, scale=cfg.data.rrc_scale,
        ratio=cfg.data.rrc_ratio, hflip=cfg.data.hflip, num_workers=cfg.data.num_workers, seed=cfg.train.seed,
        distributed=dist.world_size > 1, device=dist.device, os_cache=cfg.data.os_cache,
        batches_ahead=cfg.data.batches_ahead,
    )
    updates = len(loader) // cfg.train.grad_accum
    if cfg.train.max_steps_per_epoch:
        updates = min(updates, cfg.train.max_steps_per_epoch)
    scheduler = build_scheduler(optimizer, cfg.optim, derived, epochs=cfg.train.epochs, updates_per_epoch=updates)

    start_epoch = 0
    found = find_resume(ckpt_dir, resume)
    if found:
        client = load(engine, *found)
        start_epoch = client["epoch"] + 1
    metrics = MetricsWriter(run_dir / "metrics.jsonl", enabled=dist.is_main)
    stats: dict = {}
    for epoch in range(start_epoch, cfg.train.epochs):
        loader.set_epoch(epoch)
        stats = train_one_epoch(
            engine, loader, lambda eng, images, labels: eng(images), scheduler=scheduler, epoch=epoch,
            updates_per_epoch=updates, log_every=cfg.train.log_every, metrics=metrics, show_progress=dist.is_main,
        )
        logger.info("epoch %d/%d | loss %.4f | %.1f img/s | %.0f s", epoch + 1, cfg.train.epochs, stats["loss"],
                    stats["img_per_s"], stats["seconds"])
        metrics.write(epoch_end=epoch, train_loss=stats["loss"], img_per_s=stats["img_per_s"])
        last = epoch + 1 == cfg.train.epochs
        if last or (epoch + 1) % cfg.train.ckpt_every == 0:
            client = {"epoch": epoch, "step": (epoch + 1) * updates, "config": to_dict(cfg), "git_sha": git_sha(),
                      "method": cfg.method}
            save(engine, ckpt_dir, tag=f"epoch{epoch:04d}", client_state=client, keep_last=cfg.train.keep_last)
    logger.info("done: %s", run_dir)
    return {**stats, "run_dir": str(run_dir)}
