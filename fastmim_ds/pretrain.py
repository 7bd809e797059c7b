"""Masked image modeling pre-training on a DeepSpeed engine: wiring only (see ``engine.py`` for the loop).

Launch: ``deepspeed --num_gpus 8 --module fastmim_ds pretrain --config configs/....yaml [--set k=v] [--resume auto]``
(``make pretrain`` wraps it). Writes ``<output_dir>/<run>/{config.yaml, metrics.jsonl, log.txt, ckpt/}``.

FastMIM-P (``progressive`` in the config): at the first epoch of each stage the loader decodes at the stage's
size (rebuilt when its micro batch changes), the model adapts to the size (position embedding grid, Swin
window), the engine's micro batch / accumulation change and the lr follows the stage's effective batch. A
resumed run lands in the stage of its epoch.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from .checkpoint import CKPT_SUBDIR, find_resume, load, read_client_state
from .config import PretrainCfg, Stage, dump_yaml, resolve, to_dict
from .data import dataset_info, train_loader
from .ds_engine import build_ds_config, create_engine
from .engine import LoopState, fit
from .metrics import MetricsWriter
from .models import create_mim_model
from .optim import build_optimizer, build_scheduler, set_lr_multiplier
from .quality import QualityMonitor
from .runtime import (
    Preemption,
    check_output_dir,
    git_sha,
    init_distributed,
    make_run_dir,
    seed_everything,
    setup_logging,
)
from .trackers import build_trackers
from .validate import check_pretrain, check_resume_compatible
from .visualize import EpochVisualizer

logger = logging.getLogger(__name__)

# bytes per parameter in a checkpoint: fp32 weights + fp32 master + 2 Adam moments (+ a bf16 copy)
CKPT_BYTES_PER_PARAM = 18


def run_name(cfg: PretrainCfg) -> str:
    return f"{cfg.method}-{cfg.model.encoder}-{cfg.data.img_size}"


def main(cfg: PretrainCfg, *, resume: str | None = None) -> dict:
    """Pre-trains ``cfg``; returns the last epoch's stats (with ``run_dir`` and ``preempted``)."""
    dist = init_distributed()
    derived = check_pretrain(cfg, dist.world_size)
    run_dir = make_run_dir(cfg.train.output_dir, cfg.train.run_name, run_name(cfg), resume=resume)
    ckpt_dir = run_dir / CKPT_SUBDIR
    found = find_resume(ckpt_dir, resume)
    if found:
        check_resume_compatible(cfg, read_client_state(found[0] / found[1]).get("config", {}), found[0] / found[1],
                                world_size=dist.world_size)
    if dist.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_yaml(cfg, derived))
    setup_logging(dist.rank, run_dir / "log.txt" if dist.is_main else None)
    seed_everything(cfg.train.seed + dist.rank)  # per-rank masks and drop-path differ, data order is seeded apart

    model = create_mim_model(cfg.method, cfg.model, cfg.mask, cfg.data.img_size)
    n_params = sum(p.numel() for p in model.parameters())
    check_output_dir(ckpt_dir, checkpoint_bytes=n_params * CKPT_BYTES_PER_PARAM, keep_last=cfg.train.keep_last)
    logger.info("run %s | world %d | effective batch %d | lr %.3g (blr %.3g x %d / 256) | device %s",
                run_dir, dist.world_size, derived.eff_batch, derived.lr, cfg.optim.blr, derived.eff_batch, dist.device)
    logger.info("%s: encoder %.2fM params, total %.2fM trainable", cfg.model.encoder,
                sum(p.numel() for p in model.encoder.parameters()) / 1e6,
                sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6)
    optimizer = build_optimizer(model, cfg.optim, derived)
    engine = create_engine(model, optimizer, build_ds_config(cfg.train, clip_grad=cfg.optim.clip_grad,
                                                             world_size=dist.world_size, run_dir=run_dir),
                           compile=cfg.train.compile, compile_backend=cfg.train.compile_backend)
    scheduler = build_scheduler(optimizer, cfg.optim, derived, epochs=cfg.train.epochs)
    stages = cfg.stages()
    current: dict = {"stage": None, "loader": None}

    def begin_epoch(epoch: int):
        stage = Stage.at(stages, epoch)
        if stage != current["stage"]:
            _enter_stage(stage, current, cfg, engine, optimizer, derived.lr, dist)
        loader = current["loader"]
        updates = len(loader) // stage.grad_accum
        if cfg.train.max_steps_per_epoch:
            updates = min(updates, cfg.train.max_steps_per_epoch)
        return loader, updates

    state = LoopState()
    if found:
        state = LoopState.from_client(load(engine, *found))
    metrics = MetricsWriter(run_dir / "metrics.jsonl", enabled=dist.is_main, monitor=engine.monitor,
                            trackers=build_trackers(cfg.train, run_dir, config=to_dict(cfg), enabled=dist.is_main))
    vis = EpochVisualizer(cfg.vis, data_train=cfg.data.train, run_dir=run_dir, write=dist.is_main,
                          hog_bins=cfg.model.hog_bins, hog_cell=cfg.model.hog_cell)

    quality = _quality_monitor(cfg, engine.module, dist)

    def end_epoch(epoch: int, stats: dict) -> None:
        img_size = current["stage"].img_size
        signals = quality(engine.module, epoch, img_size) if quality else {}  # every rank (collectives)
        logger.info("epoch %d/%d | loss %.4f | %.1f img/s | %.0f s | waited for data %.1f s (%.1f%%)%s", epoch + 1,
                    cfg.train.epochs, stats["loss"], stats["img_per_s"], stats["seconds"], stats["data_wait_s"],
                    100 * stats["data_wait_frac"], _signals_text(signals))
        metrics.write(epoch_end=epoch, train_loss=stats["loss"], img_per_s=stats["img_per_s"], img_size=img_size,
                      data_wait_s=stats["data_wait_s"], data_wait_frac=stats["data_wait_frac"], **signals)
        if vis.due(epoch):  # every rank: ZeRO-3 gathers parameters collectively; rank 0 writes <run>/vis/
            vis(engine.module, epoch, current["stage"].img_size)

    client = {"config": to_dict(cfg), "git_sha": git_sha(), "method": cfg.method}
    try:
        stats = fit(
            engine, state=state, epochs=cfg.train.epochs, begin_epoch=begin_epoch,
            step_fn=lambda eng, images, labels: eng(images), scheduler=scheduler, train=cfg.train, ckpt_dir=ckpt_dir,
            client_state=lambda: client, metrics=metrics, show_progress=dist.is_main,
            stop_requested=Preemption(dist.device).requested, end_epoch=end_epoch,
            last_checkpoint=found[0] / found[1] if found else None,
        )
    finally:
        metrics.close()
    logger.info("%s: %s", "preempted" if stats["preempted"] else "done", run_dir)
    return {**stats, "run_dir": str(run_dir)}


def _quality_monitor(cfg: PretrainCfg, model, dist) -> QualityMonitor | None:
    """The run's quality signals, or None when none is on or there is no val set to measure them on."""
    ev = cfg.eval
    if not (ev.skill_every or ev.knn_every):
        return None
    if not Path(cfg.data.val).is_file():  # k-NN without a val set is refused before launch
        logger.warning("no val set at %s: reconstruction skill is not measured (set data.val)", cfg.data.val)
        return None
    if ev.skill_every and not all(hasattr(model, a) for a in ("target", "stride", "mask_generator")):
        logger.warning("%s: reconstruction skill needs a FastMIM-style model; not measured", cfg.method)
        ev = dataclasses.replace(ev, skill_every=0)
    if ev.knn_every and not hasattr(model, "adapter"):
        logger.warning("%s: k-NN needs an encoder with an adapter; not measured", cfg.method)
        ev = dataclasses.replace(ev, knn_every=0)
    num_classes = dataset_info(cfg.data.train).num_classes
    return QualityMonitor(ev, train=cfg.data.train, val=cfg.data.val, num_classes=num_classes, rank=dist.rank,
                          world_size=dist.world_size, device=dist.device, num_workers=cfg.data.num_workers)


def _signals_text(signals: dict) -> str:
    text = ""
    if "skill_ratio" in signals:
        text += (f" | skill {signals['skill_ratio']:.3f} (masked MSE {signals['skill_mse']:.4g} vs mean predictor "
                 f"{signals['skill_mean_mse']:.4g})")
    if "knn_top1" in signals:
        text += f" | k-NN top-1 {signals['knn_top1']:.2f}% ({signals['knn_seconds']:.0f} s)"
    return text


def _enter_stage(stage: Stage, current: dict, cfg: PretrainCfg, engine, optimizer, base_lr: float, dist) -> None:
    """Switches loader, model input size, engine batch sizes and lr to ``stage``."""
    old = current["stage"]
    if old is None or old.micro_batch != stage.micro_batch:
        current["loader"] = train_loader(cfg.data, img_size=stage.img_size, batch_size=stage.micro_batch,
                                         seed=cfg.train.seed, device=dist.device, world_size=dist.world_size)
    current["loader"].set_img_size(stage.img_size)
    engine.module.set_img_size(stage.img_size)
    engine.set_train_micro_batch_size(stage.micro_batch)
    engine.set_train_batch_size(stage.micro_batch * stage.grad_accum * dist.world_size)
    stage_lr = resolve(cfg.optim, dataclasses.replace(cfg.train, micro_batch=stage.micro_batch,
                                                      grad_accum=stage.grad_accum), dist.world_size).lr
    set_lr_multiplier(optimizer, stage_lr / base_lr)
    current["stage"] = stage
    if len(cfg.stages()) > 1:
        logger.info("stage from epoch %d: %d px, micro batch %d x %d accumulation x %d ranks, lr %.3g",
                    stage.start_epoch, stage.img_size, stage.micro_batch, stage.grad_accum, dist.world_size, stage_lr)
