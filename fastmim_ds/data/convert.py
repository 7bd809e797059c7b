"""ImageFolder -> FFCV ``.beton`` conversion (ffcv-imagenet ``write_imagenet.py``, made safe).

The splits' class folders are compared first (:func:`check_split_classes`): a mismatch stops the run before
anything is written. Then, per split, ``convert_split`` runs:

1. a **header pass** (threads): ``PIL.Image.open`` reads only each file's header, which rejects zero-byte files,
   files PIL cannot identify (corrupt bytes, non-images), images over ``PIL.Image.MAX_IMAGE_PIXELS``
   (decompression bombs) and images FFCV cannot store;
2. the **write pass**: FFCV's ``DatasetWriter`` processes decode every remaining image exactly once
   (:func:`load_rgb`: greyscale, CMYK, palette and 16-bit images become 8-bit RGB; large JPEGs are downscaled in the
   DCT domain, then to ``max_res``) and store it. An image whose header was fine but whose pixel data is not
   (a truncated JPEG) cannot be dropped from a beton that is being written, so it is stored as a placeholder, logged,
   and the split is written once more without it -- the only case in which an image is decoded twice;
3. a **verification** (:func:`verify_beton`): the written file is read back with ``ffcv.reader.Reader``; sample count,
   the label of every sample (hence the per-class counts), stored image sizes and the allocation table must match
   what was intended, and a spread of stored images is decoded.

Every file that is not converted is listed with a human-readable reason in ``<out>/<split>_skipped.tsv``.
The beton is written to ``<split>.beton.partial`` and renamed only once verified, so an interrupted or failed run
never leaves a half-written file under the final name; re-running removes a stale ``.partial`` and starts that split
over. ``classes.json`` beside the betons holds the class names (folder names, sorted) and the verified per-split
counts; fine-tuning reads ``num_classes`` from it and the inference API its labels.

Other layouts (unlabeled folders, the ImageNet tars, Kaggle's layout, Hugging Face datasets) are listed by
:mod:`fastmim_ds.data.sources` and written by :func:`convert_source` through the same passes
(:func:`convert_samples`): a sample is a file path or a reference whose ``read()`` gives the encoded bytes.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

logger = logging.getLogger(__name__)

__all__ = [
    "IMG_EXTENSIONS", "ConversionError", "DecodeOnceDataset", "SplitReport", "UnusableImage",
    "check_split_classes", "class_folders",
    "UNLABELED", "convert_image_folder", "convert_samples", "convert_source", "convert_split", "load_rgb", "open_ref",
    "probe_image", "read_beton_image", "ref_name", "scan_image_folder",
    "verify_beton",
]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Decompression-bomb guard: PIL warns above 89 MPix and refuses 2x that; real photos (panoramas, scans) can exceed the
# default, so allow 4x (~358 MPix). Anything above it is skipped with a reason, never decoded.
Image.MAX_IMAGE_PIXELS = 4 * 89_478_485
FFCV_MAX_SIDE = 65535  # RGBImageField stores width and height as uint16
# Largest stored (raw, H*W*3) image: FFCV needs a whole image inside one page, and every writer process holds a page
# buffer of that size in memory.
MAX_STORED_BYTES = 1 << 30
_MIN_PAGE_SIZE = 1 << 23  # ffcv DatasetWriter's default (4 * 2 MiB)
_N_DECODE_CHECKS = 16  # stored images decoded back by verify_beton


class ConversionError(RuntimeError):
    """A split could not be converted: nothing readable, or the written beton failed verification."""


class UnusableImage(ValueError):
    """An image this converter refuses by policy (empty, too large to store); the message is the reason."""


@dataclass
class SplitReport:
    """Outcome of one converted split.

    Attributes:
        split: split name (the source folder name, e.g. ``train``).
        written: number of samples in the verified beton.
        skipped: ``(path, reason)`` for every image not converted, sorted by path.
        per_class: verified sample count per class name (read back from the beton).
        beton: the final ``.beton`` path.
        skipped_file: the ``(path, reason)`` TSV report.
    """

    split: str
    written: int
    skipped: list[tuple[str, str]]
    per_class: dict[str, int]
    beton: Path
    skipped_file: Path


def class_folders(root: Path) -> list[str]:
    """Sorted class sub-folder names of ``root`` (no image is listed or read).

    Raises:
        FileNotFoundError: ``root`` missing or without class folders.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise FileNotFoundError(f"{root} has no class sub-folders (expected {root}/<class>/<image>.JPEG)")
    return classes


def _names(names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def check_split_classes(src: Path, splits: Sequence[str]) -> list[str]:
    """The class list that every split of ``src`` shares, checked before anything is converted.

    Raises:
        FileNotFoundError: a split folder missing or without class folders.
        ValueError: one line listing the classes each split lacks against the first.
    """
    src = Path(src)
    found = {split: class_folders(src / split) for split in splits}
    classes = found[splits[0]]
    diffs = []
    for split in splits[1:]:
        only_first = sorted(set(classes) - set(found[split]))
        only_here = sorted(set(found[split]) - set(classes))
        if only_first:
            diffs.append(f"only in {splits[0]}/: {_names(only_first)}")
        if only_here:
            diffs.append(f"only in {split}/: {_names(only_here)}")
    if diffs:
        raise ValueError(f"{src}: class folders differ between splits ({'; '.join(diffs)}); nothing was written")
    return classes


def scan_image_folder(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """``root/<class>/<image>`` -> (sorted class names, [(path, label)]) in a deterministic order.

    Files whose extension is not in ``IMG_EXTENSIONS`` (``.DS_Store``, ``Thumbs.db``, notes) are ignored; everything
    with an image extension is a sample, whatever its content turns out to be.

    Raises:
        FileNotFoundError: ``root`` missing or without class folders.
    """
    root = Path(root)
    classes = class_folders(root)
    samples = []
    for label, c in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(root / c)):
            for f in sorted(files):
                if f.lower().endswith(IMG_EXTENSIONS):
                    samples.append((os.path.join(dirpath, f), label))
    return classes, samples


def _stored_size(size: tuple[int, int], max_res: int) -> tuple[int, int]:
    """(W, H) px of an image of ``size`` once its longer side is capped at ``max_res`` (0: kept), +-2 px."""
    w, h = size
    s = min(1.0, max_res / max(w, h)) if max_res else 1.0
    return max(1, round(w * s)), max(1, round(h * s))


def _nbytes(f) -> int:
    """Size in bytes of a file path or a seekable binary file object."""
    if isinstance(f, (str, os.PathLike)):
        return os.path.getsize(f)
    pos = f.tell()
    n = f.seek(0, os.SEEK_END)
    f.seek(pos)
    return n


def open_ref(ref):
    """What PIL opens for a sample reference: a file path as it is, anything else (an image inside a tar or a parquet
    shard, :mod:`fastmim_ds.data.sources`) as an in-memory file of its encoded bytes."""
    if isinstance(ref, (str, os.PathLike)):
        return ref
    return io.BytesIO(ref.read())


def ref_name(ref) -> str:
    """How a sample reference is named in the skip report and in messages."""
    return ref if isinstance(ref, str) else getattr(ref, "name", str(ref))


def probe_image(path, max_res: int) -> tuple[int, int]:
    """Checks what can be checked from the file header alone (no pixel decoding).

    Args:
        path: image file (path, or a seekable binary file object).
        max_res: longest stored side in px (0: stored at full size).

    Returns:
        (W, H): the image size in px, as in the header.

    Raises:
        UnusableImage: empty file; a side over FFCV's 65535 px limit, or over 1 GiB of stored pixels, with
            ``max_res=0``.
        PIL.UnidentifiedImageError: not an image PIL recognises (corrupt bytes, another file type).
        PIL.Image.DecompressionBombWarning / DecompressionBombError: more than ``PIL.Image.MAX_IMAGE_PIXELS`` px.
        OSError: unreadable, or cut off inside the header.
    """
    if _nbytes(path) == 0:
        raise UnusableImage("empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            w, h = im.size
    sw, sh = _stored_size((w, h), max_res)
    if max(sw, sh) > FFCV_MAX_SIDE:
        raise UnusableImage(f"{w}x{h} px: a side over FFCV's limit of {FFCV_MAX_SIDE} px (convert with --max-res)")
    if sw * sh * 3 > MAX_STORED_BYTES:
        raise UnusableImage(f"{w}x{h} px: over {MAX_STORED_BYTES >> 20} MiB of pixels to store "
                            "(convert with --max-res)")
    return w, h


def load_rgb(path: str, max_side: int | None = None) -> np.ndarray:
    """Decodes any PIL-readable image to (H, W, 3) uint8 RGB whose longer side is at most ``max_side`` px.

    * greyscale, palette, CMYK (JPEG Adobe convention), LA/RGBA (alpha dropped, as torchvision's loader does):
      ``PIL.Image.convert("RGB")``;
    * 16-bit greyscale (``I;16*``, and ``I`` holding 16-bit values): value / 257, i.e. 0 -> 0 and 65535 -> 255, a fixed
      scale so dark images stay dark (no per-image contrast stretch); values outside [0, 65535] are clipped;
    * large JPEGs are first decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (``Image.draft``, still >= ``max_side``
      on both sides), then any image is shrunk with Lanczos (``Image.thumbnail``, aspect ratio kept).

    Args:
        path: image file.
        max_side: longest output side in px; None or 0 keeps the decoded size.

    Returns:
        (H, W, 3) uint8 RGB array.

    Raises:
        OSError (truncated or corrupt data), PIL.UnidentifiedImageError, PIL.Image.DecompressionBombWarning/Error,
        ValueError: the file cannot be decoded (callers turn the exception into a skip reason).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            if max_side:
                im.draft("RGB", (max_side, max_side))  # JPEG DCT-domain downscale: decodes far fewer pixels
            if im.mode.startswith("I;16") or im.mode == "I":
                arr = np.clip(np.asarray(im, dtype=np.float64), 0, 65535)
                im = Image.fromarray(np.rint(arr / 257.0).astype(np.uint8), "L")
            if im.mode != "RGB":  # convert() of an RGB image would copy it for nothing
                im = im.convert("RGB")
            if max_side and max(im.size) > max_side:
                im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
            return np.array(im, dtype=np.uint8)


def _skip_reason(e: BaseException) -> str:
    """One-line, human-readable reason for skipping an image that raised ``e``."""
    msg = " ".join(str(e).split())  # one line, no tabs
    if isinstance(e, UnusableImage):
        return msg
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"too many pixels, decompression-bomb guard (PIL.Image.MAX_IMAGE_PIXELS): {msg}"
    if isinstance(e, UnidentifiedImageError):
        return "not a readable image: PIL cannot identify the format (corrupt bytes or not an image file)"
    if isinstance(e, OSError) and e.strerror:  # FileNotFoundError, PermissionError, ...
        return f"cannot read file: {e.strerror}"
    if isinstance(e, OSError) and "truncated" in msg.lower():
        return f"truncated: image data ends early ({msg})"
    return f"cannot decode ({type(e).__name__}: {msg or 'no message'})"


def _probe_or_reason(ref, max_res: int) -> tuple[int, int] | str:
    try:
        return probe_image(open_ref(ref), max_res)
    except Exception as e:  # noqa: BLE001 - any failure is a reason to skip the file, never to stop the conversion
        return _skip_reason(e)


class DecodeOnceDataset:
    """Indexed dataset for ``DatasetWriter``: ``(uint8 (H, W, 3) RGB, label)``, decoded in the writer processes.

    A decode failure must not raise: an exception in an FFCV writer process kills that process and the parent's
    progress loop then waits forever. It is appended as ``index<TAB>reason`` to ``failure_log`` (one short
    ``O_APPEND`` write per line, so concurrent processes do not interleave) and a 1x1 black image with label -1 is
    stored instead, which the caller removes by writing the split again.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], max_side: int | None, failure_log: str):
        self.samples, self.max_side, self.failure_log = samples, max_side, failure_log

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        ref, label = self.samples[i]
        try:
            return load_rgb(open_ref(ref), self.max_side), label
        except Exception as e:  # noqa: BLE001 - see the class docstring
            with open(self.failure_log, "a") as f:
                f.write(f"{i}\t{_skip_reason(e)}\n")
            return np.zeros((1, 1, 3), np.uint8), -1


def _page_size(stored_sizes: Sequence[tuple[int, int]]) -> int:
    """FFCV page size (power of 2, >= its 8 MiB default) holding the largest stored image with 2x headroom: one
    image must fit in one page, and a JPEG is not guaranteed to be smaller than the raw pixels."""
    largest = max(w * h * 3 for w, h in stored_sizes)
    return max(_MIN_PAGE_SIZE, 1 << (2 * largest - 1).bit_length())


def _write_beton(
    path: Path, samples: Sequence[tuple[str, int]], stored_sizes: Sequence[tuple[int, int]], *, max_res: int,
    jpeg_quality: int, write_mode: str, workers: int,
) -> dict[int, str]:
    """Writes ``samples`` to ``path``; returns {index in ``samples``: reason} for the images that failed to decode."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    field = RGBImageField(write_mode=write_mode, max_resolution=max_res or None, jpeg_quality=jpeg_quality)
    fd, failure_log = tempfile.mkstemp(prefix="fastmim_convert_", suffix=".tsv")
    os.close(fd)
    try:
        writer = DatasetWriter(str(path), {"image": field, "label": IntField()}, page_size=_page_size(stored_sizes),
                               num_workers=workers)
        writer.from_indexed_dataset(DecodeOnceDataset(samples, max_res or None, failure_log), chunksize=100)
        lines = Path(failure_log).read_text().splitlines()
    finally:
        os.unlink(failure_log)
    return {int(i): reason for i, reason in (line.split("\t", 1) for line in lines)}


def _field(reader, name: str) -> np.ndarray:
    """Per-sample metadata of field ``name`` (the Reader's metadata columns are unnamed: f0, f1, ... in field order)."""
    return reader.metadata[f"f{reader.field_names.index(name)}"]


def read_beton_image(reader, i: int) -> np.ndarray:
    """Sample ``i``'s image exactly as stored in a beton (JPEG decoded with OpenCV, raw copied).

    Args:
        reader: an ``ffcv.reader.Reader`` of a beton with an ``image`` ``RGBImageField``.
        i: sample index.

    Returns:
        (H, W, 3) uint8 RGB array.

    Raises:
        ValueError: the sample has no data in the file, or its bytes do not decode to the stored size.
    """
    import cv2

    meta = _field(reader, "image")[i]
    rows = reader.alloc_table[reader.alloc_table["sample_id"] == i]
    if len(rows) != 1 or rows[0]["ptr"] != meta["data_ptr"]:
        raise ValueError(f"sample {i}: {len(rows)} allocations for its image data (expected 1 at {meta['data_ptr']})")
    buf = np.fromfile(reader.file_name, dtype=np.uint8, count=int(rows[0]["size"]), offset=int(rows[0]["ptr"]))
    h, w = int(meta["height"]), int(meta["width"])
    if meta["mode"] == 0:  # jpg: FFCV encodes RGB->BGR with OpenCV, so OpenCV's BGR output flips back to RGB
        bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
        img = None if bgr is None else np.ascontiguousarray(bgr[:, :, ::-1])
    else:  # raw
        img = buf.reshape(h, w, 3) if buf.size == h * w * 3 else None
    if img is None or img.shape != (h, w, 3):
        raise ValueError(f"sample {i}: stored bytes do not decode to its {w}x{h} RGB image")
    return img


def verify_beton(
    path: str | Path, labels: Sequence[int], *, num_classes: int, max_res: int = 0,
    sizes: Sequence[tuple[int, int]] | None = None, class_names: Sequence[str] | None = None,
) -> list[int]:
    """Reads a written beton back and checks it holds exactly the intended samples.

    Checks: sample count; every sample's label equals ``labels`` (so per-class counts match); every stored image has
    sides in [1, ``max_res``] (when ``max_res`` > 0) and, when ``sizes`` are given, the aspect ratio of its source
    within rounding; each sample owns exactly one allocation inside the file, of ``H*W*3`` bytes when stored raw;
    up to 16 evenly spread stored images decode to their recorded size.

    Args:
        path: the ``.beton`` (or ``.beton.partial``) file, with fields ``image`` (RGBImageField) and ``label``
            (IntField).
        labels: intended label of each sample, in write order.
        num_classes: number of classes (labels are in [0, num_classes)).
        max_res: longest stored side in px the writer was given (0: not checked).
        sizes: (W, H) px of each source image, to check the stored aspect ratios.
        class_names: names used in error messages (default: label numbers).

    Returns:
        Verified per-class sample counts, length ``num_classes``.

    Raises:
        ConversionError: any check fails; the message names the file, the check and the first offenders.
    """
    from ffcv.reader import Reader

    path = Path(path)
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]

    def fail(what: str) -> ConversionError:
        return ConversionError(f"{path} failed verification: {what}")

    try:
        reader = Reader(str(path))
    except Exception as e:  # noqa: BLE001 - an unreadable header is a failed verification
        raise fail(f"cannot be read as a beton ({type(e).__name__}: {e})") from e
    if sorted(reader.field_names) != ["image", "label"]:
        raise fail(f"fields {reader.field_names}, expected ['image', 'label']")
    n = int(reader.num_samples)
    if reader.header["alloc_table_ptr"] == 0 or len(reader.metadata) != n:  # DatasetWriter.finalize never ran
        raise fail("incomplete: its writer never finished (an interrupted run?)")
    if n != len(labels):
        raise fail(f"{n} samples written, {len(labels)} intended")
    got = _field(reader, "label").astype(np.int64)
    want = np.asarray(labels, dtype=np.int64)
    if not np.array_equal(got, want):
        bad = got[(got < 0) | (got >= num_classes)]
        counts_got = np.bincount(got[(got >= 0) & (got < num_classes)], minlength=num_classes)
        counts_want = np.bincount(want, minlength=num_classes)[:num_classes]
        diff = [f"{names[c]}: {counts_got[c]} written, {counts_want[c]} intended"
                for c in np.flatnonzero(counts_got != counts_want)[:10]]
        first = int(np.flatnonzero(got != want)[0])
        raise fail(f"labels differ from the intended ones (first at sample {first}); per-class counts: "
                   f"{'; '.join(diff) or 'equal'}" + (f"; {len(bad)} labels out of range" if len(bad) else ""))

    img = _field(reader, "image")
    w2, h2 = img["width"].astype(np.int64), img["height"].astype(np.int64)
    if n and (min(w2.min(), h2.min()) < 1 or (max_res and max(w2.max(), h2.max()) > max_res)):
        i = int(np.flatnonzero((np.minimum(w2, h2) < 1) | (max_res > 0) & (np.maximum(w2, h2) > max_res))[0])
        raise fail(f"sample {i} is stored at {w2[i]}x{h2[i]} px (max side {max_res or 'any'})")
    if sizes is not None:
        w, h = np.asarray(sizes, dtype=np.int64).T.reshape(2, n)
        # stored = source * s with each side rounded twice at most (DCT draft, then thumbnail/resize): |err| < 2 px
        bad = np.flatnonzero(np.abs(w2 * h - h2 * w) > 2 * (w + h))
        if len(bad):
            i = int(bad[0])
            raise fail(f"sample {i} is stored at {w2[i]}x{h2[i]} px, not the aspect ratio of its {w[i]}x{h[i]} source")

    alloc = reader.alloc_table
    order = np.argsort(alloc["sample_id"], kind="stable")
    if not np.array_equal(alloc["sample_id"][order], np.arange(n)):
        raise fail(f"{len(alloc)} image allocations for {n} samples (expected exactly one per sample)")
    ptr, size = alloc["ptr"][order].astype(np.int64), alloc["size"][order].astype(np.int64)
    if not np.array_equal(ptr, img["data_ptr"].astype(np.int64)) or (ptr + size).max(initial=0) > path.stat().st_size:
        raise fail("image data pointers do not match the allocation table or point past the end of the file")
    raw = img["mode"] == 1
    if np.any(size[raw] != (w2 * h2 * 3)[raw]):
        raise fail(f"raw image {int(np.flatnonzero(raw & (size != w2 * h2 * 3))[0])} has the wrong number of bytes")
    for i in np.unique(np.linspace(0, n - 1, min(n, _N_DECODE_CHECKS)).round().astype(int)):
        try:
            read_beton_image(reader, int(i))
        except ValueError as e:
            raise fail(str(e)) from e
    return np.bincount(got, minlength=num_classes).tolist()


def _write_skipped(file: Path, skipped: Sequence[tuple[str, str]]) -> None:
    with open(file, "w", newline="") as f:
        w = csv.writer(f, dialect="excel-tab", lineterminator="\n")
        w.writerow(["path", "reason"])
        w.writerows(skipped)


def convert_split(
    src: Path, out_file: Path, *, classes: list[str], max_res: int, jpeg_quality: int, write_mode: str,
    num_workers: int, progress: bool = True,
) -> SplitReport:
    """Converts one ``src/<class>/*`` split into ``out_file`` (.beton); see the module docstring for the passes.

    Args:
        src: split folder with one sub-folder per class.
        out_file: final ``.beton`` path; ``<out_file>.partial`` is used while writing.
        classes: class names (label = index); must equal ``src``'s class folders.
        max_res, jpeg_quality, write_mode, num_workers: as in :func:`convert_image_folder`.
        progress: tqdm bar for the header pass (FFCV's writer always shows its own).

    Returns:
        The split's :class:`SplitReport`; its ``skipped_file`` (``<split>_skipped.tsv`` beside ``out_file``, header
        ``path<TAB>reason``) is (re)written, empty but for the header when nothing was skipped.

    Raises:
        ValueError: ``src``'s class folders differ from ``classes``.
        ConversionError: no convertible image, or the written file failed verification (``out_file`` is then
            left as it was, and no ``.partial`` remains).
    """
    src, out_file = Path(src), Path(out_file)
    found, samples = scan_image_folder(src)
    if found != classes:
        raise ValueError(f"{src}: class folders differ from the first split's ({len(found)} vs {len(classes)} classes,"
                         f" first difference: {sorted(set(found) ^ set(classes))[:3]})")
    return convert_samples(src.name, samples, out_file, classes=classes, max_res=max_res, jpeg_quality=jpeg_quality,
                           write_mode=write_mode, num_workers=num_workers, progress=progress, where=str(src))


def convert_samples(
    split: str, samples: Sequence[tuple[object, int]], out_file: Path, *, classes: list[str], max_res: int,
    jpeg_quality: int, write_mode: str, num_workers: int, progress: bool = True,
    skipped: Sequence[tuple[str, str]] = (), where: str | None = None,
) -> SplitReport:
    """Converts one split given as ``(reference, label)`` samples into ``out_file`` (.beton): header pass, write
    pass(es), verification, ``.partial`` renamed only once verified, ``<split>_skipped.tsv`` (the module docstring).

    Args:
        split: split name (names the skip report ``<split>_skipped.tsv``).
        samples: ``(ref, label)``; ``ref`` is a file path or an object with ``read() -> bytes`` and ``name`` (an
            image inside a tar or a parquet shard: :mod:`fastmim_ds.data.sources`); it must pickle.
        out_file: final ``.beton`` path.
        classes: class names (label = index); an unlabeled set passes one name, every label 0.
        skipped: ``(name, reason)`` already known to be unusable (e.g. an unreadable member tar), reported too.
        where: the source named in messages (default: ``split``).
        max_res, jpeg_quality, write_mode, num_workers, progress: as in :func:`convert_split`.

    Returns / Raises: as :func:`convert_split`.
    """
    out_file, where = Path(out_file), where or split
    workers = num_workers if num_workers > 0 else (os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:  # header reads are I/O-bound; PIL releases the GIL
        probes = list(tqdm(pool.map(lambda s: _probe_or_reason(s[0], max_res), samples), total=len(samples),
                           desc=f"check {split}", disable=not progress, unit="img"))
    skipped = list(skipped) + [(ref_name(s[0]), p) for s, p in zip(samples, probes) if isinstance(p, str)]
    good = [(s, p) for s, p in zip(samples, probes) if not isinstance(p, str)]
    total = len(samples) + len(skipped) - sum(isinstance(p, str) for p in probes)

    out_file.parent.mkdir(parents=True, exist_ok=True)
    skipped_file = out_file.with_name(f"{split}_skipped.tsv")
    partial = out_file.with_name(out_file.name + ".partial")
    partial.unlink(missing_ok=True)  # left by a killed run: never read, always rewritten
    kw = dict(max_res=max_res, jpeg_quality=jpeg_quality, write_mode=write_mode, workers=workers)
    try:
        for attempt in range(2):
            if not good:
                _write_skipped(skipped_file, sorted(skipped))
                raise ConversionError(f"{where}: no convertible image ({len(skipped)} skipped, see {skipped_file})")
            failed = _write_beton(partial, [s for s, _ in good], [_stored_size(p, max_res) for _, p in good], **kw)
            if not failed:
                break
            if attempt == 1:
                raise ConversionError(f"{where}: {len(failed)} images decoded in the first write pass but not in the "
                                      f"second (did the source change during conversion?), e.g. "
                                      f"{ref_name(good[min(failed)][0][0])}: {failed[min(failed)]}")
            logger.warning("%s: %d images failed to decode after a valid header; writing the split again without "
                           "them", where, len(failed))
            skipped += [(ref_name(good[i][0][0]), reason) for i, reason in failed.items()]
            good = [g for i, g in enumerate(good) if i not in failed]
        counts = verify_beton(partial, [label for (_, label), _ in good], num_classes=len(classes), max_res=max_res,
                              sizes=[p for _, p in good], class_names=classes)
        os.replace(partial, out_file)  # atomic on POSIX: the final name only ever holds a complete, verified beton
    except BaseException:
        partial.unlink(missing_ok=True)
        raise

    skipped.sort()
    _write_skipped(skipped_file, skipped)
    for path, reason in skipped:
        logger.info("skipped %s: %s", path, reason)
    if skipped:
        logger.warning("%s: %d of %d images skipped, listed with reasons in %s", split, len(skipped), total,
                       skipped_file)
    for c, k in zip(classes, counts):
        if k == 0:
            logger.warning("%s: class '%s' has no image in %s", split, c, out_file)
    return SplitReport(split, len(good), skipped, dict(zip(classes, counts)), out_file, skipped_file)


def convert_image_folder(
    src: str | Path, out: str | Path, *, splits: tuple[str, ...] = ("train", "val"), max_res: int = 256,
    jpeg_quality: int = 90, write_mode: str = "jpg", num_workers: int = -1, progress: bool = True,
) -> list[SplitReport]:
    """Converts ``src/{train,val}/<class>/*`` into ``out/{train,val}.beton`` + ``out/classes.json``.

    Args:
        src: ImageFolder root holding one sub-folder per split.
        out: output folder.
        splits: split folder names; the first one defines the classes.
        max_res: longest stored side in px (0 keeps the original size); 256 suffices for 128-px
            pre-training and 224-px evaluation with a 224/256 centre crop.
        jpeg_quality: JPEG quality (1-100) for ``jpg``/``proportion``/``smart`` write modes.
        write_mode: FFCV ``RGBImageField`` write mode: ``jpg`` (smallest), ``raw`` (fastest decode),
            ``smart`` or ``proportion``.
        num_workers: threads/processes (-1: all cores).
        progress: show the header-pass progress bar.

    Returns:
        One :class:`SplitReport` per split. Skipped files are listed in ``out/<split>_skipped.tsv``;
        ``out/classes.json`` (``classes``, ``source``, ``max_res``, ``write_mode``, and per split ``images``,
        ``skipped``, ``per_class`` -- verified counts) is rewritten after each split.

    Raises:
        FileNotFoundError: ``src`` or a split folder missing, or a split without class folders.
        ValueError: bad ``write_mode``/``max_res``/``jpeg_quality``, or splits with different class folders.
        ConversionError: a split has no convertible image or its beton failed verification.
    """
    src, out = Path(src), Path(out)
    if write_mode not in ("jpg", "raw", "smart", "proportion"):
        raise ValueError(f"write mode must be one of jpg, raw, smart, proportion; got '{write_mode}'")
    if max_res < 0 or not 1 <= jpeg_quality <= 100:
        raise ValueError(f"need max_res >= 0 and 1 <= jpeg_quality <= 100; got {max_res}, {jpeg_quality}")
    missing = [s for s in splits if not (src / s).is_dir()]
    if missing:
        raise FileNotFoundError(f"{src} has no {' / '.join(missing)} folder (expected {src}/train/<class>/...)")
    classes = check_split_classes(src, splits)  # before any beton is written: a mismatch costs nothing
    out.mkdir(parents=True, exist_ok=True)
    meta = {"classes": classes, "source": str(src.resolve()), "max_res": max_res, "write_mode": write_mode,
            "splits": {}}
    reports = []
    for split in splits:
        rep = convert_split(
            src / split, out / f"{split}.beton", classes=classes, max_res=max_res, jpeg_quality=jpeg_quality,
            write_mode=write_mode, num_workers=num_workers, progress=progress,
        )
        reports.append(rep)
        # Rewritten after every split so it never describes a beton this run has not (yet) verified.
        meta["splits"][split] = {"images": rep.written, "skipped": len(rep.skipped), "per_class": rep.per_class}
        tmp = out / "classes.json.partial"
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, out / "classes.json")
    return reports


UNLABELED = "(unlabeled)"  # the one class name an unlabeled set is verified with (every label is 0)


def convert_source(
    source, out: str | Path, *, max_res: int = 256, jpeg_quality: int = 90, write_mode: str = "jpg",
    num_workers: int = -1, progress: bool = True,
) -> list[SplitReport]:
    """Converts a :class:`fastmim_ds.data.sources.Source` (any layout) into ``out/<split>.beton`` + ``classes.json``.

    The same passes, verification and reports as :func:`convert_image_folder`. ``classes.json`` additionally holds
    ``layout`` (what was found), ``unlabeled`` (true: every label is 0 and ``classes`` is empty; pre-training only)
    and, where the source names them, ``names``: a human-readable name per class (``""`` where none is known).

    Raises:
        ValueError: bad ``write_mode``/``max_res``/``jpeg_quality``.
        ConversionError: a split has no convertible image or its beton failed verification.
    """
    out = Path(out)
    if write_mode not in ("jpg", "raw", "smart", "proportion"):
        raise ValueError(f"write mode must be one of jpg, raw, smart, proportion; got '{write_mode}'")
    if max_res < 0 or not 1 <= jpeg_quality <= 100:
        raise ValueError(f"need max_res >= 0 and 1 <= jpeg_quality <= 100; got {max_res}, {jpeg_quality}")
    out.mkdir(parents=True, exist_ok=True)
    verify_classes = [UNLABELED] if source.unlabeled else list(source.classes)
    meta = {"classes": [] if source.unlabeled else list(source.classes), "unlabeled": bool(source.unlabeled),
            "layout": source.layout, "source": str(Path(source.root).resolve()), "max_res": max_res,
            "write_mode": write_mode, "splits": {}}
    if source.names and any(source.names):
        meta["names"] = list(source.names)
    reports = []
    for split in source.splits:
        rep = convert_samples(split.name, split.samples, out / f"{split.name}.beton", classes=verify_classes,
                              max_res=max_res, jpeg_quality=jpeg_quality, write_mode=write_mode,
                              num_workers=num_workers, progress=progress, skipped=split.skipped, where=split.where)
        reports.append(rep)
        entry = {"images": rep.written, "skipped": len(rep.skipped)}
        if not source.unlabeled:
            entry["per_class"] = rep.per_class
        meta["splits"][split.name] = entry
        tmp = out / "classes.json.partial"
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, out / "classes.json")
    return reports
