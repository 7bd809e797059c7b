"""fastmim_ds.masking: per-sample block masks (FastMIM ``mim_per_sample_block_masking``) and upsampling."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastmim_ds.masking import BlockMaskGenerator, upsample_mask

pytestmark = pytest.mark.timeout(120)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# (img_size, block_size, ratio, blocks n, masked = n - int(n * (1 - ratio))) -- numbers written out by hand
COUNT_CASES = [
    (128, 16, 0.75, 64, 48),  # FastMIM ViT at 128 px
    (128, 32, 0.75, 16, 12),  # FastMIM Swin at 128 px
    (64, 16, 0.75, 16, 12),
    (96, 16, 0.75, 36, 27),  # int(36 * 0.25) = 9 kept
    (224, 16, 0.75, 196, 147),  # int(196 * 0.25) = 49 kept
    (224, 16, 0.6, 196, 118),  # int(196 * 0.4) = int(78.4) = 78 kept
    (48, 16, 0.5, 9, 5),  # int(4.5) = 4 kept
    (80, 16, 0.3, 25, 8),  # int(25 * 0.7) = int(17.5) = 17 kept
    (128, 16, 0.0, 64, 0),
]


@pytest.mark.parametrize("img, block, ratio, n, masked", COUNT_CASES)
def test_exact_masked_count_per_sample(img, block, ratio, n, masked):
    gen = BlockMaskGenerator(ratio=ratio, block_size=block)
    assert gen.grid((img, img)) == (img // block, img // block)
    assert (img // block) ** 2 == n
    assert gen.num_masked((img, img)) == masked
    m = gen(16, (img, img), generator=_gen(0))
    assert m.shape == (16, img // block, img // block)
    assert m.dtype == torch.bool
    assert m.flatten(1).sum(1).tolist() == [masked] * 16


def test_shape_non_square_image():
    gen = BlockMaskGenerator(ratio=0.75, block_size=16)
    m = gen(3, (64, 128), generator=_gen(1))
    assert m.shape == (3, 4, 8) and m.dtype == torch.bool
    assert m.flatten(1).sum(1).tolist() == [32 - int(32 * 0.25)] * 3


def test_mask_on_requested_device():
    m = BlockMaskGenerator(ratio=0.75, block_size=16)(2, (64, 64), device="cpu", generator=_gen(0))
    assert m.device.type == "cpu"


def test_same_seed_same_mask_different_seed_different_mask():
    gen = BlockMaskGenerator(ratio=0.75, block_size=16)
    a = gen(4, (128, 128), generator=_gen(123))
    b = gen(4, (128, 128), generator=_gen(123))
    c = gen(4, (128, 128), generator=_gen(124))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_global_rng_used_without_generator():
    gen = BlockMaskGenerator(ratio=0.75, block_size=16)
    torch.manual_seed(7)
    a = gen(4, (128, 128))
    torch.manual_seed(7)
    b = gen(4, (128, 128))
    assert torch.equal(a, b)


def test_masks_differ_across_samples():
    gen = BlockMaskGenerator(ratio=0.75, block_size=16)
    m = gen(8, (128, 128), generator=_gen(0)).flatten(1)
    for i in range(8):
        for j in range(i + 1, 8):
            assert not torch.equal(m[i], m[j]), f"samples {i} and {j} got the same mask"


def test_masks_uniform_over_blocks():
    # every block is masked with probability 48/64 = 0.75; a positional bias would show up here
    gen = BlockMaskGenerator(ratio=0.75, block_size=16)
    m = gen(4000, (128, 128), generator=_gen(0)).float()
    freq = m.mean(0)
    assert freq.shape == (8, 8)
    assert (freq - 0.75).abs().max().item() < 0.04, freq


@pytest.mark.parametrize("size", [(72, 64), (64, 72), (100, 100), (8, 8)])
def test_non_divisible_size_raises(size):
    gen = BlockMaskGenerator(ratio=0.75, block_size=16)
    with pytest.raises(ValueError, match="divisible"):
        gen(2, size)
    with pytest.raises(ValueError):
        gen.grid(size)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_ratio_out_of_range_raises(ratio):
    with pytest.raises(ValueError, match="ratio"):
        BlockMaskGenerator(ratio=ratio, block_size=16)


@pytest.mark.parametrize("block", [0, -16])
def test_bad_block_size_raises(block):
    with pytest.raises(ValueError, match="block_size"):
        BlockMaskGenerator(ratio=0.75, block_size=block)


@pytest.mark.parametrize("factor", [1, 2, 4, 16])
@pytest.mark.parametrize("hw", [(4, 4), (2, 3)])
def test_upsample_mask_matches_interpolate_and_kron(factor, hw):
    mask = torch.rand(3, *hw, generator=_gen(factor)) > 0.5
    up = upsample_mask(mask, factor)
    assert up.shape == (3, hw[0] * factor, hw[1] * factor)
    assert up.dtype == torch.bool
    ref = F.interpolate(mask[:, None].float(), scale_factor=factor, mode="nearest")[:, 0].bool()
    assert torch.equal(up, ref)
    kron = torch.stack([torch.kron(m.long(), torch.ones(factor, factor, dtype=torch.long)) for m in mask]).bool()
    assert torch.equal(up, kron)


def test_upsample_mask_explicit_values():
    mask = torch.tensor([[[True, False], [False, True]]])
    expected = torch.tensor(
        [[[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]], dtype=torch.bool
    )
    assert torch.equal(upsample_mask(mask, 2), expected)
