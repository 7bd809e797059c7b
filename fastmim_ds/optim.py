"""Optimizer parameter groups and the per-iteration lr schedule (timm helpers).

* Pre-training: AdamW, no weight decay on 1-D parameters, biases, position/cls tokens and the mask token
  (timm ``param_groups_weight_decay`` + the model's ``no_weight_decay()``).
* Fine-tuning: layer-wise lr decay (BEiT/MAE; timm ``param_groups_layer_decay``): parameter group ``i`` gets
  ``lr_scale = layer_decay ** (L - i)``, embeddings at 0, block k at k + 1, final norm and head at L.
* Schedule: linear warmup from 0 then half-cosine to ``min_lr``, updated every optimizer step with fractional
  epochs (MAE ``lr_sched.adjust_learning_rate``), via timm ``CosineLRScheduler`` which honours ``lr_scale``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler

from .config import OptimCfg, Resolved

__all__ = ["build_optimizer", "build_scheduler"]


def build_optimizer(model: nn.Module, optim: OptimCfg, derived: Resolved) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters with no-decay (and optional layer-decay) groups."""
    no_wd = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    if optim.layer_decay < 1.0:
        groups = param_groups_layer_decay(
            model, weight_decay=optim.weight_decay, no_weight_decay_list=no_wd, layer_decay=optim.layer_decay
        )
    else:
        groups = param_groups_weight_decay(model, weight_decay=optim.weight_decay, no_weight_decay_list=no_wd)
    return torch.optim.AdamW(groups, lr=derived.lr, betas=tuple(optim.betas), eps=optim.eps)


def build_scheduler(
    optimizer: torch.optim.Optimizer, optim: OptimCfg, derived: Resolved, *, epochs: int, updates_per_epoch: int
) -> CosineLRScheduler:
    """Per-update schedule: call ``step_update(num_updates)`` before each optimizer step.

    Raises:
        ValueError: warmup longer than training.
    """
    total = epochs * updates_per_epoch
    warmup = int(round(optim.warmup_epochs * updates_per_epoch))
    if warmup >= total and total > 0:
        raise ValueError(f"optim.warmup_epochs={optim.warmup_epochs} is not shorter than train.epochs={epochs}")
    return CosineLRScheduler(
        optimizer, t_initial=max(1, total - warmup), lr_min=derived.min_lr, warmup_t=warmup, warmup_lr_init=0.0,
        warmup_prefix=True, t_in_epochs=False,
    )
