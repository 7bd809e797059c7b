"""Classify images with a fine-tuned (or linear-probed) model: ``inference_model(weights, image) -> Prediction``.

``weights`` is any of: a fine-tuning / linear-probe run folder or checkpoint tag (DeepSpeed, weights consolidated
from the ZeRO shards), an exported ``.safetensors`` file or an export folder (``fastmim-ds export``). The class
names are the dataset's class folders, stored in the fine-tuning checkpoint (``classes``) and in the export's
``label_names``. Images are preprocessed as the run evaluated them, with timm's eval transform: shorter side resized
to ``img_size / crop_pct`` (bicubic), centre crop of ``img_size``, ImageNet mean/std (the FFCV val pipeline takes
the same centre crop, resized with INTER_AREA).

``fastmim-ds predict WEIGHTS IMAGE [IMAGE ...] [--topk K]`` prints ``image<TAB>index:name:score`` per image, followed
by `` (description)`` when the dataset named its classes (ImageNet devkit, synset mapping, ``ClassLabel``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from PIL import Image
from timm.data import create_transform

from .export import build_timm_model, create_model_from_export, read_checkpoint_model, read_export_config

__all__ = ["Prediction", "Predictor", "inference_model"]

_DATA_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


@dataclass(frozen=True)
class Prediction:
    """One class of one image: ``index`` into the classifier's outputs, its ``name`` (e.g. the wnid), softmax
    probability ``score`` in [0, 1], and its human-readable ``description`` (``""`` when the dataset gave none)."""

    index: int
    name: str
    score: float
    description: str = ""


class Predictor:
    """A classifier in eval mode with its eval transform and class names.

    Args:
        model: timm classifier; outputs (B, K) logits.
        data_config: ``input_size`` (3, H, W), ``mean``/``std``, ``crop_pct``, ``interpolation``.
        label_names: K class names (``[]``: names are the indices).
        label_descriptions: K human-readable names (``[]``: none).
    """

    def __init__(self, model: nn.Module, data_config: dict, label_names: list[str],
                 label_descriptions: list[str] | None = None):
        self.model = model.eval()
        self.label_names = list(label_names)
        self.label_descriptions = list(label_descriptions or [])
        cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in data_config.items() if k in _DATA_KEYS}
        self.transform = create_transform(**cfg, is_training=False)

    @classmethod
    def load(cls, weights: str | Path) -> "Predictor":
        """Loads a run/checkpoint or an export (CPU, fp32).

        Raises:
            FileNotFoundError: nothing loadable at ``weights``.
            ValueError: weights without a classifier head (a pre-training run or an encoder export).
        """
        path = Path(weights)
        if path.suffix == ".safetensors" or (path / "config.json").is_file():
            config = read_export_config(path)
            model = create_model_from_export(path)
            labels, data = config.get("label_names", []), config["pretrained_cfg"]
            descriptions = config.get("label_descriptions", [])
        else:
            cm = read_checkpoint_model(path)
            if cm.kind != "classifier":
                raise ValueError(f"{weights}: a pre-training checkpoint has no classifier; fine-tune it "
                                 "(`make finetune PRETRAINED=...`) or run a linear probe first")
            model, labels, data = build_timm_model(cm), cm.label_names, cm.data_config
            descriptions = cm.label_descriptions
        if not getattr(model, "num_classes", 0):
            raise ValueError(f"{weights}: an encoder export (num_classes=0) has no classifier; "
                             "export a fine-tuning run")
        if labels and len(labels) != model.num_classes:
            raise ValueError(f"{weights}: {len(labels)} class names for {model.num_classes} outputs")
        return cls(model, data, labels, descriptions if len(descriptions) == len(labels) else [])

    def name(self, index: int) -> str:
        return self.label_names[index] if self.label_names else str(index)

    def description(self, index: int) -> str:
        return self.label_descriptions[index] if self.label_descriptions else ""

    @torch.no_grad()
    def predict(self, image: str | Path | Image.Image, topk: int = 1) -> list[Prediction]:
        """The ``topk`` most probable classes of one image (RGB-converted), best first.

        Raises:
            FileNotFoundError: no such image file.
        """
        img = image if isinstance(image, Image.Image) else Image.open(image)
        x = self.transform(img.convert("RGB")).unsqueeze(0)  # (1, 3, H, W)
        probs = self.model(x).float().softmax(dim=-1)[0]  # (K,)
        scores, idx = probs.topk(min(topk, probs.numel()))
        return [Prediction(int(i), self.name(int(i)), float(s), self.description(int(i))) for s, i in zip(scores, idx)]


@functools.lru_cache(maxsize=2)
def _cached(path: str, mtime_ns: int) -> Predictor:
    return Predictor.load(path)


def inference_model(weights: str | Path, image_path: str | Path) -> Prediction:
    """Top-1 class of ``image_path`` under ``weights`` (a fine-tuning run/checkpoint or an exported classifier).

    The loaded model is cached (the two most recent weights, keyed by path and modification time), so calling this
    in a loop does not reload it. For top-k, use :class:`Predictor`.

    Returns:
        ``Prediction(index, name, score)``; ``name`` is the class folder name, ``score`` the softmax probability.

    Raises:
        FileNotFoundError: no weights or no image at the path.
        ValueError: weights without a classifier head.
    """
    p = Path(weights).resolve()
    if not p.exists():
        raise FileNotFoundError(f"{weights}: no run folder, checkpoint or exported weights")
    return _cached(str(p), p.stat().st_mtime_ns).predict(image_path, topk=1)[0]
