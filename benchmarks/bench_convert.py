"""Conversion speed (issue 13): ``fastmim-ds prepare`` vs FFCV's plain ``DatasetWriter`` on the same images.

* FFCV: what ffcv-imagenet's ``write_imagenet.py`` does: ``torchvision.datasets.ImageFolder`` (PIL loader) into
  ``DatasetWriter(path, {"image": RGBImageField(write_mode, max_resolution, jpeg_quality), "label": IntField()},
  num_workers=W)`` with ``from_indexed_dataset(chunksize=100)``, once per split, from the ImageFolder ``--src``.
* ``fastmim-ds prepare`` (the product: layout detection, header pass, write pass, read-back verification, skip
  reports, classes.json), in two modes:

  - ``folder``: on the same ImageFolder ``--src``;
  - ``tar``: on the same images packed as the official ILSVRC2012 files (``ILSVRC2012_img_train.tar``: a tar of one
    ``<wnid>.tar`` per class; ``ILSVRC2012_img_val.tar``: flat ``ILSVRC2012_val_XXXXXXXX.JPEG``;
    ``ILSVRC2012_devkit_t12.tar.gz`` with ``meta.mat`` and the val ground truth), built once under
    ``data/bench/convert_tars/`` and reused. ``prepare`` streams the images out of the tars; FFCV has no tar reader,
    so its side reads the extracted folder (the same bytes), as ffcv-imagenet users do after ``tar -xf``. The time
    to extract is not counted against FFCV.

Every trial is a separate process with the same max resolution, JPEG quality, write mode and number of workers,
timed as a whole (interpreter start, imports and all passes included). Rounds interleave the sides -- FFCV,
prepare folder, prepare tar -- rotating which goes first, so machine load (another benchmark may be running) falls
on all alike. Reported per side: the best and the median wall time, img/s of the best, the CPU seconds the process
tree used; ``ratio = FFCV time / prepare time`` of the best trials (>= 1: prepare is at least as fast; the target
is >= 0.9) and of the medians, and the load average at start and end.

Usage: ``python -m benchmarks.bench_convert [--src FOLDER] [--modes folder tar] [--max-res 256]
[--jpeg-quality 90] [--workers N] [--repeats 3]``; ``--src`` needs ``train/<class>/`` and ``val/<class>/``
(default: ../shared/datasets/imagenette2-224). Writes ``benchmarks/results/cpu/convert.json`` unless
``--no-save``.
"""
from __future__ import annotations

import argparse
import io
import logging
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, median

logger = logging.getLogger("bench_convert")

SOURCE = REPO.parent / "shared" / "datasets" / "imagenette2-224"
TAR_CACHE = REPO / "data" / "bench" / "convert_tars"
MODES = ("folder", "tar")


def ffcv_write(src: str, out: str, *, max_res: int, jpeg_quality: int, write_mode: str, workers: int) -> None:
    """ffcv-imagenet ``write_imagenet.py``, for each split of ``src``."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from torchvision.datasets import ImageFolder

    for split in ("train", "val"):
        dataset = ImageFolder(os.path.join(src, split))
        writer = DatasetWriter(os.path.join(out, f"{split}.beton"), {
            "image": RGBImageField(write_mode=write_mode, max_resolution=max_res, jpeg_quality=jpeg_quality),
            "label": IntField(),
        }, num_workers=workers)
        writer.from_indexed_dataset(dataset, chunksize=100)


def _class_files(split: Path) -> dict[str, list[Path]]:
    """{class folder: its files, sorted} of one ImageFolder split (ImageFolder's order)."""
    return {d.name: sorted(f for f in d.iterdir() if f.is_file()) for d in sorted(split.iterdir()) if d.is_dir()}


def _add_file(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _write_devkit(path: Path, wnids: list[str], val_labels: list[int]) -> None:
    """``ILSVRC2012_devkit_t12.tar.gz`` as torchvision parses it: ``data/meta.mat`` (one leaf synset per wnid, ID =
    label + 1, words = the wnid) and ``data/ILSVRC2012_validation_ground_truth.txt`` (the ID of each val image)."""
    import numpy as np
    from scipy.io import savemat

    fields = ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images")
    synsets = np.array([(i + 1, w, w, "", 0, np.zeros(0), 0, 0) for i, w in enumerate(wnids)],
                       dtype=[(f, "O") for f in fields])
    mat = io.BytesIO()
    savemat(mat, {"synsets": synsets})
    with tarfile.open(path, "w:gz") as tf:
        _add_file(tf, "ILSVRC2012_devkit_t12/data/meta.mat", mat.getvalue())
        _add_file(tf, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt",
                  "".join(f"{y + 1}\n" for y in val_labels).encode())


def build_imagenet_tars(src: Path, cache: Path = TAR_CACHE) -> Path:
    """The ImageFolder ``src`` packed as the official ILSVRC2012 tars + devkit in ``cache`` (built once; a
    ``source.txt`` stamp names the folder and its image count, and a changed folder rebuilds it).

    Train: ``<wnid>.tar`` per class folder (members keep their file names) inside ``ILSVRC2012_img_train.tar``; val:
    the images of ``src/val`` in ImageFolder order as ``ILSVRC2012_val_00000001.JPEG``, ..., labelled by the
    devkit's ground truth. ``prepare`` then yields the same labels, in the same order, as on ``src``.
    """
    train, val = _class_files(src / "train"), _class_files(src / "val")
    stamp = f"{src.resolve()}\n{sum(map(len, train.values()))} {sum(map(len, val.values()))}\n"
    if (cache / "source.txt").is_file() and (cache / "source.txt").read_text() == stamp:
        return cache
    t0 = time.perf_counter()
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    wnids = sorted(train)
    with tarfile.open(cache / "ILSVRC2012_img_train.tar", "w") as outer:
        for wnid in wnids:
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w", dereference=True) as tf:
                for f in train[wnid]:
                    tf.add(f, arcname=f.name)
            _add_file(outer, f"{wnid}.tar", inner.getvalue())
    val_labels = []
    with tarfile.open(cache / "ILSVRC2012_img_val.tar", "w", dereference=True) as tf:
        for f in (f for wnid in sorted(val) for f in val[wnid]):
            val_labels.append(wnids.index(f.parent.name))
            tf.add(f, arcname=f"ILSVRC2012_val_{len(val_labels):08d}.JPEG")
    _write_devkit(cache / "ILSVRC2012_devkit_t12.tar.gz", wnids, val_labels)
    (cache / "source.txt").write_text(stamp)
    logger.info("built the ImageNet-layout tars of %s in %s (%.0f s)", src, cache, time.perf_counter() - t0)
    return cache


def _run(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the whole process tree) of one command."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:  # prepare exits 1 when it skipped images: a benchmark folder must convert whole
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _count_images(src: Path) -> int:
    return sum(len(files) for split in ("train", "val") for files in _class_files(src / split).values())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", type=Path, default=SOURCE, help="ImageFolder with train/<class>/ and val/<class>/")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="prepare's input(s)")
    p.add_argument("--max-res", type=int, default=256)
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--write-mode", default="jpg")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="writer processes, both sides")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    p.add_argument("--tar-cache", type=Path, default=TAR_CACHE)
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--ffcv-only", metavar="OUT", help=argparse.SUPPRESS)  # the FFCV side's own process
    args = p.parse_args(argv)
    if args.ffcv_only:
        ffcv_write(str(args.src), args.ffcv_only, max_res=args.max_res, jpeg_quality=args.jpeg_quality,
                   write_mode=args.write_mode, workers=args.workers)
        return {}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not (args.src / "train").is_dir() or not (args.src / "val").is_dir():
        raise SystemExit(f"error: {args.src} has no train/ and val/ ImageFolder (set --src)")
    import torch

    from benchmarks.common import machine_info, write_result

    info = machine_info(torch.device("cpu"))
    t_start = time.perf_counter()
    n = _count_images(args.src)
    common = ["--max-res", str(args.max_res), "--jpeg-quality", str(args.jpeg_quality), "--write-mode",
              args.write_mode, "--workers", str(args.workers)]
    inputs = {"folder": args.src}
    if "tar" in args.modes:
        inputs["tar"] = build_imagenet_tars(args.src, args.tar_cache)
    sides = ["ffcv"] + [f"prepare_{m}" for m in args.modes]
    wall: dict[str, list[float]] = {s: [] for s in sides}
    cpu: dict[str, list[float]] = {s: [] for s in sides}
    with tempfile.TemporaryDirectory(prefix="bench_convert_") as tmp:
        for r in range(args.repeats):
            for side in sides[r % len(sides):] + sides[:r % len(sides)]:  # rotate who goes first
                out = Path(tmp) / side
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                if side == "ffcv":
                    cmd = [sys.executable, "-m", "benchmarks.bench_convert", "--src", str(args.src), *common,
                           "--ffcv-only", str(out)]
                else:
                    cmd = [sys.executable, "-m", "fastmim_ds", "prepare", "--src", str(inputs[side[8:]]), "--out",
                           str(out), *common]
                w, c = _run(cmd)
                wall[side].append(w)
                cpu[side].append(c)
                logger.info("round %d/%d %s: %.1f s (%.0f img/s), %.1f CPU s, load %.1f", r + 1, args.repeats, side,
                            w, n / w, c, os.getloadavg()[0])
    best = {s: min(v) for s, v in wall.items()}
    med = {s: median(v) for s, v in wall.items()}
    rows = [{"mode": m, "ffcv_best_s": best["ffcv"], "prepare_best_s": best[f"prepare_{m}"],
             "ffcv_img_s": n / best["ffcv"], "prepare_img_s": n / best[f"prepare_{m}"],
             "ratio": best["ffcv"] / best[f"prepare_{m}"], "median_ratio": med["ffcv"] / med[f"prepare_{m}"],
             "ffcv_median_cpu_s": median(cpu["ffcv"]), "prepare_median_cpu_s": median(cpu[f"prepare_{m}"])}
            for m in args.modes]
    result = {"src": str(args.src), "images": n, "max_res": args.max_res, "jpeg_quality": args.jpeg_quality,
              "write_mode": args.write_mode, "workers": args.workers, "repeats": args.repeats,
              "tar_dir": str(inputs.get("tar", "")), "wall_s": wall, "cpu_s": cpu, "best_s": best,
              "median_s": med, "rows": rows, "seconds": time.perf_counter() - t_start, "machine": info}
    for row in rows:
        print(f"{row['mode']}: {n} images, max res {args.max_res}, quality {args.jpeg_quality}, {args.workers} "
              f"workers: FFCV DatasetWriter {row['ffcv_best_s']:.1f} s ({row['ffcv_img_s']:.1f} img/s), fastmim-ds "
              f"prepare {row['prepare_best_s']:.1f} s ({row['prepare_img_s']:.1f} img/s), ratio {row['ratio']:.2f} "
              f"(best of {args.repeats}; median {row['median_ratio']:.2f}; target >= 0.9)")
    if not args.no_save:
        print(f"-> {write_result(torch.device('cpu'), 'convert', result)}")
    return result


if __name__ == "__main__":
    main()
