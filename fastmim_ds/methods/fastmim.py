"""FastMIM (arXiv 2212.06593; ggjy/FastMIM.pytorch): one masked-image-modeling wrapper for every backbone family.

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

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block

from ..config import MethodCfg, MIMModelCfg, SettingError
from ..losses import masked_mse
from ..masking import BlockMaskGenerator, upsample_mask
from ..models.adapters import EncoderAdapter, adapter_for
from ..models.layers import init_encoder_mae, init_xavier
from ..targets import build_target
from . import BlockMaskedMethod

__all__ = ["FastMIMCfg", "FastMIM", "TokenDecoder", "init_prediction"]


@dataclass
class FastMIMCfg(MethodCfg):
    """``method:`` section of FastMIM (defaults: the released ViT-B recipe, docs/methods.md §1.1)."""

    name: str = "fastmim"
    mask_ratio: float = 0.75  # fraction of mask blocks replaced by the learned colour
    block_size: int = 16  # px side of one mask block; multiple of the encoder's output stride (32 for Swin)
    target: str = "hog"  # "hog" (FastMIM) or "pixel"
    norm_pix_loss: bool = True  # HOG: L2-normalise each cell histogram; pixel: per-patch mean/std
    hog_bins: int = 9  # unsigned orientation bins of 20 degrees
    hog_cell: int = 8  # px side of a HOG cell
    decoder_dim: int = 256
    decoder_depth: int = 1  # 1 for ViT-B, 4 for Swin-B (FastMIM README)
    decoder_heads: int = 0  # 0: decoder_dim // 32, as FastMIM


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
        return self.head(self.embed(tokens))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Blocks, norm and prediction on already embedded tokens: (B, N, D) -> (B, N, out_dim) (MixMIM and MAE
        insert mask tokens and position embeddings between ``embed`` and this)."""
        return self.pred(self.norm(self.blocks(x)))


def init_prediction(pred: nn.Linear, value: float) -> None:
    """Zero weight and a constant bias ``value``: the untrained decoder predicts one typical target value.

    With xavier initialisation the first predictions have ~30x the variance of an L2-normalised HOG target
    (mean 0.24, std 0.23 per value), and the first tens of updates only shrink them (measured on imagenette).
    Starting from a constant puts the loss near that of the mean predictor at step 0; the zero weight still gets
    gradients (d loss / d W = error x features), so learning starts at once.
    """
    nn.init.zeros_(pred.weight)
    nn.init.constant_(pred.bias, value)


class FastMIM(BlockMaskedMethod):
    """FastMIM pre-training model around any encoder with an :class:`EncoderAdapter`.

    Args:
        encoder: timm backbone built by ``adapter.create``.
        adapter: the encoder family's adapter.
        target: :class:`~fastmim_ds.targets.HOGTarget` or :class:`~fastmim_ds.targets.PixelTarget`.
        mask_ratio: fraction of blocks masked per sample (0.75).
        block_size: mask block side in px, a multiple of the encoder stride (16 for ViT/16, 32 for Swin).
        decoder_dim, decoder_depth, decoder_heads: decoder shape (heads 0 -> decoder_dim // 32).

    Raises:
        ValueError: a block size that is not a multiple of the encoder stride.
    """

    name = "fastmim"
    config = FastMIMCfg

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
            raise SettingError(
                "method.block_size",
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
        self.decoder.apply(init_xavier)
        init_prediction(self.decoder.pred, target.init_value())
        trunc_normal_(self.mask_token, std=0.02)

    @classmethod
    def build(cls, model: MIMModelCfg, method: FastMIMCfg, img_size: int) -> "FastMIM":
        """FastMIM model from its config sections; the encoder re-initialised as FastMIM/MAE.

        Raises:
            ValueError: unknown encoder or target, a block size or image size that does not fit.
        """
        adapter = adapter_for(model.encoder)
        encoder = adapter.create(model.encoder, img_size=img_size, drop_path=model.drop_path, **model.encoder_kwargs)
        if model.encoder_blocks:  # FastMIM finding ii: pre-train the first k blocks; fine-tuning initialises the rest
            adapter.truncate(encoder, model.encoder_blocks)
        init_encoder_mae(encoder)
        target = build_target(
            method.target, normalize=method.norm_pix_loss, hog_bins=method.hog_bins, hog_cell=method.hog_cell
        )
        mim = cls(
            encoder=encoder, adapter=adapter, target=target, mask_ratio=method.mask_ratio,
            block_size=method.block_size, decoder_dim=method.decoder_dim, decoder_depth=method.decoder_depth,
            decoder_heads=method.decoder_heads,
        )
        mim.check_img_size(img_size)
        return mim

    def picture_fill(self, imgs: torch.Tensor) -> torch.Tensor:
        """The learned mask colour: what the encoder sees at masked pixels."""
        return self.mask_token.float().expand_as(imgs)

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
