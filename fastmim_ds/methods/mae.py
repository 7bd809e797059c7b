"""MAE: masked autoencoders (He et al., arXiv 2111.06377; facebookresearch/mae ``models_mae.py``).

1. per-sample random masking of the patch grid (ratio 0.75; MAE ``random_masking``: argsort of uniform noise, the
   ``int(N * (1 - ratio))`` lowest kept) - :class:`~fastmim_ds.masking.BlockMaskGenerator` with one patch per block
   draws exactly these masks;
2. the ViT encoder sees the **visible tokens only**: patch embedding + fixed sin-cos position table, the masked
   tokens dropped, the class token (+ its position row) prepended, blocks, norm: ``(1 - ratio) * N + 1`` tokens;
3. the decoder embeds them (Linear C -> 512), puts a shared learned mask token at every masked position, adds its
   own fixed sin-cos table (class row zero), runs 8 blocks of 16 heads, LayerNorm and a Linear to patch^2 * 3
   pixels per token;
4. MSE to the per-patch normalised pixels (``norm_pix_loss``) over the masked patches only.

Initialisation as MAE ``initialize_weights``: encoder and decoder Linears xavier_uniform, LayerNorms (1, 0), the
patch-embedding conv xavier_uniform as a Linear, class and mask tokens normal(0.02).

The encoder is the product's timm ViT (:class:`~fastmim_ds.models.adapters.ViTAdapter`): its frozen sin-cos table is
regenerated for every image size, and the decoder's with it, so FastMIM-P stages work for MAE too. Differences from
the reference: the visible tokens keep their row-major order (MAE keeps them in shuffled order; a transformer
without position-dependent operations after the table gives the same outputs up to that permutation); the final
LayerNorm is timm's ``fc_norm`` (``global_pool='avg'``), transferred to the classifier, as for every method here;
weight decay skips position/class/mask tokens (MAE's timm 0.3.2 ``add_weight_decay`` decays the two tokens).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from timm.models import checkpoint_seq

from ..config import MethodCfg, MIMModelCfg, SettingError
from ..losses import masked_mse
from ..masking import BlockMaskGenerator
from ..models.adapters import EncoderAdapter, ViTAdapter, adapter_for
from ..models.layers import init_encoder_mae, init_xavier, sincos_pos_embed
from ..targets import PixelTarget
from . import BlockMaskedMethod
from .fastmim import TokenDecoder

__all__ = ["MAECfg", "MAE"]


@dataclass
class MAECfg(MethodCfg):
    """``method:`` section of MAE (defaults: the released ``mae_vit_base_patch16_dec512d8b`` recipe)."""

    name: str = "mae"
    mask_ratio: float = 0.75  # fraction of patches dropped from the encoder's input
    norm_pix_loss: bool = True  # target: pixels normalised per patch (mean/std)
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16


class MAE(BlockMaskedMethod):
    """MAE pre-training model around a timm ViT with a class token.

    Args:
        encoder: timm ``VisionTransformer`` built by ``adapter.create`` (class token, no register tokens).
        adapter: its :class:`~fastmim_ds.models.adapters.ViTAdapter`.
        mask_ratio: fraction of patches masked per sample, in (0, 1).
        norm_pix_loss: normalise each target patch by its mean and std.
        decoder_dim, decoder_depth, decoder_heads: decoder shape (512, 8, 16).

    Raises:
        ValueError: not a ViT with exactly one class token, a ratio that masks nothing or everything.
    """

    name = "mae"
    config = MAECfg

    def __init__(self, *, encoder: nn.Module, adapter: EncoderAdapter, mask_ratio: float, norm_pix_loss: bool,
                 decoder_dim: int, decoder_depth: int, decoder_heads: int):
        super().__init__()
        if (not isinstance(adapter, ViTAdapter) or encoder.cls_token is None or encoder.num_prefix_tokens != 1
                or encoder.no_embed_class or encoder.pos_embed is None):
            raise SettingError("model.encoder", f"method mae needs a ViT with one class token and a position table "
                               f"(a timm vit_* model, class_token=True, reg_tokens=0), got {type(encoder).__name__}")
        if not 0.0 < mask_ratio < 1.0:
            raise SettingError("method.mask_ratio", f"must be in (0, 1) for mae, got {mask_ratio}")
        self.encoder = encoder
        self.adapter = adapter
        self.stride = adapter.stride(encoder)  # one token per patch
        self.mask_generator = BlockMaskGenerator(ratio=mask_ratio, block_size=self.stride)
        self.target = PixelTarget(normalize=norm_pix_loss)
        self.decoder = TokenDecoder(in_dim=encoder.embed_dim, dim=decoder_dim, depth=decoder_depth,
                                    num_heads=decoder_heads or max(1, decoder_dim // 32),
                                    out_dim=self.target.out_dim(self.stride))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        # fixed (1, 1 + N, D) table of the current grid, class row zero; rebuilt by set_img_size, never saved
        self.register_buffer("decoder_pos_embed", self._decoder_table(), persistent=False)
        self.decoder.apply(init_xavier)
        nn.init.normal_(self.mask_token, std=0.02)

    def _decoder_table(self) -> torch.Tensor:
        grid = tuple(self.encoder.patch_embed.grid_size)
        dim = self.mask_token.shape[-1]
        return torch.cat([torch.zeros(1, dim), sincos_pos_embed(grid, dim)]).unsqueeze(0)

    @classmethod
    def build(cls, model: MIMModelCfg, method: MAECfg, img_size: int) -> "MAE":
        """MAE model from its config sections; the encoder re-initialised as MAE.

        Raises:
            ValueError: an encoder that is no ViT with a class token, an image size the patches do not tile.
        """
        adapter = adapter_for(model.encoder)
        if not isinstance(adapter, ViTAdapter):
            raise SettingError("model.encoder", f"method mae needs a ViT encoder (a timm vit_* model), got "
                               f"'{model.encoder}' ({adapter.family})")
        encoder = adapter.create(model.encoder, img_size=img_size, drop_path=model.drop_path, **model.encoder_kwargs)
        if model.encoder_blocks:
            adapter.truncate(encoder, model.encoder_blocks)
        init_encoder_mae(encoder)
        mim = cls(encoder=encoder, adapter=adapter, mask_ratio=method.mask_ratio, norm_pix_loss=method.norm_pix_loss,
                  decoder_dim=method.decoder_dim, decoder_depth=method.decoder_depth,
                  decoder_heads=method.decoder_heads)
        mim.check_img_size(img_size)
        return mim

    def set_img_size(self, img_size: int) -> None:
        """Regenerates the encoder's and the decoder's sin-cos tables for the new patch grid.

        Raises:
            ValueError: ``img_size`` not a multiple of the patch size.
        """
        super().set_img_size(img_size)
        self.decoder_pos_embed = self._decoder_table().to(self.decoder_pos_embed)

    def forward_encoder(self, imgs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The ViT on the visible patches only.

        Args:
            imgs: (B, 3, H, W) in the encoder's dtype, H and W at the grid of :meth:`set_img_size`.
            keep: (B, K) long, the visible patches' row-major indices.

        Returns:
            (B, 1 + K, C): the class token, then the visible tokens in the order of ``keep``, after the final norm.
        """
        enc = self.encoder
        x = enc.patch_embed(imgs)  # (B, h, w, C) (dynamic_img_size) or (B, N, C)
        x = x.flatten(1, 2) if x.dim() == 4 else x
        B, N, C = x.shape
        pos = enc.pos_embed  # (1, 1 + N, C): frozen sin-cos, class row zero
        if pos.shape[1] != 1 + N:
            raise ValueError(f"input of {N} patches but the position table has {pos.shape[1] - 1}: call "
                             f"set_img_size({imgs.shape[-1]}) first")
        x = torch.gather(x + pos[:, 1:], 1, keep.unsqueeze(-1).expand(-1, -1, C))  # (B, K, C)
        x = enc.pos_drop(torch.cat([(enc.cls_token + pos[:, :1]).expand(B, -1, -1), x], dim=1))
        x = enc.norm_pre(x)
        if enc.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(enc.blocks, x)
        else:
            x = enc.blocks(x)
        return enc.fc_norm(enc.norm(x))

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Masked-autoencoder loss of a batch.

        Args:
            imgs: (B, 3, H, W) mean/std-normalised images (any float dtype; the target uses fp32).
            mask: optional (B, H / patch, W / patch) bool, True = masked, with the same number of masked patches in
                every sample (the encoder's batch has one length); drawn when ``None``.

        Returns:
            ``loss``: scalar fp32; ``pred``: (B, N, patch^2 * 3) decoder output; ``target``: (B, N, patch^2 * 3)
            fp32 (per-patch normalised with ``norm_pix_loss``); ``mask``: (B, N) bool, True = masked.

        Raises:
            ValueError: a mask of another grid, or with different counts per sample, or masking nothing / all.
        """
        B, _, H, W = imgs.shape
        if mask is None:
            mask = self.mask_generator(B, (H, W), device=imgs.device)
        grid = (H // self.stride, W // self.stride)
        if tuple(mask.shape) != (B, *grid):
            raise ValueError(f"MAE mask must be (B, H / {self.stride}, W / {self.stride}) = {(B, *grid)}, got "
                             f"{tuple(mask.shape)}")
        token_mask = mask.flatten(1)  # (B, N)
        N = grid[0] * grid[1]
        if torch.compiler.is_compiling():  # no host sync in a compiled graph: the drawn masks' count
            num_masked = self.mask_generator.num_masked((H, W))
        else:
            counts = token_mask.sum(1)
            num_masked = int(counts[0])
            if bool((counts != num_masked).any()) or not 0 < num_masked < N:
                raise ValueError(f"MAE masks the same number of patches in every sample (between 1 and {N - 1}); "
                                 f"got {counts.tolist()}")
        keep = token_mask.to(torch.int8).argsort(dim=1, stable=True)[:, :N - num_masked]  # visible, row-major
        target = self.target(imgs, self.stride)  # (B, N, D) fp32, from the unmasked image
        y = self.decoder.embed(self.forward_encoder(imgs.to(self.mask_token.dtype), keep))  # (B, 1 + K, D)
        D = y.shape[-1]
        full = self.mask_token.to(y.dtype).expand(B, N, D).scatter(1, keep.unsqueeze(-1).expand(-1, -1, D), y[:, 1:])
        y = torch.cat([y[:, :1], full], dim=1) + self.decoder_pos_embed.to(y.dtype)  # (B, 1 + N, D)
        pred = self.decoder.head(y)[:, 1:]  # (B, N, patch^2 * 3), class token dropped
        loss = masked_mse(pred, target, token_mask)
        return {"loss": loss, "pred": pred, "target": target, "mask": token_mask}
