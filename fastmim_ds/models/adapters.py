"""Per-family encoder adapters: a timm backbone, seen by the MIM wrapper as image -> tokens.

The MIM logic (masking, mask token, decoder, target, loss) lives once in :mod:`fastmim_ds.models.mim`.
An adapter only knows how one timm model family is built for pre-training, turns a (masked) image into its
final-stage tokens, and maps pre-trained weights into the same family's classifier. Adding a backbone
family means adding one adapter class and one line in :data:`ADAPTERS` (this replaces FastMIM's one
copied 500-780-line script per backbone and SimMIM's ``*ForSimMIM`` subclasses).

Adapters are stateless: the pre-trained encoder *is* the timm classifier without its head, so its
``state_dict`` loads into ``timm.create_model(name, num_classes=K)`` with only ``head.*`` missing.
"""
from __future__ import annotations

import logging
from typing import Protocol

import timm
import torch
import torch.nn as nn
from timm.layers import build_sincos2d_pos_embed, resample_abs_pos_embed
from timm.models import is_model_in_modules

logger = logging.getLogger(__name__)

__all__ = ["EncoderAdapter", "ViTAdapter", "ADAPTERS", "adapter_for"]


class EncoderAdapter(Protocol):
    """What the MIM wrapper needs from a backbone family."""

    family: str

    def create(self, name: str, *, img_size: int, drop_path: float, **kwargs) -> nn.Module:
        """Builds the encoder for pre-training (timm model, no head, any valid input size)."""

    def stride(self, encoder: nn.Module) -> int:
        """Output stride in pixels: the token grid is (H / stride, W / stride)."""

    def num_features(self, encoder: nn.Module) -> int:
        """Channels C of the returned tokens."""

    def check_img_size(self, encoder: nn.Module, img_size: int) -> None:
        """Raises ValueError, naming sizes that would work, when ``img_size`` is not valid."""

    def forward_tokens(self, encoder: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(B, 3, H, W) -> ((B, P + N, C) tokens, P prefix tokens); N row-major on the stride grid."""

    def no_weight_decay(self, encoder: nn.Module) -> set[str]:
        """Parameter names (relative to the encoder) excluded from weight decay besides 1-D params."""

    def create_classifier(
        self, name: str, *, img_size: int, num_classes: int, drop_path: float, global_pool: str, **kwargs
    ) -> nn.Module:
        """Builds the fine-tuning classifier of the same family."""

    def adapt_state_dict(self, state: dict[str, torch.Tensor], classifier: nn.Module) -> dict[str, torch.Tensor]:
        """Maps pre-trained encoder weights onto ``classifier`` (resampling position tables)."""


class ViTAdapter:
    """timm ``VisionTransformer`` (FastMIM ``mim_vit_pretrain.py``).

    Pre-training uses a fixed 2-D sin-cos position embedding (frozen, as FastMIM/MAE) that timm resamples to
    the current grid (``dynamic_img_size=True``), so one model accepts every size divisible by the patch
    size (FastMIM-P). The encoder is built with ``global_pool='avg'``: its final LayerNorm is ``fc_norm``,
    applied per token here and after pooling in the classifier, so every encoder weight is transferred.
    Fine-tuning bicubically resamples the position embedding to the new grid and trains it (FastMIM
    ``interpolate_pos_embed``).
    """

    family = "vit"

    def create(self, name: str, *, img_size: int, drop_path: float, **kwargs) -> nn.Module:
        model = timm.create_model(
            name, pretrained=False, num_classes=0, global_pool="avg", img_size=img_size,
            dynamic_img_size=True, drop_path_rate=drop_path, **kwargs,
        )
        if model.pos_embed is not None:
            gh, gw = model.patch_embed.grid_size
            sincos = build_sincos2d_pos_embed([gh, gw], dim=model.embed_dim)  # (gh * gw, C)
            prefix = torch.zeros(0 if model.no_embed_class else model.num_prefix_tokens, model.embed_dim)
            with torch.no_grad():
                model.pos_embed.copy_(torch.cat([prefix, sincos]).unsqueeze(0))
            model.pos_embed.requires_grad_(False)
        return model

    def stride(self, encoder: nn.Module) -> int:
        return encoder.patch_embed.patch_size[0]

    def num_features(self, encoder: nn.Module) -> int:
        return encoder.embed_dim

    def check_img_size(self, encoder: nn.Module, img_size: int) -> None:
        p = self.stride(encoder)
        if img_size % p:
            raise ValueError(f"image size {img_size} is not divisible by the ViT patch size {p}")

    def forward_tokens(self, encoder: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        tokens = encoder.forward_features(x)  # (B, P + N, C), final norm is Identity with global_pool='avg'
        return encoder.fc_norm(tokens), encoder.num_prefix_tokens

    def no_weight_decay(self, encoder: nn.Module) -> set[str]:
        return set(encoder.no_weight_decay())

    def create_classifier(
        self, name: str, *, img_size: int, num_classes: int, drop_path: float, global_pool: str, **kwargs
    ) -> nn.Module:
        return timm.create_model(
            name, pretrained=False, num_classes=num_classes, global_pool=global_pool, img_size=img_size,
            drop_path_rate=drop_path, **kwargs,
        )

    def adapt_state_dict(self, state: dict[str, torch.Tensor], classifier: nn.Module) -> dict[str, torch.Tensor]:
        state = dict(state)
        if "pos_embed" in state and classifier.pos_embed is not None:
            old = state["pos_embed"]
            prefix = 0 if classifier.no_embed_class else classifier.num_prefix_tokens
            n_old = old.shape[1] - prefix
            side = int(n_old**0.5)
            new_grid = classifier.patch_embed.grid_size
            if (side, side) != tuple(new_grid):
                logger.info("resampling pos_embed %dx%d -> %dx%d (bicubic)", side, side, *new_grid)
                state["pos_embed"] = resample_abs_pos_embed(
                    old.float(), new_size=list(new_grid), old_size=[side, side], num_prefix_tokens=prefix
                )
        return state


# timm module name -> adapter; a new family = one adapter + one line here.
ADAPTERS: dict[str, EncoderAdapter] = {
    "vision_transformer": ViTAdapter(),
}


def adapter_for(name: str) -> EncoderAdapter:
    """Adapter of the timm model ``name``.

    Raises:
        ValueError: unknown timm model, or a family without an adapter (lists the supported ones).
    """
    if not timm.is_model(name):
        raise ValueError(f"'{name}' is not a timm model (see timm.list_models())")
    for module, adapter in ADAPTERS.items():
        if is_model_in_modules(name, [module]):
            return adapter
    raise ValueError(f"no MIM adapter for '{name}' (supported timm modules: {', '.join(ADAPTERS)})")
