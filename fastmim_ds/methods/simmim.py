"""SimMIM (Xie et al., arXiv 2111.09886; microsoft/SimMIM ``models/simmim.py``, ``data/data_simmim.py``).

1. a per-sample random block mask (SimMIM ``MaskGenerator``: ratio 0.6, 32-px mask patches at 192/224 px;
   ``ceil(n * ratio)`` of the n blocks masked, which equals :class:`~fastmim_ds.masking.BlockMaskGenerator`'s
   ``n - int(n * (1 - ratio))``), upsampled to the stem's patch grid;
2. after the patch embedding, a learned C-dimensional ``mask_token`` replaces every masked patch embedding (in
   token space, unlike FastMIM's pixel-space colour); the encoder then runs as usual on **all** tokens (position
   embedding, class token, blocks / stages, final norm) - the encoder family's adapter provides the split
   (``adapter.embed`` + ``adapter.forward_embedded``), so ViT, Swin, PVTv2 and MixMIM backbones all work;
3. a linear head predicts the stride x stride x 3 pixels of every final-stage token (SimMIM's 1x1 conv +
   PixelShuffle, here a Linear per token);
4. the loss is **L1** on the masked pixels (SimMIM: ``l1_loss`` summed over masked pixels / their count /
   channels), of the mean/std-normalised image (no per-patch normalisation by default; ``norm_pix_loss`` adds it).

Encoder initialisation: timm's own (trunc_normal(0.02) Linears, as SimMIM's encoders); mask token trunc_normal(0.02).
Differences from the reference: SimMIM's ViT uses relative position bias, layer scale and no absolute position
table; here the product's timm ViT with its frozen sin-cos table is used. A PVTv2 stem is an overlapping 7x7 conv, so
a visible patch's embedding sees a 3-px border of its masked neighbours (their embeddings are replaced entirely).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from ..config import MethodCfg, MIMModelCfg, SettingError
from ..losses import masked_l1
from ..masking import BlockMaskGenerator, upsample_mask
from ..models.adapters import EncoderAdapter, adapter_for
from ..models.layers import stem_conv
from ..targets import PixelTarget
from . import BlockMaskedMethod

__all__ = ["SimMIMCfg", "SimMIM"]


@dataclass
class SimMIMCfg(MethodCfg):
    """``method:`` section of SimMIM (defaults: the released ViT-B / Swin-B recipes)."""

    name: str = "simmim"
    mask_ratio: float = 0.6
    block_size: int = 32  # px side of one mask block (SimMIM mask_patch_size); multiple of the encoder stride
    norm_pix_loss: bool = False  # SimMIM regresses the normalised image itself


class SimMIM(BlockMaskedMethod):
    """SimMIM pre-training model around any encoder whose adapter splits the forward after the patch embedding.

    Args:
        encoder: timm backbone built by ``adapter.create``; its stem is ``encoder.patch_embed`` with a conv ``proj``.
        adapter: the encoder family's adapter (``embed`` / ``forward_embedded``).
        mask_ratio: fraction of mask blocks masked per sample, in (0, 1).
        block_size: mask block side in px, a multiple of the encoder's output stride.
        norm_pix_loss: normalise each target patch by its mean and std.

    Raises:
        ValueError: a block size that is not a multiple of the stride, a stem without a conv projection.
    """

    name = "simmim"
    config = SimMIMCfg

    def __init__(self, *, encoder: nn.Module, adapter: EncoderAdapter, mask_ratio: float, block_size: int,
                 norm_pix_loss: bool):
        super().__init__()
        self.encoder = encoder
        self.adapter = adapter
        self.stride = adapter.stride(encoder)
        if block_size % self.stride:
            raise SettingError("method.block_size", f"mask block size {block_size} must be a multiple of the "
                               f"encoder stride {self.stride} (e.g. {self.stride} or {2 * self.stride})")
        if not 0.0 < mask_ratio < 1.0:
            raise SettingError("method.mask_ratio", f"must be in (0, 1) for simmim, got {mask_ratio}")
        proj = stem_conv(encoder)
        if not isinstance(proj, nn.Conv2d):
            raise SettingError("model.encoder", f"method simmim needs an encoder whose stem (timm pretrained_cfg "
                               f"first_conv) is a conv, got {type(encoder).__name__}")
        self.mask_generator = BlockMaskGenerator(ratio=mask_ratio, block_size=block_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, proj.out_channels))  # replaces a patch embedding
        self.target = PixelTarget(normalize=norm_pix_loss)
        self.head = nn.Linear(adapter.num_features(encoder), self.target.out_dim(self.stride))
        trunc_normal_(self.mask_token, std=0.02)

    @classmethod
    def build(cls, model: MIMModelCfg, method: SimMIMCfg, img_size: int) -> "SimMIM":
        """SimMIM model from its config sections (encoder at timm's initialisation).

        Raises:
            ValueError: unknown encoder, a block size or image size that does not fit.
        """
        adapter = adapter_for(model.encoder)
        encoder = adapter.create(model.encoder, img_size=img_size, drop_path=model.drop_path, **model.encoder_kwargs)
        if model.encoder_blocks:
            adapter.truncate(encoder, model.encoder_blocks)
        mim = cls(encoder=encoder, adapter=adapter, mask_ratio=method.mask_ratio, block_size=method.block_size,
                  norm_pix_loss=method.norm_pix_loss)
        mim.check_img_size(img_size)
        return mim

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Masked-pixel L1 loss of a batch.

        Args:
            imgs: (B, 3, H, W) mean/std-normalised images (any float dtype; the target uses fp32).
            mask: optional (B, H / block_size, W / block_size) bool, True = masked; drawn when ``None``.

        Returns:
            ``loss``: scalar fp32 (L1); ``pred``: (B, N, stride^2 * 3) head output; ``target``: (B, N, stride^2 * 3)
            fp32 pixels; ``mask``: (B, N) bool on the token grid, True = masked.

        Raises:
            ValueError: a mask whose grid does not match the image.
        """
        B, _, H, W = imgs.shape
        block = self.mask_generator.block_size
        if mask is None:
            mask = self.mask_generator(B, (H, W), device=imgs.device)
        if tuple(mask.shape) != (B, H // block, W // block):
            raise ValueError(f"SimMIM mask must be (B, H / {block}, W / {block}) = {(B, H // block, W // block)}, "
                             f"got {tuple(mask.shape)}")
        x = self.adapter.embed(self.encoder, imgs.to(self.mask_token.dtype))  # (B, H / p, W / p, C)
        patch_mask = upsample_mask(mask, x.shape[1] // mask.shape[1]).unsqueeze(-1)  # (B, H / p, W / p, 1)
        x = torch.where(patch_mask, self.mask_token.to(x.dtype), x)
        tokens, num_prefix = self.adapter.forward_embedded(self.encoder, x)  # (B, P + N, C)
        pred = self.head(tokens[:, num_prefix:])  # (B, N, stride^2 * 3)
        target = self.target(imgs, self.stride)  # (B, N, stride^2 * 3) fp32, from the unmasked image
        token_mask = upsample_mask(mask, block // self.stride).flatten(1)  # (B, N)
        loss = masked_l1(pred, target, token_mask)
        return {"loss": loss, "pred": pred, "target": target, "mask": token_mask}
