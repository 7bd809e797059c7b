"""Inference API: ``inference_model(weights, image)`` and ``fastmim-ds predict`` from a fine-tuning checkpoint (1-rank
DeepSpeed, in-process) and from its export; class names come from the checkpoint."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CLASSES, TINY_VIT, finetune_run, pretrain_run  # noqa: F401  (fixture)
from PIL import Image
from timm.data import create_transform

import fastmim_ds
from fastmim_ds.export import export
from fastmim_ds.inference import Prediction, Predictor

pytestmark = [pytest.mark.usefixtures("one_rank_group"), pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inference")
    clf, run = finetune_run(tmp)
    images = []
    rng = np.random.default_rng(0)
    for i in range(3):  # non-square, not at the model's size: the eval transform resizes and crops
        arr = rng.integers(0, 256, size=(50 + 10 * i, 90, 3), dtype=np.uint8)
        path = tmp / f"img{i}.png"
        Image.fromarray(arr).save(path)
        images.append(path)
    return clf, run, images, tmp


def _reference(clf, image) -> tuple[int, float]:
    """Top-1 computed by hand: timm eval transform at the run's preprocessing (64 px, crop 0.875, ImageNet stats)."""
    tf = create_transform((3, 64, 64), is_training=False, crop_pct=224 / 256, interpolation="bicubic",
                          mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    with torch.no_grad():
        p = clf(tf(Image.open(image).convert("RGB"))[None]).softmax(-1)[0]
    return int(p.argmax()), float(p.max())


def test_inference_from_checkpoint_and_export_agree(finetuned):
    clf, run, images, tmp = finetuned
    weights, _ = export(run, tmp / "clf.safetensors")
    in_folder, _ = export(run, tmp / "clf_dir")  # clf_dir/model.safetensors + clf_dir/config.json
    for image in images:
        index, score = _reference(clf, image)
        for source in (run, weights, in_folder.parent):
            pred = fastmim_ds.inference_model(source, image)
            assert isinstance(pred, Prediction)
            assert pred.index == index and pred.name == CLASSES[index], source
            assert pred.score == pytest.approx(score, abs=1e-5)


def test_predictor_topk_is_sorted_probabilities(finetuned):
    _, run, images, _ = finetuned
    top = Predictor.load(run).predict(images[0], topk=5)
    assert len(top) == 3 and sorted(p.name for p in top) == CLASSES  # topk capped at the class count
    scores = [p.score for p in top]
    assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1.0, abs=1e-5)


def test_encoder_weights_have_no_classifier(tmp_path, finetuned):
    _, run, images, _ = finetuned
    _, _, pre_run = pretrain_run(tmp_path, TINY_VIT)
    with pytest.raises(ValueError, match="no classifier"):
        Predictor.load(pre_run)
    enc, _ = export(pre_run, tmp_path / "enc.safetensors")
    with pytest.raises(ValueError, match="no classifier"):
        Predictor.load(enc)
    with pytest.raises(FileNotFoundError):
        fastmim_ds.inference_model(tmp_path / "missing", images[0])


def test_predict_cli(finetuned, capsys):
    from fastmim_ds.cli import main

    clf, run, images, tmp = finetuned
    weights = tmp / "clf.safetensors"
    if not weights.exists():
        export(run, weights)
    assert main(["predict", str(weights), *map(str, images[:2]), "--topk", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line, image in zip(lines, images):
        index, _ = _reference(clf, image)
        path, first, second = line.split("\t")
        assert path == str(image) and first.startswith(f"{index}:{CLASSES[index]}:") and second.count(":") == 2
    assert main(["predict", str(tmp / "missing.safetensors"), str(images[0])]) == 2
