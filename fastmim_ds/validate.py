"""Pre-launch checks: every config problem is one line naming the key, raised before any rank starts.

``fastmim-ds check pretrain|finetune`` runs these (``make pretrain``/``make finetune`` call it before the
``deepspeed`` launcher); every rank runs them again at start-up. Models are built on the ``meta`` device, so
checking a ViT-L config takes milliseconds and no memory.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import ConfigError, FinetuneCfg, PretrainCfg, Resolved, resolve
from .ds_engine import load_ds_config

__all__ = ["check_pretrain", "check_finetune", "read_classes"]


def _check_common(data, optim, train, world_size: int, *, need_val: bool) -> Resolved:
    derived = resolve(optim, train, world_size)
    if train.epochs < 1:
        raise ConfigError(f"train.epochs must be >= 1, got {train.epochs}")
    if optim.warmup_epochs >= train.epochs:
        raise ConfigError(f"optim.warmup_epochs={optim.warmup_epochs} must be < train.epochs={train.epochs}")
    if not 0.0 < optim.layer_decay <= 1.0:
        raise ConfigError(f"optim.layer_decay must be in (0, 1], got {optim.layer_decay}")
    if optim.clip_grad < 0:
        raise ConfigError(f"optim.clip_grad must be >= 0 (0 = off), got {optim.clip_grad}")
    if not (0.0 < data.rrc_scale[0] <= data.rrc_scale[1] <= 1.0):
        raise ConfigError(f"data.rrc_scale must satisfy 0 < min <= max <= 1, got {list(data.rrc_scale)}")
    for key in ("train", "val") if need_val else ("train",):
        p = Path(getattr(data, key))
        if not p.is_file():
            raise ConfigError(f"data.{key}: {p} not found (create it with `make prepare-data SRC=<imagefolder> OUT=...`)")
    load_ds_config(train.ds_config)
    return derived


def check_pretrain(cfg: PretrainCfg, world_size: int, *, check_files: bool = True) -> Resolved:
    """Validates a pre-training config for ``world_size`` ranks; returns the derived values.

    Raises:
        ConfigError: one line naming the key and the fix.
    """
    from .models import METHODS, create_mim_model

    if cfg.method not in METHODS:
        raise ConfigError(f"method: unknown '{cfg.method}' (choices: {', '.join(METHODS)})")
    try:
        with torch.device("meta"):
            create_mim_model(cfg.method, cfg.model, cfg.mask, cfg.data.img_size)
    except (ValueError, TypeError, RuntimeError) as e:
        key = "data.img_size" if "image size" in str(e) else "mask.block_size" if "block" in str(e) else "model"
        raise ConfigError(f"{key}: {e}") from None
    if check_files:
        return _check_common(cfg.data, cfg.optim, cfg.train, world_size, need_val=False)
    return resolve(cfg.optim, cfg.train, world_size)


def read_classes(beton: str) -> list[str]:
    """Class names stored by the converter in ``classes.json`` next to the .beton ([] if absent)."""
    meta = Path(beton).with_name("classes.json")
    if not meta.is_file():
        return []
    return json.loads(meta.read_text())["classes"]


def check_finetune(cfg: FinetuneCfg, world_size: int, *, check_files: bool = True) -> Resolved:
    """Validates a fine-tuning config (pre-trained weights, classes, classifier build).

    Raises:
        ConfigError: one line naming the key and the fix.
    """
    from .checkpoint import resolve_tag_dir

    if cfg.model.pretrained:
        p = Path(cfg.model.pretrained)
        if not p.is_file():
            try:
                resolve_tag_dir(p)
            except FileNotFoundError as e:
                raise ConfigError(f"model.pretrained: {e}") from None
    elif not cfg.model.name:
        raise ConfigError("model.name: give a timm model name, or model.pretrained to take the pre-trained encoder's")
    if check_files and cfg.model.num_classes == 0 and not read_classes(cfg.data.train):
        raise ConfigError(f"model.num_classes: 0 needs {Path(cfg.data.train).with_name('classes.json')}; set it")
    if not 0 <= cfg.aug.smoothing < 1:
        raise ConfigError(f"aug.smoothing must be in [0, 1), got {cfg.aug.smoothing}")
    if check_files:
        return _check_common(cfg.data, cfg.optim, cfg.train, world_size, need_val=True)
    return resolve(cfg.optim, cfg.train, world_size)
