"""Dataset conversion (ImageFolder -> .beton): real imagenette JPEGs mixed with every kind of bad or odd file.

Good and convertible files must land in the beton with the right pixels and labels, unconvertible ones in
``<split>_skipped.tsv`` with a readable reason; the written beton is verified; a killed run leaves nothing under the
final name and a re-run finishes; ``fastmim-ds prepare`` exits 0 / 1 (skipped) / 2 (bad arguments).
"""
from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from fastmim_ds.cli import main as cli_main
from fastmim_ds.data import convert
from fastmim_ds.data.convert import (
    ConversionError,
    convert_image_folder,
    load_rgb,
    read_beton_image,
    scan_image_folder,
    verify_beton,
)

pytestmark = pytest.mark.timeout(120)

CLASSES = ("n01440764", "n02102040", "n02979186")  # the first three imagenette classes
PIXEL_LIMIT = 1_000_000  # PIL.Image.MAX_IMAGE_PIXELS in the mixed-folder test: 1 MPix stands in for ~358 MPix


def _link_real(imagenette: Path, dst: Path, split: str, per_class: int, classes=CLASSES) -> list[Path]:
    """Symlinks the first ``per_class`` real JPEGs of each class into ``dst/<class>/``."""
    links = []
    for c in classes:
        (dst / c).mkdir(parents=True, exist_ok=True)
        for f in sorted((imagenette / split / c).iterdir())[:per_class]:
            (dst / c / f.name).symlink_to(f.resolve())
            links.append(dst / c / f.name)
    return links


def _reader(beton: Path):
    from ffcv.reader import Reader

    return Reader(str(beton))


def _labels(reader) -> np.ndarray:
    return reader.metadata[f"f{reader.field_names.index('label')}"].astype(int)


def _read_tsv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f, dialect="excel-tab"))


# --------------------------------------------------------------------------------------------- the mixed folder
GREY = np.tile(np.linspace(0, 255, 60).round().astype(np.uint8), (40, 1))  # (H=40, W=60) horizontal ramp
CMYK_SOURCE_RGB = (200, 100, 50)
PNG16 = np.concatenate([np.tile(np.linspace(0, 65535, 48).round().astype(np.uint16), (20, 1)),  # full range ramp
                        np.full((20, 48), 1000, np.uint16)])  # dark half: 1000 / 257 -> 4
RGB_NOISE = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)


def _ramp_rgb(w: int, h: int) -> np.ndarray:
    x, y = np.meshgrid(np.linspace(0, 255, w), np.linspace(0, 255, h))
    return np.stack([x, y, 255 - x], axis=-1).round().astype(np.uint8)


@pytest.fixture
def mixed_folder(imagenette_subset, tmp_path) -> Path:
    """``src/train/<3 classes>/``: 3 real JPEGs per class plus one file of each bad or odd kind.

    Convertible: CMYK JPEG, greyscale JPEG, 16-bit PNG, PNG named .JPEG, 1000x800 JPEG (> max_res, < pixel limit).
    Not convertible: random bytes named .JPEG, JPEG cut in half, JPEG cut inside its header, zero bytes, PNGs over
    the pixel limit (1.2 MPix: PIL warns; 2.1 MPix: PIL refuses) -- with PIL.Image.MAX_IMAGE_PIXELS = 1 MPix.
    """
    train = tmp_path / "src" / "train"
    real = _link_real(imagenette_subset, train, "train", 3)
    a, b, c = (train / k for k in CLASSES)
    jpeg = real[0].read_bytes()
    (a / "corrupt.JPEG").write_bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    (a / "truncated.JPEG").write_bytes(jpeg[: len(jpeg) // 2])
    (a / "header_cut.JPEG").write_bytes(jpeg[:200])
    Image.new("RGB", (40, 30), CMYK_SOURCE_RGB).convert("CMYK").save(a / "cmyk.JPEG", quality=95)
    (b / "empty.JPEG").write_bytes(b"")
    Image.fromarray(GREY, "L").save(b / "grey.JPEG", quality=95)
    Image.fromarray(PNG16).save(b / "png16.png")
    Image.fromarray(RGB_NOISE).save(b / "png_named.JPEG", format="PNG")
    Image.fromarray(_ramp_rgb(1000, 800)).save(c / "large.JPEG", quality=90)
    Image.new("RGB", (1200, 1000)).save(c / "bomb_warn.png")
    Image.new("RGB", (1500, 1400)).save(c / "bomb_error.png")
    return tmp_path / "src"


SKIP_REASONS = {  # file -> words its reason must contain
    "corrupt.JPEG": "not a readable image", "truncated.JPEG": "truncated", "header_cut.JPEG": "truncated",
    "empty.JPEG": "empty file", "bomb_warn.png": "decompression-bomb", "bomb_error.png": "decompression-bomb",
}


def test_mixed_folder_converts_good_images_and_reports_bad_ones(mixed_folder, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", PIXEL_LIMIT)
    out = tmp_path / "out"
    (rep,) = convert_image_folder(mixed_folder, out, splits=("train",), max_res=64, write_mode="raw", num_workers=2,
                                  progress=False)

    # report: exactly the bad files, each with a readable reason, in the returned report and in the TSV
    assert {Path(p).name: r for p, r in rep.skipped}.keys() == SKIP_REASONS.keys()
    for p, reason in rep.skipped:
        assert SKIP_REASONS[Path(p).name] in reason, (p, reason)
    rows = _read_tsv(out / "train_skipped.tsv")
    assert rows[0] == ["path", "reason"] and sorted(map(tuple, rows[1:])) == sorted(rep.skipped)
    # the truncated JPEG has a valid header, so it failed in the write pass and forced the one rewrite
    assert "writing the split again" in caplog.text

    # beton: good files only, labels in scan order, verified per-class counts in classes.json
    _, samples = scan_image_folder(mixed_folder / "train")
    written = [(p, label) for p, label in samples if Path(p).name not in SKIP_REASONS]
    assert rep.written == len(written) == 3 * 3 + 5
    reader = _reader(out / "train.beton")
    assert reader.num_samples == len(written)
    assert _labels(reader).tolist() == [label for _, label in written]
    expected_counts = {CLASSES[0]: 3 + 1, CLASSES[1]: 3 + 3, CLASSES[2]: 3 + 1}
    assert rep.per_class == expected_counts
    meta = json.loads((out / "classes.json").read_text())
    assert meta["classes"] == list(CLASSES) and meta["splits"]["train"] == {
        "images": 14, "skipped": 6, "per_class": expected_counts}
    assert not list(out.glob("*.partial"))

    def stored(name: str) -> np.ndarray:
        return read_beton_image(reader, next(i for i, (p, _) in enumerate(written) if Path(p).name == name))

    real = stored(Path(samples[0][0]).name)  # a real 224x224 photo, stored at 64x64, close to PIL's own resize
    ref = np.asarray(Image.open(samples[0][0]).convert("RGB").resize((64, 64), Image.Resampling.LANCZOS), float)
    assert real.shape == (64, 64, 3) and np.abs(real - ref).mean() < 6
    grey = stored("grey.JPEG")  # greyscale -> R == G == B, the JPEG'd ramp
    assert grey.shape == (40, 60, 3) and (grey == grey[..., :1]).all()
    assert np.abs(grey[..., 0].astype(int) - GREY).max() <= 8
    cmyk = stored("cmyk.JPEG")  # CMYK JPEG -> the RGB colour it was made from
    assert cmyk.shape == (30, 40, 3) and np.abs(cmyk.astype(int) - CMYK_SOURCE_RGB).max() <= 6
    png16 = stored("png16.png")  # 16-bit -> value / 257
    assert (png16 == png16[..., :1]).all() and (png16[..., 0] == np.rint(PNG16 / 257)).all()
    assert png16[20:].max() == 4
    assert (stored("png_named.JPEG") == RGB_NOISE).all()  # PNG content under a .JPEG name, lossless in raw mode
    large = stored("large.JPEG")  # 1000x800 -> longest side 64, aspect kept, content = the ramp
    ref = np.asarray(Image.fromarray(_ramp_rgb(1000, 800)).resize((64, 51), Image.Resampling.LANCZOS), float)
    assert large.shape == (51, 64, 3) and np.abs(large - ref).mean() < 3


def test_every_image_is_decoded_once(imagenette_subset, tmp_path, monkeypatch):
    """A folder without late decode failures is decoded in the writer processes only (the header pass reads headers)."""
    src = tmp_path / "src" / "train"
    real = _link_real(imagenette_subset, src, "train", 3, CLASSES[:2])
    log = tmp_path / "decoded.txt"
    original = convert.load_rgb

    def counting_load_rgb(path, max_side=None):
        with open(log, "a") as f:  # O_APPEND: safe from the forked writer processes
            f.write(f"{path}\n")
        return original(path, max_side)

    monkeypatch.setattr(convert, "load_rgb", counting_load_rgb)
    (rep,) = convert_image_folder(src.parent, tmp_path / "out", splits=("train",), max_res=32, num_workers=2,
                                  progress=False)
    assert rep.written == 6 and not rep.skipped
    assert sorted(log.read_text().splitlines()) == sorted(map(str, real))


def test_load_rgb_modes():
    """Every PIL mode a dataset may hold becomes (H, W, 3) uint8 RGB; big JPEGs come back at most max_side."""
    def roundtrip(im: Image.Image, fmt: str = "PNG", **kw) -> io.BytesIO:
        buf = io.BytesIO()
        im.save(buf, format=fmt, **kw)
        buf.seek(0)
        return buf

    cases = {
        "1": Image.new("1", (5, 4), 1), "L": Image.new("L", (5, 4), 7), "LA": Image.new("LA", (5, 4), (7, 0)),
        "P": Image.new("P", (5, 4), 3), "RGBA": Image.new("RGBA", (5, 4), (1, 2, 3, 0)),
        "I;16": Image.fromarray(np.full((4, 5), 65535, np.uint16)), "I": Image.new("I", (5, 4), 514),
        "I;16 dark": Image.fromarray(np.full((4, 5), 1000, np.uint16)),  # a fixed scale: no per-image stretch
    }
    expected = {"1": 255, "L": 7, "LA": 7, "RGBA": (1, 2, 3), "I;16": 255, "I": 2, "I;16 dark": 4}
    for mode, im in cases.items():
        arr = load_rgb(roundtrip(im, "TIFF" if mode == "I" else "PNG"))
        assert arr.shape == (4, 5, 3) and arr.dtype == np.uint8, mode
        if mode in expected:
            assert (arr == np.broadcast_to(expected[mode], arr.shape)).all(), (mode, arr[0, 0])
    big = load_rgb(roundtrip(Image.fromarray(_ramp_rgb(900, 300)), "JPEG"), max_side=100)
    assert big.shape == (33, 100, 3)


def test_verification_failure_raises_and_keeps_the_final_name(imagenette_subset, tmp_path, monkeypatch):
    src = tmp_path / "src" / "train"
    _link_real(imagenette_subset, src, "train", 2, CLASSES[:2])
    out = tmp_path / "out"
    convert_image_folder(src.parent, out, splits=("train",), max_res=32, num_workers=2, progress=False)
    good = (out / "train.beton").read_bytes()
    labels = _labels(_reader(out / "train.beton")).tolist()
    assert labels == [0, 0, 1, 1]
    assert verify_beton(out / "train.beton", labels, num_classes=2, max_res=32) == [2, 2]
    with pytest.raises(ConversionError, match="per-class counts: 0: 2 written, 3 intended; 1: 2 written, 1 intended"):
        verify_beton(out / "train.beton", [0, 0, 0, 1], num_classes=2)
    with pytest.raises(ConversionError, match="4 samples written, 5 intended"):
        verify_beton(out / "train.beton", labels + [1], num_classes=2)
    with pytest.raises(ConversionError, match="sample 0 is stored at 32x32 px, not the aspect ratio of its 100x10"):
        verify_beton(out / "train.beton", labels, num_classes=2, sizes=[(100, 10)] * 4)
    with pytest.raises(ConversionError, match="sample 0 is stored at 32x32 px \\(max side 16\\)"):
        verify_beton(out / "train.beton", labels, num_classes=2, max_res=16)
    cut = tmp_path / "cut.beton"
    cut.write_bytes(good[: len(good) // 2])
    with pytest.raises(ConversionError, match="failed verification"):
        verify_beton(cut, labels, num_classes=2)

    # a writer that stores a wrong label: the re-run fails verification, the previous beton stays as it was
    original = convert.DecodeOnceDataset.__getitem__
    monkeypatch.setattr(convert.DecodeOnceDataset, "__getitem__", lambda self, i: (original(self, i)[0], 0))
    with pytest.raises(ConversionError, match=f"{CLASSES[1]}: 0 written, 2 intended"):
        convert_image_folder(src.parent, out, splits=("train",), max_res=32, num_workers=2, progress=False)
    assert (out / "train.beton").read_bytes() == good and not list(out.glob("*.partial"))
    fresh = tmp_path / "fresh"
    with pytest.raises(ConversionError, match="failed verification"):
        convert_image_folder(src.parent, fresh, splits=("train",), max_res=32, num_workers=2, progress=False)
    assert sorted(p.name for p in fresh.iterdir()) == []  # no beton, no partial, no classes.json


def test_killed_conversion_leaves_no_result_and_restarts(imagenette_subset, tmp_path):
    """SIGKILL (process group: the parent and FFCV's writer processes) in the middle of writing train.beton."""
    src = tmp_path / "src"
    _link_real(imagenette_subset, src / "train", "train", 3, CLASSES[:2])
    out = tmp_path / "out"
    slow_convert = (
        "import sys, time\n"
        "from fastmim_ds.data import convert\n"
        "load = convert.load_rgb\n"
        "convert.load_rgb = lambda p, m=None: (time.sleep(0.5), load(p, m))[1]\n"
        "convert.convert_image_folder(sys.argv[1], sys.argv[2], splits=('train',), max_res=32, num_workers=1,"
        " progress=False)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", slow_convert, str(src), str(out)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    partial = out / "train.beton.partial"
    try:
        deadline = time.monotonic() + 60
        while not (partial.exists() and partial.stat().st_size > 0) and time.monotonic() < deadline:
            assert proc.poll() is None, "conversion ended before it could be killed"
            time.sleep(0.05)
        time.sleep(0.5)  # inside the 6 x 0.5 s write pass
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # our own session: the converter and its writer processes
        proc.wait()
    assert partial.exists(), "the kill should have left a half-written file"
    assert not (out / "train.beton").exists() and not (out / "classes.json").exists()
    with pytest.raises(ConversionError, match="failed verification"):  # a stale partial is not a beton
        verify_beton(partial, [0, 0, 0, 1, 1, 1], num_classes=2)

    (rep,) = convert_image_folder(src, out, splits=("train",), max_res=32, num_workers=2, progress=False)
    assert rep.written == 6 and not partial.exists()
    assert _labels(_reader(out / "train.beton")).tolist() == [0, 0, 0, 1, 1, 1]
    assert json.loads((out / "classes.json").read_text())["splits"]["train"]["per_class"] == {
        CLASSES[0]: 3, CLASSES[1]: 3}


def test_prepare_cli_exit_status_and_summary(imagenette_subset, tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    _link_real(imagenette_subset, src / "train", "train", 2, CLASSES[:2])
    _link_real(imagenette_subset, src / "val", "val", 1, CLASSES[:2])
    (src / "train" / CLASSES[0] / "empty.JPEG").write_bytes(b"")
    args = ["prepare", "--src", str(src), "--out", str(out), "--max-res", "32", "--workers", "2"]

    assert cli_main(args) == 1  # converted, one file skipped
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(f"found {src}: imagefolder layout, 2 classes")  # the layout found, then the summary
    lines = lines[1:]
    assert lines[0] == f"train: 4 written, 1 skipped -> {out / 'train.beton'} (skipped: {out / 'train_skipped.tsv'})"
    assert lines[1] == f"val: 2 written, 0 skipped -> {out / 'val.beton'} (skipped: {out / 'val_skipped.tsv'})"
    assert _read_tsv(out / "train_skipped.tsv")[1][0].endswith("empty.JPEG")

    (src / "train" / CLASSES[0] / "empty.JPEG").unlink()
    assert cli_main(args) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("train: 4 written, 0 skipped")
    assert _read_tsv(out / "train_skipped.tsv") == [["path", "reason"]]  # the stale report was replaced

    for bad in (["--jpeg-quality", "0"], ["--max-res", "-1"], ["--write-mode", "png"], ["--workers", "two"]):
        with pytest.raises(SystemExit) as e:
            cli_main(args + bad)
        assert e.value.code == 2, bad
    assert cli_main(["prepare", "--src", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "missing has no train / val folder" in capsys.readouterr().err

    for c in CLASSES[:2]:  # a val split with nothing convertible: exit 3, reasons still reported, no val.beton
        for f in (src / "val" / c).iterdir():
            f.unlink()
        (src / "val" / c / "empty.JPEG").write_bytes(b"")
    out3 = tmp_path / "out3"
    assert cli_main(args[:4] + [str(out3)] + args[5:]) == 3
    assert "no convertible image (2 skipped" in capsys.readouterr().err
    assert len(_read_tsv(out3 / "val_skipped.tsv")) == 3 and not (out3 / "val.beton").exists()
    assert json.loads((out3 / "classes.json").read_text())["splits"].keys() == {"train"}


def test_class_mismatch_is_found_before_any_beton_is_written(tmp_path, monkeypatch, capsys):
    """issue 17: val/ with other classes than train/ used to stop only after train.beton was written and verified."""
    src, out = tmp_path / "src", tmp_path / "out"
    for split, classes in (("train", ("cat", "dog", "fox")), ("val", ("cat", "dog", "owl", "yak"))):
        for c in classes:
            (src / split / c).mkdir(parents=True)
            Image.fromarray(RGB_NOISE).save(src / split / c / "0.JPEG")
    started = []
    monkeypatch.setattr(convert, "convert_split", lambda *a, **k: started.append(a))
    assert cli_main(["prepare", "--src", str(src), "--out", str(out), "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {src}: class folders differ between splits (only in train/: fox; only in val/: owl, yak); "
                   "nothing was written"]
    assert not started and not out.exists()  # no split started, no folder, no beton, no classes.json


def test_convert_writes_betons_and_class_counts(small_beton):
    """The shared 240/80-image fixture (real JPEGs, jpg mode): counts in classes.json match the betons read back."""
    meta = json.loads((small_beton / "classes.json").read_text())
    assert len(meta["classes"]) == 10 and meta["classes"] == sorted(meta["classes"])
    assert meta["splits"]["train"]["images"] == 240 and meta["splits"]["val"]["images"] == 80
    assert set(meta["splits"]["train"]["per_class"].values()) == {24}
    for split, n in (("train", 24), ("val", 8)):
        labels = _labels(_reader(small_beton / f"{split}.beton"))
        assert np.bincount(labels).tolist() == [n] * 10
        assert verify_beton(small_beton / f"{split}.beton", labels, num_classes=10, max_res=96) == [n] * 10
    assert not list(small_beton.glob("*.partial"))
