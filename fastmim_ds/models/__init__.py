"""Encoders: timm backbones through per-family adapters, and the backbones this package defines (MixMIM), which
importing this package registers in timm (with their adapter). The MIM methods that train them are
:mod:`fastmim_ds.methods`."""
from __future__ import annotations

import torch.nn as nn

from ..config import SettingError
from .adapters import ADAPTERS, adapter_for, register_adapter
from .mixmim import MixMIMTransformer  # registers the mixmim_* models in timm and their adapter

__all__ = ["set_grad_checkpointing", "adapter_for", "register_adapter", "ADAPTERS", "MixMIMTransformer"]


def set_grad_checkpointing(module: nn.Module, enable: bool = True) -> None:
    """Activation checkpointing of a timm backbone's blocks (ViT, Swin, PVTv2, MixMIM): timm's own switch.

    Raises:
        SettingError: (key ``model.grad_checkpointing``) the model has no ``set_grad_checkpointing``.
    """
    if not hasattr(module, "set_grad_checkpointing"):
        raise SettingError("model.grad_checkpointing", f"{type(module).__name__} has no set_grad_checkpointing: "
                           "activation checkpointing is not supported for it")
    module.set_grad_checkpointing(enable)
