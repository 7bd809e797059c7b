"""Masked image modeling pre-training on a DeepSpeed engine: :class:`PretrainLoop` on :class:`~fastmim_ds.loop.Loop`.

Launch: ``deepspeed --num_gpus 8 --module fastmim_ds pretrain --config configs/....yaml [--set k=v] [--resume auto]``
(``make pretrain`` wraps it). Writes ``<output_dir>/<run>/{config.yaml, metrics.jsonl, log.txt, ckpt/}``.

FastMIM-P (``progressive`` in the config): at the first epoch of each stage the loader decodes at the stage's
size (rebuilt when its micro batch changes), the model adapts to the size (position embedding grid, Swin
window), the engine's micro batch / accumulation change and the lr follows the stage's effective batch. A
resumed run lands in the stage of its epoch.

Resumed on another number of ranks, the checkpoint is re-partitioned (:func:`~fastmim_ds.checkpoint.load`), the
epoch continues at its image offset, and the peak lr is that of the new effective batch (blr x batch / 256) at the
same epoch fraction (one warning line says so).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from .checks import check_pretrain
from .config import PretrainCfg, Stage, resolve, to_dict
from .data import dataset_info, train_loader
from .ds_engine import build_ds_config, create_engine
from .loop import Loop, LoopState
from .methods import create_mim_model
from .metrics import MetricsWriter
from .optim import build_optimizer, build_scheduler, set_lr_multiplier
from .quality import QualityMonitor
from .run import Run, open_metrics, start_run
from .runtime import Preemption, check_output_dir, git_sha
from .visualize import EpochVisualizer

logger = logging.getLogger(__name__)

# bytes per parameter in a checkpoint: fp32 weights + fp32 master + 2 Adam moments (+ a bf16 copy)
CKPT_BYTES_PER_PARAM = 18


def run_name(cfg: PretrainCfg) -> str:
    return f"{cfg.method.name}-{cfg.model.encoder}-{cfg.data.img_size}"


class PretrainLoop(Loop):
    """Pre-training epochs: the FastMIM-P stage switch at the start of an epoch, the quality signals, the epoch line
    and the reconstruction pictures at its end."""

    def __init__(self, cfg: PretrainCfg, run: Run, engine, optimizer, *, state: LoopState, metrics: MetricsWriter):
        super().__init__(engine, state=state, scheduler=build_scheduler(optimizer, cfg.optim, run.derived,
                                                                        epochs=cfg.train.epochs),
                         train=cfg.train, ckpt_dir=run.ckpt_dir, metrics=metrics, show_progress=run.dist.is_main,
                         stop_requested=Preemption(run.dist.device).requested, last_checkpoint=run.resume_tag)
        self.cfg, self.run_, self.optimizer = cfg, run, optimizer
        self.stages, self.stage, self.loader = cfg.stages(), None, None
        self.quality = _quality_monitor(cfg, run.dist)
        self.vis = EpochVisualizer(cfg.vis, data_train=cfg.data.train, run_dir=run.dir, write=run.dist.is_main)
        self.client = {"config": to_dict(cfg), "git_sha": git_sha(), "method": cfg.method.name}

    def step(self, images, labels) -> dict:
        return self.engine(images)  # self-supervised: the labels are not used

    def begin_epoch(self, epoch: int) -> tuple[object, int]:
        stage = Stage.at(self.stages, epoch)
        if stage != self.stage:
            self.enter_stage(stage)
        updates = len(self.loader) // stage.grad_accum
        if self.cfg.train.max_steps_per_epoch:
            updates = min(updates, self.cfg.train.max_steps_per_epoch)
        return self.loader, updates

    def enter_stage(self, stage: Stage) -> None:
        """Switches loader, model input size, engine batch sizes and lr to ``stage`` (FastMIM-P)."""
        cfg, dist, engine = self.cfg, self.run_.dist, self.engine
        if self.stage is None or self.stage.micro_batch != stage.micro_batch:
            self.loader = train_loader(cfg.data, img_size=stage.img_size, batch_size=stage.micro_batch,
                                       seed=cfg.train.seed, device=dist.device, world_size=dist.world_size)
        self.loader.set_img_size(stage.img_size)
        engine.module.set_img_size(stage.img_size)
        engine.set_train_micro_batch_size(stage.micro_batch)
        engine.set_train_batch_size(stage.micro_batch * stage.grad_accum * dist.world_size)
        stage_lr = resolve(cfg.optim, dataclasses.replace(cfg.train, micro_batch=stage.micro_batch,
                                                          grad_accum=stage.grad_accum), dist.world_size).lr
        set_lr_multiplier(self.optimizer, stage_lr / self.run_.derived.lr)
        self.stage = stage
        if len(self.stages) > 1:
            logger.info("stage from epoch %d: %d px, micro batch %d x %d accumulation x %d ranks, lr %.3g",
                        stage.start_epoch, stage.img_size, stage.micro_batch, stage.grad_accum, dist.world_size,
                        stage_lr)

    def end_epoch(self, epoch: int, stats: dict) -> None:
        img_size, module = self.stage.img_size, self.engine.module
        signals = self.quality(module, epoch, img_size) if self.quality else {}  # every rank (collectives)
        logger.info("epoch %d/%d | loss %.4f | %.1f img/s | %.0f s | waited for data %.1f s (%.1f%%)%s", epoch + 1,
                    self.cfg.train.epochs, stats["loss"], stats["img_per_s"], stats["seconds"], stats["data_wait_s"],
                    100 * stats["data_wait_frac"], _signals_text(signals))
        self.metrics.write(epoch_end=epoch, train_loss=stats["loss"], img_per_s=stats["img_per_s"], img_size=img_size,
                           data_wait_s=stats["data_wait_s"], data_wait_frac=stats["data_wait_frac"], **signals)
        if self.vis.due(epoch):  # every rank: ZeRO-3 gathers parameters collectively; rank 0 writes <run>/vis/
            self.vis(module, epoch, img_size)

    def client_state(self) -> dict:
        return self.client


def main(cfg: PretrainCfg, *, resume: str | None = None) -> dict:
    """Pre-trains ``cfg``; returns the last epoch's stats (with ``run_dir`` and ``preempted``)."""
    run = start_run(cfg, check=check_pretrain, default_name=run_name(cfg), resume=resume)
    dist, derived = run.dist, run.derived
    model = create_mim_model(cfg.method, cfg.model, cfg.data.img_size)
    n_params = sum(p.numel() for p in model.parameters())
    check_output_dir(run.ckpt_dir, checkpoint_bytes=n_params * CKPT_BYTES_PER_PARAM, keep_last=cfg.train.keep_last)
    logger.info("run %s | world %d | effective batch %d | lr %.3g (blr %.3g x %d / 256) | device %s",
                run.dir, dist.world_size, derived.eff_batch, derived.lr, cfg.optim.blr, derived.eff_batch, dist.device)
    logger.info("%s: encoder %.2fM params, total %.2fM trainable", cfg.model.encoder,
                sum(p.numel() for p in model.encoder.parameters()) / 1e6,
                sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6)
    optimizer = build_optimizer(model, cfg.optim, derived)
    engine = create_engine(model, optimizer, build_ds_config(cfg.train, clip_grad=cfg.optim.clip_grad,
                                                             world_size=dist.world_size, run_dir=run.dir),
                           compile=cfg.train.compile, compile_backend=cfg.train.compile_backend)
    state = LoopState.from_client(run.load(engine))
    metrics = open_metrics(cfg, run, engine)
    try:
        stats = PretrainLoop(cfg, run, engine, optimizer, state=state, metrics=metrics).run(cfg.train.epochs)
    finally:
        metrics.close()
    logger.info("%s: %s", "preempted" if stats["preempted"] else "done", run.dir)
    return {**stats, "run_dir": str(run.dir)}


def _quality_monitor(cfg: PretrainCfg, dist) -> QualityMonitor | None:
    """The run's quality signals, or None when none is on or there is no val set to measure them on."""
    ev = cfg.eval
    if not (ev.skill_every or ev.knn_every):
        return None
    if not Path(cfg.data.val).is_file():  # k-NN without a val set is refused before launch
        logger.warning("no val set at %s: reconstruction skill is not measured (set data.val)", cfg.data.val)
        return None
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
