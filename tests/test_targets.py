"""fastmim_ds.targets: HOG (docs/methods.md §1.6), per-token regrouping (1.7), pixel targets, patchify."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastmim_ds.targets import HOGTarget, PixelTarget, build_target, patchify

pytestmark = pytest.mark.timeout(120)

KX = np.array([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
KY = KX.T


def _int_image(b=2, h=32, w=32, seed=0, lo=-3, hi=4) -> torch.Tensor:
    """Small-integer images: Sobel gradients are exact integers, so no pixel sits within rounding of a bin edge."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, (b, 3, h, w), generator=g).float()


def _np_sobel(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, C, H, W) -> gx, gy: reflect pad 1, 3x3 cross-correlation with KX / KY (float64)."""
    _, _, H, W = img.shape
    pad = np.pad(img.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    gx = np.zeros(img.shape)
    gy = np.zeros(img.shape)
    for i in range(3):
        for j in range(3):
            win = pad[:, :, i : i + H, j : j + W]
            gx += KX[i, j] * win
            gy += KY[i, j] * win
    return gx, gy


def _np_bins(gx: np.ndarray, gy: np.ndarray, nbins: int = 9) -> np.ndarray:
    return np.floor(np.arctan2(gx, gy) / np.pi * nbins).astype(np.int64) % nbins


def _np_hog(img: np.ndarray, nbins: int = 9, cell: int = 8, normalize: bool = False) -> np.ndarray:
    """Independent float64 implementation of docs/methods.md §1.6 -> (B, 3 * nbins, H / cell, W / cell)."""
    B, C, H, W = img.shape
    gx, gy = _np_sobel(img)
    mag = np.sqrt(gx**2 + gy**2)
    bins = _np_bins(gx, gy, nbins)
    hist = np.stack([np.where(bins == k, mag, 0.0) for k in range(nbins)], axis=2)  # (B, C, nbins, H, W)
    hist = hist.reshape(B, C, nbins, H // cell, cell, W // cell, cell).sum(axis=(4, 6))
    if normalize:
        norm = np.sqrt((hist**2).sum(axis=2, keepdims=True))
        hist = hist / np.maximum(norm, 1e-12)
    return hist.reshape(B, C * nbins, H // cell, W // cell)


# ------------------------------------------------------------------------------------------- HOG


@pytest.mark.parametrize("hw", [(32, 32), (64, 48)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hog_shape_and_dtype(hw, dtype):
    x = _int_image(2, *hw).to(dtype)
    h = HOGTarget().histograms(x)
    assert h.shape == (2, 27, hw[0] // 8, hw[1] // 8)
    assert h.dtype == torch.float32


@pytest.mark.parametrize("normalize", [False, True])
def test_hog_matches_numpy_reference(normalize):
    x = _int_image(2, 32, 40, seed=3)
    got = HOGTarget(normalize=normalize).histograms(x).numpy()
    ref = _np_hog(x.numpy(), normalize=normalize)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_hog_normalized_histograms_have_unit_norm():
    x = _int_image(2, 32, 32, seed=1)
    x[:, :, :, :16] = 0.5  # left half constant: cells there have no gradient at all
    raw = HOGTarget(normalize=False).histograms(x).view(2, 3, 9, 4, 4)
    h = HOGTarget(normalize=True).histograms(x).view(2, 3, 9, 4, 4)
    norms = h.norm(dim=2)  # (B, 3, 4, 4): one L2 norm per (channel, cell)
    nonzero = raw.abs().sum(dim=2) > 0
    assert nonzero.any() and (~nonzero).any()  # both kinds of cells are present
    torch.testing.assert_close(norms[nonzero], torch.ones_like(norms[nonzero]), rtol=0, atol=1e-5)
    assert torch.all(norms[~nonzero] == 0)
    assert torch.isfinite(h).all()
    assert (h >= 0).all()
    # normalisation is a per-(channel, cell) rescaling of the raw histogram
    scale = raw.norm(dim=2, keepdim=True).clamp_min(1e-12)
    torch.testing.assert_close(h, raw / scale)


@pytest.mark.parametrize("normalize", [False, True])
def test_hog_of_constant_image_is_zero(normalize):
    x = torch.full((2, 3, 32, 32), 0.7)
    x[1, 1] = -1.3  # per-channel constants
    h = HOGTarget(normalize=normalize).histograms(x)
    assert torch.isfinite(h).all()
    assert torch.all(h == 0)


def _edge_image(direction: str, sign: float, size: int = 32) -> torch.Tensor:
    x = torch.zeros(1, 3, size, size)
    if direction == "vertical":  # intensity changes along x (columns): a vertical edge line
        x[..., : size // 2] = sign
        x[..., size // 2 :] = -sign
    else:  # intensity changes along y (rows)
        x[..., : size // 2, :] = sign
        x[..., size // 2 :, :] = -sign
    return x


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_vertical_edge_single_bin(sign):
    x = _edge_image("vertical", sign)
    # By hand: at the two columns beside the step, gx = (1 + 2 + 1) * (left - right) = +-8 and gy = 0,
    # so phase = atan2(+-8, 0) / pi * 9 = +-4.5 -> floor 4 or -5 -> mod 9 = 4 either way.
    gx, gy = _np_sobel(x.numpy())
    nz = np.hypot(gx, gy) > 0
    assert nz.any()
    assert np.all(gy == 0)
    assert np.allclose(np.abs(gx[nz]), 8.0)
    bins = np.unique(_np_bins(gx[nz], gy[nz]))
    assert bins.tolist() == [4]
    expected_bin = int(bins[0])

    h = HOGTarget(normalize=False).histograms(x).view(1, 3, 9, 4, 4)
    per_bin = h.sum(dim=(0, 1, 3, 4))  # total magnitude per bin
    assert per_bin[expected_bin] > 0
    assert torch.all(per_bin[torch.arange(9) != expected_bin] == 0)
    # columns 15 and 16 carry |gx| = 8 over 8 rows per cell: 64 in cell columns 1 and 2, nothing elsewhere
    expected = torch.zeros(4, 4)
    expected[:, 1] = 64.0
    expected[:, 2] = 64.0
    for c in range(3):
        torch.testing.assert_close(h[0, c, expected_bin], expected)
    # normalised: that bin's histogram is a unit vector wherever the edge is
    hn = HOGTarget(normalize=True).histograms(x).view(1, 3, 9, 4, 4)
    torch.testing.assert_close(hn[0, :, expected_bin], (expected > 0).float().expand(3, 4, 4))


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_horizontal_edge_single_bin(sign):
    x = _edge_image("horizontal", sign)
    gx, gy = _np_sobel(x.numpy())
    nz = np.hypot(gx, gy) > 0
    bins = np.unique(_np_bins(gx[nz], gy[nz]))
    assert bins.tolist() == [0]  # atan2(0, +-8) = 0 or pi -> 0 or 9 -> bin 0
    h = HOGTarget(normalize=False).histograms(x).view(1, 3, 9, 4, 4)
    per_bin = h.sum(dim=(0, 1, 3, 4))
    assert per_bin[0] > 0 and torch.all(per_bin[1:] == 0)


def test_diagonal_gradient_bin():
    # a linear ramp x + 2y has gx = -8 and gy = -16 everywhere inside (kernel flips the sign),
    # so theta = atan2(-8, -16) is in (-pi, -pi/2): bin derived in numpy
    H = W = 32
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    x = (xx + 2 * yy).expand(1, 3, H, W).contiguous()
    gx, gy = _np_sobel(x.numpy())
    assert gx[0, 0, 5, 5] == -8 and gy[0, 0, 5, 5] == -16
    inner_bin = int(_np_bins(np.array(-8.0), np.array(-16.0)))
    # by hand: atan2(-8, -16) = -pi + atan(1/2) = -2.678 rad -> * 9 / pi = -7.67 -> floor -8 -> mod 9 = 1
    assert inner_bin == math.floor(math.atan2(-8, -16) / math.pi * 9) % 9 == 1
    h = HOGTarget(normalize=False).histograms(x).view(1, 3, 9, 4, 4)
    # an interior cell sees only the ramp gradient
    cell = h[0, :, :, 1, 1]
    expected = torch.zeros(3, 9)
    expected[:, inner_bin] = 64 * math.hypot(8, 16)
    torch.testing.assert_close(cell, expected)


def test_unsigned_folding_negated_image():
    x = _int_image(2, 32, 32, seed=5)
    hog = HOGTarget(normalize=False)
    torch.testing.assert_close(hog.histograms(-x), hog.histograms(x), rtol=0, atol=0)
    # also for a rotated-by-pi image (theta -> theta + pi for every pixel's gradient)
    torch.testing.assert_close(
        hog.histograms(x.flip(-1).flip(-2)).flip(-1).flip(-2), hog.histograms(x), rtol=1e-6, atol=1e-5
    )


def test_hog_is_computed_per_colour_channel():
    x = _int_image(1, 32, 32, seed=2)
    x[:, 1:] = 0  # only the first channel has structure
    h = HOGTarget(normalize=False).histograms(x)
    assert h[:, :9].abs().sum() > 0
    assert torch.all(h[:, 9:] == 0)


def test_bf16_input_quantisation_changes_target_but_cast_is_exact():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 32, 32, generator=g)
    hog = HOGTarget(normalize=True)
    xb = x.bfloat16()
    # quantising the image to bf16 changes the target noticeably: HOG must see the fp32 image
    diff = (hog(x, 16) - hog(xb, 16)).abs().max().item()
    assert diff > 1e-3
    # a bf16 input is computed exactly as its fp32 upcast (HOG runs in fp32 internally)
    assert torch.equal(hog(xb, 16), hog(xb.float(), 16))
    assert torch.equal(hog.histograms(xb), hog.histograms(xb.float()))
    assert hog(xb, 16).dtype == torch.float32
    # and an fp32 input is bit-identical to itself run again (no hidden low precision)
    assert torch.equal(hog(x, 16), hog(x.float().clone(), 16))


# ------------------------------------------------------------------------------------------- per token


@pytest.mark.parametrize("stride, per_token", [(16, 108), (32, 432)])
def test_hog_per_token_regrouping(stride, per_token):
    x = _int_image(2, 64, 64, seed=4)
    hog = HOGTarget(normalize=True)
    hist = hog.histograms(x).numpy()  # (B, 27, 8, 8)
    t = hog(x, stride).numpy()
    g = 64 // stride
    u = stride // 8
    assert hog.out_dim(stride) == per_token
    assert t.shape == (2, g * g, per_token)
    assert t.dtype == np.float32
    manual = np.empty_like(t)
    for b in range(2):
        for i in range(g):
            for j in range(g):
                for k in range(27):
                    for dy in range(u):
                        for dx in range(u):
                            manual[b, i * g + j, k * u * u + dy * u + dx] = hist[b, k, u * i + dy, u * j + dx]
    np.testing.assert_array_equal(t, manual)


def test_hog_per_token_non_square():
    x = _int_image(1, 32, 64, seed=6)
    hog = HOGTarget()
    t = hog(x, 16)
    assert t.shape == (1, 2 * 4, 108)
    hist = hog.histograms(x)
    # token (1, 3) = row 1, column 3 -> index 1 * 4 + 3; value (k=5, dy=1, dx=0)
    assert t[0, 7, 5 * 4 + 1 * 2 + 0] == hist[0, 5, 3, 6]


def test_hog_check():
    hog = HOGTarget()
    hog.check((64, 64), 16)
    with pytest.raises(ValueError, match="stride"):
        hog.check((64, 64), 12)
    with pytest.raises(ValueError, match="divisible"):
        hog.check((68, 64), 16)


# ------------------------------------------------------------------------------------------- pixels


def test_patchify_matches_manual_loop():
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(2, 3, 8, 12, generator=g)
    p = 4
    out = patchify(imgs, p)
    assert out.shape == (2, 2 * 3, p * p * 3)
    manual = torch.empty_like(out)
    for b in range(2):
        for i in range(2):
            for j in range(3):
                for pp in range(p):
                    for q in range(p):
                        for c in range(3):
                            manual[b, i * 3 + j, (pp * p + q) * 3 + c] = imgs[b, c, i * p + pp, j * p + q]
    assert torch.equal(out, manual)


def test_pixel_target_normalized_per_patch():
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(2, 3, 32, 32, generator=g) * 3 + 5
    t = PixelTarget(normalize=True)(imgs, 16)
    assert t.shape == (2, 4, 768) and t.dtype == torch.float32
    torch.testing.assert_close(t.mean(-1), torch.zeros(2, 4), rtol=0, atol=1e-5)
    torch.testing.assert_close(t.var(-1), torch.ones(2, 4), rtol=0, atol=1e-4)  # unbiased, as MAE
    # exact formula on one patch
    patch = patchify(imgs, 16)[1, 2]
    ref = (patch - patch.mean()) / (patch.var(unbiased=True) + 1e-6).sqrt()
    torch.testing.assert_close(t[1, 2], ref)


def test_pixel_target_raw_and_bf16():
    imgs = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    pt = PixelTarget(normalize=False)
    assert pt.out_dim(8) == 192
    assert torch.equal(pt(imgs, 8), patchify(imgs, 8))
    out = pt(imgs.bfloat16(), 8)
    assert out.dtype == torch.float32
    assert torch.equal(out, patchify(imgs.bfloat16().float(), 8))


def test_build_target():
    h = build_target("hog", normalize=False, hog_bins=9, hog_cell=8)
    assert isinstance(h, HOGTarget) and h.normalize is False and h.nbins == 9 and h.cell == 8
    p = build_target("pixel", normalize=True)
    assert isinstance(p, PixelTarget) and p.normalize is True
    with pytest.raises(ValueError, match="hog, pixel"):
        build_target("dino", normalize=True)
