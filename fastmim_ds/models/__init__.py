"""Model registry: MIM methods by name, encoders from timm through per-family adapters."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..config import MaskCfg, MIMModelCfg, PretrainCfg, load_config
from ..targets import build_target
from .adapters import ADAPTERS, adapter_for
from .mim import FastMIM, TokenDecoder, _init_xavier
from .mixmim import MixMIM, MixMIMTransformer, build_mixmim  # registers the mixmim_* models and their adapter

__all__ = [
    "METHODS", "create_mim_model", "initial_mim_model", "set_grad_checkpointing", "adapter_for", "ADAPTERS", "FastMIM",
    "TokenDecoder", "MixMIM", "MixMIMTransformer",
]


def _init_encoder(encoder: nn.Module) -> None:
    # FastMIM/MAE re-initialise every encoder Linear with xavier_uniform (METHODS.md 1.3, 1.4)
    encoder.apply(_init_xavier)
    pe = getattr(getattr(encoder, "patch_embed", None), "proj", None)
    if isinstance(pe, nn.Conv2d):  # MAE: xavier on the conv weight viewed as a Linear
        nn.init.xavier_uniform_(pe.weight.view(pe.weight.shape[0], -1))
    if getattr(encoder, "cls_token", None) is not None:  # FastMIM: normal(0.02); timm uses 1e-6
        nn.init.normal_(encoder.cls_token, std=0.02)


def build_fastmim(model: MIMModelCfg, mask: MaskCfg, img_size: int) -> FastMIM:
    """FastMIM model from its config sections; validates ``img_size`` (ValueError with the reason)."""
    adapter = adapter_for(model.encoder)
    encoder = adapter.create(model.encoder, img_size=img_size, drop_path=model.drop_path, **model.encoder_kwargs)
    if model.encoder_blocks:  # FastMIM finding ii: pre-train the first k blocks; fine-tuning initialises the rest
        adapter.truncate(encoder, model.encoder_blocks)
    _init_encoder(encoder)
    target = build_target(
        model.target, normalize=model.norm_pix_loss, hog_bins=model.hog_bins, hog_cell=model.hog_cell
    )
    mim = FastMIM(
        encoder=encoder, adapter=adapter, target=target, mask_ratio=mask.ratio, block_size=mask.block_size,
        decoder_dim=model.decoder_dim, decoder_depth=model.decoder_depth, decoder_heads=model.decoder_heads,
    )
    mim.check_img_size(img_size)
    return mim


# method name -> builder(model_cfg, mask_cfg, img_size); picked once, an unknown name lists the choices.
METHODS = {
    "fastmim": build_fastmim,
    "mixmim": build_mixmim,
}


def create_mim_model(method: str, model: MIMModelCfg, mask: MaskCfg, img_size: int) -> nn.Module:
    """Builds the pre-training model of ``method``.

    Raises:
        ValueError: unknown method or encoder, or an image size the model cannot take.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}' (choices: {', '.join(METHODS)})")
    mim = METHODS[method](model, mask, img_size)
    if model.grad_checkpointing:
        set_grad_checkpointing(mim.encoder)
    return mim


def set_grad_checkpointing(module: nn.Module, enable: bool = True) -> None:
    """Activation checkpointing of a timm backbone's blocks (ViT, Swin, PVTv2, MixMIM): timm's own switch.

    Raises:
        ValueError: the model has no ``set_grad_checkpointing``.
    """
    if not hasattr(module, "set_grad_checkpointing"):
        raise ValueError(f"{type(module).__name__} has no set_grad_checkpointing: model.grad_checkpointing is not "
                         "supported for it")
    module.set_grad_checkpointing(enable)


def initial_mim_model(config: str | Path) -> tuple[nn.Module, PretrainCfg]:
    """The pre-training model of a YAML config exactly as its run starts (rank 0: seeded with ``train.seed``):
    the *untrained* baseline of k-NN, linear probing and fine-tuning.

    Raises:
        ConfigError: the config does not load.
        ValueError: as :func:`create_mim_model`.
    """
    cfg = load_config(PretrainCfg, config)
    torch.manual_seed(cfg.train.seed)
    return create_mim_model(cfg.method, cfg.model, cfg.mask, cfg.data.img_size), cfg
