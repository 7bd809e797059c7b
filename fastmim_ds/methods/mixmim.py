"""MixMIM / MixMAE pre-training (arXiv 2205.13137; Sense-X/MixMIM ``models_mixmim.py``, docs/methods.md §3).

One mask per iteration shared by the whole local batch, drawn on the last-stage grid (``int(49 * 0.5) = 24`` of 49
tokens at 224 px); after the patch embedding, sample ``i`` takes the masked positions from sample ``B - 1 - i`` (the
batch flipped; :class:`~fastmim_ds.models.mixmim.MixMIMTransformer` does the mixing and keeps the two images apart
in attention); the decoder (512-d x 8, own fixed sin-cos position embedding) reconstructs both images from two
un-mixed inputs (the other image's positions replaced by a mask token); the loss is the MSE to norm-pix targets over
**all** tokens ("dual reconstruction").

Mask convention: bool, **True = the token of mixed input i comes from image B - 1 - i** (hidden for image i).
"""
from __future__ import annotations

from dataclasses import dataclass

import timm
import torch
import torch.nn as nn
from timm.layers import to_2tuple, trunc_normal_

from ..config import ConfigError, MethodCfg, MIMModelCfg, PretrainCfg, SettingError
from ..losses import masked_mse
from ..models.adapters import adapter_for
from ..models.layers import init_xavier, sincos_pos_embed
from ..models.mixmim import MixMIMAdapter, MixMIMTransformer
from ..targets import build_target
from . import MIMMethod
from .fastmim import TokenDecoder

__all__ = ["MixMIMCfg", "MixMIM", "draw_mix_mask", "dual_decoder_inputs", "unmix"]


@dataclass
class MixMIMCfg(MethodCfg):
    """``method:`` section of MixMIM (defaults: the official MixMIM-B recipe, docs/methods.md §3.6)."""

    name: str = "mixmim"
    mask_ratio: float = 0.5  # fraction of last-stage tokens taken from the partner image (24 of 49 at 224 px)
    target: str = "pixel"  # "pixel" (official) or "hog"
    norm_pix_loss: bool = True
    hog_bins: int = 9
    hog_cell: int = 8
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16  # 0: decoder_dim // 32


def draw_mix_mask(
    grid: tuple[int, int],
    ratio: float,
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One mixing mask for the whole local batch (official ``random_masking``).

    Exactly ``int(h * w * ratio)`` positions are True (24 of 49 at 224 px and ratio 0.5: an effective ratio of
    0.49). ``None`` generator: the global torch RNG, seeded per rank by the trainer.

    Returns:
        (h, w) bool on the last-stage grid, True = position taken from the partner image B - 1 - i.
    """
    h, w = grid
    n = h * w
    noise = torch.rand(n, device=device, generator=generator)
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    mask[noise.argsort()[: int(n * ratio)]] = True
    return mask.view(h, w)


def dual_decoder_inputs(z: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
    """The two un-mixed decoder inputs, concatenated along the batch (official ``forward_decoder``).

    Rows ``0..B-1`` keep the tokens of image ``i`` (mask False) and put ``mask_token`` where True; rows
    ``B..2B-1`` keep the tokens of image ``B - 1 - i`` (mask True) and put ``mask_token`` where False.

    Args:
        z: (B, N, D) embedded encoder tokens of the mixed inputs.
        mask: (N,) bool, True = token came from the partner image.
        mask_token: (1, 1, D).

    Returns:
        (2B, N, D).
    """
    m = mask[None, :, None]
    return torch.cat([torch.where(m, mask_token, z), torch.where(m, z, mask_token)])


def unmix(rec: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-image prediction from the dual decoder output (official ``forward_loss``).

    Image ``i`` takes the mask-True positions from row ``i`` (where image ``i`` was hidden behind the mask
    token) and the mask-False positions from row ``B + (B - 1 - i)`` (the second input of the partner, where
    image ``i``'s tokens were visible at the True positions and hidden at the False ones). Every token of every
    image is thus predicted exactly once, from a decoder input in which that token is a mask token.

    Args:
        rec: (2B, N, D) decoder output.
        mask: (N,) bool, True = token came from the partner image.

    Returns:
        (B, N, D).
    """
    B = rec.shape[0] // 2
    return torch.where(mask[None, :, None], rec[:B], rec[B:].flip(0))


class MixMIM(MIMMethod):
    """MixMIM pre-training model (official ``models_mixmim.MixMIM``): mix, encode, dual-decode, unmix.

    Args:
        encoder: :class:`MixMIMTransformer` without head, built at the training image size.
        target: :class:`~fastmim_ds.targets.PixelTarget` (norm-pix, as official) or another target module.
        mask_ratio: fraction of last-stage tokens taken from the partner image (0.5 -> 24 of 49).
        decoder_dim, decoder_depth, decoder_heads: decoder shape (512, 8, 16); heads 0 -> decoder_dim // 32.

    Raises:
        ValueError: a mask ratio that mixes no token or every token on the last-stage grid.
    """

    name = "mixmim"
    config = MixMIMCfg

    def __init__(
        self,
        *,
        encoder: MixMIMTransformer,
        target: nn.Module,
        mask_ratio: float,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
    ):
        super().__init__()
        self.encoder = encoder
        self.adapter = MixMIMAdapter()
        self.stride = encoder.stride
        self.grid = encoder.out_grid
        n = self.grid[0] * self.grid[1]
        if not 0 < int(n * mask_ratio) < n:
            raise SettingError(
                "method.mask_ratio",
                f"mask ratio {mask_ratio} mixes {int(n * mask_ratio)} of {n} tokens on the {self.grid} last-stage "
                "grid; MixMIM needs at least one token of each image"
            )
        self.mask_ratio = mask_ratio
        self.target = target
        heads = decoder_heads or max(1, decoder_dim // 32)
        # Linear(C -> D), blocks, LayerNorm, Linear(D -> 3 * stride^2); LN eps 1e-6 as mmpretrain (official 1e-5)
        self.decoder = TokenDecoder(
            in_dim=encoder.num_features, dim=decoder_dim, depth=decoder_depth, num_heads=heads,
            out_dim=target.out_dim(self.stride),
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        pos = sincos_pos_embed(self.grid, decoder_dim).unsqueeze(0)  # (1, N, D), fixed as official
        self.decoder_pos_embed = nn.Parameter(pos, requires_grad=False)
        self.decoder.apply(init_xavier)
        trunc_normal_(self.mask_token, std=0.02)

    @classmethod
    def build(cls, model: MIMModelCfg, method: MixMIMCfg, img_size: int) -> "MixMIM":
        """MixMIM pre-training model: ``model.encoder`` must be a ``mixmim_*`` timm name (e.g. ``window_size`` in
        ``model.encoder_kwargs``); ``model.encoder_blocks`` keeps the first k blocks (merges and norm stay).

        Raises:
            ValueError: not a MixMIM encoder, an image size the windows do not tile, or a ratio that mixes no token /
                every token.
        """
        try:
            adapter = adapter_for(model.encoder)
        except ValueError:
            adapter = None
        if not isinstance(adapter, MixMIMAdapter):
            raise SettingError(
                "model.encoder",
                f"method mixmim needs a MixMIM encoder, got '{model.encoder}' "
                f"(choices: {', '.join(timm.list_models('mixmim_*'))})"
            )
        encoder = adapter.create(model.encoder, img_size=img_size, drop_path=model.drop_path, **model.encoder_kwargs)
        if model.encoder_blocks:  # pre-train the first k blocks only (FastMIM finding ii); merges and norm stay
            adapter.truncate(encoder, model.encoder_blocks)
        target = build_target(
            method.target, normalize=method.norm_pix_loss, hog_bins=method.hog_bins, hog_cell=method.hog_cell
        )
        mim = cls(
            encoder=encoder, target=target, mask_ratio=method.mask_ratio, decoder_dim=method.decoder_dim,
            decoder_depth=method.decoder_depth, decoder_heads=method.decoder_heads,
        )
        mim.check_img_size(img_size)
        return mim

    @classmethod
    def check(cls, cfg: PretrainCfg, world_size: int) -> None:
        """Every stage's per-rank micro batch must be even: sample i is mixed with sample B - 1 - i.

        Raises:
            ConfigError: names the stage (or ``train.micro_batch``) and the odd value.
        """
        for s in cfg.stages():
            if s.micro_batch % 2:
                where = f"progressive stage from epoch {s.start_epoch}" if cfg.progressive else "train.micro_batch"
                raise ConfigError(f"{where}: MixMIM pairs sample i with B-1-i, so the per-rank micro batch must be "
                                  f"even, got {s.micro_batch}")

    def set_img_size(self, img_size: int) -> None:
        """Per-stage size switch of the trainer (FastMIM-P): MixMIM is built for one size, so only that size passes.

        Raises:
            ValueError: any other size (the window layout and the position tables are fixed at construction).
        """
        self.check_img_size(img_size)

    def no_weight_decay(self) -> set[str]:
        """Full names without weight decay besides 1-D params and biases: only the frozen position tables.

        The mask token and the relative position bias tables are decayed, as the official pre-training
        (``MX:main_pretrain.py`` calls timm ``add_weight_decay`` without a skip list).
        """
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()} | {"decoder_pos_embed"}

    def draw_mask(self, batch_size: int, img_size: tuple[int, int], *, device: torch.device | str = "cpu",
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, h, w) bool: one mixing mask on the last-stage grid, the same row for every sample (the batch shares
        it); True = from image B - 1 - i. Raises ValueError for another image size than the model's."""
        self.check_img_size(to_2tuple(img_size)[0])
        mask = draw_mix_mask(self.grid, self.mask_ratio, device=device, generator=generator)
        return mask.expand(batch_size, -1, -1)

    def picture_fill(self, imgs: torch.Tensor) -> torch.Tensor:
        """The partner images: a mixed token shows image B - 1 - i."""
        return imgs.flip(0)

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """As :meth:`MIMMethod.reconstruct`; an odd batch gets a copy of its first image appended for the pairing
        (its outputs are not returned)."""
        n = imgs.shape[0]
        out = super().reconstruct(torch.cat([imgs, imgs[:1]]) if n % 2 else imgs, generator)
        return {k: v[:n] if v.dim() else v for k, v in out.items()}

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Dual-reconstruction loss of a batch.

        Args:
            imgs: (B, 3, H, W) mean/std-normalised images, B even (any float dtype; the target uses fp32).
            mask: optional bool mixing mask on the (H / 32, W / 32) last-stage grid, shared by the batch: (h, w), or
                (B, h, w) with equal rows (:meth:`draw_mask`); True = from image B - 1 - i. Drawn when ``None``.

        Returns:
            ``loss``: scalar fp32, mean over all B x N x D values; ``pred``: (B, N, D) un-mixed prediction of each
            image; ``target``: (B, N, D) fp32; ``mask``: (B, N) bool (the shared mask, one row per image).

        Raises:
            ValueError: odd B (set ``train.micro_batch`` even), wrong image size or mask shape, or a (B, h, w) mask
                whose rows differ.
        """
        B = imgs.shape[0]
        if B % 2:
            raise ValueError(
                f"MixMIM needs an even batch per rank (sample i is mixed with sample B-1-i), got B={B}; "
                "set train.micro_batch to an even number"
            )
        if mask is None:
            mask = draw_mix_mask(self.grid, self.mask_ratio, device=imgs.device)
        elif mask.dim() == 3:
            if not torch.compiler.is_compiling() and not bool((mask == mask[:1]).all()):
                raise ValueError("MixMIM shares one mixing mask across the batch: the rows of a (B, h, w) mask "
                                 "must be equal")
            mask = mask[0]
        target = self.target(imgs, self.stride)  # (B, N, D) fp32, from the unmixed images
        z = self.encoder.forward_features(imgs.to(self.mask_token.dtype), mask=mask).flatten(1, 2)  # (B, N, C)
        flat = mask.flatten()  # (N,)
        x = dual_decoder_inputs(self.decoder.embed(z), flat, self.mask_token) + self.decoder_pos_embed  # (2B, N, D)
        pred = unmix(self.decoder.head(x), flat)  # (2B, N, out) -> (B, N, out)
        loss = masked_mse(pred, target, None)  # every token of every image counts once
        return {"loss": loss, "pred": pred, "target": target, "mask": flat.expand(B, -1)}
