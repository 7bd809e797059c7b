"""Reproducible, resumable FFCV training batches (seeded crop/flip decoder, mid-epoch start, pipeline errors).

Real JPEGs: the ``small_beton`` fixture (240 imagenette images at <= 96 px). Single-process order only; across ranks the
order is ffcv's ``DistributedSampler(seed).set_epoch(epoch)``, and crops/flips are keyed by the sample index, so they
do not depend on the rank either.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from ffcv.libffcv import imdecode, resize_crop
from ffcv.reader import Reader

from fastmim_ds.data.loaders import IMAGENET_MEAN, IMAGENET_STD, build_train_loader, random_resized_crop_params

pytestmark = pytest.mark.timeout(120)

SCALE, RATIO, SIZE, BATCH = (0.2, 1.0), (3 / 4, 4 / 3), 40, 16  # 240 images -> 15 batches


def _loader(path, *, seed=0, num_workers=1, scale=SCALE):
    return build_train_loader(str(path), img_size=SIZE, batch_size=BATCH, scale=scale, ratio=RATIO, hflip=True,
                              num_workers=num_workers, seed=seed, distributed=False, device=torch.device("cpu"))


def _epoch(loader, epoch, start_batch=0):
    loader.set_epoch(epoch, start_batch=start_batch)
    return [(x.clone(), y.clone()) for x, y in loader]  # FFCV reuses its buffers: keep copies


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


@pytest.fixture(scope="module")
def loaders(small_beton):
    """Two loaders with seed 0 (1 and 2 decode threads) and one with seed 1, on train.beton."""
    path = small_beton / "train.beton"
    return {"w1": _loader(path), "w2": _loader(path, num_workers=2), "seed1": _loader(path, seed=1)}


def test_crop_params_stay_in_bounds_and_flip_half():
    rng = np.random.default_rng(0)
    n = 4000
    heights = rng.integers(40, 500, n)
    widths = np.round(heights * np.exp(rng.uniform(np.log(0.6), np.log(1.7), n))).astype(np.int64)  # photo shapes
    boxes = np.array([random_resized_crop_params(heights[k], widths[k], SCALE, RATIO, 0.5, 7, 3, k)
                      for k in range(n)], dtype=np.float64)
    i, j, h, w, flip = boxes.T
    assert np.all((i >= 0) & (j >= 0) & (h >= 1) & (w >= 1) & (i + h <= heights) & (j + w <= widths))
    # (the 10-try fallback, a centre crop clamped to RATIO, also lies within the bounds for these image shapes)
    area, aspect = h * w / (heights * widths), w / h
    # w and h are rounded to whole pixels: allow +-0.5 px on each side of the box
    slack = 0.5 / np.minimum(h, w)
    assert np.all(area >= SCALE[0] * (1 - slack) ** 2) and np.all(area <= SCALE[1] * (1 + slack) ** 2)
    assert np.all(aspect >= RATIO[0] * (1 - slack) / (1 + slack))
    assert np.all(aspect <= RATIO[1] * (1 + slack) / (1 - slack))
    assert area.min() < 0.25 and area.max() > 0.9  # the whole scale range is used
    assert abs(flip.mean() - 0.5) < 0.03  # 4000 fair flips: std 0.008
    assert np.median(i / np.maximum(heights - h, 1)) == pytest.approx(0.5, abs=0.05)  # positions spread evenly
    # a pure function of (seed, epoch, index); other keys give other crops
    again = np.array([random_resized_crop_params(heights[k], widths[k], SCALE, RATIO, 0.5, 7, 3, k)
                      for k in range(n)])
    assert np.array_equal(boxes, again)
    other_epoch = np.array([random_resized_crop_params(heights[k], widths[k], SCALE, RATIO, 0.5, 7, 4, k)
                            for k in range(200)])
    other_seed = np.array([random_resized_crop_params(heights[k], widths[k], SCALE, RATIO, 0.5, 8, 3, k)
                           for k in range(200)])
    assert np.mean(np.any(other_epoch[:, :4] != boxes[:200, :4], axis=1)) > 0.95
    assert np.mean(np.any(other_seed[:, :4] != boxes[:200, :4], axis=1)) > 0.95


def test_crop_params_fallback_and_flip_probability():
    # scale 1 with a square aspect fits only a square image; otherwise: centre crop clamped to the ratio (torchvision)
    assert random_resized_crop_params(60, 60, (1.0, 1.0), (1.0, 1.0), 0.0, 0, 0, 5) == (0, 0, 60, 60, False)
    assert random_resized_crop_params(90, 60, (1.0, 1.0), (1.0, 1.0), 0.0, 0, 0, 5) == (15, 0, 60, 60, False)
    assert random_resized_crop_params(60, 100, (1.0, 1.0), (0.5, 1.5), 0.0, 0, 0, 5) == (0, 5, 60, 90, False)
    assert not any(random_resized_crop_params(60, 60, SCALE, RATIO, 0.0, 0, 0, k)[4] for k in range(500))
    assert all(random_resized_crop_params(60, 60, SCALE, RATIO, 1.0, 0, 0, k)[4] for k in range(500))


def test_same_seed_gives_identical_batches_for_any_thread_count(loaders):
    one, two = _epoch(loaders["w1"], 2), _epoch(loaders["w2"], 2)
    assert len(one) == 240 // BATCH and one[0][0].shape == (BATCH, 3, SIZE, SIZE)
    assert _same(one, two)  # exact: order, crops, flips and decode do not depend on threads or the loader object
    assert _same(one, _epoch(loaders["w1"], 2))  # and the epoch replays


def _images_by_index(loader, epoch) -> dict:
    batches = _epoch(loader, epoch)
    order = loader.loader.traversal_order.sample_order(epoch)  # ffcv's order for the epoch: sample index per slot
    return dict(zip(order.tolist(), torch.cat([x for x, _ in batches])))


def test_other_epoch_or_seed_gives_other_order_and_crops(loaders):
    base = _epoch(loaders["w1"], 0)
    for other in (_epoch(loaders["w1"], 1), _epoch(loaders["seed1"], 0)):
        assert not torch.equal(torch.cat([y for _, y in base]), torch.cat([y for _, y in other]))
    # the same image is cropped/flipped differently in another epoch or with another seed
    ref = _images_by_index(loaders["w1"], 0)
    for other in (_images_by_index(loaders["w1"], 1), _images_by_index(loaders["seed1"], 0)):
        assert sorted(other) == sorted(ref)
        assert sum(torch.equal(ref[k], other[k]) for k in ref) <= 2


def test_start_batch_yields_the_rest_of_the_epoch_without_decoding_the_rest(loaders):
    loader = loaders["w2"]
    full = _epoch(loader, 3)
    for k in (1, 7, len(full) - 1):
        rest = _epoch(loader, 3, start_batch=k)
        assert len(loader) == len(full) and _same(rest, full[k:])
    assert _epoch(loader, 3, start_batch=len(full)) == []
    # the skip applies to one epoch only: the next iteration is epoch 4 from its first batch
    assert _same([(x.clone(), y.clone()) for x, y in loader], _epoch(loaders["w1"], 4))
    with pytest.raises(ValueError, match="start_batch"):
        loader.set_epoch(0, start_batch=len(full) + 1)
    with pytest.raises(ValueError, match="epoch"):
        loader.set_epoch(-1)


def _reference_images(path, indices, *, seed, epoch, size):
    """(B, H, W, 3) uint8 built outside the loader: ffcv's imdecode + resize_crop (the C functions the decoder calls)
    of the boxes ``random_resized_crop_params`` gives, then the flip."""
    reader = Reader(str(path))
    fields = reader.metadata[f"f{list(reader.handlers).index('image')}"]
    data = np.memmap(path, dtype=np.uint8, mode="r")
    table = reader.alloc_table
    out = np.empty((len(indices), size, size, 3), np.uint8)
    for b, idx in enumerate(indices):
        field = fields[idx]
        height, width, ptr = int(field["height"]), int(field["width"]), int(field["data_ptr"])
        assert field["mode"] == 0  # JPEG, as the converter writes
        nbytes = int(table["size"][table["ptr"] == ptr][0])
        img = np.empty((height, width, 3), np.uint8)
        assert imdecode(np.array(data[ptr:ptr + nbytes]), img, height, width, height, width, 0, 0, 1, 1, False,
                        False) == 0
        i, j, h, w, flip = random_resized_crop_params(height, width, SCALE, RATIO, 0.5, seed, epoch, idx)
        resize_crop(img, i, i + h, j, j + w, out[b])
        if flip:
            out[b] = out[b][:, ::-1]
    return out


def test_decoded_batches_equal_the_documented_crop_and_flip(loaders, small_beton):
    """The compiled decoder crops and flips exactly as ``random_resized_crop_params(seed, epoch, index)`` says."""
    loader, epoch = loaders["w2"], 5
    x, _ = _epoch(loader, epoch, start_batch=2)[0]
    indices = loader.loader.traversal_order.sample_order(epoch)[2 * BATCH:3 * BATCH]  # ffcv's order for the epoch
    ref = _reference_images(small_beton / "train.beton", indices, seed=0, epoch=epoch, size=SIZE)
    mean, std = np.array(IMAGENET_MEAN) * 255, np.array(IMAGENET_STD) * 255
    expected = ((ref - mean) / std).astype(np.float32)  # NormalizeImage's lookup table, entry by entry
    assert torch.equal(x.permute(0, 2, 3, 1), torch.from_numpy(expected))


def test_set_img_size_keeps_batches_reproducible(loaders):
    loader = loaders["w1"]
    loader.set_img_size(24)
    try:
        small = _epoch(loader, 0, start_batch=13)
        assert small[0][0].shape == (BATCH, 3, 24, 24) and _same(small, _epoch(loaders["w1"], 0)[13:])
    finally:
        loader.set_img_size(SIZE)


def test_corrupt_jpeg_raises_in_the_consumer_after_the_earlier_batches(small_beton, tmp_path):
    path = tmp_path / "train.beton"
    shutil.copy(small_beton / "train.beton", path)
    reader = Reader(str(path))
    order = np.random.default_rng(0).permutation(reader.num_samples)  # ffcv's RANDOM order of epoch 0, seed 0
    bad = int(order[3 * BATCH + 5])  # in batch 3
    ptr = int(reader.metadata[f"f{list(reader.handlers).index('image')}"][bad]["data_ptr"])
    with open(path, "r+b") as f:
        f.seek(ptr)
        f.write(b"\0" * 64)  # no JPEG SOI marker any more
    loader = _loader(path, num_workers=2)
    got = 0
    with pytest.raises(RuntimeError, match="pipeline thread failed") as info:
        for _ in loader:
            got += 1
    assert got == 3
    assert isinstance(info.value.__cause__, ValueError) and str(bad) in str(info.value.__cause__)
