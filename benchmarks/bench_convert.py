"""Conversion speed (issue 13): ``fastmim-ds prepare`` vs FFCV's plain ``DatasetWriter`` on the same ImageFolder.

* FFCV: what ffcv-imagenet's ``write_imagenet.py`` does: ``torchvision.datasets.ImageFolder`` (PIL loader) into
  ``DatasetWriter(path, {"image": RGBImageField(write_mode, max_resolution, jpeg_quality), "label": IntField()},
  num_workers=W)`` with ``from_indexed_dataset(chunksize=100)``, once per split.
* ``fastmim-ds prepare``: the product (layout detection, header pass, write pass, read-back verification, skip
  reports, classes.json).

Both run as separate processes with the same max resolution, JPEG quality, write mode and number of workers, and are
timed as whole processes (interpreter start and imports included), alternating FFCV, prepare, FFCV, ... so machine
load affects both alike. Reported: the best and the median wall time of each, and ``ratio = FFCV time / prepare
time`` of the best trials (>= 1: prepare is at least as fast; the target is >= 0.9).

Usage: ``python -m benchmarks.bench_convert --src FOLDER [--max-res 256] [--jpeg-quality 90] [--workers N]
[--repeats 3]``; ``--src`` needs ``train/<class>/`` and ``val/<class>/``. Writes
``benchmarks/results/cpu/convert.json`` unless ``--no-save``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, median


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


def _run(cmd: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", required=True, help="ImageFolder with train/<class>/ and val/<class>/")
    p.add_argument("--max-res", type=int, default=256)
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--write-mode", default="jpg")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--ffcv-only", metavar="OUT", help=argparse.SUPPRESS)  # the FFCV side's own process
    args = p.parse_args(argv)
    common = ["--max-res", str(args.max_res), "--jpeg-quality", str(args.jpeg_quality), "--write-mode",
              args.write_mode, "--workers", str(args.workers)]
    if args.ffcv_only:
        ffcv_write(args.src, args.ffcv_only, max_res=args.max_res, jpeg_quality=args.jpeg_quality,
                   write_mode=args.write_mode, workers=args.workers)
        return {}

    times: dict[str, list[float]] = {"ffcv": [], "prepare": []}
    with tempfile.TemporaryDirectory(prefix="bench_convert_") as tmp:
        for _ in range(args.repeats):
            for side in ("ffcv", "prepare"):
                out = Path(tmp) / side
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                if side == "ffcv":
                    cmd = [sys.executable, "-m", "benchmarks.bench_convert", "--src", args.src, *common,
                           "--ffcv-only", str(out)]
                else:
                    cmd = [sys.executable, "-m", "fastmim_ds", "prepare", "--src", args.src, "--out", str(out), *common]
                times[side].append(_run(cmd))
    n = sum(1 for split in ("train", "val") for _, _, fs in os.walk(Path(args.src) / split) for _ in fs)
    best = {k: min(v) for k, v in times.items()}
    result = {"src": str(args.src), "files": n, "max_res": args.max_res, "jpeg_quality": args.jpeg_quality,
              "write_mode": args.write_mode, "workers": args.workers, "seconds": times,
              "best_s": best, "median_s": {k: median(v) for k, v in times.items()},
              "ratio": best["ffcv"] / best["prepare"]}
    print(f"{n} files, max res {args.max_res}, quality {args.jpeg_quality}, {args.workers} workers: FFCV "
          f"DatasetWriter {best['ffcv']:.1f} s ({n / best['ffcv']:.1f} img/s), fastmim-ds prepare "
          f"{best['prepare']:.1f} s ({n / best['prepare']:.1f} img/s), ratio {result['ratio']:.2f} "
          "(FFCV time / prepare time, best of "
          f"{args.repeats}; target >= 0.9)")
    if not args.no_save:
        import json

        path = REPO / "benchmarks" / "results" / "cpu" / "convert.json"
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"-> {path}")
    return result


if __name__ == "__main__":
    main()
