"""Loader throughput (issue 6, part 1): the product's FFCV pre-training pipeline vs torchvision + PIL.

Both read the same images (imagenette2-224, 9,469 training JPEGs) with the same number of workers and produce the
same batches: RandomResizedCrop(res, scale=(0.2, 1)) + horizontal flip, ImageNet mean/std normalisation, (B, 3, res,
res) float32, shuffled, on ``--device``.

* FFCV: ``fastmim_ds.data.loaders.build_train_loader`` on a ``.beton`` of the same folder (JPEG q90, longest side
  <= 256 px, written once by ``fastmim_ds.data.convert.convert_image_folder`` into ``data/bench/``, then reused):
  libjpeg-turbo decode + crop + ``cv::resize(INTER_AREA)`` fused in numba threads.
* torchvision: ``ImageFolder`` + ``RandomResizedCrop(interpolation=BICUBIC)`` (FastMIM ``main_pretrain.py``,
  methods.md §1.2) + ``RandomHorizontalFlip`` + ``ToTensor`` + ``Normalize`` in a ``DataLoader`` with the same number
  of worker processes (``pin_memory`` on GPU only). One extra row at 128 px uses torchvision's default bilinear
  interpolation, the cheaper choice, to show how much of the ratio the interpolation accounts for.

Throughput is images/s in steady state. Warm-up, excluded: one whole FFCV epoch (its first batches JIT-compile the
numba pipeline, timed separately; the epoch maps every page of the beton) and one read of every source JPEG (into
the page cache), as after a first training epoch. Every trial opens a fresh epoch iterator, skips the start-up batch
plus the batches the loader keeps ready
ahead (FFCV ``batches_ahead``, DataLoader workers x ``prefetch_factor``), times the next ``--batches`` and closes the
iterator, so no loader works in the background while the other is timed (persistent DataLoader workers would keep
prefetching during the FFCV trial). Trials alternate FFCV, torchvision, FFCV, ... at every resolution so machine load
affects both alike. Reported per side: the best trial (load from other jobs on a shared machine only ever slows a
trial down, so the fastest one is the closest to the loader's own speed) and the median.

Also a per-image, one-thread cost of each stage of both pipelines at 128 px (:func:`stage_profile`).

Usage: ``python -m benchmarks.bench_loader [--device cuda] [--workers N] [--sizes 96 128 160 224]``.
Writes ``benchmarks/results/<device>/loader.json``.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import torch

from benchmarks.common import REPO, add_device_args, machine_info, median, setup_device, sync, write_result

logger = logging.getLogger("bench_loader")

# the project's shared/ sits beside the repository (or inside a copy of it, on a lent GPU machine)
SOURCE = next((p for p in (REPO.parent / "shared" / "datasets" / "imagenette2-224",
                           REPO / "shared" / "datasets" / "imagenette2-224") if p.is_dir()),
              REPO.parent / "shared" / "datasets" / "imagenette2-224")
CACHE = REPO / "data" / "bench" / "imagenette_256"  # data/ is git-ignored
BATCHES_AHEAD = 3  # FFCV Loader default (fastmim_ds DataCfg.batches_ahead)
PREFETCH = 2  # DataLoader prefetch_factor (its default)


def ensure_beton(source: Path, cache: Path) -> Path:
    """``cache/train.beton`` of ``source`` (max side 256 px, JPEG q90), converted on first use.

    Raises:
        FileNotFoundError: ``source`` has no ``train/`` folder.
    """
    beton = cache / "train.beton"
    if not beton.is_file():
        from fastmim_ds.data.convert import convert_image_folder

        if not (source / "train").is_dir():
            raise FileNotFoundError(f"{source}/train not found (the imagenette2-224 ImageFolder)")
        t0 = time.perf_counter()
        convert_image_folder(source, cache, splits=("train",), max_res=256, progress=False)
        logger.info("wrote %s in %.0f s", beton, time.perf_counter() - t0)
    return beton


def stage_profile(source: Path, beton: Path, size: int, *, n: int = 200) -> list[dict]:
    """Per-image milliseconds of each stage of both pipelines, one thread, on the same ``n`` random images.

    torchvision: PIL open + decode (+ RGB convert), RandomResizedCrop (bicubic; bilinear), ToTensor, Normalize.
    FFCV: the two C functions its decoder calls per image (``ffcv.libffcv.imdecode``: libjpeg-turbo,
    ``resize_crop``: ``cv::resize(INTER_AREA)``) through their Python wrappers, on the beton's stored JPEGs with the
    crop boxes of ``random_resized_crop_params``; normalisation (FFCV's per-pixel lookup table) is not split out.
    """
    import numpy as np
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.reader import Reader
    from PIL import Image
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    from fastmim_ds.data.loaders import IMAGENET_MEAN, IMAGENET_STD, random_resized_crop_params

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    files = sorted((source / "train").glob("*/*.JPEG"))
    files = [files[i] for i in rng.choice(len(files), n, replace=False)]
    rows: list[dict] = []

    def per_image(pipeline: str, stage: str, fn, items) -> list:
        fn(items[0])  # warm-up
        t0 = time.perf_counter()
        out = [fn(x) for x in items]
        rows.append({"pipeline": pipeline, "stage": stage, "ms": (time.perf_counter() - t0) / len(items) * 1e3})
        return out

    pils = per_image("torchvision", "PIL open + decode + RGB", lambda f: Image.open(f).convert("RGB"), files)
    crops = per_image("torchvision", "RandomResizedCrop bicubic", transforms.RandomResizedCrop(
        size, scale=(0.2, 1.0), interpolation=InterpolationMode.BICUBIC), pils)
    per_image("torchvision", "RandomResizedCrop bilinear", transforms.RandomResizedCrop(
        size, scale=(0.2, 1.0), interpolation=InterpolationMode.BILINEAR), pils)
    tensors = per_image("torchvision", "ToTensor", transforms.ToTensor(), crops)
    per_image("torchvision", "Normalize", transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD), tensors)

    reader = Reader(str(beton))
    meta = reader.metadata[f"f{reader.field_names.index('image')}"]
    sizes = {int(a["ptr"]): int(a["size"]) for a in reader.alloc_table}
    data = np.memmap(beton, dtype=np.uint8, mode="r")
    samples = []
    for i in rng.choice(len(meta), n, replace=False):
        ptr = int(meta[i]["data_ptr"])
        samples.append((np.array(data[ptr:ptr + sizes[ptr]]), int(meta[i]["height"]), int(meta[i]["width"]), int(i)))
    scratch = np.zeros(max(h * w * 3 for _, h, w, _ in samples), np.uint8)
    decoded = []

    def decode(sample):
        buf, h, w, _ = sample
        imdecode(buf, scratch, h, w, h, w, 0, 0, 1, 1, False, False)
        decoded.append(scratch[:h * w * 3].reshape(h, w, 3).copy())

    per_image("FFCV", "imdecode (libjpeg-turbo)", decode, samples)
    decoded = decoded[1:]  # the warm-up call's image
    out = np.zeros((size, size, 3), np.uint8)

    def crop(k):
        img, (_, h, w, idx) = decoded[k], samples[k]
        i, j, ch, cw, _ = random_resized_crop_params(h, w, (0.2, 1.0), (3 / 4, 4 / 3), 0.5, 0, 0, idx)
        resize_crop(img, i, i + ch, j, j + cw, out)

    per_image("FFCV", "resize_crop (cv::resize INTER_AREA)", crop, list(range(len(decoded))))
    torch.set_num_threads(threads)
    return rows


def _torchvision_loader(root: Path, size: int, *, batch: int, workers: int, bicubic: bool, pin: bool):
    from torchvision import datasets, transforms
    from torchvision.transforms import InterpolationMode

    from fastmim_ds.data.loaders import IMAGENET_MEAN, IMAGENET_STD

    tf = transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(0.2, 1.0),
                                     interpolation=(InterpolationMode.BICUBIC if bicubic
                                                    else InterpolationMode.BILINEAR)),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    ds = datasets.ImageFolder(str(root / "train"), transform=tf)
    # forkserver: forking while FFCV's numba threads run can deadlock the workers
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                                       pin_memory=pin, prefetch_factor=PREFETCH, multiprocessing_context="forkserver")


def _time_batches(it, n: int, skip: int, device: torch.device) -> tuple[float, int]:
    """(seconds, images) for ``n`` batches of iterator ``it`` after ``skip`` untimed ones; batches land on ``device``.

    ``skip`` covers start-up and the batches the loader prepared ahead, so the timed ones are produced while timed.
    """
    for _ in range(skip):
        next(it)
    sync(device)
    t0, count = time.perf_counter(), 0
    for _ in range(n):
        imgs, _ = next(it)
        if imgs.device != device:
            imgs = imgs.to(device, non_blocking=True)
        count += imgs.shape[0]
    sync(device)
    return time.perf_counter() - t0, count


def _trial(loader, n: int, skip: int, device: torch.device) -> tuple[float, int]:
    """One timed trial on a fresh epoch iterator, closed afterwards: FFCV stops its pipeline thread, the DataLoader
    shuts its workers down, so neither loader works in the background while the other one is timed."""
    it = iter(loader)
    try:
        return _time_batches(it, n, skip, device)
    finally:
        if hasattr(it, "close"):
            it.close()
        else:
            it._shutdown_workers()  # what the DataLoader iterator's __del__ does


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_args(parser)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="FFCV threads = DataLoader processes")
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 128, 160, 224])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=10, help="timed batches per trial")
    parser.add_argument("--rounds", type=int, default=3, help="FFCV/torchvision trial pairs per size")
    parser.add_argument("--source", type=Path, default=SOURCE)
    parser.add_argument("--cache", type=Path, default=CACHE)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    device, _ = setup_device(args)
    info = machine_info(device)
    t_start = time.perf_counter()
    beton = ensure_beton(args.source, args.cache)

    from fastmim_ds.data.loaders import build_train_loader

    ffcv = build_train_loader(str(beton), img_size=args.sizes[0], batch_size=args.batch, scale=(0.2, 1.0),
                              ratio=(3 / 4, 4 / 3), hflip=True, num_workers=args.workers, seed=0, distributed=False,
                              device=device, batches_ahead=BATCHES_AHEAD, torch_threads=args.threads)
    t0 = time.perf_counter()
    _trial(ffcv, 2, 1, device)  # numba compiles the pipeline at the first batch
    compile_s = time.perf_counter() - t0
    for _ in ffcv:  # the rest of a first epoch: every page of the beton mapped, as after any first training epoch
        pass
    warm_s = time.perf_counter() - t0
    for f in sorted((args.source / "train").glob("*/*.JPEG")):  # the JPEG files into the page cache, likewise
        f.read_bytes()
    logger.info("FFCV first batches (numba compilation) %.1f s, whole first epoch %.1f s", compile_s, warm_s)

    rows = []
    cases = [(s, True) for s in args.sizes] + [(128, False)]
    for size, bicubic in cases:
        ffcv.set_img_size(size)
        tv = _torchvision_loader(args.source, size, batch=args.batch, workers=args.workers, bicubic=bicubic,
                                 pin=device.type == "cuda")
        # skip = start-up batch + what each loader keeps ready ahead (FFCV batches_ahead; DataLoader workers x prefetch)
        skip = 1 + max(BATCHES_AHEAD, args.workers * PREFETCH)
        ffcv_rates, tv_rates = [], []
        for _ in range(args.rounds):
            s, n = _trial(ffcv, args.batches, skip, device)
            ffcv_rates.append(n / s)
            s, n = _trial(tv, args.batches, skip, device)
            tv_rates.append(n / s)
        del tv
        row = {"size": size, "torchvision_interp": "bicubic" if bicubic else "bilinear",
               "ffcv_img_s": max(ffcv_rates), "torchvision_img_s": max(tv_rates),
               "ffcv_median_img_s": median(ffcv_rates), "torchvision_median_img_s": median(tv_rates),
               "ffcv_all": ffcv_rates, "torchvision_all": tv_rates}
        row["ratio"] = row["ffcv_img_s"] / row["torchvision_img_s"]
        rows.append(row)
        logger.info("%d px (%s): FFCV %.0f img/s, torchvision %.0f img/s, ratio %.2f", size,
                    row["torchvision_interp"], row["ffcv_img_s"], row["torchvision_img_s"], row["ratio"])
    profile = stage_profile(args.source, beton, 128)
    for row in profile:
        logger.info("%s %s: %.3f ms/img", row["pipeline"], row["stage"], row["ms"])
    write_result(device, "loader", {
        "machine": info, "workers": args.workers, "batch": args.batch, "batches_per_trial": args.batches,
        "rounds": args.rounds, "beton": str(beton.relative_to(REPO) if beton.is_relative_to(REPO) else beton),
        "images": len(ffcv) * args.batch, "ffcv_compile_s": compile_s, "ffcv_first_epoch_s": warm_s, "rows": rows,
        "stage_profile": profile,
        "seconds": time.perf_counter() - t_start,
    })


if __name__ == "__main__":
    main()
