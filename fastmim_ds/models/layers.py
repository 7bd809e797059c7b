"""Building blocks shared by backbones and MIM methods: MAE-style initialisation and the MAE sin-cos table."""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import build_sincos2d_pos_embed

__all__ = ["init_xavier", "init_encoder_mae", "sincos_pos_embed", "stem_conv"]


def init_xavier(m: nn.Module) -> None:
    """MAE/FastMIM/MixMIM initialisation of one module (use with ``module.apply``): xavier_uniform for every Linear
    (bias 0), LayerNorm weight 1 and bias 0 (MAE ``models_mae._init_weights``, following the JAX ViT)."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def stem_conv(encoder: nn.Module) -> nn.Module | None:
    """The encoder's first (patch-embedding) conv as timm's ``pretrained_cfg['first_conv']`` names it; None when the
    model names none or the name does not resolve."""
    name = (getattr(encoder, "pretrained_cfg", None) or {}).get("first_conv")
    try:
        return encoder.get_submodule(name) if name else None
    except AttributeError:
        return None


def init_encoder_mae(encoder: nn.Module) -> None:
    """Re-initialises a timm encoder as MAE ``initialize_weights`` and FastMIM (docs/methods.md §1.3, 1.4).

    Every Linear xavier_uniform, LayerNorms (1, 0); the stem conv (the module timm's ``pretrained_cfg['first_conv']``
    names, e.g. ``patch_embed.proj``) xavier_uniform on its weight viewed as a Linear; the class token, when there is
    one, normal(0.02) (timm uses 1e-6).
    """
    encoder.apply(init_xavier)
    pe = stem_conv(encoder)
    if isinstance(pe, nn.Conv2d):
        nn.init.xavier_uniform_(pe.weight.view(pe.weight.shape[0], -1))
    if getattr(encoder, "cls_token", None) is not None:
        nn.init.normal_(encoder.cls_token, std=0.02)


def sincos_pos_embed(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position table, (h * w, dim), tokens row-major.

    Channel order of MAE/MixMIM ``get_2d_sincos_pos_embed``: [sin(x), cos(x), sin(y), cos(y)] with x the column,
    y the row and frequencies 1 / 10000^(k / (dim / 4)). timm's ``build_sincos2d_pos_embed`` computes the same
    values in the order [sin(y), sin(x), cos(y), cos(x)]; only the channels are permuted here.

    Raises:
        ValueError: ``dim`` not a multiple of 4.
    """
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos table needs a width divisible by 4, got {dim}")
    emb = build_sincos2d_pos_embed(list(grid), dim=dim)  # (N, dim): (sin|cos) x (row|col) x dim/4
    n = emb.shape[0]
    return emb.view(n, 2, 2, dim // 4).flip(2).transpose(1, 2).reshape(n, dim)
