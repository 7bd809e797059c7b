"""``prepare`` from the forms users hold data in: unlabeled nested folders, the official ImageNet tars (devkit built
here), the Kaggle layout, a flat val folder with a labels file, Hugging Face datasets (save_to_disk, parquet shards);
corrupt images inside a tar and a parquet shard in the skip report; fine-tuning refusing an unlabeled set; a short
pre-training on an unlabeled set. Every dataset is built in the test from a few real JPEGs."""
from __future__ import annotations

import csv
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import IMAGENETTE, REPO, run_deepspeed

from fastmim_ds.checks import check_finetune
from fastmim_ds.cli import main as cli_main
from fastmim_ds.config import ConfigError, FinetuneCfg, LinprobeCfg, load_config
from fastmim_ds.data.convert import convert_source
from fastmim_ds.data.sources import detect_source, draw_val_split

WNIDS = ["n01440764", "n02102040", "n02979186"]
NAMES = {"n01440764": "tench, Tinca tinca", "n02102040": "English springer, English springer spaniel",
         "n02979186": "cassette player"}
CONVERT = dict(max_res=32, num_workers=1, progress=False)


@pytest.fixture(scope="module")
def jpegs() -> dict[str, list[Path]]:
    """Three real JPEGs per class of three imagenette classes."""
    if not (IMAGENETTE / "train").is_dir():
        pytest.skip(f"real images not found at {IMAGENETTE}")
    return {w: sorted((IMAGENETTE / "train" / w).iterdir())[:3] for w in WNIDS}


def _labels(beton: Path) -> list[int]:
    from ffcv.reader import Reader

    r = Reader(str(beton))
    return r.metadata[f"f{r.field_names.index('label')}"].tolist()


def _tsv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f, dialect="excel-tab"))


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _tar_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in files.items():
            _add(tf, name, data)
    return buf.getvalue()


# ------------------------------------------------------------------ unlabeled
def test_val_draw_is_seeded():
    a, b, c = draw_val_split(100, 0.1, 0), draw_val_split(100, 0.1, 0), draw_val_split(100, 0.1, 1)
    assert a.sum() == 10 and (a == b).all() and not (a == c).all()
    assert draw_val_split(5, 0.02, 0).sum() == 1 and draw_val_split(1, 0.5, 0).sum() == 0


@pytest.fixture(scope="module")
def unlabeled_out(jpegs, tmp_path_factory) -> Path:
    """An unlabeled nested folder (9 images at three depths, plus a note and a hidden file) prepared by the CLI."""
    src = tmp_path_factory.mktemp("photos")
    for i, f in enumerate(p for ps in jpegs.values() for p in ps):
        d = src / ["", "2023", "2023/trip/day1"][i % 3]
        d.mkdir(parents=True, exist_ok=True)
        (d / f"img{i}.jpg").symlink_to(f)
    (src / "2023" / "notes.txt").write_text("not an image")
    (src / ".hidden.jpg").write_bytes(b"")
    out = tmp_path_factory.mktemp("unlabeled_beton")
    assert cli_main(["prepare", "--src", str(src), "--out", str(out), "--max-res", "64", "--workers", "1",
                     "--val-fraction", "0.2"]) == 0
    return out


def test_unlabeled_nested_folder(unlabeled_out, capsys):
    meta = json.loads((unlabeled_out / "classes.json").read_text())
    assert meta["unlabeled"] is True and meta["classes"] == [] and meta["layout"] == "unlabeled"
    assert meta["splits"]["train"]["images"] == 7 and meta["splits"]["val"]["images"] == 2
    assert "per_class" not in meta["splits"]["train"]
    assert _labels(unlabeled_out / "train.beton") == [0] * 7 and _labels(unlabeled_out / "val.beton") == [0] * 2
    assert _tsv(unlabeled_out / "train_skipped.tsv") == [["path", "reason"]]
    assert not list(unlabeled_out.glob("*.partial"))


def test_unlabeled_is_refused_by_finetune_and_linprobe(unlabeled_out, capsys):
    data = [f"data.train={unlabeled_out / 'train.beton'}", f"data.val={unlabeled_out / 'val.beton'}"]
    with pytest.raises(ConfigError, match=r"^data.train: .*train.beton is unlabeled .*fine-tuning needs labels"):
        check_finetune(load_config(FinetuneCfg, None, data + ["model.name=vit_tiny_patch16_224"]), 1)
    assert cli_main(["check", "linprobe", *[a for d in data for a in ("--set", d)], "--pretrained", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the linear probe needs labels" in err
    from fastmim_ds.linprobe import check_linprobe

    with pytest.raises(ConfigError, match="unlabeled"):
        check_linprobe(load_config(LinprobeCfg, None, data), 1)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_pretrain_on_unlabeled_folder(unlabeled_out, tmp_path):
    """2 CPU ranks, tiny ViT, one epoch cut at 2 steps (7 images, 1 per rank), reconstruction skill on val."""
    sets = ["model.encoder_kwargs={embed_dim: 32, depth: 1, num_heads: 2}", "method.decoder_dim=32",
            f"data.train={unlabeled_out / 'train.beton'}", f"data.val={unlabeled_out / 'val.beton'}",
            "data.img_size=64", "data.num_workers=1", "optim.warmup_epochs=0", "train.epochs=1",
            "train.micro_batch=1", "train.max_steps_per_epoch=2", "train.log_every=1", "eval.skill_images=2",
            "eval.skill_mean_images=4",
            "eval.batch_size=2", f"train.output_dir={tmp_path}", "train.run_name=u",
            "train.ds_config=ds_configs/zero2_fp32.json"]
    proc = run_deepspeed(["pretrain", *[a for s in sets for a in ("--set", s)]], cwd=REPO, port=29741)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "u" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "step" in r] == [1, 2]
    assert [r["epoch_end"] for r in rows if "epoch_end" in r] == [0]


# ------------------------------------------------------------------ official ImageNet tars
def _devkit(path: Path, val_idcs: list[int]) -> None:
    """A devkit tar.gz with the official layout: data/meta.mat (leaf synsets + one parent) and the val ground truth."""
    from scipy.io import savemat

    dt = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"), ("num_children", "O"),
          ("children", "O"), ("wordnet_height", "O"), ("num_train_images", "O")]
    rows = [(i + 1, w, NAMES[w], "gloss", 0, np.zeros(0), 0, 3) for i, w in enumerate(WNIDS)]
    rows.append((len(WNIDS) + 1, "n00000001", "entity", "a parent synset", 3, np.arange(1, 4), 1, 0))
    synsets = np.array(rows, dtype=dt)
    mat = io.BytesIO()
    savemat(mat, {"synsets": synsets})
    gt = "".join(f"{i}\n" for i in val_idcs).encode()
    with tarfile.open(path, "w:gz") as tf:
        _add(tf, "ILSVRC2012_devkit_t12/data/meta.mat", mat.getvalue())
        _add(tf, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", gt)


def test_imagenet_tars_with_devkit_and_a_corrupt_member(jpegs, tmp_path, capsys):
    root = tmp_path / "ilsvrc"
    root.mkdir()
    inner = {w: {f"{w}_{k}.JPEG": p.read_bytes() for k, p in enumerate(jpegs[w][:2])} for w in WNIDS}
    inner[WNIDS[1]][f"{WNIDS[1]}_9.JPEG"] = b"\xff\xd8\xff not really a jpeg" * 10  # corrupt, inside a tar in a tar
    with tarfile.open(root / "ILSVRC2012_img_train.tar", "w") as tf:
        for w in WNIDS:
            _add(tf, f"{w}.tar", _tar_bytes(inner[w]))
    val_idcs = [3, 1, 2, 1]  # ILSVRC2012_IDs in val file order
    val = {f"ILSVRC2012_val_{k + 1:08d}.JPEG": jpegs[WNIDS[i - 1]][2].read_bytes() for k, i in enumerate(val_idcs)}
    (root / "ILSVRC2012_img_val.tar").write_bytes(_tar_bytes(dict(reversed(val.items()))))  # sorted by the reader
    _devkit(root / "ILSVRC2012_devkit_t12.tar.gz", val_idcs)

    src = detect_source(root)
    assert "found" in capsys.readouterr().out and src.layout == "imagenet-tars"
    assert src.classes == WNIDS and src.names == [NAMES[w] for w in WNIDS]
    out = tmp_path / "out"
    reports = convert_source(src, out, **CONVERT)
    assert [r.written for r in reports] == [6, 4]
    assert _labels(out / "train.beton") == [0, 0, 1, 1, 2, 2]
    assert _labels(out / "val.beton") == [i - 1 for i in val_idcs]
    skipped = _tsv(out / "train_skipped.tsv")
    assert len(skipped) == 2 and skipped[1][0].endswith(f"ILSVRC2012_img_train.tar:{WNIDS[1]}.tar:{WNIDS[1]}_9.JPEG")
    assert "not a readable image" in skipped[1][1]
    meta = json.loads((out / "classes.json").read_text())
    assert meta["classes"] == WNIDS and meta["names"][0] == "tench, Tinca tinca" and not meta["unlabeled"]


def test_devkit_without_its_files_or_with_unknown_ids_is_refused(tmp_path):
    from fastmim_ds.data.sources import parse_devkit

    bare = tmp_path / "bare.tar.gz"
    with tarfile.open(bare, "w:gz") as tf:
        _add(tf, "ILSVRC2012_devkit_t12/readme.txt", b"no data folder")
    with pytest.raises(ValueError, match=r"bare.tar.gz: not an ILSVRC2012 devkit, it has no data/meta.mat / "):
        parse_devkit(bare)
    _devkit(tmp_path / "odd.tar.gz", [1, 4])  # ID 4 is the parent synset: no class of its own
    with pytest.raises(ValueError, match=r"odd.tar.gz: val ground truth names synset IDs that are no leaf class: .4"):
        parse_devkit(tmp_path / "odd.tar.gz")
    _devkit(tmp_path / "ok.tar.gz", [3, 1])
    names, val = parse_devkit(tmp_path / "ok.tar.gz")
    assert val == [WNIDS[2], WNIDS[0]] and names[WNIDS[0]] == ("tench", "Tinca tinca") and len(names) == 3


# ------------------------------------------------------------------ Kaggle layout, flat val + labels file
def test_kaggle_layout(jpegs, tmp_path, capsys):
    root = tmp_path / "kaggle"
    cls_loc = root / "ILSVRC" / "Data" / "CLS-LOC"
    for w in WNIDS:
        (cls_loc / "train" / w).mkdir(parents=True)
        for p in jpegs[w][:2]:
            (cls_loc / "train" / w / p.name).symlink_to(p)
    (cls_loc / "val").mkdir()
    truth = {"ILSVRC2012_val_00000001": WNIDS[2], "ILSVRC2012_val_00000002": WNIDS[0]}
    for k, (stem, w) in enumerate(truth.items()):
        (cls_loc / "val" / f"{stem}.JPEG").symlink_to(jpegs[w][2])
    (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "".join(
        f"{stem},{w} 1 2 30 40 {w} 5 6 70 80 \n" for stem, w in truth.items()))
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} {NAMES[w]}\n" for w in WNIDS))
    out = tmp_path / "out"
    assert cli_main(["prepare", "--src", str(root), "--out", str(out), "--max-res", "32", "--workers", "1"]) == 0
    assert "imagenet-kaggle layout, 3 classes, images: train 6, val 2" in capsys.readouterr().out
    assert _labels(out / "val.beton") == [2, 0]
    assert json.loads((out / "classes.json").read_text())["names"] == [NAMES[w] for w in WNIDS]


def test_flat_val_with_labels_file_is_listed(jpegs, tmp_path, capsys):
    root = tmp_path / "flat"
    for w in WNIDS[:2]:
        (root / "train" / w).mkdir(parents=True)
        (root / "train" / w / "a.JPEG").symlink_to(jpegs[w][0])
    (root / "val").mkdir()
    for k, w in enumerate([WNIDS[1], WNIDS[0], WNIDS[1]]):
        (root / "val" / f"v{k}.JPEG").symlink_to(jpegs[w][1])
    (root / "val_labels.txt").write_text(f"v0.JPEG\t{WNIDS[1]}\nv1.JPEG\t{WNIDS[0]}\n")  # v2 is not labelled
    src = detect_source(root)
    assert src.layout == "flat-val" and "val_labels.txt" in capsys.readouterr().out
    (train, val) = src.splits
    assert [label for _, label in val.samples] == [1, 0]
    assert val.skipped == [(str(root / "val" / "v2.JPEG"), "no label in val_labels.txt")]


# ------------------------------------------------------------------ Hugging Face datasets
def test_hf_save_to_disk_with_classlabel(jpegs, tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=WNIDS)})

    def split(k: slice) -> "datasets.Dataset":
        rows = [(str(p), i) for i, w in enumerate(WNIDS) for p in jpegs[w][k]]
        return datasets.Dataset.from_dict({"image": [r[0] for r in rows], "label": [r[1] for r in rows]},
                                          features=feats)

    root = tmp_path / "hf"
    datasets.DatasetDict({"train": split(slice(0, 2)), "validation": split(slice(2, 3))}).save_to_disk(str(root))
    src = detect_source(root)
    assert src.layout == "huggingface" and src.classes == WNIDS
    out = tmp_path / "out"
    reports = convert_source(src, out, **CONVERT)
    assert [(r.split, r.written) for r in reports] == [("train", 6), ("val", 3)]
    assert _labels(out / "train.beton") == [0, 0, 1, 1, 2, 2] and _labels(out / "val.beton") == [0, 1, 2]


def test_hf_parquet_shards_other_columns_and_a_corrupt_cell(jpegs, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "shards" / "data"
    root.mkdir(parents=True)
    files = [p for w in WNIDS for p in jpegs[w]]
    cells = [{"bytes": p.read_bytes(), "path": p.name} for p in files]
    cells[4] = {"bytes": b"this is not an image" * 4, "path": "broken.jpg"}
    img_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    names = [f"cls{i // 3}" for i in range(len(files))]  # string labels, no ClassLabel
    for shard in range(2):
        part = slice(shard * 5, (shard + 1) * 5)
        table = pa.table({"img": pa.array(cells[part], img_type), "cls": pa.array(names[part])})
        pq.write_table(table, root / f"train-{shard:05d}-of-00002.parquet")
    out = tmp_path / "out"
    args = ["prepare", "--src", str(root.parent), "--out", str(out), "--max-res", "32", "--workers", "1",
            "--val-fraction", "0.25"]
    assert cli_main(args) == 2 and "no image column 'image'" in capsys.readouterr().err
    assert cli_main(args + ["--image-column", "img", "--label-column", "cls"]) == 1  # 1: something was skipped
    text = capsys.readouterr().out
    assert "no val split; 2 of 9 train images drawn as val" in text
    meta = json.loads((out / "classes.json").read_text())
    assert meta["classes"] == ["cls0", "cls1", "cls2"] and meta["layout"] == "huggingface"
    assert meta["splits"]["train"]["images"] + meta["splits"]["val"]["images"] == 8
    skipped = _tsv(out / "train_skipped.tsv")[1:] + _tsv(out / "val_skipped.tsv")[1:]
    assert len(skipped) == 1 and skipped[0][0] == f"{root / 'train-00000-of-00002.parquet'}:row4"
    assert "not a readable image" in skipped[0][1]
    assert os.path.exists(out / "train.beton") and not list(out.glob("*.partial"))


def test_predict_prints_readable_class_names(jpegs, monkeypatch, capsys):
    """Class descriptions kept by prepare (devkit, synset mapping, ClassLabel) reach `predict`'s output."""
    import timm

    from fastmim_ds import inference

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=3, depth=1)
    data = {"input_size": (3, 32, 32), "crop_pct": 0.875, "interpolation": "bicubic"}
    predictor = inference.Predictor(model, data, WNIDS, [NAMES[w] for w in WNIDS])
    monkeypatch.setattr(inference.Predictor, "load", classmethod(lambda cls, w: predictor))
    image = str(jpegs[WNIDS[0]][0])
    assert cli_main(["predict", "weights", image, "--topk", "3"]) == 0
    fields = capsys.readouterr().out.strip().split("\t")
    assert fields[0] == image and len(fields) == 4
    for f in fields[1:]:
        index = int(f.split(":")[0])
        assert f.startswith(f"{index}:{WNIDS[index]}:") and f.endswith(f" ({NAMES[WNIDS[index]]})")
