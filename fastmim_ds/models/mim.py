"""One masked-image-modeling wrapper for every backbone family: FastMIM (arXiv 2212.06593).

``FastMIM(encoder, adapter, decoder, target)``:

1. draw a per-sample block mask on the (H / block_size, W / block_size) grid (True = masked);
2. replace masked pixels by a learned RGB colour in normalised-pixel space, *before* the patch embedding
   (``mask_token`` of shape (1, 3, 1, 1); FastMIM ``mim_vit_pretrain.py``; not a C-dimensional embedding);
3. encode all tokens (nothing is dropped, so hierarchical encoders work unchanged);
4. a light transformer decoder predicts the target of every token from the encoder's tokens (no decoder
   position embedding, no mask-token re-insertion, as the reference);
5. MSE over the masked tokens only; the target (HOG or pixels) comes from the unmasked image, in fp32.

The model returns ``{"loss", "pred", "target", "mask"}``; nothing here knows about devices, ranks or
precision beyond casting the image to the encoder's dtype.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block

from ..losses import masked_mse
from ..masking import BlockMaskGenerator, upsample_mask
from .adapters import EncoderAdapter

__all__ = ["TokenDecoder", "FastMIM", "init_prediction"]


class TokenDecoder(nn.Module):
    """Light decoder on encoder tokens: Linear(C -> D), ``depth`` timm Blocks, LayerNorm, Linear(D -> out).

    Args:
        in_dim: encoder channels C.
        dim: decoder width D (256 in FastMIM).
        depth: transformer blocks (1 for ViT-B, 4 for Swin-B).
        num_heads: attention heads (FastMIM: D / 32).
        out_dim: values predicted per token (108 for HOG at stride 16).
    """

    def __init__(self, *, in_dim: int, dim: int, depth: int, num_heads: int, out_dim: int):
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.embed = nn.Linear(in_dim, dim)
        self.blocks = nn.Sequential(
            *[Block(dim, num_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm) for _ in range(depth)]
        )
        self.norm = norm(dim)
        self.pred = nn.Linear(dim, out_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N, out_dim)."""
        return self.pred(self.norm(self.blocks(self.embed(tokens))))


def _init_xavier(m: nn.Module) -> None:
    # MAE/FastMIM initialisation: xavier_uniform for every Linear, LayerNorm (1, 0)
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def init_prediction(pred: nn.Linear, value: float) -> None:
    """Zero weight and a constant bias ``value``: the untrained decoder predicts one typical target value.

    With xavier initialisation the first predictions have ~30x the variance of an L2-normalised HOG target
    (mean 0.24, std 0.23 per value), and the first tens of updates only shrink them (measured on imagenette).
    Starting from a constant puts the loss near that of the mean predictor at step 0; the zero weight still gets
    gradients (d loss / d W = error x features), so learning starts at once.
    """
    nn.init.zeros_(pred.weight)
    nn.init.constant_(pred.bias, value)


class FastMIM(nn.Module):
    """FastMIM pre-training model around any encoder with an :class:`EncoderAdapter`.

    Args:
        encoder: timm backbone built by ``adapter.create``.
        adapter: the encoder family's adapter.
        target: :class:`~fastmim_ds.targets.HOGTarget` or :class:`~fastmim_ds.targets.PixelTarget`.
        mask_ratio: fraction of blocks masked per sample (0.75).
        block_size: mask block side in px, a multiple of the encoder stride (16 for ViT/16, 32 for Swin).
        decoder_dim, decoder_depth, decoder_heads: decoder shape (heads 0 -> decoder_dim // 32).
    """

    def __init__(
        self,
        *,
        encoder: nn.Module,
        adapter: EncoderAdapter,
        target: nn.Module,
        mask_ratio: float,
        block_size: int,
        decoder_dim: int,
        decoder_depth: int,
        decoder_heads: int = 0,
    ):
        super().__init__()
        self.encoder = encoder
        self.adapter = adapter
        self.stride = adapter.stride(encoder)
        if block_size % self.stride:
            raise ValueError(
                f"mask block size {block_size} must be a multiple of the encoder stride {self.stride} "
                f"(e.g. {self.stride} or {2 * self.stride})"
            )
        self.mask_generator = BlockMaskGenerator(ratio=mask_ratio, block_size=block_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 3, 1, 1))  # learned RGB colour, normalised-pixel units
        self.target = target
        heads = decoder_heads or max(1, decoder_dim // 32)
        self.decoder = TokenDecoder(
            in_dim=adapter.num_features(encoder), dim=decoder_dim, depth=decoder_depth, num_heads=heads,
            out_dim=target.out_dim(self.stride),
        )
        self.decoder.apply(_init_xavier)
        init_prediction(self.decoder.pred, target.init_value())
        trunc_normal_(self.mask_token, std=0.02)

    def check_img_size(self, img_size: int) -> None:
        """Raises ValueError when ``img_size`` does not fit the mask grid, the encoder or the target."""
        if img_size % self.mask_generator.block_size:
            raise ValueError(
                f"image size {img_size} is not divisible by the mask block size {self.mask_generator.block_size}"
            )
        self.adapter.check_img_size(self.encoder, img_size)
        self.target.check((img_size, img_size), self.stride)

    def set_img_size(self, img_size: int) -> None:
        """Prepares the encoder for (B, 3, img_size, img_size) inputs (FastMIM-P stages; Swin windows).

        Raises:
            ValueError: ``img_size`` does not fit the mask grid, the encoder or the target.
        """
        self.check_img_size(img_size)
        self.adapter.set_img_size(self.encoder, img_size)

    def no_weight_decay(self) -> set[str]:
        """Full parameter names without weight decay besides 1-D params (position/cls tokens, mask token)."""
        return {f"encoder.{n}" for n in self.adapter.no_weight_decay(self.encoder)} | {"mask_token"}

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Masked reconstruction loss of a batch.

        Args:
            imgs: (B, 3, H, W) mean/std-normalised images (any float dtype; the target uses fp32).
            mask: optional (B, H / block_size, W / block_size) bool, True = masked; drawn when ``None``.

        Returns:
            ``loss``: scalar fp32; ``pred``: (B, N, D) decoder output; ``target``: (B, N, D) fp32;
            ``mask``: (B, N) bool on the token grid, True = masked.
        """
        B, _, H, W = imgs.shape
        block = self.mask_generator.block_size
        if mask is None:
            mask = self.mask_generator(B, (H, W), device=imgs.device)
        target = self.target(imgs, self.stride)  # (B, N, D) fp32, from the unmasked image
        pixel_mask = upsample_mask(mask, block).unsqueeze(1)  # (B, 1, H, W)
        dtype = self.mask_token.dtype
        x = torch.where(pixel_mask, self.mask_token, imgs.to(dtype))
        tokens, num_prefix = self.adapter.forward_tokens(self.encoder, x)  # (B, P + N, C)
        pred = self.decoder(tokens)[:, num_prefix:]  # (B, N, D)
        token_mask = upsample_mask(mask, block // self.stride).flatten(1)  # (B, N)
        loss = masked_mse(pred, target, token_mask)
        return {"loss": loss, "pred": pred, "target": target, "mask": token_mask}
