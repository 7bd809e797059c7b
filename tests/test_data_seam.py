"""The data seam (:mod:`fastmim_ds.data`): only the data package touches ffcv; ``dataset_info``; the ``Loader``
protocol as the training loop, evaluation and the quality signals use it, on real JPEGs (the ``small_beton``
fixture: 240 train / 80 val imagenette images, 10 classes of 24 / 8)."""
from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO

from fastmim_ds.checks import check_dataset, check_labeled
from fastmim_ds.config import ConfigError, DataCfg
from fastmim_ds.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetInfo,
    Loader,
    dataset_info,
    eval_loader,
    labeled_indices,
    train_loader,
    val_loader,
)

pytestmark = pytest.mark.timeout(300)

PACKAGE = REPO / "fastmim_ds"
DATA = PACKAGE / "data"
CPU = torch.device("cpu")


# ------------------------------------------------------------------ nothing outside fastmim_ds/data/ imports ffcv
def _module_of(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def seam_violations(source: str, module: str, *, is_package: bool = False) -> list[str]:
    """``line: import`` for each import of ffcv or of ``fastmim_ds.data.loaders`` (FFCV's implementation) in
    ``source``, the code of module ``module``, at any depth (function-local imports included)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = module.split(".") if is_package else module.split(".")[:-1]
            if node.level:
                base = base[: len(base) - (node.level - 1)]
                parent = ".".join(base + ([node.module] if node.module else []))
            else:
                parent = node.module or ""
            names = [parent] + [f"{parent}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "ffcv" or name == "fastmim_ds.data.loaders" \
                    or name.startswith("fastmim_ds.data.loaders."):
                found.append(f"{node.lineno}: {name}")
                break
    return found


def test_the_seam_check_finds_ffcv_and_loader_imports():
    bad = ("import ffcv\nfrom ffcv.loader import Loader\n"
           "def f():\n    from .data.loaders import build_val_loader\n    from .data import loaders\n"
           "    from . import data\n    from .data import dataset_info\n")
    assert [v.split(": ")[0] for v in seam_violations(bad, "fastmim_ds.quality")] == ["1", "2", "4", "5"]
    assert seam_violations("from ..data.loaders import x\n", "fastmim_ds.models.vit") == ["1: fastmim_ds.data.loaders"]


def test_only_the_data_package_imports_ffcv():
    files = [p for p in sorted(PACKAGE.rglob("*.py")) if DATA not in p.parents]
    assert len(files) > 20 and PACKAGE / "pretrain.py" in files
    found = [f"{p.relative_to(REPO)}:{v}" for p in files
             for v in seam_violations(p.read_text(), _module_of(p), is_package=p.name == "__init__.py")]
    assert not found, ("import ffcv and fastmim_ds.data.loaders only inside fastmim_ds/data/; use the seam "
                       f"(fastmim_ds.data: dataset_info, train_loader, val_loader, eval_loader): {found}")


# ------------------------------------------------------------------ dataset_info
def _copy_beton(src: Path, dst: Path, meta: dict | None) -> Path:
    dst.mkdir()
    shutil.copy(src, dst / "train.beton")
    if meta is not None:
        (dst / "classes.json").write_text(json.dumps(meta))
    return dst / "train.beton"


def test_dataset_info_counts_and_names(small_beton, tmp_path):
    classes = sorted(json.loads((small_beton / "classes.json").read_text())["classes"])
    info = dataset_info(small_beton / "train.beton")
    assert info == DatasetInfo(path=str(small_beton / "train.beton"), num_images=240, classes=classes,
                               class_names=[], labeled=True, num_classes=10)
    assert dataset_info(str(small_beton / "val.beton")).num_images == 80
    assert len(classes) == 10 and classes[0].startswith("n")  # imagenette wnids, sorted

    named = _copy_beton(small_beton / "train.beton", tmp_path / "named",
                        {"classes": classes, "names": [f"name {c}" for c in classes]})
    assert dataset_info(named).class_names[3] == f"name {classes[3]}"
    bare = _copy_beton(small_beton / "train.beton", tmp_path / "bare", None)  # no classes.json: labels decide
    assert (dataset_info(bare).classes, dataset_info(bare).num_classes, dataset_info(bare).labeled) == ([], 10, True)
    unlabeled = _copy_beton(small_beton / "train.beton", tmp_path / "unlabeled", {"classes": [], "unlabeled": True})
    info = dataset_info(unlabeled)
    assert (info.num_images, info.classes, info.num_classes, info.labeled) == (240, [], 0, False)
    (unlabeled.parent / "classes.json").write_text(json.dumps({"classes": ["a", "b"]}))  # rewritten: not cached
    assert dataset_info(unlabeled).classes == ["a", "b"] and dataset_info(unlabeled).labeled

    with pytest.raises(FileNotFoundError, match="nope.beton"):
        dataset_info(tmp_path / "nope.beton")
    junk = tmp_path / "junk.beton"
    junk.write_bytes(b"not a beton at all" * 10)
    with pytest.raises(ValueError, match=r"junk.beton: not an FFCV .beton"):
        dataset_info(junk)
    with pytest.raises(ConfigError, match=r"^data.val: .*nope.beton not found"):
        check_dataset(DataCfg(train=str(junk), val=str(tmp_path / "nope.beton")), "val")
    with pytest.raises(ConfigError, match=r"^data.train: .*junk.beton: not an FFCV"):
        check_dataset(DataCfg(train=str(junk)), "train")
    (unlabeled.parent / "classes.json").write_text(json.dumps({"classes": [], "unlabeled": True}, indent=1))
    with pytest.raises(ConfigError, match=r"^data.train: .*train.beton is unlabeled .*fine-tuning needs labels"):
        check_labeled(DataCfg(train=str(unlabeled), val=str(small_beton / "val.beton")), "fine-tuning")


def test_labeled_indices_follow_the_config(small_beton):
    train = str(small_beton / "train.beton")
    assert labeled_indices(DataCfg(train=train)) is None
    sub = labeled_indices(DataCfg(train=train, labels_per_class=3, labels_seed=1))
    assert len(sub) == 30 and sub.dtype.kind == "u"
    assert (labeled_indices(DataCfg(train=train, labels_per_class=3, labels_seed=1)) == sub).all()


# ------------------------------------------------------------------ the Loader protocol
def _epoch(loader: Loader, epoch: int, start_batch: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch, start_batch=start_batch)
    return [(x.clone(), y.clone()) for x, y in loader]  # the loader may reuse its buffers


def test_train_loader_protocol(small_beton):
    data = DataCfg(train=str(small_beton / "train.beton"), img_size=40, num_workers=1)
    loader = train_loader(data, batch_size=16, seed=0, device=CPU)
    assert isinstance(loader, Loader)
    assert len(loader) == 240 // 16

    full = _epoch(loader, 1)
    assert len(full) == 15
    lo = (0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    hi = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    for x, y in full:
        assert x.shape == (16, 3, 40, 40) and x.dtype == torch.float32 and x.is_contiguous(
            memory_format=torch.channels_last)
        assert y.shape == (16,) and y.dtype == torch.int64
        assert torch.all(x.amin(dim=(0, 2, 3)) >= lo - 1e-4) and torch.all(x.amax(dim=(0, 2, 3)) <= hi + 1e-4)
    labels = torch.cat([y for _, y in full])
    assert torch.bincount(labels, minlength=10).tolist() == [24] * 10  # every image once, with its class

    resumed = _epoch(loader, 1, start_batch=6)  # exact mid-epoch resume: the same batches from batch 6 on
    assert len(resumed) == 9 and len(loader) == 15
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(resumed, full[6:]))
    assert not torch.equal(_epoch(loader, 2, start_batch=14)[0][0], full[14][0])  # another epoch: other order, crops
    assert _epoch(loader, 1, start_batch=15) == []

    loader.set_img_size(32)
    x, y = _epoch(loader, 1, start_batch=14)[0]
    assert x.shape == (16, 3, 32, 32) and torch.equal(y, full[14][1])  # same images, smaller crops
    for bad in ({"epoch": -1}, {"epoch": 0, "start_batch": 16}, {"epoch": 0, "start_batch": -1}):
        with pytest.raises(ValueError):
            loader.set_epoch(**bad)

    sub = labeled_indices(DataCfg(train=data.train, labels_per_class=4))
    subset = train_loader(data, batch_size=8, seed=0, device=CPU, img_size=24, indices=sub)
    x, _ = next(iter(subset))
    assert len(subset) == 40 // 8 and x.shape == (8, 3, 24, 24)


def test_eval_loaders(small_beton):
    data = DataCfg(val=str(small_beton / "val.beton"), img_size=32, num_workers=1)
    loader = val_loader(data, batch_size=32, device=CPU)
    assert isinstance(loader, Loader) and len(loader) == 3
    batches = _epoch(loader, 0)
    assert [x.shape for x, _ in batches] == [(32, 3, 32, 32)] * 2 + [(16, 3, 32, 32)]  # the last batch is kept
    labels = torch.cat([y for _, y in batches])
    assert labels.tolist() == sorted(labels.tolist()) and torch.bincount(labels).tolist() == [8] * 10  # file order
    assert torch.equal(_epoch(loader, 3)[1][0], batches[1][0])  # evaluation is the same every epoch

    shards = [eval_loader(data.val, img_size=24, batch_size=5, device=CPU, rank=r, world_size=2,
                          indices=[0, 9, 17, 30, 79]) for r in range(2)]
    got = [torch.cat([y.clone() for _, y in s]).tolist() for s in shards]
    assert got == [labels[[0, 17, 79]].tolist(), labels[[9, 30]].tolist()]


def test_pictures_take_the_first_images_with_their_classes(small_beton, tmp_path):
    from fastmim_ds.config import VisCfg
    from fastmim_ds.visualize import EpochVisualizer

    vis = EpochVisualizer(VisCfg(every=1, num_images=3), data_train=str(small_beton / "train.beton"), run_dir=tmp_path,
                          write=False)
    imgs, names = vis.images(32)
    first = dataset_info(small_beton / "train.beton").classes[0]
    assert imgs.shape == (3, 3, 32, 32) and names == [f"#{i} {first}" for i in range(3)]  # sorted by class on disk
    assert vis.images(32)[0] is imgs  # read once per image size
