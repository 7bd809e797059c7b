"""The data seam: all the rest of fastmim_ds knows about datasets and their loaders.

* :func:`dataset_info`: image count, classes, class names and whether a prepared dataset file is labeled (the
  pre-launch checks, pre-training, fine-tuning, the linear probe, k-NN and the pictures read it here);
* :func:`train_loader` / :func:`val_loader`: a config's ``data`` section turned into the training and validation
  loaders; :func:`labeled_indices`: its labelled subset; :func:`eval_loader`: centre crops of any prepared file
  (quality signals, k-NN, pictures);
* :class:`Loader`: what every loader offers (the training loop, evaluation and the quality signals rely on nothing
  else).

The implementation is FFCV: ``.beton`` files written by ``fastmim-ds prepare`` (:mod:`.convert`, :mod:`.sources`)
and read by :mod:`.loaders`. Nothing outside this package imports ffcv or :mod:`.loaders`, so another storage format
or reader means changing this package only. Importing this package is cheap (no torch, no ffcv): ffcv, slow to import,
is loaded on the first count or loader.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np
    import torch

    from ..config import DataCfg

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Loader", "DatasetInfo", "dataset_info", "labeled_indices",
           "train_loader", "val_loader", "eval_loader"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # per-channel mean / std of RGB values in [0, 1] that loaders normalise with
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_RATIO = 224 / 256  # centre-crop side / shorter image side (ImageNet evaluation)


@runtime_checkable
class Loader(Protocol):
    """A loader of one dataset split for one rank.

    Iterating yields ``(images, labels)``: images (B, 3, H, W) float32 on the loader's device, normalised with
    :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD` (``(x / 255 - mean) / std``, channels-last memory), H = W = the
    current image size in px; labels (B,) int64 class indices (0 for every image of an unlabeled set). B is the batch
    size, except possibly in an evaluation loader's last batch (training loaders drop the incomplete last batch). The
    tensors may be reused by the loader once the next batch is requested: clone what must outlive the step.
    """

    def __len__(self) -> int:
        """Batches in a full epoch (also after ``set_epoch(epoch, start_batch=k)``, whose iteration yields k fewer)."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of the next epoch (see the class docstring)."""

    def set_epoch(self, epoch: int, start_batch: int = 0, *, start_sample: int = 0) -> None:
        """Makes the next iteration yield batches ``start_batch``, ..., ``len(self) - 1`` of epoch ``epoch``,
        bit-identical to those batches of an uninterrupted epoch ``epoch`` (order and augmentation are functions of
        the seed, the epoch and the sample); the skipped batches are not decoded.

        A training epoch is one permutation of the dataset, the same for every world size, dealt in global batches
        (B x ranks images, each rank its slice). ``start_sample`` skips that many images of it, counted over all
        ranks, and deals the rest: what a run resumed on another number of ranks reads. The loop passes it only when
        the offset is not a whole number of global batches (else ``start_batch``); a loader of a fixed order may
        refuse it.

        Raises:
            ValueError: ``epoch`` < 0, ``start_batch`` outside [0, len(self)], ``start_sample`` outside [0, images],
                or ``start_sample`` on a loader without a global training order.
        """

    def set_img_size(self, size: int) -> None:
        """Decodes to ``size`` x ``size`` px from the next iteration on (FastMIM-P stages)."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a prepared dataset file holds (:func:`dataset_info`).

    Attributes:
        path: the file.
        num_images: images in it.
        classes: class ids (folder names, ImageNet wnids), label = index; [] when unknown or unlabeled.
        class_names: human-readable names parallel to ``classes`` (ImageNet devkit, synset mapping, ``ClassLabel``);
            [] when the source gave none.
        labeled: False for a set prepared without classes (every label 0; pre-training only).
        num_classes: ``len(classes)``; without ``classes.json`` the largest label + 1; 0 when unlabeled.
    """

    path: str
    num_images: int
    classes: list[str]
    class_names: list[str]
    labeled: bool
    num_classes: int


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat() if path.is_file() else None
    return (st.st_mtime_ns, st.st_size) if st else (0, -1)


def dataset_info(path: str | os.PathLike) -> DatasetInfo:
    """Image count, classes and class names of the prepared dataset ``path`` (a ``.beton`` and the ``classes.json``
    that ``fastmim-ds prepare`` writes beside it). Cached per process while the files are unchanged.

    Raises:
        FileNotFoundError: ``path`` missing.
        ValueError: ``path`` is not a dataset written by ``fastmim-ds prepare`` (FFCV ``.beton``).
    """
    p = Path(path)
    meta = p.with_name("classes.json")
    return _dataset_info(str(p), _stat(p), _stat(meta))


@functools.lru_cache(maxsize=32)
def _dataset_info(path: str, stat: tuple[int, int], meta_stat: tuple[int, int]) -> DatasetInfo:
    from .loaders import dataset_labels, dataset_size

    try:
        n = dataset_size(path)
    except AssertionError as e:  # ffcv's Reader asserts on the header's format version
        raise ValueError(f"{path}: not an FFCV .beton written by `fastmim-ds prepare` ({e})") from None
    meta_file = Path(path).with_name("classes.json")
    meta = json.loads(meta_file.read_text()) if meta_stat[1] >= 0 else {}
    labeled = not meta.get("unlabeled", False)
    classes = list(meta.get("classes", [])) if labeled else []
    num_classes = len(classes) or (int(dataset_labels(path).max()) + 1 if labeled and n else 0)
    return DatasetInfo(path=path, num_images=n, classes=classes, class_names=list(meta.get("names", [])),
                       labeled=labeled, num_classes=num_classes)


def labeled_indices(data: DataCfg) -> np.ndarray | None:
    """The labelled subset of ``data.train`` that ``data.labels_fraction`` / ``labels_per_class`` / ``labels_seed``
    select (class-balanced, seeded, the same on any machine and world size): sorted uint64 sample indices, or None for
    every image (``labels_fraction`` 1 and ``labels_per_class`` 0).

    Raises:
        FileNotFoundError: ``data.train`` missing.
        ValueError: ``labels_fraction`` outside (0, 1] or ``labels_per_class`` < 0.
    """
    from .loaders import labeled_subset

    return labeled_subset(data.train, fraction=data.labels_fraction, per_class=data.labels_per_class,
                          seed=data.labels_seed)


def train_loader(data: DataCfg, *, batch_size: int, seed: int, device: torch.device, world_size: int = 1,
                 img_size: int = 0, indices: np.ndarray | None = None) -> Loader:
    """The shuffled training loader of ``data.train`` for this rank: seeded RandomResizedCrop (``data.rrc_scale``,
    ``data.rrc_ratio``) + horizontal flip (``data.hflip``), incomplete last batch dropped, every epoch a function of
    (seed, epoch) alone, so ``set_epoch(epoch, start_batch)`` resumes mid-epoch exactly.

    Args:
        data: the config's ``data`` section (also ``num_workers``, ``os_cache``, ``batches_ahead``).
        batch_size: images per batch on this rank.
        seed: order and augmentation seed, >= 0 (the same on every rank).
        device: where batches land.
        world_size: ranks sharing the epoch (> 1: each reads its own shard; torch.distributed initialised).
        img_size: crop side in px; 0 = ``data.img_size``.
        indices: train on these sample indices only (:func:`labeled_indices`); None = all.

    Raises:
        FileNotFoundError: ``data.train`` missing.
        ValueError: fewer images per rank than one batch; crop scale / ratio out of range.
    """
    from .loaders import build_train_loader

    return build_train_loader(
        data.train, img_size=img_size or data.img_size, batch_size=batch_size, scale=data.rrc_scale,
        ratio=data.rrc_ratio, hflip=data.hflip, num_workers=data.num_workers, seed=seed, distributed=world_size > 1,
        device=device, os_cache=data.os_cache, batches_ahead=data.batches_ahead, indices=indices)


def val_loader(data: DataCfg, *, batch_size: int, device: torch.device, rank: int = 0, world_size: int = 1,
               img_size: int = 0) -> Loader:
    """The evaluation loader of ``data.val`` for rank ``rank`` of ``world_size``: :func:`eval_loader` with the
    section's ``val_crop_ratio``, ``num_workers``, ``os_cache`` and (``img_size`` 0) ``img_size``."""
    return eval_loader(data.val, img_size=img_size or data.img_size, batch_size=batch_size, device=device,
                       crop_ratio=data.val_crop_ratio, num_workers=data.num_workers, rank=rank, world_size=world_size,
                       os_cache=data.os_cache)


def eval_loader(path: str | os.PathLike, *, img_size: int, batch_size: int, device: torch.device,
                crop_ratio: float = EVAL_CROP_RATIO, num_workers: int = 1, rank: int = 0, world_size: int = 1,
                indices: np.ndarray | None = None, os_cache: bool = True) -> Loader:
    """Sequential loader of centre crops of the prepared dataset ``path``: the central ``crop_ratio`` of the shorter
    side, resized to ``img_size`` px. Rank r of ``world_size`` reads images r, r + W, ... (of ``indices``, in order,
    when given), so every image is seen exactly once across the ranks; ``set_epoch`` only restarts it.

    Raises:
        FileNotFoundError: ``path`` missing.
    """
    from .loaders import build_val_loader

    return build_val_loader(str(path), img_size=img_size, batch_size=batch_size, crop_ratio=crop_ratio,
                            num_workers=num_workers, rank=rank, world_size=world_size, device=device,
                            os_cache=os_cache, indices=indices)
