"""Fine-tuning classifiers: the timm model of the pre-trained encoder's family, loaded with its weights.

Follows FastMIM/MAE ``main_finetune.py``: strip the MIM wrapper (decoder, mask token), let the family's adapter
map the weights (ViT: resample the position embedding to the new grid; Swin: resample relative-position bias
tables to the new window and drop the buffers the model rebuilds), ``load_state_dict(strict=False)``,
re-initialise the head with trunc_normal(std=2e-5). The classifier is always the full architecture. Unlike the
reference, every key is accounted for: anything missing besides the head (e.g. the blocks a truncated
pre-training removed, ``model.encoder_blocks``), or unexpected, is reported and logged ("not pre-trained").
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from ..config import ClassifierCfg, SettingError
from ..weights import classifier_arch, load_pretrained_encoder
from .adapters import adapter_for

logger = logging.getLogger(__name__)

__all__ = ["LoadReport", "create_classifier", "PROBE_BN_EPS", "probe_head", "fold_probe_head"]

PROBE_BN_EPS = 1e-6  # MAE main_linprobe.py: BatchNorm1d(affine=False, eps=1e-6)


@dataclass
class LoadReport:
    """What a pre-trained load transferred: ``loaded`` keys, ``missing`` (left at init), ``unexpected`` (dropped)."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    pretrain_config: dict = field(default_factory=dict)


def _head_keys(model: nn.Module) -> set[str]:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    names = {id(p) for p in head.parameters()} if head is not None else set()
    return {n for n, p in model.named_parameters() if id(p) in names}


def create_classifier(cfg: ClassifierCfg, *, num_classes: int, img_size: int) -> tuple[nn.Module, LoadReport]:
    """Builds the classifier and loads ``cfg.pretrained`` into it (when set).

    The architecture is ``cfg.name``/``cfg.kwargs`` or, when empty, the pre-trained encoder's (stored in its
    checkpoint), so ``make finetune PRETRAINED=<run>`` needs no model name.

    Raises:
        ValueError: no model name anywhere, or pre-trained weights that do not fit the architecture.
    """
    report = LoadReport()
    state = None
    if cfg.pretrained:
        state, report.pretrain_config = load_pretrained_encoder(cfg.pretrained)
    name, kwargs = classifier_arch({"name": cfg.name, "kwargs": cfg.kwargs}, report.pretrain_config)
    if not name:
        raise SettingError("model.name", "empty, and the pre-trained checkpoint names no encoder")
    adapter = adapter_for(name)
    model = adapter.create_classifier(
        name, img_size=img_size, num_classes=num_classes, drop_path=cfg.drop_path, global_pool=cfg.global_pool,
        **kwargs,
    )
    head = _head_keys(model)
    if state is not None:
        state = adapter.adapt_state_dict(state, model)
        own = model.state_dict()
        # checked before loading: load_state_dict raises a RuntimeError on a shape mismatch even when not strict
        shape_err = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                     if k in own and own[k].shape != v.shape]
        if shape_err:
            raise SettingError("model.pretrained", f"pre-trained weights do not fit {name}: {'; '.join(shape_err[:3])}")
        result = model.load_state_dict(state, strict=False)
        report.missing = [k for k in result.missing_keys if k not in head]
        report.unexpected = list(result.unexpected_keys)
        report.loaded = [k for k in state if k not in result.unexpected_keys]
        logger.info("loaded %d pre-trained tensors from %s into %s", len(report.loaded), cfg.pretrained, name)
        if report.missing:
            logger.warning("not pre-trained (random init): %s", ", ".join(report.missing))
        if report.unexpected:
            logger.warning("pre-trained weights not used: %s", ", ".join(report.unexpected))
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    head_mod = model.get_classifier()
    if isinstance(head_mod, nn.Linear):
        trunc_normal_(head_mod.weight, std=2e-5)
        nn.init.zeros_(head_mod.bias)
    return model, report


def probe_head(linear: nn.Linear) -> nn.Sequential:
    """The linear probe's head around ``linear``: ``Sequential(BatchNorm1d(affine=False, eps=1e-6), linear)`` on the
    pooled (B, C) features (MAE ``main_linprobe.py``); :func:`fold_probe_head` turns it back into one Linear."""
    return nn.Sequential(nn.BatchNorm1d(linear.in_features, affine=False, eps=PROBE_BN_EPS), linear)


def fold_probe_head(state: dict[str, torch.Tensor], head: str) -> dict[str, torch.Tensor]:
    """Folds a linear probe's ``Sequential(BatchNorm1d(affine=False), Linear)`` head into one Linear.

    ``y = W (x - mu) / sqrt(var + eps) + b`` = ``W' x + b'`` with ``W' = W / sqrt(var + eps)`` (per input column) and
    ``b' = b - W' mu`` (BatchNorm in eval mode: running statistics; eps 1e-6 as MAE ``main_linprobe.py``).

    Args:
        state: weights with ``{head}.0.running_mean/var`` and ``{head}.1.weight/bias``.
        head: the classifier's module path (timm ``pretrained_cfg['classifier']``: ``head`` or ``head.fc``).

    Returns:
        a new dict with ``{head}.weight/bias`` instead of the probe's tensors.
    """
    out = {k: v for k, v in state.items() if not k.startswith(f"{head}.0.") and not k.startswith(f"{head}.1.")}
    inv_std = (state[f"{head}.0.running_var"].double() + PROBE_BN_EPS).rsqrt()  # (C,)
    w = state[f"{head}.1.weight"].double() * inv_std  # (K, C)
    out[f"{head}.weight"] = w.float()
    out[f"{head}.bias"] = (state[f"{head}.1.bias"].double() - w @ state[f"{head}.0.running_mean"].double()).float()
    return out
