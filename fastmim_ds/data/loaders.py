"""FFCV loaders for pre-training, fine-tuning and evaluation (ffcv-imagenet ``create_*_loader``): the implementation
behind :mod:`fastmim_ds.data`'s seam (:class:`FFCVLoader` is its :class:`~fastmim_ds.data.Loader`); the rest of the
package reaches it only through that seam.

JPEGs are decoded, cropped and resized in one fused step (libjpeg-turbo + ``cv::resize(INTER_AREA)``) straight to
the training resolution, in numba threads. Pipelines:

* pre-training: ``RandomResizedCrop(img_size, scale=(0.2, 1))`` + flip (FastMIM ``main_pretrain.py``);
* fine-tuning: ``RandomResizedCrop(img_size, scale=(0.08, 1))`` + flip (Mixup/CutMix happen on the batch);
* evaluation: centre crop of ``val_crop_ratio`` (224/256) of the shorter side, resized to ``img_size``.

Normalisation: on CPU FFCV's numba ``NormalizeImage`` runs in the loader threads (before ``ToTensor``, the only
order that works without CuPy); on GPU uint8 batches are copied to the device and normalised there by torch.
Both yield (B, 3, H, W) float32 channels-last images and (B,) int64 labels.

Reproducible, resumable training batches. A training epoch is a pure function of (seed, epoch):

* order (:func:`epoch_order`): one permutation of the dataset per epoch, ``np.random.default_rng(seed +
  epoch).permutation`` (ffcv's ``OrderOption.RANDOM`` on one rank), whatever the number of ranks. It is dealt in
  global batches of ``batch_size x world_size`` images, each rank reading its contiguous slice of every global batch,
  so the images of a step do not depend on how they are split over ranks, and a run resumed on another number of
  ranks continues the same permutation at its global sample offset (``set_epoch(epoch, start_sample=n)``);
* crops and flips: ffcv's ``RandomResizedCropRGBImageDecoder`` + ``RandomHorizontalFlip`` draw from numba's
  per-thread, unseeded ``np.random`` inside ``prange``, so they change from run to run. :class:`SeededRRCDecoder`
  replaces both: the same RandomResizedCrop algorithm (torchvision / ffcv ``get_random_crop``) and the flip take
  their uniforms from a counter-based hash (splitmix64) of (seed, epoch, sample index, draw number). They do not
  depend on threads, ``num_workers``, batch position or rank.

``FFCVLoader.set_epoch(epoch, start_batch=k)`` then yields exactly batches k, k + 1, ... of that epoch without
decoding the first k (``--resume`` mid-epoch), and an exception raised in FFCV's pipeline thread (e.g. a corrupt
JPEG) is re-raised in the consuming thread instead of leaving it blocked on the batch queue forever.

FFCV's ``Compiler.set_num_threads`` also calls ``torch.set_num_threads`` (on import, in the Loader constructor
and in every epoch iterator); this module and :class:`FFCVLoader` put torch's thread count back so training keeps its
cores.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from queue import Full

import numba as nb
import numpy as np
import torch
from numba import types as nbt
from numba.core import cgutils
from numba.extending import intrinsic

_torch_threads = torch.get_num_threads()  # importing ffcv runs Compiler.set_num_threads(1), torch's included
from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder  # noqa: E402
from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder  # noqa: E402
from ffcv.libffcv import imdecode, resize_crop  # noqa: E402
from ffcv.loader import Loader, OrderOption  # noqa: E402
from ffcv.loader.epoch_iterator import EpochIterator  # noqa: E402
from ffcv.memory_managers.os_cache import OSCacheManager  # noqa: E402
from ffcv.pipeline.compiler import Compiler  # noqa: E402
from ffcv.reader import Reader  # noqa: E402
from ffcv.transforms import NormalizeImage, Squeeze, ToDevice, ToTensor, ToTorchImage  # noqa: E402
from ffcv.traversal_order.base import TraversalOrder  # noqa: E402

from . import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

torch.set_num_threads(_torch_threads)

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "FFCVLoader", "SeededRRCDecoder", "random_resized_crop_params", "epoch_order",
    "GlobalOrder", "SAMPLE_TRACE_ENV", "build_train_loader", "build_val_loader", "dataset_size", "dataset_labels",
    "labeled_subset",
]

# debugging aid (and the resume tests' witness): a folder where every rank appends the sample indices of each training
# batch it yields, one line "epoch index index ..." per batch, to samples_rank<r>.txt
SAMPLE_TRACE_ENV = "FASTMIM_SAMPLE_TRACE"


def _check_beton(path: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"dataset file not found: {p} (create it with `make prepare-data SRC=... OUT=...`)")
    return p


# ----------------------------------------------------------------------------- counter-based RNG (numba, nogil)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # splitmix64's increment (2^64 / golden ratio)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


@nb.njit(nogil=True)
def _splitmix64(z: np.uint64) -> np.uint64:
    """splitmix64's output function (Steele, Lea & Flood 2014): a bijective avalanche mix of a 64-bit word."""
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@nb.njit(nogil=True)
def _uniform(key: np.uint64, draw: int) -> float:
    """Draw number ``draw`` of the splitmix64 stream that starts at ``key``: a float64 uniform in [0, 1)."""
    return (_splitmix64(key + np.uint64(draw + 1) * _GOLDEN) >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@nb.njit(nogil=True)
def random_resized_crop_params(height, width, scale, ratio, flip_prob, seed, epoch, index):
    """Crop box and flip of one sample: RandomResizedCrop (torchvision ``RandomResizedCrop.get_params``, ffcv
    ``get_random_crop``: 10 tries, then a centre crop clamped to ``ratio``) + horizontal flip with ``flip_prob``.

    A pure function of its arguments (numba-compiled; callable from Python and from the decoder's ``prange`` loop):
    the uniforms are splitmix64 draws keyed by (seed, epoch, index); draw 0 decides the flip, draws 1 + 4t .. 4 + 4t
    are try t's area, log-aspect, row and column.

    Args:
        height, width: source image size in pixels.
        scale: (lo, hi) crop area as a fraction of the image area.
        ratio: (lo, hi) crop aspect ratio w / h (sampled log-uniformly).
        flip_prob: probability of a horizontal flip (0 = never).
        seed, epoch, index: non-negative ints (loader seed, epoch, sample index in the .beton).

    Returns:
        (i, j, h, w, flip): crop rows [i, i + h), columns [j, j + w) (int64) and whether to mirror the output (bool).
    """
    height, width = np.int64(height), np.int64(width)
    key = _splitmix64(_splitmix64(_splitmix64(np.uint64(seed) + _GOLDEN) + np.uint64(epoch)) + np.uint64(index))
    flip = _uniform(key, 0) < flip_prob
    area = float(height * width)
    log_lo, log_hi = np.log(ratio[0]), np.log(ratio[1])
    for t in range(10):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * _uniform(key, 1 + 4 * t))
        aspect = np.exp(log_lo + (log_hi - log_lo) * _uniform(key, 2 + 4 * t))
        w = np.int64(round(np.sqrt(target_area * aspect)))
        h = np.int64(round(np.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = np.int64(_uniform(key, 3 + 4 * t) * (height - h + 1))
            j = np.int64(_uniform(key, 4 + 4 * t) * (width - w + 1))
            return i, j, h, w, flip
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, np.int64(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = np.int64(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w, flip


@nb.njit(nogil=True)
def _hflip_inplace(img):
    """Mirrors an (H, W, C) image left-right in place (the flip's cost is a fraction of the decode's)."""
    width = img.shape[1]
    for y in range(img.shape[0]):
        for x in range(width // 2):
            for c in range(img.shape[2]):
                img[y, x, c], img[y, width - 1 - x, c] = img[y, width - 1 - x, c], img[y, x, c]


@intrinsic
def _address_to_voidptr(typingctx, address):
    """``void*`` from an integer address (numba has no cast for it; this is the usual ``inttoptr`` intrinsic)."""
    if not isinstance(address, nbt.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return nbt.voidptr(address), codegen


@nb.njit(nogil=True)
def _read_seed_epoch(address):
    # numba freezes arrays captured by a compiled closure as constants; reading through the address sees the live
    # values the decoder writes between epochs without recompiling the pipeline.
    state = nb.carray(_address_to_voidptr(address), (2,), np.uint64)
    return state[0], state[1]


class SeededRRCDecoder(ResizedCropRGBImageDecoder):
    """ffcv's RandomResizedCrop decoder + horizontal flip, with crops and flips a pure function of
    (seed, epoch, sample index) (see :func:`random_resized_crop_params`).

    The decode path is ffcv's ``ResizedCropRGBImageDecoder``: libjpeg-turbo ``imdecode`` of the stored image into a
    per-sample scratch buffer (raw images are read in place), then ``resize_crop`` (``cv::resize(INTER_AREA)``) of the
    crop box straight into the (output_size[0], output_size[1], 3) uint8 batch slot, in parallel over the batch.
    Unlike ffcv's decoder it checks ``imdecode``'s status: a JPEG that does not decode raises ``ValueError`` naming
    the sample index instead of feeding a stale buffer to training.

    The seed and epoch are set by the owning loader before each epoch (:meth:`set_seed_epoch`) and read by the
    compiled code at every batch, so changing them costs no recompilation. ``output_size`` may change between epochs
    (FastMIM-P, ffcv-imagenet progressive resizing); ``scale``, ``ratio`` and ``flip_prob`` are compiled in.

    Args:
        output_size: (H, W) of the decoded images in pixels.
        scale: (lo, hi) crop area fraction, 0 < lo <= hi <= 1.
        ratio: (lo, hi) crop aspect ratio w / h, 0 < lo <= hi.
        flip_prob: probability of a horizontal flip, in [0, 1].

    Raises:
        ValueError: ``scale``, ``ratio`` or ``flip_prob`` out of range.
    """

    def __init__(self, output_size: tuple[int, int], *, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_prob: float = 0.5):
        super().__init__(tuple(output_size))
        scale, ratio = (float(scale[0]), float(scale[1])), (float(ratio[0]), float(ratio[1]))
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"RandomResizedCrop scale must satisfy 0 < lo <= hi <= 1; got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"RandomResizedCrop ratio must satisfy 0 < lo <= hi; got {ratio}")
        if not 0 <= flip_prob <= 1:
            raise ValueError(f"flip probability must be in [0, 1]; got {flip_prob}")
        self.scale, self.ratio, self.flip_prob = scale, ratio, float(flip_prob)
        self._seed_epoch = np.zeros(2, np.uint64)  # read by address from the compiled decode: never reallocate

    def set_seed_epoch(self, seed: int, epoch: int) -> None:
        """Keys the next batches' crops and flips by (seed, epoch); both must be >= 0 (uint64)."""
        self._seed_epoch[:] = (seed, epoch)

    @property
    def get_crop_generator(self):  # ffcv's abstract hook; our generate_code calls the seeded sampler directly
        return random_resized_crop_params

    def generate_code(self):
        """ffcv ``ResizedCropRGBImageDecoder.generate_code``'s decode loop with the seeded crop + flip and a decode
        status check; returns the (parallel) numba-compilable ``decode``."""
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        scale, ratio, flip_prob = self.scale, self.ratio, self.flip_prob
        state_address = self._seed_epoch.ctypes.data

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            seed, epoch = _read_seed_epoch(state_address)
            status = np.zeros(len(batch_indices), np.int32)  # raising inside prange would serialise the loop
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])

                if field["mode"] == jpg:
                    temp_buffer = temp_storage[dst_ix]
                    status[dst_ix] = imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1,
                                                False, False)
                    selected_size = 3 * height * width
                    temp_buffer = temp_buffer.reshape(-1)[:selected_size]
                    temp_buffer = temp_buffer.reshape(height, width, 3)
                else:
                    temp_buffer = image_data.reshape(height, width, 3)

                if status[dst_ix] == 0:
                    i, j, h, w, flip = random_resized_crop_params(height, width, scale, ratio, flip_prob, seed, epoch,
                                                                  source_ix)
                    resize_crop_c(temp_buffer, i, i + h, j, j + w, destination[dst_ix])
                    if flip:
                        _hflip_inplace(destination[dst_ix])

            for dst_ix in range(len(batch_indices)):
                if status[dst_ix] != 0:
                    raise ValueError("libjpeg-turbo could not decode the JPEG of sample", batch_indices[dst_ix])
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


# ----------------------------------------------------------------------------- training order
def epoch_order(indices: np.ndarray, *, seed: int, epoch: int, batch_size: int, rank: int = 0, world_size: int = 1,
                start_sample: int = 0) -> np.ndarray:
    """The sample indices rank ``rank`` reads in epoch ``epoch`` of a training loader, in reading order.

    The epoch is one permutation of ``indices``, ``np.random.default_rng(seed + epoch).permutation(indices)``, the
    same for every world size. After its first ``start_sample`` images it is dealt in global batches of
    ``G = batch_size * world_size`` images: global batch k is ``perm[start_sample + k G : start_sample + (k + 1) G]``
    and rank r reads its slice ``[r * batch_size, (r + 1) * batch_size)``. The images left over after the last full
    global batch are not read (drop_last over the global batch). So the ranks of a step together read the same images
    whatever the world size, and a run resumed on another world size at ``start_sample`` = images consumed so far
    reads the rest of the same permutation, each image once.

    Args:
        indices: (N,) sample indices of the beton to draw from (uint64; all of them, or a labelled subset).
        seed, epoch: order seed and epoch, >= 0.
        batch_size: images per rank per batch, >= 1.
        rank, world_size: this rank, 0 <= rank < world_size.
        start_sample: images of the permutation already consumed (all ranks), in [0, N].

    Returns:
        (n_batches * batch_size,) array of ``indices``' dtype, ``n_batches = (N - start_sample) // G``.

    Raises:
        ValueError: an argument out of range.
    """
    n = len(indices)
    if batch_size < 1 or not 0 <= rank < world_size or seed < 0 or epoch < 0 or not 0 <= start_sample <= n:
        raise ValueError(f"epoch_order: need batch_size >= 1, 0 <= rank < world_size, seed, epoch >= 0 and "
                         f"0 <= start_sample <= {n}; got batch_size={batch_size}, rank={rank}, "
                         f"world_size={world_size}, seed={seed}, epoch={epoch}, start_sample={start_sample}")
    rest = np.random.default_rng(seed + epoch).permutation(indices)[start_sample:]
    n_batches = len(rest) // (batch_size * world_size)
    return rest[:n_batches * batch_size * world_size].reshape(n_batches, world_size, batch_size)[:, rank].reshape(-1)


class GlobalOrder(TraversalOrder):
    """ffcv traversal order of a training loader: :func:`epoch_order` for this loader's rank and world size.

    Args:
        loader: the ffcv loader (its ``indices``, ``seed`` and ``batch_size`` are used).
        rank, world_size: this rank, 0 <= rank < world_size.
    """

    def __init__(self, loader, *, rank: int, world_size: int):
        super().__init__(loader)
        self.rank, self.world_size = rank, world_size

    def sample_order(self, epoch: int, start_sample: int = 0) -> np.ndarray:
        """This rank's sample indices of epoch ``epoch`` from global sample ``start_sample`` on (see
        :func:`epoch_order`)."""
        return epoch_order(self.indices, seed=self.seed, epoch=epoch, batch_size=self.loader.batch_size,
                           rank=self.rank, world_size=self.world_size, start_sample=start_sample)


# ----------------------------------------------------------------------------- loader
class _EpochIterator(EpochIterator):
    """ffcv's ``EpochIterator`` (the epoch's pipeline thread) that hands an exception raised in the thread to the
    consumer: ffcv's thread dies and the consumer waits on the batch queue forever (ffcv #113, #350)."""

    error: BaseException | None = None  # set by the pipeline thread
    _finished = False

    def run(self) -> None:
        try:
            super().run()
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer thread by __next__
            self.error = e
            while not self.terminate_event.is_set():  # the consumer may have stopped reading (close())
                try:
                    self.output_queue.put(None, timeout=0.5)  # ffcv's end-of-epoch marker
                    return
                except Full:
                    pass

    def __next__(self):
        if self._finished:  # ffcv's iterator would block on the empty queue
            raise StopIteration
        try:
            return super().__next__()
        except StopIteration:
            self._finished = True
            if self.error is not None:
                raise RuntimeError(f"FFCV pipeline thread failed: {self.error!r}") from self.error
            raise


class _ResumableLoader(Loader):
    """ffcv ``Loader`` whose next epoch can start at batch ``start_batch`` (after ``start_sample`` images of a
    :class:`GlobalOrder`), whose seeded decoders are keyed by (seed, epoch) before each epoch, and whose pipeline
    exceptions reach the consumer.

    Args:
        *args, **kwargs: ffcv ``Loader`` arguments.
        seeded_decoders: decoders to key by (``self.seed``, epoch) at every ``iter``.
        shard: (rank, world_size): traverse in :class:`GlobalOrder` (ffcv's ``order`` is then unused); None keeps
            ffcv's order.
    """

    def __init__(self, *args, seeded_decoders: tuple[SeededRRCDecoder, ...] = (),
                 shard: tuple[int, int] | None = None, **kwargs):
        self.seeded_decoders = tuple(seeded_decoders)
        self.start_batch = self.start_sample = 0  # of the next epoch only
        self.epoch_indices = np.zeros(0, np.uint64)  # sample indices of the current iteration, in order
        super().__init__(*args, **kwargs)
        if shard is not None:
            self.traversal_order = GlobalOrder(self, rank=shard[0], world_size=shard[1])
            self.first_traversal_order = self.next_traversal_order()  # what len(self) counts

    def next_traversal_order(self):
        if isinstance(self.traversal_order, GlobalOrder):
            return self.traversal_order.sample_order(self.next_epoch, start_sample=self.start_sample)
        return super().next_traversal_order()

    def __iter__(self) -> _EpochIterator:
        # ffcv 1.0.2 Loader.__iter__, plus the seeding and the skip
        Compiler.set_num_threads(self.num_workers)
        # A previous epoch's thread still finishing a batch (its consumer stopped early) may see the new key: its
        # batches are never read.
        for decoder in self.seeded_decoders:
            decoder.set_seed_epoch(self.seed, self.next_epoch)
        order = self.next_traversal_order()[: len(self) * self.batch_size]  # drop_last as ffcv does it
        skip, self.start_batch, self.start_sample = self.start_batch * self.batch_size, 0, 0
        self.next_epoch += 1
        if self.code is None or self.recompile:
            self.generate_code()
        self.epoch_indices = order[skip:]
        return _EpochIterator(self, self.epoch_indices)


class FFCVLoader:
    """An FFCV loader yielding normalised float batches on ``device``.

    Iterating yields (images (B, 3, H, W) float32 normalised with ImageNet statistics, channels-last; labels (B,)
    int64). An exception raised in FFCV's pipeline thread (e.g. ``ValueError`` for a JPEG that does not decode)
    is raised in the iterating thread as ``RuntimeError`` chained to it, after the batches prepared before it.

    Args:
        loader: the FFCV loader (image pipeline emits uint8 on GPU, float32 normalised on CPU).
        decoder: its image decoder (``output_size`` can change between epochs: FastMIM-P).
        device: where batches land.
        torch_threads: torch intra-op threads to restore after FFCV changes them.
    """

    def __init__(self, loader: _ResumableLoader, decoder, *, device: torch.device, torch_threads: int):
        self.loader, self.decoder, self.device, self.torch_threads = loader, decoder, device, torch_threads
        self._normalize_on_device = device.type != "cpu"
        mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
        self._mean, self._std = mean, std
        torch.set_num_threads(torch_threads)

    def __len__(self) -> int:
        """Batches in a full epoch (also after ``set_epoch(..., start_batch=k)``, whose iteration yields k fewer)."""
        return len(self.loader)

    @property
    def img_size(self) -> int:
        return self.decoder.output_size[0]

    def set_img_size(self, size: int) -> None:
        """Changes the decoded resolution from the next epoch on (buffers are re-declared per ``iter``)."""
        self.decoder.output_size = (size, size)

    def set_epoch(self, epoch: int, start_batch: int = 0, *, start_sample: int = 0) -> None:
        """Makes the next ``iter`` yield batches ``start_batch``, ..., ``len(self) - 1`` of epoch ``epoch``.

        The batches are bit-identical to those of an uninterrupted epoch ``epoch`` of a loader built with the same
        arguments (order from (seed, epoch); crops and flips from (seed, epoch, sample index)); the skipped ones are
        not read or decoded. Resuming after micro-batch step s (0-based) of an epoch means ``start_batch=s + 1``.
        Without a call, iterations run epochs 0, 1, 2, ... from their first batch.

        ``start_sample`` (training loaders) first skips that many images of the epoch's permutation, counted over
        all ranks, then deals the rest in global batches (:func:`epoch_order`): a run resumed on another number of
        ranks continues where the old ranks stopped together. ``start_batch=k`` equals
        ``start_sample=k * batch_size * world_size``.

        Args:
            epoch: epoch number, >= 0.
            start_batch: loader batches (micro-batches, not optimizer steps) to skip, in [0, len(self)].
            start_sample: images of the epoch already consumed by all ranks, in [0, images in the loader].

        Raises:
            ValueError: ``epoch`` < 0, ``start_batch`` or ``start_sample`` out of range, or ``start_sample`` on a loader
                without a global training order.
        """
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0; got {epoch}")
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be in [0, {len(self)}] (batches per epoch); got {start_batch}")
        if start_sample and not isinstance(self.loader.traversal_order, GlobalOrder):
            raise ValueError("start_sample needs a training loader (global order); this one reads a fixed order")
        if not 0 <= start_sample <= len(self.loader.indices):
            raise ValueError(f"start_sample must be in [0, {len(self.loader.indices)}] (images per epoch); "
                             f"got {start_sample}")
        self.loader.next_epoch = epoch
        self.loader.start_batch = start_batch
        self.loader.start_sample = start_sample

    def __iter__(self):
        epoch = self.loader.next_epoch
        it = iter(self.loader)
        trace = _sample_trace()
        try:
            for i, (imgs, labels) in enumerate(it):
                if i == 0:  # the epoch's worker thread called Compiler.set_num_threads before its first batch
                    torch.set_num_threads(self.torch_threads)
                if trace is not None:
                    batch = self.loader.epoch_indices[i * self.loader.batch_size:(i + 1) * self.loader.batch_size]
                    with open(trace, "a") as f:
                        f.write(" ".join(map(str, (epoch, *batch.tolist()))) + "\n")
                if self._normalize_on_device:
                    imgs = (imgs.float() - self._mean) / self._std
                # FFCV reuses its output buffers (batches_ahead + 2 slots) once we move on: callers that keep a
                # batch beyond the step must clone it.
                yield imgs, labels.long()
        finally:
            it.close()
            torch.set_num_threads(self.torch_threads)


def _sample_trace() -> Path | None:
    """This rank's trace file when ``FASTMIM_SAMPLE_TRACE`` names a folder (see :data:`SAMPLE_TRACE_ENV`)."""
    folder = os.environ.get(SAMPLE_TRACE_ENV)
    if not folder:
        return None
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    Path(folder).mkdir(parents=True, exist_ok=True)
    return Path(folder) / f"samples_rank{rank}.txt"


def _fix_ffcv_os_cache_reader() -> None:
    """Stops ``Loader(os_cache=True)`` from mutating numba's shared ``uint8[::1]`` type (idempotent).

    ffcv's ``OSCacheManager.state_type`` does ``t1 = nb.uint8[::1]; t1.mutable = False``: numba interns types, so this
    flips the process-wide ``Array(uint8, 1, 'C')`` to read-only and changes its hash. Overload keys of numba functions
    compiled earlier (e.g. a previous loader's ``imdecode``) then miss their dict slot, and numba's dispatcher
    finalizer raises "KeyError" when that loader is garbage-collected. We compile ffcv's reader with the same,
    explicitly read-only types instead (``compile_reader`` is the only user of ``state_type``).
    """
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


def dataset_size(path: str) -> int:
    """Number of images in a beton.

    Raises:
        FileNotFoundError: ``path`` missing.
    """
    return int(Reader(str(_check_beton(path))).num_samples)


def dataset_labels(path: str) -> np.ndarray:
    """(N,) int64 label of every image of a beton, in sample order (read from its metadata, no decoding)."""
    reader = Reader(str(_check_beton(path)))
    field = reader.field_names.index("label")
    return np.asarray(reader.metadata[f"f{field}"], dtype=np.int64)


def labeled_subset(path: str, *, fraction: float = 1.0, per_class: int = 0, seed: int = 0) -> np.ndarray | None:
    """A class-balanced, seeded subset of a beton's images: the semi-supervised protocol (SimCLR, MAE-style papers).

    From each class it keeps ``per_class`` images (all when the class has fewer) or, with ``per_class`` 0,
    ``max(1, round(fraction * class size))`` images, drawn by ``np.random.default_rng(seed)`` class by class in
    label order. The same (path, fraction, per_class, seed) gives the same subset on any machine and world size,
    so a pre-trained and a from-scratch run see identical labels.

    Returns:
        sorted uint64 sample indices, or None for the whole set (``fraction`` 1 and ``per_class`` 0).

    Raises:
        ValueError: ``fraction`` outside (0, 1] or ``per_class`` < 0.
    """
    if not 0 < fraction <= 1 or per_class < 0:
        raise ValueError(f"labels fraction must be in (0, 1] and labels per class >= 0 (got {fraction}, {per_class})")
    if fraction == 1 and per_class == 0:
        return None
    labels = dataset_labels(path)
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n = min(per_class, len(members)) if per_class else max(1, round(fraction * len(members)))
        keep.append(rng.choice(members, size=n, replace=False))
    return np.sort(np.concatenate(keep)).astype(np.uint64)


def _pipelines(decoder, *, device: torch.device) -> dict:
    image = [decoder]
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
    batches_ahead: int = 3, torch_threads: int | None = None, indices: np.ndarray | None = None,
) -> FFCVLoader:
    """Shuffled, ``drop_last`` training loader with seeded RandomResizedCrop + flip; with ``distributed`` each rank
    reads its slice of every global batch.

    Every epoch is a function of (seed, epoch) alone: the order is one permutation ``np.random.default_rng(seed +
    epoch)`` dealt in global batches of ``batch_size x world_size`` (:func:`epoch_order`; torch.distributed must be
    initialised first and every rank must pass the same seed), and crops/flips come from (seed, epoch, sample
    index) via :class:`SeededRRCDecoder`. ``set_epoch(epoch, start_batch=k)`` resumes inside an epoch,
    ``set_epoch(epoch, start_sample=n)`` after n images on another number of ranks.

    Args:
        path: the ``train.beton``.
        img_size: side of the square crops in pixels (changeable between epochs: ``set_img_size``).
        batch_size: images per batch (per rank).
        scale: (lo, hi) RandomResizedCrop area fraction.
        ratio: (lo, hi) RandomResizedCrop aspect ratio w / h.
        hflip: mirror half the images (probability 0.5) or none.
        num_workers: FFCV decode threads (<= the machine's cores).
        seed: order and augmentation seed, >= 0.
        distributed: shard over torch.distributed ranks (its rank and world size).
        device: where batches land.
        os_cache: read through the OS page cache (shared by the ranks) rather than a per-process cache.
        batches_ahead: batches decoded ahead of the consumer.
        torch_threads: torch intra-op threads to keep (default: the current count).
        indices: train on these sample indices only (e.g. :func:`labeled_subset`); None = all.

    Raises:
        FileNotFoundError: ``path`` missing.
        ValueError: fewer images than one global batch; ``scale``/``ratio`` out of range.
    """
    _fix_ffcv_os_cache_reader()
    threads = torch_threads or torch.get_num_threads()
    decoder = SeededRRCDecoder((img_size, img_size), scale=scale, ratio=ratio, flip_prob=0.5 if hflip else 0.0)
    shard = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
    loader = _ResumableLoader(
        str(_check_beton(path)), batch_size=batch_size, num_workers=num_workers, order=OrderOption.RANDOM,
        seed=seed, drop_last=True, os_cache=os_cache, batches_ahead=batches_ahead,
        pipelines=_pipelines(decoder, device=device), seeded_decoders=(decoder,), shard=shard,
        indices=None if indices is None else np.asarray(indices, dtype=np.uint64),
    )
    if len(loader) == 0:
        raise ValueError(f"{path}: fewer images than one global batch of {batch_size} x {shard[1]} ranks "
                         "(lower train.micro_batch)")
    return FFCVLoader(loader, decoder, device=device, torch_threads=threads)


def build_val_loader(
    path: str, *, img_size: int, batch_size: int, crop_ratio: float, num_workers: int, rank: int, world_size: int,
    device: torch.device, os_cache: bool = True, torch_threads: int | None = None,
    indices: np.ndarray | None = None,
) -> FFCVLoader:
    """Sequential evaluation loader; rank r reads images r, r + W, ... so every image is counted exactly once
    (FFCV's distributed mode pads with repeats, like ``DistributedSampler``).

    ``indices`` restricts it to a subset of the beton (sample indices, in order); rank r then reads
    ``indices[r::W]``.
    """
    _fix_ffcv_os_cache_reader()
    threads = torch_threads or torch.get_num_threads()
    p = str(_check_beton(path))
    subset = np.arange(Reader(p).num_samples) if indices is None else np.asarray(indices)
    decoder = CenterCropRGBImageDecoder((img_size, img_size), ratio=crop_ratio)
    loader = _ResumableLoader(
        p, batch_size=batch_size, num_workers=num_workers, order=OrderOption.SEQUENTIAL, drop_last=False,
        indices=subset[rank::world_size].astype(np.uint64), os_cache=os_cache,  # int64 would mix with
        # FFCV's uint64 offsets and promote to float64 (numpy rule), which its numba decoder rejects
        pipelines=_pipelines(decoder, device=device),
    )
    return FFCVLoader(loader, decoder, device=device, torch_threads=threads)
