"""The two pre-training baselines FastMIM's speed is compared with, on the very same timm backbones.

* :class:`SimMIMStyle` (Xie et al., arXiv 2111.09886; microsoft/SimMIM ``models/simmim.py``): masked patch
  *embeddings* are replaced by a learnable C-dimensional mask token, **all** tokens are encoded, a linear head
  predicts the stride x stride x 3 raw (normalised) pixels of every final-stage token (SimMIM's 1x1 conv +
  PixelShuffle) and the loss is L1 over the masked pixels. SimMIM's recipe: 32-px mask blocks, ratio 0.6.
  Works for ViT and Swin encoders.
* :class:`MAEStyle` (He et al., arXiv 2111.06377; facebookresearch/mae ``models_mae.py``): a ViT encodes only the
  visible 25% of the patch tokens (random per-sample keep, argsort of noise), an 8-block 512-d decoder
  (16 heads) sees the encoded tokens plus mask tokens at every position with a fixed sin-cos position table,
  and the loss is the norm-pix MSE over the masked patches. ViT only (dropping tokens needs a plain ViT).

The encoders are built by the product's adapters (``fastmim_ds.models.adapters``: timm model, frozen sin-cos
position table for ViT), initialised as FastMIM's, so the three methods differ only in what the MIM papers differ
in. Both models return ``{"loss", "pred", "mask"}`` (mask: (B, N) bool, True = masked) like
``fastmim_ds.models.FastMIM``, so the same DeepSpeed engine and step run them.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from timm.layers import build_sincos2d_pos_embed, trunc_normal_
from timm.models.vision_transformer import Block

from fastmim_ds.losses import masked_mse
from fastmim_ds.masking import BlockMaskGenerator, upsample_mask
from fastmim_ds.models import adapter_for
from fastmim_ds.models.adapters import SwinAdapter, ViTAdapter
from fastmim_ds.models.mim import _init_xavier
from fastmim_ds.targets import PixelTarget, patchify

__all__ = ["SimMIMStyle", "MAEStyle", "create_baseline", "BASELINES"]


def _create_encoder(name: str, img_size: int, **kwargs) -> tuple[nn.Module, ViTAdapter | SwinAdapter]:
    adapter = adapter_for(name)
    if not isinstance(adapter, (ViTAdapter, SwinAdapter)):
        raise ValueError(f"baselines support ViT and Swin encoders, not '{name}' ({adapter.family})")
    encoder = adapter.create(name, img_size=img_size, drop_path=0.0, **kwargs)
    encoder.apply(_init_xavier)
    return encoder, adapter


class SimMIMStyle(nn.Module):
    """SimMIM: C-dim mask token on the patch embeddings, all tokens encoded, linear pixel head, masked L1.

    Args:
        encoder: timm ViT or Swin name (e.g. ``vit_base_patch16_224``, ``swin_base_patch4_window7_224``).
        img_size: input side in px.
        mask_ratio: fraction of mask blocks masked (SimMIM: 0.6).
        mask_block: mask block side in px, a multiple of the encoder's output stride (SimMIM: 32).
        **encoder_kwargs: passed to ``timm.create_model`` (e.g. ``window_size``).
    """

    def __init__(self, *, encoder: str, img_size: int, mask_ratio: float = 0.6, mask_block: int = 32,
                 **encoder_kwargs):
        super().__init__()
        self.encoder, self.adapter = _create_encoder(encoder, img_size, **encoder_kwargs)
        self.is_vit = isinstance(self.adapter, ViTAdapter)
        self.patch = self.encoder.patch_embed.patch_size[0]  # side of one patch embedding in px
        self.stride = self.adapter.stride(self.encoder)  # side of one final-stage token in px
        if mask_block % self.stride or img_size % mask_block:
            raise ValueError(f"mask block {mask_block} px must be a multiple of the stride {self.stride} px and "
                             f"divide the image size {img_size}")
        self.mask_generator = BlockMaskGenerator(ratio=mask_ratio, block_size=mask_block)
        dim = self.encoder.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, dim))  # replaces a masked patch embedding
        trunc_normal_(self.mask_token, std=0.02)
        self.head = nn.Linear(self.adapter.num_features(self.encoder), self.stride**2 * 3)

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.adapter.no_weight_decay(self.encoder)} | {"mask_token"}

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Args: imgs (B, 3, H, W) normalised; mask (B, H / mask_block, W / mask_block) bool, True = masked (drawn
        when ``None``). Returns ``loss`` (fp32 scalar), ``pred`` (B, N, stride^2 * 3), ``mask`` (B, N) bool."""
        B, _, H, W = imgs.shape
        block = self.mask_generator.block_size
        if mask is None:
            mask = self.mask_generator(B, (H, W), device=imgs.device)
        enc = self.encoder
        x = enc.patch_embed(imgs.to(self.mask_token.dtype))  # (B, H / patch, W / patch, C), NHWC for both families
        w = upsample_mask(mask, block // self.patch).unsqueeze(-1).to(x.dtype)  # (B, h, w, 1), 1 = masked
        x = x * (1 - w) + self.mask_token * w
        if self.is_vit:
            # timm VisionTransformer.forward_features after its patch_embed
            x = enc.norm_pre(enc.patch_drop(enc._pos_embed(x)))
            tokens = enc.fc_norm(enc.blocks(x))[:, enc.num_prefix_tokens:]  # (B, N, C)
        else:
            tokens = enc.norm(enc.layers(x)).flatten(1, 2)  # SwinTransformer.forward_features -> (B, N, C)
        pred = self.head(tokens)  # (B, N, stride^2 * 3)
        target = patchify(imgs.float(), self.stride)  # raw normalised pixels, as SimMIM
        token_mask = upsample_mask(mask, block // self.stride).flatten(1)  # (B, N)
        err = (pred.float() - target).abs().mean(dim=-1)  # L1, mean over a token's pixels
        m = token_mask.to(err.dtype)
        loss = (err * m).sum() / m.sum().clamp(min=1)
        return {"loss": loss, "pred": pred, "mask": token_mask}


class MAEStyle(nn.Module):
    """MAE: a ViT encodes the visible tokens only; a ``decoder_depth`` x ``decoder_dim`` decoder; norm-pix MSE.

    Args:
        encoder: timm ViT name (e.g. ``vit_base_patch16_224``).
        img_size: input side in px.
        mask_ratio: fraction of patches dropped (MAE: 0.75).
        decoder_dim, decoder_depth, decoder_heads: decoder shape (MAE: 512, 8, 16).
        **encoder_kwargs: passed to ``timm.create_model``.
    """

    def __init__(self, *, encoder: str, img_size: int, mask_ratio: float = 0.75, decoder_dim: int = 512,
                 decoder_depth: int = 8, decoder_heads: int = 16, **encoder_kwargs):
        super().__init__()
        self.encoder, self.adapter = _create_encoder(encoder, img_size, **encoder_kwargs)
        if not isinstance(self.adapter, ViTAdapter) or self.encoder.cls_token is None:
            raise ValueError(f"MAE-style pre-training needs a ViT with a class token, not '{encoder}'")
        self.mask_ratio = mask_ratio
        self.patch = self.encoder.patch_embed.patch_size[0]
        grid = self.encoder.patch_embed.grid_size
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_embed = nn.Linear(self.encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        table = torch.cat([torch.zeros(1, decoder_dim), build_sincos2d_pos_embed(list(grid), dim=decoder_dim)])
        self.register_buffer("decoder_pos_embed", table.unsqueeze(0), persistent=False)  # (1, 1 + N, D), fixed
        self.decoder_blocks = nn.Sequential(
            *[Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm)
              for _ in range(decoder_depth)]
        )
        self.decoder_norm = norm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch**2 * 3)
        self.target = PixelTarget(normalize=True)
        for m in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            m.apply(_init_xavier)
        nn.init.normal_(self.mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.adapter.no_weight_decay(self.encoder)} | {"mask_token"}

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Args: imgs (B, 3, H, W) normalised; ``mask`` is ignored (MAE draws its own per-sample keep set).
        Returns ``loss`` (fp32 scalar), ``pred`` (B, N, patch^2 * 3), ``mask`` (B, N) bool, True = masked."""
        enc = self.encoder
        x = enc.patch_embed(imgs.to(self.mask_token.dtype)).flatten(1, 2)  # (B, N, C)
        B, N, C = x.shape
        pos = enc.pos_embed  # (1, 1 + N, C): frozen sin-cos, class row zero
        x = x + pos[:, 1:]
        num_keep = int(N * (1 - self.mask_ratio))
        noise = torch.rand(B, N, device=x.device)
        ids_shuffle = noise.argsort(dim=1)  # ascending: the num_keep smallest are kept (MAE random_masking)
        ids_restore = ids_shuffle.argsort(dim=1)
        ids_keep = ids_shuffle[:, :num_keep]
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, C))  # (B, num_keep, C)
        cls = (enc.cls_token + pos[:, :1]).expand(B, -1, -1)
        x = enc.fc_norm(enc.blocks(enc.norm_pre(torch.cat([cls, x], dim=1))))  # (B, 1 + num_keep, C)

        y = self.decoder_embed(x)  # (B, 1 + num_keep, D)
        D = y.shape[-1]
        y_ = torch.cat([y[:, 1:], self.mask_token.expand(B, N - num_keep, -1)], dim=1)  # (B, N, D) shuffled
        y_ = torch.gather(y_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, D))  # back to row-major order
        y = torch.cat([y[:, :1], y_], dim=1) + self.decoder_pos_embed.to(y.dtype)
        pred = self.decoder_pred(self.decoder_norm(self.decoder_blocks(y)))[:, 1:]  # (B, N, patch^2 * 3)
        mask = torch.ones(B, N, dtype=torch.bool, device=x.device)
        mask[:, :num_keep] = False
        mask = torch.gather(mask, 1, ids_restore)  # (B, N), True = masked
        loss = masked_mse(pred, self.target(imgs, self.patch), mask)
        return {"loss": loss, "pred": pred, "mask": mask}


BASELINES = {"simmim": SimMIMStyle, "mae": MAEStyle}


def create_baseline(method: str, *, encoder: str, img_size: int, **kwargs) -> nn.Module:
    """``"simmim"`` or ``"mae"`` baseline around the timm ``encoder``.

    Raises:
        ValueError: unknown method (lists the choices) or an encoder the method cannot use.
    """
    if method not in BASELINES:
        raise ValueError(f"unknown baseline '{method}' (choices: {', '.join(BASELINES)})")
    return BASELINES[method](encoder=encoder, img_size=img_size, **kwargs)
