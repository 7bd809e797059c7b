"""FFCV loaders for pre-training, fine-tuning and evaluation (ffcv-imagenet ``create_*_loader``).

JPEGs are decoded, cropped and resized in one fused step (libjpeg-turbo + ``cv::resize(INTER_AREA)``) straight to
the training resolution, in numba threads. Pipelines:

* pre-training: ``RandomResizedCrop(img_size, scale=(0.2, 1))`` + flip (FastMIM ``main_pretrain.py``);
* fine-tuning: ``RandomResizedCrop(img_size, scale=(0.08, 1))`` + flip (Mixup/CutMix happen on the batch);
* evaluation: centre crop of ``val_crop_ratio`` (224/256) of the shorter side, resized to ``img_size``.

Normalisation: on CPU FFCV's numba ``NormalizeImage`` runs in the loader threads (before ``ToTensor``, the only
order that works without CuPy); on GPU uint8 batches are copied to the device and normalised there by torch.
Both yield (B, 3, H, W) float32 channels-last images and (B,) int64 labels.

FFCV's ``Compiler.set_num_threads`` also calls ``torch.set_num_threads`` (on import, in the Loader constructor
and in every epoch iterator); :class:`FFCVLoader` puts torch's thread count back so training keeps its cores.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "FFCVLoader", "build_train_loader", "build_val_loader"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _check_beton(path: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"dataset file not found: {p} (create it with `make prepare-data SRC=... OUT=...`)")
    return p


class FFCVLoader:
    """An FFCV ``Loader`` yielding normalised float batches on ``device``.

    Args:
        loader: the FFCV loader (image pipeline emits uint8 on GPU, float32 normalised on CPU).
        decoder: its image decoder (``output_size`` can change between epochs: FastMIM-P).
        device: where batches land.
        torch_threads: torch intra-op threads to restore after FFCV changes them.
    """

    def __init__(self, loader, decoder, *, device: torch.device, torch_threads: int):
        self.loader, self.decoder, self.device, self.torch_threads = loader, decoder, device, torch_threads
        self._normalize_on_device = device.type != "cpu"
        mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
        self._mean, self._std = mean, std
        torch.set_num_threads(torch_threads)

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def img_size(self) -> int:
        return self.decoder.output_size[0]

    def set_img_size(self, size: int) -> None:
        """Changes the decoded resolution from the next epoch on (buffers are re-declared per ``iter``)."""
        self.decoder.output_size = (size, size)

    def set_epoch(self, epoch: int) -> None:
        """Makes the next ``iter`` use epoch ``epoch``'s data order (seeded per epoch; resume)."""
        self.loader.next_epoch = epoch

    def __iter__(self):
        it = iter(self.loader)
        try:
            for i, (imgs, labels) in enumerate(it):
                if i == 0:  # the epoch's worker thread called Compiler.set_num_threads before its first batch
                    torch.set_num_threads(self.torch_threads)
                if self._normalize_on_device:
                    imgs = (imgs.float() - self._mean) / self._std
                # FFCV reuses its output buffers (batches_ahead + 2 slots) once we move on: callers that keep a
                # batch beyond the step must clone it.
                yield imgs, labels.long()
        finally:
            it.close()
            torch.set_num_threads(self.torch_threads)


def _fix_ffcv_os_cache_reader() -> None:
    """Stops ``Loader(os_cache=True)`` from mutating numba's shared ``uint8[::1]`` type (idempotent).

    ffcv's ``OSCacheManager.state_type`` does ``t1 = nb.uint8[::1]; t1.mutable = False``: numba interns types, so this
    flips the process-wide ``Array(uint8, 1, 'C')`` to read-only and changes its hash. Overload keys of numba functions
    compiled earlier (e.g. a previous loader's ``imdecode``) then miss their dict slot, and numba's dispatcher
    finalizer raises "KeyError" when that loader is garbage-collected. We compile ffcv's reader with the same,
    explicitly read-only types instead (``compile_reader`` is the only user of ``state_type``).
    """
    import numba as nb
    from ffcv.memory_managers.os_cache import OSCacheManager
    from ffcv.pipeline.compiler import Compiler

    if getattr(OSCacheManager.compile_reader, "_fastmim_fixed", False):
        return

    def compile_reader(self):
        def read(address, mem_state):  # ffcv's OSCacheManager.compile_reader body, unchanged
            size = mem_state[2][np.searchsorted(mem_state[1], address)]
            return mem_state[0][address:address + size]

        data = nb.types.Array(nb.uint8, 1, "C", readonly=True)  # what ffcv's mutation turned nb.uint8[::1] into
        return Compiler.compile(read, data(nb.uint64, nb.types.Tuple([data, nb.uint64[::1], nb.uint64[::1]])))

    compile_reader._fastmim_fixed = True
    OSCacheManager.compile_reader = compile_reader


def _pipelines(decoder, *, device: torch.device, hflip: bool):
    from ffcv.fields.decoders import IntDecoder
    from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage

    image = [decoder]
    if hflip:
        image.append(RandomHorizontalFlip())
    if device.type == "cpu":
        image.append(NormalizeImage(np.array(IMAGENET_MEAN) * 255, np.array(IMAGENET_STD) * 255, np.float32))
        image += [ToTensor(), ToTorchImage()]
    else:
        image += [ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage()]
    label = [IntDecoder(), ToTensor(), Squeeze()]
    if device.type != "cpu":
        label.append(ToDevice(device, non_blocking=True))
    return {"image": image, "label": label}


def build_train_loader(
    path: str, *, img_size: int, batch_size: int, scale: tuple[float, float], ratio: tuple[float, float],
    hflip: bool, num_workers: int, seed: int, distributed: bool, device: torch.device, os_cache: bool = True,
    batches_ahead: int = 3, torch_threads: int | None = None,
) -> FFCVLoader:
    """Shuffled, ``drop_last`` training loader; with ``distributed`` each rank reads its own shard.

    The order is a function of (seed, epoch): ``np.random.default_rng(seed + epoch)`` on one rank, a
    ``DistributedSampler(seed).set_epoch(epoch)`` across ranks (torch.distributed must be initialised first).

    Raises:
        FileNotFoundError: ``path`` missing.
    """
    from ffcv.fields.decoders import RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    _fix_ffcv_os_cache_reader()
    threads = torch_threads or torch.get_num_threads()
    decoder = RandomResizedCropRGBImageDecoder((img_size, img_size), scale=tuple(scale), ratio=tuple(ratio))
    loader = Loader(
        str(_check_beton(path)), batch_size=batch_size, num_workers=num_workers, order=OrderOption.RANDOM,
        distributed=distributed, seed=seed, drop_last=True, os_cache=os_cache, batches_ahead=batches_ahead,
        pipelines=_pipelines(decoder, device=device, hflip=hflip),
    )
    if len(loader) == 0:
        raise ValueError(f"{path}: fewer images per rank than one batch of {batch_size} (lower train.micro_batch)")
    return FFCVLoader(loader, decoder, device=device, torch_threads=threads)


def build_val_loader(
    path: str, *, img_size: int, batch_size: int, crop_ratio: float, num_workers: int, rank: int, world_size: int,
    device: torch.device, os_cache: bool = True, torch_threads: int | None = None,
) -> FFCVLoader:
    """Sequential evaluation loader; rank r reads images r, r + W, ... so every image is counted exactly once
    (FFCV's distributed mode pads with repeats, like ``DistributedSampler``).
    """
    from ffcv.fields.decoders import CenterCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.reader import Reader

    _fix_ffcv_os_cache_reader()
    threads = torch_threads or torch.get_num_threads()
    p = str(_check_beton(path))
    n = Reader(p).num_samples
    decoder = CenterCropRGBImageDecoder((img_size, img_size), ratio=crop_ratio)
    loader = Loader(
        p, batch_size=batch_size, num_workers=num_workers, order=OrderOption.SEQUENTIAL, drop_last=False,
        indices=np.arange(rank, n, world_size, dtype=np.uint64), os_cache=os_cache,  # int64 would mix with
        # FFCV's uint64 offsets and promote to float64 (numpy rule), which its numba decoder rejects
        pipelines=_pipelines(decoder, device=device, hflip=False),
    )
    return FFCVLoader(loader, decoder, device=device, torch_threads=threads)
