"""Mask generators for masked image modeling.

FastMIM masks square pixel blocks independently per sample (``mim_per_sample_block_masking`` in
ggjy/FastMIM.pytorch ``mim_vit_pretrain.py``; MAE's argsort-of-noise trick). Masks are pure functions of
the batch size, image size and a ``torch.Generator``, so they are seedable and testable on CPU.

Convention everywhere in this package: ``mask`` is bool and **True = masked** (replaced in the input,
predicted by the decoder, counted by the loss).
"""
from __future__ import annotations

import torch

__all__ = ["BlockMaskGenerator", "upsample_mask"]


class BlockMaskGenerator:
    """Per-sample random block mask on a (H / block_size, W / block_size) grid.

    Exactly ``n - int(n * (1 - ratio))`` of the ``n`` blocks are masked in every sample, as in FastMIM
    (``len_keep = int(n * (1 - mask_ratio))``): 48 of 64 at 128 px with 16-px blocks and ratio 0.75.

    Args:
        ratio: fraction of blocks to mask, in [0, 1).
        block_size: side of one block in pixels.
    """

    def __init__(self, *, ratio: float, block_size: int):
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
        if block_size < 1:
            raise ValueError(f"mask block_size must be >= 1, got {block_size}")
        self.ratio = ratio
        self.block_size = block_size

    def grid(self, img_size: tuple[int, int]) -> tuple[int, int]:
        """Mask grid (gh, gw) for an image of (H, W) pixels.

        Raises:
            ValueError: H or W not divisible by the block size.
        """
        h, w = img_size
        if h % self.block_size or w % self.block_size:
            raise ValueError(f"image size {h}x{w} is not divisible by the mask block size {self.block_size}")
        return h // self.block_size, w // self.block_size

    def num_masked(self, img_size: tuple[int, int]) -> int:
        gh, gw = self.grid(img_size)
        n = gh * gw
        return n - int(n * (1 - self.ratio))

    def __call__(
        self,
        batch_size: int,
        img_size: tuple[int, int],
        *,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Draws a mask.

        Args:
            batch_size: B.
            img_size: (H, W) in pixels, both divisible by ``block_size``.
            device: device of the returned mask.
            generator: RNG (on ``device``); ``None`` uses the global torch RNG.

        Returns:
            (B, H / block_size, W / block_size) bool, True = masked.
        """
        gh, gw = self.grid(img_size)
        n = gh * gw
        num_keep = int(n * (1 - self.ratio))
        noise = torch.rand(batch_size, n, device=device, generator=generator)  # (B, n)
        # rank of each block's noise in its sample; the num_keep lowest are kept (MAE random_masking)
        rank = noise.argsort(dim=1).argsort(dim=1)
        return (rank >= num_keep).view(batch_size, gh, gw)


def upsample_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """Nearest upsampling of a (B, h, w) mask by an integer factor -> (B, h * factor, w * factor)."""
    if factor == 1:
        return mask
    return mask.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)
