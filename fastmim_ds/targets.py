"""Reconstruction targets, regrouped per encoder output token.

* :class:`HOGTarget`: Histograms of Oriented Gradients as in FastMIM (``util/hog_layer.py``, copied from
  MaskFeat, arXiv 2112.09133): per-channel Sobel gradients, 9 unsigned orientation bins with hard
  assignment, magnitudes summed over 8x8-pixel cells, optional L2 normalisation of each (channel, cell)
  histogram. Always computed in fp32: orientation binning is a hard ``floor``, and bf16 inputs flip about
  1% of the bins (docs/methods.md §5.5).
* :class:`PixelTarget`: raw or per-patch normalised pixels (MAE/SimMIM ``norm_pix_loss``).

Both are computed from the *unmasked*, mean/std-normalised image and return (B, N, D) with N the number of
tokens on the stride-``s`` grid, in row-major order.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["HOGTarget", "PixelTarget", "build_target", "patchify"]


def patchify(imgs: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, patch * patch * C), N = (H / patch) * (W / patch), inner order (p, q, c) as MAE."""
    B, C, H, W = imgs.shape
    h, w = H // patch, W // patch
    x = imgs.reshape(B, C, h, patch, w, patch)
    x = torch.einsum("bchpwq->bhwpqc", x)
    return x.reshape(B, h * w, patch * patch * C)


class HOGTarget(nn.Module):
    """HOG features per token (FastMIM ``HOGLayerC(nbins=9, pool=8)``).

    Args:
        nbins: orientation bins over 180 degrees (unsigned: theta and theta + pi share a bin).
        cell: side of a pooling cell in pixels.
        normalize: L2-normalise each (channel, cell) histogram (FastMIM ties this to ``norm_pix_loss``).
    """

    def __init__(self, *, nbins: int = 9, cell: int = 8, normalize: bool = True):
        super().__init__()
        self.nbins, self.cell, self.normalize = nbins, cell, normalize

    def out_dim(self, stride: int) -> int:
        """Values per token for an encoder of output stride ``stride`` px: 3 * nbins * (stride / cell)^2."""
        return 3 * self.nbins * (stride // self.cell) ** 2

    def init_value(self) -> float:
        """A typical target value for the decoder's initial bias: the entry of a uniform L2-normalised histogram
        (1 / sqrt(nbins)) when normalised, else 0."""
        return 1.0 / math.sqrt(self.nbins) if self.normalize else 0.0

    def check(self, img_size: tuple[int, int], stride: int) -> None:
        """Raises ValueError when cells do not tile the image or the tokens."""
        if stride % self.cell:
            raise ValueError(f"HOG cell {self.cell} px must divide the encoder stride {stride} px")
        if img_size[0] % self.cell or img_size[1] % self.cell:
            raise ValueError(f"image size {img_size} is not divisible by the HOG cell size {self.cell}")

    @torch.no_grad()
    def histograms(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised image -> (B, 3 * nbins, H / cell, W / cell) fp32, channel index c * nbins + bin."""
        x = imgs.float()
        B, C, H, W = x.shape
        x = F.pad(x, (1, 1, 1, 1), mode="reflect")  # (B, C, H + 2, W + 2)
        # the reference's Sobel cross-correlation (kernels [[1, 0, -1], [2, 0, -2], [1, 0, -1]] and its transpose),
        # written as differences first: a flat region then gives exactly 0, whereas F.conv2d's summation order on
        # some backends leaves ~1e-6, which the per-cell L2 normalisation would blow up to a unit histogram
        dx = x[..., :, :-2] - x[..., :, 2:]  # (B, C, H + 2, W): x[j - 1] - x[j + 1]
        gx = dx[..., :-2, :] + 2 * dx[..., 1:-1, :] + dx[..., 2:, :]  # rows i - 1, i, i + 1 weighted 1, 2, 1
        dy = x[..., :-2, :] - x[..., 2:, :]  # (B, C, H, W + 2): x[i - 1] - x[i + 1]
        gy = dy[..., :, :-2] + 2 * dy[..., :, 1:-1] + dy[..., :, 2:]
        magnitude = torch.sqrt(gx * gx + gy * gy)
        # atan2(gx, gy) with gx first, as the reference; floor(.) mod nbins folds theta and theta + pi together
        phase = torch.atan2(gx, gy) / math.pi * self.nbins
        bins = torch.floor(phase).long() % self.nbins
        hist = torch.zeros(B, C, self.nbins, H, W, dtype=torch.float32, device=x.device)
        hist.scatter_add_(2, bins.unsqueeze(2), magnitude.unsqueeze(2))
        # sum over non-overlapping cell x cell windows
        hist = hist.view(B, C * self.nbins, H // self.cell, self.cell, W // self.cell, self.cell).sum(dim=(3, 5))
        if self.normalize:
            hist = F.normalize(hist.view(B, C, self.nbins, H // self.cell, W // self.cell), p=2, dim=2)
        return hist.reshape(B, C * self.nbins, H // self.cell, W // self.cell)

    @torch.no_grad()
    def forward(self, imgs: torch.Tensor, stride: int) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N, 3 * nbins * u * u) fp32 with u = stride / cell.

        Inner order: (c * nbins + bin, dy, dx).
        """
        hist = self.histograms(imgs)  # (B, K, Hc, Wc)
        B, K, Hc, Wc = hist.shape
        u = stride // self.cell
        h, w = Hc // u, Wc // u
        t = hist.view(B, K, h, u, w, u).permute(0, 2, 4, 1, 3, 5)  # (B, h, w, K, dy, dx)
        return t.reshape(B, h * w, K * u * u)


class PixelTarget(nn.Module):
    """Pixels of each stride x stride token, optionally normalised per patch (MAE ``norm_pix_loss``)."""

    def __init__(self, *, normalize: bool = True):
        super().__init__()
        self.normalize = normalize

    def out_dim(self, stride: int) -> int:
        return 3 * stride * stride

    def init_value(self) -> float:
        """0: the mean of a per-patch normalised target (and roughly of mean/std-normalised pixels)."""
        return 0.0

    def check(self, img_size: tuple[int, int], stride: int) -> None:
        return None

    @torch.no_grad()
    def forward(self, imgs: torch.Tensor, stride: int) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N, stride^2 * 3) fp32."""
        t = patchify(imgs.float(), stride)
        if self.normalize:
            mean = t.mean(dim=-1, keepdim=True)
            var = t.var(dim=-1, keepdim=True)  # unbiased, as MAE
            t = (t - mean) / (var + 1e-6).sqrt()
        return t


def build_target(name: str, *, normalize: bool, hog_bins: int = 9, hog_cell: int = 8) -> nn.Module:
    """``"hog"`` or ``"pixel"`` -> target module.

    Raises:
        ValueError: unknown name (the message lists the choices).
    """
    if name == "hog":
        return HOGTarget(nbins=hog_bins, cell=hog_cell, normalize=normalize)
    if name == "pixel":
        return PixelTarget(normalize=normalize)
    raise ValueError(f"unknown target '{name}' (choices: hog, pixel)")
