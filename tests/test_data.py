"""FFCV loaders on real JPEGs (imagenette subset); conversion itself is tested in test_convert.py."""
from __future__ import annotations

import pytest
import torch

from fastmim_ds.data.loaders import IMAGENET_MEAN, IMAGENET_STD, build_train_loader, build_val_loader

pytestmark = pytest.mark.timeout(300)


def test_train_loader_batches(small_beton):
    threads = torch.get_num_threads()
    loader = build_train_loader(
        str(small_beton / "train.beton"), img_size=48, batch_size=16, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3),
        hflip=True, num_workers=1, seed=0, distributed=False, device=torch.device("cpu"),
    )
    assert len(loader) == 240 // 16
    batches = [(x.clone(), y.clone()) for x, y in loader]
    assert torch.get_num_threads() == threads  # FFCV's set_num_threads undone
    x, y = batches[0]
    assert x.shape == (16, 3, 48, 48) and x.dtype == torch.float32 and y.dtype == torch.int64
    allx = torch.cat([b[0] for b in batches])
    # normalised with ImageNet statistics: per-channel mean near 0, std near 1 on natural images
    assert allx.mean().abs() < 0.5 and 0.6 < allx.std() < 1.5
    lo = (0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.all(allx.amin(dim=(0, 2, 3)) >= lo - 1e-4)
    labels = torch.cat([b[1] for b in batches])
    assert labels.min() >= 0 and labels.max() <= 9 and len(labels.unique()) == 10
    # same seed and epoch -> same order; next epoch -> another order
    loader.set_epoch(0)
    again = torch.cat([y.clone() for _, y in loader])
    assert torch.equal(again, labels)
    loader.set_epoch(1)
    assert not torch.equal(torch.cat([y.clone() for _, y in loader]), labels)


def test_val_loader_shards_cover_every_image_once(small_beton):
    shards = []
    for rank in range(3):
        loader = build_val_loader(str(small_beton / "val.beton"), img_size=32, batch_size=7, crop_ratio=224 / 256,
                                  num_workers=1, rank=rank, world_size=3, device=torch.device("cpu"))
        shards.append(torch.cat([y.clone() for _, y in loader]))
    assert sum(len(s) for s in shards) == 80
    counts = torch.bincount(torch.cat(shards), minlength=10)
    assert counts.tolist() == [8] * 10


def test_second_loader_does_not_break_numba_finalizers(small_beton, monkeypatch):
    """Regression: ffcv's OSCacheManager mutated numba's interned uint8[::1] type, so garbage-collecting a loader
    built before another one raised ``KeyError`` in numba's dispatcher finalizer (printed as "Exception ignored")."""
    import gc
    import sys

    raised = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: raised.append(u.exc_value))
    cpu = torch.device("cpu")
    first = build_train_loader(str(small_beton / "train.beton"), img_size=32, batch_size=8, scale=(0.2, 1.0),
                               ratio=(3 / 4, 4 / 3), hflip=True, num_workers=1, seed=0, distributed=False, device=cpu)
    for _ in first:
        pass
    second = build_val_loader(str(small_beton / "val.beton"), img_size=32, batch_size=8, crop_ratio=0.875,
                              num_workers=1, rank=0, world_size=1, device=cpu)
    del first
    gc.collect()
    assert raised == []
    assert sum(len(y) for _, y in second) == 80
