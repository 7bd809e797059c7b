"""Is a pre-training run learning? Two signals, measured while it trains (``eval`` section of the config).

* **Reconstruction skill**: the masked-token MSE of the model on a fixed set of val images with fixed masks, next
  to the MSE of the *mean predictor*, which predicts for every token the train-set mean target at that token
  position (computed once per image size from ``eval.skill_mean_images`` train images). ``skill_ratio`` =
  model MSE / mean-predictor MSE: 1.0 means the model predicts no better than the average, below 1 it uses the
  visible context. A run whose ratio stays >= 0.98 for ``SKILL_STALL_EPOCHS`` epochs gets a warning.
* **Weighted k-NN top-1** of the encoder's mean-pooled patch tokens (:mod:`fastmim_ds.knn`), train set as the
  bank, val set as the queries, every ``eval.knn_every`` epochs, with its cost in seconds.

Images are centre crops (as evaluation) at the training stage's size, so FastMIM-P runs are measured at the size
they train at. Every rank takes part (each on its shard, one forward per rank for the skill set); the results are
all-reduced, so under ZeRO-3 the collective parameter gathers match.
"""
from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .config import PretrainEvalCfg
from .data import dataset_info, eval_loader
from .knn import encoder_features, knn_evaluate
from .metrics import all_reduce_sum

__all__ = ["SKILL_STALL_RATIO", "SKILL_STALL_EPOCHS", "skill_sums", "mean_target", "QualityMonitor",
           "spread_indices", "skill_summary"]

logger = logging.getLogger(__name__)

SKILL_STALL_RATIO = 0.98
SKILL_STALL_EPOCHS = 3


def spread_indices(n_total: int, n: int) -> np.ndarray:
    """``n`` sample indices spread evenly over ``range(n_total)`` (all of them when ``n`` is 0 or >= n_total)."""
    if n <= 0 or n >= n_total:
        return np.arange(n_total)
    return np.linspace(0, n_total - 1, n).round().astype(np.int64)


@torch.no_grad()
def skill_sums(out: dict, mean: torch.Tensor) -> tuple[float, float, float]:
    """Sums behind the skill ratio for one forward's output.

    Args:
        out: the model's ``{"pred": (B, N, D), "target": (B, N, D), "mask": (B, N) bool, True = masked}``.
        mean: (N, D) mean target per token position.

    Returns:
        (sum over masked tokens of the model's per-token MSE, the same for the mean predictor, masked tokens).
    """
    pred, target, mask = out["pred"].float(), out["target"].float(), out["mask"]
    err = (pred - target).pow(2).mean(-1)  # (B, N)
    base = (mean.unsqueeze(0) - target).pow(2).mean(-1)
    m = mask.float()
    return (err * m).sum().item(), (base * m).sum().item(), m.sum().item()


@torch.no_grad()
def mean_target(target: nn.Module, stride: int, loader, device: torch.device) -> torch.Tensor:
    """(N, D) mean of ``target(images, stride)`` over the images of ``loader`` on all ranks."""
    total, count = None, 0
    for images, _ in loader:
        t = target(images, stride).double().sum(0)  # (N, D)
        total = t if total is None else total + t
        count += images.shape[0]
    sums = all_reduce_sum(total.flatten().tolist() + [float(count)], device)
    return torch.tensor(sums[:-1], dtype=torch.float32, device=device).view_as(total) / sums[-1]


class QualityMonitor:
    """The per-epoch quality signals of one pre-training run (see the module docstring).

    Args:
        cfg: the ``eval`` section.
        train: train beton (mean target, k-NN bank); val: val beton (skill images, k-NN queries).
        num_classes: classes of the k-NN labels.
        rank, world_size, device: this process.
        num_workers: FFCV decoding threads.
    """

    def __init__(self, cfg: PretrainEvalCfg, *, train: str, val: str, num_classes: int, rank: int, world_size: int,
                 device: torch.device, num_workers: int):
        self.cfg, self.train, self.val, self.num_classes = cfg, train, val, num_classes
        self.rank, self.world, self.device, self.num_workers = rank, world_size, device, num_workers
        self._means: dict[int, torch.Tensor] = {}
        self._loaders: dict[tuple, object] = {}
        self.stalled_epochs = 0

    def _loader(self, path: str, img_size: int, n: int, batch_size: int):
        key = (path, n, batch_size)
        if key not in self._loaders:  # built once (FFCV compiles its pipeline), resized with the stages
            subset = spread_indices(dataset_info(path).num_images, n)
            self._loaders[key] = eval_loader(
                path, img_size=img_size, batch_size=batch_size, crop_ratio=224 / 256, num_workers=self.num_workers,
                rank=self.rank, world_size=self.world, device=self.device, indices=subset)
        loader = self._loaders[key]
        loader.set_img_size(img_size)
        return loader

    def due(self, epoch: int) -> dict[str, bool]:
        """Which signals run after epoch ``epoch`` (0-based)."""
        every = lambda k: k > 0 and (epoch + 1) % k == 0  # noqa: E731
        return {"skill": every(self.cfg.skill_every), "knn": every(self.cfg.knn_every)}

    @torch.no_grad()
    def skill(self, model: nn.Module, img_size: int) -> dict:
        """``{"skill_mse", "skill_mean_mse", "skill_ratio"}`` of ``model`` (a :class:`~fastmim_ds.methods.MIMMethod`:
        ``target``, ``stride``, ``draw_mask`` and a forward taking ``(images, mask)``) at ``img_size``; the same on
        every rank."""
        if img_size not in self._means:
            loader = self._loader(self.train, img_size, self.cfg.skill_mean_images, self.cfg.batch_size)
            self._means[img_size] = mean_target(model.target, model.stride, loader, self.device)
        n = self.cfg.skill_images
        per_rank = math.ceil(n / self.world)  # one batch per rank: equal forwards on every rank (ZeRO-3)
        loader = self._loader(self.val, img_size, n, per_rank)
        images = next(iter(loader))[0].clone()
        gen = torch.Generator(device="cpu").manual_seed(self.cfg.seed)
        masks = model.draw_mask(per_rank * self.world, (img_size, img_size), device=torch.device("cpu"),
                                generator=gen)  # the same masks for every rank count and every epoch
        mask = masks[self.rank::self.world][: images.shape[0]].to(images.device)
        was_training = model.training
        model.eval()
        try:
            out = model(images, mask)
        finally:
            model.train(was_training)
        err, base, count = all_reduce_sum(list(skill_sums(out, self._means[img_size])), self.device)
        ratio = err / base if base > 0 else math.nan
        self.stalled_epochs = self.stalled_epochs + 1 if ratio >= SKILL_STALL_RATIO else 0
        if self.stalled_epochs >= SKILL_STALL_EPOCHS:
            logger.warning("reconstruction skill ratio %.3f >= %.2f for %d epochs: the model predicts about the "
                           "average target (try a larger token grid, a lower mask ratio, more epochs or another lr)",
                           ratio, SKILL_STALL_RATIO, self.stalled_epochs)
        return {"skill_mse": err / count, "skill_mean_mse": base / count, "skill_ratio": ratio}

    def knn(self, model: nn.Module, img_size: int) -> dict:
        """``{"knn_top1", "knn_seconds", "knn_bank", "knn_queries"}`` of the model's encoder at ``img_size``."""
        bs = self.cfg.batch_size
        bank = self._loader(self.train, img_size, self.cfg.knn_bank_images, bs)
        queries = self._loader(self.val, img_size, 0, bs)
        return knn_evaluate(encoder_features(model), bank, queries, num_classes=self.num_classes, device=self.device,
                            k=self.cfg.knn_k, temperature=self.cfg.knn_temperature, model=model)

    def __call__(self, model: nn.Module, epoch: int, img_size: int) -> dict:
        """The signals due after ``epoch``, as metrics fields (empty when none is due)."""
        due, row = self.due(epoch), {}
        if due["skill"]:
            row.update(self.skill(model, img_size))
        if due["knn"]:
            row.update(self.knn(model, img_size))
        return row


def skill_summary(run_dir: str | Path) -> str:
    """One line on the last reconstruction skill logged in ``<run_dir>/metrics.jsonl`` (``python -m
    fastmim_ds.quality RUN`` prints it; ``make demo`` does at the end of pre-training).

    Raises:
        FileNotFoundError: no metrics.jsonl; ValueError: no epoch with a skill measurement in it.
    """
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "skill_ratio" in r]
    if not rows:
        raise ValueError(f"{run_dir}: no reconstruction skill in metrics.jsonl (eval.skill_every=0 or no data.val)")
    r = rows[-1]
    verdict = "better than" if r["skill_ratio"] < 1 else "NO better than"
    return (f"reconstruction skill after epoch {r['epoch_end'] + 1}: masked-token MSE {r['skill_mse']:.4f} vs "
            f"{r['skill_mean_mse']:.4f} for the mean predictor, ratio {r['skill_ratio']:.3f}: {verdict} predicting "
            "the average target")


if __name__ == "__main__":
    print(skill_summary(sys.argv[1]))
