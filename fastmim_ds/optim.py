"""Optimizer parameter groups and the per-iteration lr schedule (timm helpers).

* Pre-training: AdamW, no weight decay on 1-D parameters, biases, position/cls tokens and the mask token
  (timm ``param_groups_weight_decay`` + the model's ``no_weight_decay()``).
* Fine-tuning: layer-wise lr decay (BEiT/MAE; timm ``param_groups_layer_decay``): parameter group ``i`` gets
  ``lr_scale = layer_decay ** (L - i)``, embeddings at 0, block k at k + 1, final norm and head at L.
* Schedule: linear warmup from 0 then half-cosine to ``min_lr``, updated every optimizer step with fractional
  epochs (MAE ``lr_sched.adjust_learning_rate``), via timm ``CosineLRScheduler`` which honours ``lr_scale``
  (also used to rescale the lr per FastMIM-P stage).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler

from .config import OptimCfg, Resolved

__all__ = ["build_optimizer", "build_scheduler", "set_lr_multiplier"]


def build_optimizer(model: nn.Module, optim: OptimCfg, derived: Resolved) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters with no-decay (and optional layer-decay) groups.

    torch's fused AdamW kernel (CPU and CUDA): one pass over each flat ZeRO partition instead of torch's default
    per-op update; on a 2-core CPU the update of ViT-B's 87 M fp32 parameters drops from ~1 s to ~0.1 s
    (``benchmarks/RESULTS.md``, before/after).
    """
    no_wd = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    if optim.layer_decay < 1.0:
        groups = param_groups_layer_decay(
            model, weight_decay=optim.weight_decay, no_weight_decay_list=no_wd, layer_decay=optim.layer_decay
        )
    else:
        groups = param_groups_weight_decay(model, weight_decay=optim.weight_decay, no_weight_decay_list=no_wd)
    return torch.optim.AdamW(groups, lr=derived.lr, betas=tuple(optim.betas), eps=optim.eps, fused=True)


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimCfg, derived: Resolved, *,
                    epochs: int) -> CosineLRScheduler:
    """Warmup + half-cosine in fractional epochs: call ``step(epoch + i / updates_per_epoch)`` before each update.

    Fractional epochs (MAE ``adjust_learning_rate``) keep the schedule right when an epoch's number of updates
    changes between FastMIM-P stages. Warmup starts at exactly 0. The peak is ``derived.lr`` (times each group's
    ``lr_scale``), also when the optimizer's state came from a checkpoint of another effective batch (a resume on
    another number of ranks): timm would otherwise take the loaded groups' ``initial_lr``, the old run's peak.

    Raises:
        ValueError: warmup not shorter than training.
    """
    if optim.warmup_epochs >= epochs:
        raise ValueError(f"optim.warmup_epochs={optim.warmup_epochs} is not shorter than train.epochs={epochs}")
    for group in optimizer.param_groups:
        group["initial_lr"] = derived.lr
    return CosineLRScheduler(
        optimizer, t_initial=epochs - optim.warmup_epochs, lr_min=derived.min_lr, warmup_t=optim.warmup_epochs,
        warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=True,
    )


def set_lr_multiplier(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Scales every group's lr (and min lr) by ``factor`` on top of its layer-decay ``lr_scale``.

    FastMIM-P re-derives the peak lr from each stage's effective batch (``blr * eff_batch / 256``); the
    scheduler multiplies its value by ``lr_scale`` (timm ``Scheduler._update_groups``), so changing the scale
    changes the peak and the floor together, as FastMIM's ``main_pretrain.py`` does.
    """
    for group in optimizer.param_groups:
        group.setdefault("base_lr_scale", group.get("lr_scale", 1.0))
        group["lr_scale"] = group["base_lr_scale"] * factor
