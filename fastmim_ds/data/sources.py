"""Where ``fastmim-ds prepare`` reads images from: one :class:`Source` per layout, all written by the same converter.

A source is a list of splits, each a list of ``(ref, label)`` samples, plus the class list (and human-readable class
names where the data provides them). ``ref`` is a file path, or a small picklable reference whose ``read()`` returns
the encoded image bytes (:class:`TarMember`, :class:`ArrowCell`), so images inside tars and parquet/arrow shards are
streamed, never extracted. :func:`fastmim_ds.data.convert.convert_source` turns any source into the same verified
betons (header pass, write pass, verification, skip report, ``.partial`` renamed only once verified).

Layouts (:func:`detect_source` tries them in this order and says which one it found):

* ``huggingface``: a ``datasets`` dataset saved with ``save_to_disk`` (``dataset_dict.json`` or ``state.json``), or
  parquet / arrow shards (``<split>-00000-of-00004.parquet``, any depth); an image column (HF ``Image`` feature:
  ``{bytes, path}``, or plain binary) and a label column; class names from the ``ClassLabel`` feature. Read with
  pyarrow from the files on disk: no network, no cache folder.
* ``imagenet-tars``: the official ``ILSVRC2012_img_train.tar`` (one tar per class inside), ``ILSVRC2012_img_val.tar``
  and ``ILSVRC2012_devkit_t12.tar.gz`` (``meta.mat`` and ``ILSVRC2012_validation_ground_truth.txt``, read as
  torchvision's ``parse_devkit_archive`` reads them: :func:`parse_devkit`).
* ``imagenet-kaggle``: ``ILSVRC/Data/CLS-LOC/{train/<wnid>/,val/}`` with ``LOC_val_solution.csv`` (and
  ``LOC_synset_mapping.txt`` for the names).
* ``imagefolder``: ``train/<class>/`` and ``val/<class>/``.
* ``flat-val``: ``train/<class>/`` and a flat ``val/`` with a labels file (``<file> <class>`` per line, comma, tab or
  space separated; ``--val-labels``, or the one ``*val*`` .txt/.csv/.tsv file beside ``val/``).
* ``unlabeled``: any other folder holding images at any depth (or ``--unlabeled``): every image is label 0, and
  a seeded ``val_fraction`` of them becomes the val split unless ``train/`` and ``val/`` folders are there.
"""
from __future__ import annotations

import csv
import functools
import io
import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .convert import IMG_EXTENSIONS, check_split_classes, class_folders, scan_image_folder

logger = logging.getLogger(__name__)

__all__ = ["ArrowCell", "draw_val_split", "Source", "SourceSplit", "TarMember", "detect_source",
           "hf_source", "imagefolder_source",
           "imagenet_tar_source", "kaggle_source", "flat_val_source", "unlabeled_source", "SPLIT_ALIASES"]

SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val"}
TRAIN_TAR, VAL_TAR, DEVKIT = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"


@dataclass
class SourceSplit:
    """One split: ``samples`` ``(ref, label)``; ``skipped`` ``(name, reason)`` found unusable while listing."""

    name: str
    samples: list
    skipped: list = field(default_factory=list)
    where: str = ""


@dataclass
class Source:
    """A dataset as found on disk: ``layout`` (which form), ``classes`` (label = index; ``[]`` when unlabeled),
    ``names`` (human-readable per class, ``""`` where unknown; ``[]`` when none is known), ``splits``."""

    layout: str
    root: str
    classes: list[str]
    splits: list[SourceSplit]
    names: list[str] = field(default_factory=list)
    unlabeled: bool = False

    def describe(self) -> str:
        counts = ", ".join(f"{s.name} {len(s.samples)}" for s in self.splits)
        what = "unlabeled" if self.unlabeled else f"{len(self.classes)} classes"
        return f"{self.root}: {self.layout} layout, {what}, images: {counts}"


# ------------------------------------------------------------------ sample references
@dataclass(frozen=True)
class TarMember:
    """An image stored in an uncompressed tar (also inside a tar inside a tar): ``size`` bytes at ``offset``."""

    tar: str
    offset: int
    size: int
    name: str

    def read(self) -> bytes:
        with open(self.tar, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


@functools.lru_cache(maxsize=2)
def _column(file: str, column: str):
    """The ``column`` of a parquet or arrow shard (cached per process: consecutive rows come from the same shard)."""
    import pyarrow.parquet as pq

    if file.endswith(".parquet"):
        return pq.read_table(file, columns=[column]).column(column)
    return _read_arrow(file).column(column)


def _read_arrow(file: str):
    import pyarrow as pa

    source = pa.memory_map(file)
    try:
        return pa.ipc.open_stream(source).read_all()  # what datasets' save_to_disk writes
    except pa.ArrowInvalid:
        return pa.ipc.open_file(pa.memory_map(file)).read_all()


@dataclass(frozen=True)
class ArrowCell:
    """Row ``row``'s image in a parquet/arrow shard: an HF ``Image`` struct (``bytes``, ``path``) or plain binary."""

    file: str
    column: str
    row: int
    name: str

    def read(self) -> bytes:
        cell = _column(self.file, self.column)[self.row].as_py()
        if isinstance(cell, dict):
            data, path = cell.get("bytes"), cell.get("path")
            if data is None and path:
                p = Path(path) if Path(path).is_absolute() else Path(self.file).parent / path
                return p.read_bytes()
            cell = data
        if not cell:
            raise ValueError("the image cell holds no bytes")
        return bytes(cell)


# ------------------------------------------------------------------ helpers
def _images_under(root: Path) -> list[str]:
    """Image files at any depth under ``root``, sorted; hidden files and folders are ignored."""
    found = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(dirpath, f) for f in sorted(files)
                  if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith(".")]
    return sorted(found)


def draw_val_split(n: int, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the ``round(n * fraction)`` (at least 1 when ``n`` >= 2) samples drawn as val, seeded."""
    if not 0 < fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {fraction}")
    k = min(n - 1, max(1, round(n * fraction))) if n >= 2 else 0
    mask = np.zeros(n, bool)
    mask[np.random.default_rng(seed).permutation(n)[:k]] = True
    return mask


def _split_off_val(samples: list, fraction: float, seed: int) -> tuple[list, list]:
    mask = draw_val_split(len(samples), fraction, seed)
    return [s for s, m in zip(samples, mask) if not m], [s for s, m in zip(samples, mask) if m]


def _read_synset_names(file: Path) -> dict[str, str]:
    """``wnid name, name`` lines (``LOC_synset_mapping.txt``, ``synset_words.txt``) -> {wnid: names}."""
    names = {}
    for line in file.read_text().splitlines():
        wnid, _, rest = line.strip().partition(" ")
        if wnid:
            names[wnid] = rest.strip()
    return names


def _names_for(classes: Sequence[str], names: dict[str, str]) -> list[str]:
    return [names.get(c, "") for c in classes] if names else []


def _has_class_dirs(d: Path) -> bool:
    return d.is_dir() and any(p.is_dir() and not p.name.startswith(".") for p in d.iterdir())


def _has_flat_images(d: Path) -> bool:
    return d.is_dir() and any(p.is_file() and p.name.lower().endswith(IMG_EXTENSIONS) for p in d.iterdir())


# ------------------------------------------------------------------ layouts
def imagefolder_source(root: str | Path, splits: Sequence[str] = ("train", "val")) -> Source:
    """``root/{train,val}/<class>/*`` (the classes of every split checked before anything is written)."""
    root = Path(root)
    classes = check_split_classes(root, splits)
    parts = [SourceSplit(s, scan_image_folder(root / s)[1], where=str(root / s)) for s in splits]
    return Source("imagefolder", str(root), classes, parts)


def unlabeled_source(root: str | Path, *, val_fraction: float = 0.02, seed: int = 0) -> Source:
    """Every image at any depth under ``root``, label 0. With ``root/train`` and ``root/val`` folders those are the
    splits; otherwise a seeded ``val_fraction`` of the images becomes val.

    Raises:
        FileNotFoundError: no image under ``root``.
    """
    root = Path(root)
    if (root / "train").is_dir() and (root / "val").is_dir():
        parts = [SourceSplit(s, [(p, 0) for p in _images_under(root / s)], where=str(root / s)) for s in ("train",
                                                                                                         "val")]
    else:
        train, val = _split_off_val([(p, 0) for p in _images_under(root)], val_fraction, seed)
        parts = [SourceSplit("train", train, where=str(root)), SourceSplit("val", val, where=str(root))]
    if not any(p.samples for p in parts):
        raise FileNotFoundError(f"{root}: no image files found (extensions {', '.join(IMG_EXTENSIONS)})")
    return Source("unlabeled", str(root), [], parts, unlabeled=True)


def _match_labels(files: Sequence[str], labels_file: Path, classes: Sequence[str]) -> tuple[list, list]:
    """Labels of flat val ``files`` from ``labels_file`` lines ``<file or stem>,<class ...>`` -> (samples, skipped).

    The first column names the file (with or without extension), the first token of the second the class (a class
    folder name; ``LOC_val_solution.csv``'s ``PredictionString`` starts with the wnid). Header lines and lines
    naming no known class are ignored.
    """
    index = {c: i for i, c in enumerate(classes)}
    by_stem = {}
    text = labels_file.read_text()
    dialect = "excel-tab" if "\t" in text.split("\n", 1)[0] else "excel"
    for row in csv.reader(io.StringIO(text), dialect):
        if len(row) == 1:
            row = row[0].split()
        if len(row) < 2:
            continue
        cls = row[1].split()[0] if row[1].split() else ""
        if cls in index:
            by_stem[Path(row[0].strip()).stem] = index[cls]
    samples, skipped = [], []
    for f in files:
        label = by_stem.get(Path(f).stem)
        if label is None:
            skipped.append((f, f"no label in {labels_file.name}"))
        else:
            samples.append((f, label))
    if not samples:
        raise ValueError(f"{labels_file}: labels none of the {len(files)} val images with a class of the train folders "
                         "(expected lines '<file>,<class>' or '<file> <class>')")
    return samples, skipped


def flat_val_source(root: str | Path, labels_file: str | Path | None = None, *, train_dir: Path | None = None,
                    val_dir: Path | None = None, names_file: Path | None = None, layout: str = "flat-val") -> Source:
    """``train/<class>/*`` and a flat ``val/`` labelled by ``labels_file`` (default: the one ``*val*``
    .txt/.csv/.tsv file in ``root``). Names from ``names_file`` (default: ``LOC_synset_mapping.txt`` or
    ``synset_words.txt`` in ``root``) when there is one.

    Raises:
        FileNotFoundError: no labels file found, or more than one candidate.
        ValueError: the labels file names no class of the train folders.
    """
    root = Path(root)
    train_dir, val_dir = train_dir or root / "train", val_dir or root / "val"
    if labels_file is None:
        found = sorted(p for p in root.iterdir() if p.is_file() and "val" in p.name.lower()
                       and p.suffix.lower() in (".txt", ".csv", ".tsv"))
        if len(found) != 1:
            raise FileNotFoundError(f"{val_dir} holds images without class folders: name their labels file with "
                                    f"--val-labels FILE ('<file>,<class>' per line)"
                                    + (f"; candidates: {', '.join(p.name for p in found)}" if found else ""))
        labels_file = found[0]
    classes, train = scan_image_folder(train_dir)
    files = [str(p) for p in sorted(val_dir.iterdir()) if p.is_file() and p.name.lower().endswith(IMG_EXTENSIONS)]
    val, skipped = _match_labels(files, Path(labels_file), classes)
    if names_file is None:
        names_file = next((root / n for n in ("LOC_synset_mapping.txt", "synset_words.txt") if (root / n).is_file()),
                          None)
    names = _names_for(classes, _read_synset_names(names_file)) if names_file else []
    print(f"{layout}: val labels from {labels_file}" + (f", class names from {names_file}" if names else ""))
    return Source(layout, str(root), classes, [SourceSplit("train", train, where=str(train_dir)),
                                               SourceSplit("val", val, skipped, where=str(val_dir))], names)


def kaggle_source(root: str | Path) -> Source:
    """Kaggle's ImageNet: ``ILSVRC/Data/CLS-LOC/{train/<wnid>/,val/}``, ``LOC_val_solution.csv``,
    ``LOC_synset_mapping.txt`` (``root`` may be the folder holding them or ``CLS-LOC`` itself)."""
    root = Path(root)
    cls_loc = root if (root / "train").is_dir() and root.name == "CLS-LOC" else root / "ILSVRC" / "Data" / "CLS-LOC"
    top = next((d for d in (root, *root.parents) if (d / "LOC_val_solution.csv").is_file()), None)
    if top is None:
        raise FileNotFoundError(f"{root}: Kaggle layout without LOC_val_solution.csv (the val labels)")
    names = top / "LOC_synset_mapping.txt"
    return flat_val_source(top, top / "LOC_val_solution.csv", train_dir=cls_loc / "train", val_dir=cls_loc / "val",
                           names_file=names if names.is_file() else None, layout="imagenet-kaggle")


DEVKIT_MD5 = "fa75699e90414af021442c21a62c3abf"  # the official devkit archive (torchvision ARCHIVE_META)


def parse_devkit(devkit: str | Path) -> tuple[dict[str, tuple[str, ...]], list[str]]:
    """``(wnid -> class names, val wnids in file order)`` from ``ILSVRC2012_devkit_t12.tar.gz``, read as torchvision's
    ``parse_devkit_archive`` reads it (``data/meta.mat``: the leaf synsets, those with no children, give ID -> wnid and
    the comma-separated names; ``data/ILSVRC2012_validation_ground_truth.txt``: one synset ID per val image), straight
    from the archive (no extraction, no torchvision import). An archive whose MD5 differs from the official one is
    parsed too, with a warning.

    Raises:
        ValueError: the archive lacks one of the two files, or a ground-truth ID names no leaf synset.
        tarfile.TarError, OSError: not a readable tar.gz.
    """
    import hashlib

    from scipy.io import loadmat

    devkit = Path(devkit)
    data = devkit.read_bytes()
    if hashlib.md5(data).hexdigest() != DEVKIT_MD5:
        logger.warning("%s: MD5 differs from the official devkit's; parsing it anyway", devkit)
    wanted = {"data/meta.mat": None, "data/ILSVRC2012_validation_ground_truth.txt": None}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tf:
        for m in tf:
            for suffix in wanted:
                if m.isfile() and m.name.endswith(suffix):
                    wanted[suffix] = tf.extractfile(m).read()
    missing = [k for k, v in wanted.items() if v is None]
    if missing:
        raise ValueError(f"{devkit}: not an ILSVRC2012 devkit, it has no {' / '.join(missing)}")
    synsets = loadmat(io.BytesIO(wanted["data/meta.mat"]), squeeze_me=True)["synsets"]
    leaves = [s for s in synsets if s["num_children"] == 0]
    id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in leaves}
    wnid_to_classes = {str(s["WNID"]): tuple(str(s["words"]).split(", ")) for s in leaves}
    ids = [int(line) for line in wanted["data/ILSVRC2012_validation_ground_truth.txt"].decode().split()]
    unknown = sorted(set(ids) - set(id_to_wnid))
    if unknown:
        raise ValueError(f"{devkit}: val ground truth names synset IDs that are no leaf class: {unknown[:5]}")
    return wnid_to_classes, [id_to_wnid[i] for i in ids]


def _tar_images(tar_path: str, tf: tarfile.TarFile, base: int, prefix: str) -> list[tuple[str, TarMember]]:
    """(member file name, reference) for every image file in ``tf`` (opened on ``tar_path`` at byte ``base``)."""
    out = []
    for m in tf:
        if m.isfile() and m.name.lower().endswith(IMG_EXTENSIONS):
            out.append((m.name, TarMember(tar_path, base + m.offset_data, m.size, f"{prefix}:{m.name}")))
    return out


def imagenet_tar_source(root: str | Path) -> Source:
    """The official ILSVRC2012 tars in ``root``, streamed: train = one tar per wnid inside the train tar (label =
    index of the sorted wnids), val = the val tar's images in sorted order labelled by the devkit's ground truth.

    Raises:
        FileNotFoundError: a tar or the devkit missing.
        ValueError: the val labels name a wnid with no train tar.
    """
    root = Path(root)
    missing = [f for f in (TRAIN_TAR, VAL_TAR, DEVKIT) if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{root}: ImageNet tars incomplete, missing {', '.join(missing)}")
    wnid_to_classes, val_wnids = parse_devkit(root / DEVKIT)
    train_tar = str(root / TRAIN_TAR)
    per_class, skipped = {}, []
    with tarfile.open(train_tar, "r:") as outer:
        for m in outer:
            if not m.isfile():
                continue
            wnid = Path(m.name).name.split(".")[0]
            try:
                with tarfile.open(fileobj=outer.extractfile(m), mode="r:") as inner:
                    per_class[wnid] = _tar_images(train_tar, inner, m.offset_data, f"{train_tar}:{m.name}")
            except tarfile.TarError as e:
                skipped.append((f"{train_tar}:{m.name}", f"not a readable tar of images ({e})"))
    classes = sorted(per_class)
    train = [(ref, label) for label, c in enumerate(classes) for _, ref in sorted(per_class[c], key=lambda t: t[0])]
    val_tar = str(root / VAL_TAR)
    with tarfile.open(val_tar, "r:") as tf:
        val_refs = sorted(_tar_images(val_tar, tf, 0, val_tar), key=lambda t: t[0])
    if len(val_refs) != len(val_wnids):
        raise ValueError(f"{val_tar}: {len(val_refs)} images, but the devkit labels {len(val_wnids)}")
    unknown = sorted(set(val_wnids) - set(classes))
    if unknown:
        raise ValueError(f"{root}: val labels name wnids without a train tar: {', '.join(unknown[:5])}; nothing was "
                         "written")
    index = {c: i for i, c in enumerate(classes)}
    val = [(ref, index[w]) for (_, ref), w in zip(val_refs, val_wnids)]
    names = [", ".join(wnid_to_classes.get(c, ())) for c in classes]
    return Source("imagenet-tars", str(root), classes, [SourceSplit("train", train, skipped, where=train_tar),
                                                        SourceSplit("val", val, where=val_tar)], names)


# ------------------------------------------------------------------ Hugging Face datasets
def _hf_features(obj: dict) -> dict:
    return obj.get("features") or obj.get("info", {}).get("features") or {}


def _hf_files(root: Path) -> dict[str, tuple[list[str], dict]]:
    """{split: (arrow/parquet files, features dict)} of a ``save_to_disk`` folder or a folder of shards."""
    found: dict[str, tuple[list[str], dict]] = {}
    if (root / "dataset_dict.json").is_file():
        for name in json.loads((root / "dataset_dict.json").read_text())["splits"]:
            found.update({name: v for v in _hf_files(root / name).values()})
        return found
    if (root / "state.json").is_file():
        state = json.loads((root / "state.json").read_text())
        info = root / "dataset_info.json"
        feats = _hf_features(json.loads(info.read_text())) if info.is_file() else {}
        split = state.get("_split") or "train"
        return {split: ([str(root / f["filename"]) for f in state["_data_files"]], feats)}
    for f in sorted(root.rglob("*")):
        if f.suffix not in (".parquet", ".arrow") or not f.is_file():
            continue
        m = re.match(r"([A-Za-z]+)", f.name)
        split = m.group(1) if m else "train"
        if split.lower() not in SPLIT_ALIASES:
            split = "train" if f.suffix == ".arrow" and split.startswith("data") else split
        found.setdefault(split, ([], _shard_features(f)))[0].append(str(f))
    return found


def _shard_features(file: Path) -> dict:
    """The HF features stored in a shard's schema metadata (``huggingface`` key), ``{}`` if none."""
    import pyarrow.parquet as pq

    schema = pq.read_schema(file) if file.suffix == ".parquet" else _read_arrow(str(file)).schema
    raw = (schema.metadata or {}).get(b"huggingface")
    return _hf_features(json.loads(raw)) if raw else {}


def _shard_rows(file: str, column: str) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(file).metadata.num_rows if file.endswith(".parquet") else len(_column(file, column))


def _labels_of(file: str, column: str) -> list:
    import pyarrow.parquet as pq

    if file.endswith(".parquet"):
        return pq.read_table(file, columns=[column]).column(column).to_pylist()
    return _read_arrow(file).column(column).to_pylist()


def hf_source(root: str | Path, *, image_column: str = "image", label_column: str = "label",
              val_fraction: float = 0.02, seed: int = 0, unlabeled: bool = False) -> Source:
    """A Hugging Face dataset on disk (``save_to_disk`` folder, or parquet/arrow shards): the ``train`` and
    ``validation``/``val`` splits (others, e.g. ``test`` with label -1, are left out). Without a val split, a seeded
    ``val_fraction`` of train becomes val. Without ``label_column`` (or with ``unlabeled``) the set is unlabeled.
    Class names: the ``ClassLabel`` feature's names, else the sorted distinct label values.

    Raises:
        FileNotFoundError: no shard; ValueError: the image column missing, or no train split.
    """
    root = Path(root)
    files = {SPLIT_ALIASES[k.lower()]: v for k, v in _hf_files(root).items() if k.lower() in SPLIT_ALIASES}
    if "train" not in files:
        raise ValueError(f"{root}: Hugging Face dataset without a train split (found: "
                         f"{', '.join(_hf_files(root)) or 'no parquet/arrow file'})")
    feats = files["train"][1]
    first = files["train"][0][0]
    import pyarrow.parquet as pq

    schema_names = (pq.read_schema(first) if first.endswith(".parquet") else _read_arrow(first).schema).names
    if image_column not in schema_names:
        raise ValueError(f"{root}: no image column '{image_column}' (columns: {', '.join(schema_names)}); "
                         "name it with --image-column")
    labeled = not unlabeled and label_column in schema_names
    if not unlabeled and not labeled:
        print(f"{root}: no label column '{label_column}' (columns: {', '.join(schema_names)}): treated as unlabeled; "
              "name the labels with --label-column")
    label_feat = feats.get(label_column, {}) if labeled else {}
    class_names = label_feat.get("names") if label_feat.get("_type") == "ClassLabel" else None

    rows: dict[str, list] = {}
    raw_labels: dict[str, list] = {}
    for split, (shards, _) in files.items():
        rows[split], raw_labels[split] = [], []
        for f in shards:
            n = _shard_rows(f, image_column)
            rows[split] += [ArrowCell(f, image_column, i, f"{f}:row{i}") for i in range(n)]
            raw_labels[split] += _labels_of(f, label_column) if labeled else [0] * n
    if labeled and class_names:
        classes = list(class_names)
        to_label = {i: i for i in range(len(classes))}
    elif labeled:
        values = sorted({v for vs in raw_labels.values() for v in vs if v is not None})
        classes = [str(v) for v in values]
        to_label = {v: i for i, v in enumerate(values)}
    else:
        classes, to_label = [], {0: 0}
    parts = []
    for split in ("train", "val"):
        if split not in rows:
            continue
        samples, skipped = [], []
        for ref, v in zip(rows[split], raw_labels[split]):
            if v in to_label:
                samples.append((ref, to_label[v]))
            else:
                skipped.append((ref.name, f"label {v!r} is not a class of the train split"))
        parts.append(SourceSplit(split, samples, skipped, where=f"{root} ({split})"))
    if len(parts) == 1:
        train, val = _split_off_val(parts[0].samples, val_fraction, seed)
        print(f"{root}: no val split; {len(val)} of {len(parts[0].samples)} train images drawn as val "
              f"(--val-fraction {val_fraction}, seed {seed})")
        parts = [SourceSplit("train", train, parts[0].skipped, parts[0].where), SourceSplit("val", val,
                                                                                            where=parts[0].where)]
    return Source("huggingface", str(root), [] if not labeled else classes, parts, unlabeled=not labeled)


def _is_hf(root: Path) -> bool:
    if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
        return True
    return any(root.glob("*.parquet")) or any(root.glob("*/*.parquet")) or any(root.glob("*.arrow")) \
        or any(root.glob("*/*.arrow"))


# ------------------------------------------------------------------ detection
def detect_source(
    root: str | Path, *, unlabeled: bool = False, val_fraction: float = 0.02, seed: int = 0,
    image_column: str = "image", label_column: str = "label", val_labels: str | Path | None = None,
) -> Source:
    """Finds which layout ``root`` holds (see the module docstring), prints it in one line, and lists the source.

    Raises:
        FileNotFoundError: ``root`` missing, a layout incomplete, or no image anywhere.
        ValueError: inconsistent labels (splits with different classes, labels naming unknown classes).
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root} has no train / val folder (the path does not exist)")
    if root.is_dir() and _is_hf(root):
        src = hf_source(root, image_column=image_column, label_column=label_column, val_fraction=val_fraction,
                        seed=seed, unlabeled=unlabeled)
    elif unlabeled:
        src = unlabeled_source(root, val_fraction=val_fraction, seed=seed)
    elif (root / TRAIN_TAR).is_file() or (root / VAL_TAR).is_file():
        src = imagenet_tar_source(root)
    elif (root / "ILSVRC" / "Data" / "CLS-LOC").is_dir() or (root / "LOC_val_solution.csv").is_file() \
            or root.name == "CLS-LOC":
        src = kaggle_source(root)
    elif _has_class_dirs(root / "train") and _has_flat_images(root / "val"):
        src = flat_val_source(root, val_labels)
    elif _has_class_dirs(root / "train") or _has_class_dirs(root / "val"):
        missing = [s for s in ("train", "val") if not (root / s).is_dir()]
        if missing:
            raise FileNotFoundError(f"{root} has no {' / '.join(missing)} folder (expected {root}/train/<class>/...; "
                                    "--unlabeled to use the images without their classes)")
        class_folders(root / "train")
        src = imagefolder_source(root)
    else:
        src = unlabeled_source(root, val_fraction=val_fraction, seed=seed)
        how = ("train/ and val/ as given" if (root / "train").is_dir() and (root / "val").is_dir() else
               f"val = {len(src.splits[1].samples)} images drawn with --val-fraction {val_fraction}, seed {seed}")
        print(f"{root}: no train/<class>/ + val/<class>/ layout; converting every image as unlabeled "
              f"(pre-training only; {how})")
    print(f"found {src.describe()}")
    return src
