"""Linear probing of a frozen pre-trained encoder on a DeepSpeed engine: wiring only.

Recipe (MAE ``main_linprobe.py``, also FastMIM's): the timm classifier of the pre-trained encoder with every weight
frozen except the head, which becomes ``Sequential(BatchNorm1d(C, affine=False, eps=1e-6), Linear(C, K))`` (the
Linear re-initialised with trunc_normal(std=0.01)); RandomResizedCrop(scale 0.08-1) + flip only (no mixup, no
label smoothing, no drop path); cross-entropy; LARS (momentum 0.9, trust coefficient 0.001, adapting weight
matrices but not biases, as MAE's ``util/lars.py``) or SGD; blr 0.1 (lr = blr x effective batch / 256), no weight
decay, warmup + cosine; top-1/top-5 on the val set every ``train.eval_every`` epochs.

DeepSpeed: the head is tiny and LARS needs per-tensor norms, so the engine runs without ZeRO partitioning (stage 0:
ZeRO-1/2 would hand the optimizer flat, rank-partitioned buffers and change the trust ratios); a bf16 DeepSpeed
config becomes ``torch_autocast`` (bf16 forward, fp32 head and optimizer, MAE uses AMP) on GPUs and fp32 on CPUs.
Before each evaluation the head's BatchNorm statistics are broadcast from rank 0 (each rank saw its own batches),
so every rank evaluates the model that the checkpoint (rank 0's module) holds.
The run itself (loaders, resume, evaluation, best top-1) is :class:`fastmim_ds.finetune.ClassifierLoop`, shared
with fine-tuning.

Launch: ``deepspeed --num_gpus 8 --module fastmim_ds linprobe --config configs/linprobe_....yaml --pretrained <run>``
(``make linprobe PRETRAINED=<run> LP_CONFIG=...``).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.optim import Lars

from .checkpoint import resolve_tag_dir
from .config import ClassifierCfg, ConfigError, LinprobeCfg, LinprobeOptimCfg, OptimCfg, Resolved, resolve
from .ds_engine import build_ds_config, create_engine
from .finetune import ClassifierLoop, start_classifier_run
from .loop import evaluate
from .models.classifier import LoadReport, create_classifier, probe_head
from .optim import build_scheduler

logger = logging.getLogger(__name__)

__all__ = ["OPTIMIZERS", "create_probe", "build_probe_optimizer", "probe_ds_config", "check_linprobe",
           "main"]

OPTIMIZERS = ("lars", "sgd")


def create_probe(cfg: ClassifierCfg, *, num_classes: int, img_size: int) -> tuple[nn.Module, LoadReport]:
    """The timm classifier with the pre-trained encoder, frozen, and a BatchNorm + Linear head (MAE linear probe).

    The head sits where timm's classifier is (``pretrained_cfg['classifier']``: ``head`` for ViT/MixMIM/PVTv2,
    ``head.fc`` for Swin), so it acts on the pooled (B, C) features (ViT: mean of patch tokens + ``fc_norm``).

    Returns:
        (model with only ``<head>.1.weight/bias`` trainable, the pre-trained load report).

    Raises:
        ValueError: as :func:`~fastmim_ds.models.classifier.create_classifier`.
    """
    model, report = create_classifier(cfg, num_classes=num_classes, img_size=img_size)
    path = model.pretrained_cfg.get("classifier", "head")
    linear = model.get_submodule(path)
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"{type(model).__name__}: classifier '{path}' is {type(linear).__name__}, not a Linear")
    trunc_normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    model.set_submodule(path, probe_head(linear))
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(f"{path}."))
    return model, report


def build_probe_optimizer(model: nn.Module, optim: LinprobeOptimCfg, lr: float) -> torch.optim.Optimizer:
    """LARS or SGD over the trainable parameters: weight matrices (decayed, LARS-adapted) and the rest (neither).

    LARS is timm's ``Lars`` with ``always_adapt`` on the matrices: MAE's LARS adapts every >1-D parameter even with
    weight decay 0 (timm's default adapts only when the group decays) and leaves biases alone.

    Raises:
        ConfigError: unknown ``optim.name``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    weights, others = [p for p in params if p.ndim > 1], [p for p in params if p.ndim <= 1]
    if optim.name == "lars":
        groups = [dict(params=weights, weight_decay=optim.weight_decay, always_adapt=True),
                  dict(params=others, weight_decay=0.0, always_adapt=False)]
        return Lars(groups, lr=lr, momentum=optim.momentum)
    if optim.name == "sgd":
        groups = [dict(params=weights, weight_decay=optim.weight_decay), dict(params=others, weight_decay=0.0)]
        return torch.optim.SGD(groups, lr=lr, momentum=optim.momentum)
    raise ConfigError(f"optim.name: unknown '{optim.name}' (choices: {', '.join(OPTIMIZERS)})")


def probe_ds_config(ds: dict, device: torch.device) -> dict:
    """The DeepSpeed config of a linear probe: ZeRO stage 0; bf16 becomes ``torch_autocast`` (GPU) or fp32 (CPU)."""
    ds = dict(ds)
    if ds.get("zero_optimization", {}).get("stage", 0):
        logger.info("linear probe: ZeRO stage 0 (ZeRO partitions would change LARS's per-tensor trust ratios)")
    ds["zero_optimization"] = {"stage": 0}
    if ds.get("bf16", {}).get("enabled"):
        ds["bf16"] = {"enabled": False}
        if device.type != "cpu":
            ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
        else:
            logger.info("linear probe on CPU: fp32 (bf16 needs AVX512-BF16/AMX to be fast)")
    return ds


def _optim_view(optim: LinprobeOptimCfg) -> OptimCfg:
    """The fields the shared checks and the cosine schedule read, as an :class:`OptimCfg`."""
    return OptimCfg(blr=optim.blr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
                    warmup_epochs=optim.warmup_epochs, clip_grad=optim.clip_grad)


def check_linprobe(cfg: LinprobeCfg, world_size: int, *, check_files: bool = True) -> Resolved:
    """Validates a linear-probe config (pre-trained weights, optimizer, classes, batch arithmetic, files).

    Raises:
        ConfigError: one line naming the key and the fix.
    """
    from .checks import check_classifier_kwargs, check_common, check_labeled, check_num_classes

    if check_files:
        check_labeled(cfg.data, "the linear probe")
    if not cfg.model.pretrained:
        raise ConfigError("model.pretrained: a linear probe needs pre-trained weights (--pretrained <run>)")
    if not Path(cfg.model.pretrained).is_file():
        try:
            resolve_tag_dir(Path(cfg.model.pretrained))
        except FileNotFoundError as e:
            raise ConfigError(f"model.pretrained: {e}") from None
    check_classifier_kwargs(cfg.model)
    if cfg.optim.name not in OPTIMIZERS:
        raise ConfigError(f"optim.name: unknown '{cfg.optim.name}' (choices: {', '.join(OPTIMIZERS)})")
    if cfg.optim.momentum < 0 or cfg.optim.weight_decay < 0:
        raise ConfigError(f"optim.momentum and optim.weight_decay must be >= 0, got {cfg.optim.momentum}, "
                          f"{cfg.optim.weight_decay}")
    if check_files:
        check_num_classes(cfg)
    if check_files:
        return check_common(cfg.data, _optim_view(cfg.optim), cfg.train, world_size, need_val=True)
    return resolve(_optim_view(cfg.optim), cfg.train, world_size)


class LinprobeLoop(ClassifierLoop):
    """The probe's step (cross-entropy of the BatchNorm + Linear head on frozen features) and its evaluation: every
    rank evaluates with rank 0's BatchNorm statistics (the ones rank 0 saves), under the engine's autocast."""

    def __init__(self, cfg: LinprobeCfg, run, engine, **kwargs):
        super().__init__(cfg, run, engine, client_extra={"task": "linprobe"}, **kwargs)
        self.criterion = nn.CrossEntropyLoss()
        self.bn = engine.module.get_submodule(engine.module.pretrained_cfg.get("classifier", "head"))[0]

    def step(self, images, labels) -> dict:
        logits = self.engine(images).float()
        return {"loss": self.criterion(logits, labels), "logits": logits}

    def evaluate_val(self) -> dict:
        if self.run_.dist.world_size > 1:
            for buf in self.bn.buffers():
                torch.distributed.broadcast(buf, src=0)
        amp = self.engine.torch_autocast_enabled()
        with torch.autocast(self.run_.dist.device.type, dtype=torch.bfloat16, enabled=amp):
            return evaluate(self.engine.module, self.val_loader, dtype=torch.float32, show_progress=self.show_progress)


def main(cfg: LinprobeCfg, *, resume: str | None = None) -> dict:
    """Trains and evaluates the probe; returns ``{"top1": last, "top5", "best_top1", "run_dir"}``."""
    run, name, num_classes = start_classifier_run(cfg, task="linprobe", check=check_linprobe, resume=resume,
                                                  zero_stage=0)  # probe_ds_config: always ZeRO-0
    dist, derived = run.dist, run.derived
    model, report = create_probe(cfg.model, num_classes=num_classes, img_size=cfg.data.img_size)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("run %s | %s frozen, head %d params trainable, %d classes | world %d | effective batch %d | "
                "%s lr %.3g (blr %.3g)", run.dir, name, trainable, num_classes, dist.world_size,
                derived.eff_batch, cfg.optim.name, derived.lr, cfg.optim.blr)
    if report.missing:
        logger.warning("not pre-trained (random init, frozen): %s", ", ".join(report.missing))
    optimizer = build_probe_optimizer(model, cfg.optim, derived.lr)
    ds = build_ds_config(cfg.train, clip_grad=cfg.optim.clip_grad, world_size=dist.world_size, run_dir=run.dir)
    engine = create_engine(model, optimizer, probe_ds_config(ds, dist.device), compile=cfg.train.compile,
                           compile_backend=cfg.train.compile_backend)
    scheduler = build_scheduler(optimizer, _optim_view(cfg.optim), derived, epochs=cfg.train.epochs)
    loop = LinprobeLoop(cfg, run, engine, scheduler=scheduler, report=report, model_name=name,
                        num_classes=num_classes)
    return loop.train_and_evaluate("linear-probe top-1: {top1:.2f}% (top-5 {top5:.2f}%, best {best_top1:.2f}% at "
                                   "epoch {best_epoch}), run: {run_dir}")
