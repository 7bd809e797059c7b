"""ImageFolder -> FFCV ``.beton`` conversion (ffcv-imagenet ``write_imagenet.py``, made safe).

* Every image is decoded and converted to RGB (greyscale, CMYK, palette, 16-bit) before writing; files that
  cannot be decoded are skipped and listed in ``<out>/<split>_skipped.tsv`` (path, reason), never crash the
  conversion.
* The beton is written to ``<name>.beton.partial`` and renamed only when complete, so an interrupted run
  never leaves a half-written file under the final name; re-running starts that split over.
* ``classes.json`` beside the betons stores the class names (folder names, sorted) and per-split counts, which
  fine-tuning uses for ``num_classes`` and the inference API for labels.
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

logger = logging.getLogger(__name__)

__all__ = ["IMG_EXTENSIONS", "scan_image_folder", "convert_split", "convert_image_folder", "load_rgb"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Decompression-bomb guard: PIL warns above 89 MPix; treat > 4x that as an error rather than OOM a worker.
Image.MAX_IMAGE_PIXELS = 4 * 89_478_485


def scan_image_folder(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """``root/<class>/<image>`` -> (sorted class names, [(path, label)]) in a deterministic order.

    Raises:
        FileNotFoundError: ``root`` missing or without class folders.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise FileNotFoundError(f"{root} has no class sub-folders (expected {root}/<class>/<image>.JPEG)")
    samples = []
    for label, c in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(root / c)):
            for f in sorted(files):
                if f.lower().endswith(IMG_EXTENSIONS):
                    samples.append((os.path.join(dirpath, f), label))
    return classes, samples


def load_rgb(path: str, max_side: int | None = None) -> np.ndarray:
    """Decodes any PIL-readable image to (H, W, 3) uint8 RGB, shrinking its longer side to ``max_side``.

    Raises:
        OSError / ValueError / PIL errors for unreadable files (callers record the reason).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            im.draft("RGB", (max_side, max_side) if max_side else None)  # JPEG DCT-domain downscale, cheap
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit greyscale: scale to 8 bits
                arr = np.asarray(im, dtype=np.float64)
                arr = arr * (255.0 / max(arr.max(), 1.0))
                im = Image.fromarray(arr.astype(np.uint8))
            im = im.convert("RGB")
            if max_side and max(im.size) > max_side:
                im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
            return np.asarray(im, dtype=np.uint8).copy()


@dataclass
class SplitReport:
    split: str
    written: int
    skipped: list[tuple[str, str]]
    per_class: dict[str, int]


class _VerifiedDataset:
    """Indexed dataset for ``DatasetWriter``: (uint8 HWC RGB, label), only over pre-verified samples."""

    def __init__(self, samples: list[tuple[str, int]], max_side: int | None):
        self.samples, self.max_side = samples, max_side

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return load_rgb(path, self.max_side), label


def _verify(item: tuple[str, int], max_side: int | None) -> str | None:
    try:
        arr = load_rgb(item[0], max_side)
        if arr.ndim != 3 or arr.shape[2] != 3 or min(arr.shape[:2]) < 1:
            return f"decoded to unexpected shape {arr.shape}"
        if max(arr.shape[:2]) > 65535:
            return f"side {max(arr.shape[:2])} px exceeds the FFCV limit of 65535"
        return None
    except Exception as e:  # noqa: BLE001 - any decoder failure is a reason to skip the file
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}"


def convert_split(
    src: Path, out_file: Path, *, classes: list[str], max_res: int, jpeg_quality: int, write_mode: str,
    num_workers: int, progress: bool = True,
) -> SplitReport:
    """Converts one ``src/<class>/*`` split into ``out_file`` (.beton), skipping undecodable images."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    found, samples = scan_image_folder(src)
    if found != classes:
        raise ValueError(f"{src}: class folders differ from the train split's ({len(found)} vs {len(classes)})")
    max_side = max_res or None
    workers = num_workers if num_workers > 0 else (os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:  # PIL decoding releases the GIL
        reasons = list(tqdm(pool.map(lambda s: _verify(s, max_side), samples, chunksize=32), total=len(samples),
                            desc=f"check {src.name}", disable=not progress, unit="img"))
    good = [s for s, r in zip(samples, reasons) if r is None]
    skipped = [(s[0], r) for s, r in zip(samples, reasons) if r is not None]
    for path, reason in skipped:
        logger.warning("skipping %s: %s", path, reason)
    if not good:
        raise ValueError(f"{src}: no readable image ({len(skipped)} skipped)")

    out_file.parent.mkdir(parents=True, exist_ok=True)
    partial = out_file.with_name(out_file.name + ".partial")
    partial.unlink(missing_ok=True)
    field = RGBImageField(write_mode=write_mode, max_resolution=max_res or None, jpeg_quality=jpeg_quality)
    writer = DatasetWriter(str(partial), {"image": field, "label": IntField()}, num_workers=workers)
    writer.from_indexed_dataset(_VerifiedDataset(good, max_side), chunksize=100)
    os.replace(partial, out_file)  # atomic on POSIX: the final name only ever holds a complete beton

    counts = np.bincount([label for _, label in good], minlength=len(classes))
    return SplitReport(src.name, len(good), skipped, {c: int(n) for c, n in zip(classes, counts)})


def convert_image_folder(
    src: str | Path, out: str | Path, *, splits: tuple[str, ...] = ("train", "val"), max_res: int = 256,
    jpeg_quality: int = 90, write_mode: str = "jpg", num_workers: int = -1, progress: bool = True,
) -> list[SplitReport]:
    """Converts ``src/{train,val}/<class>/*`` into ``out/{train,val}.beton`` + ``out/classes.json``.

    Args:
        src: ImageFolder root holding one sub-folder per split.
        out: output folder.
        max_res: longest stored side in px (0 keeps the original size); 256 suffices for 128-px
            pre-training and 224-px evaluation with a 224/256 centre crop.
        jpeg_quality: JPEG quality for ``jpg``/``proportion``/``smart`` write modes.
        write_mode: FFCV ``RGBImageField`` write mode: ``jpg`` (smallest), ``raw`` (fastest decode),
            ``smart`` or ``proportion``.
        num_workers: threads/processes (-1: all cores).

    Returns:
        One :class:`SplitReport` per split; skipped files are also written to ``out/<split>_skipped.tsv``.

    Raises:
        FileNotFoundError: ``src`` or a split folder missing.
    """
    src, out = Path(src), Path(out)
    if write_mode not in ("jpg", "raw", "smart", "proportion"):
        raise ValueError(f"write mode must be one of jpg, raw, smart, proportion; got '{write_mode}'")
    missing = [s for s in splits if not (src / s).is_dir()]
    if missing:
        raise FileNotFoundError(f"{src} has no {' / '.join(missing)} folder (expected {src}/train/<class>/...)")
    classes, _ = scan_image_folder(src / splits[0])
    reports = []
    for split in splits:
        rep = convert_split(
            src / split, out / f"{split}.beton", classes=classes, max_res=max_res, jpeg_quality=jpeg_quality,
            write_mode=write_mode, num_workers=num_workers, progress=progress,
        )
        skipped_file = out / f"{split}_skipped.tsv"
        if rep.skipped:
            skipped_file.write_text("".join(f"{p}\t{r}\n" for p, r in rep.skipped))
        else:
            skipped_file.unlink(missing_ok=True)
        reports.append(rep)
    meta = {
        "classes": classes,
        "source": str(src.resolve()),
        "max_res": max_res,
        "splits": {r.split: {"images": r.written, "skipped": len(r.skipped), "per_class": r.per_class} for r in reports},
    }
    tmp = out / "classes.json.partial"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out / "classes.json")
    return reports
