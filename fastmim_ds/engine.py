"""Training and evaluation loops (MAE ``engine_pretrain.py`` / ``engine_finetune.py``, on a DeepSpeed engine).

The loop does not know which method it runs: ``step_fn(engine, images, labels)`` returns the model's output dict
with a scalar ``loss``. Here live only the per-update lr, the non-finite-loss stop, throughput and metric
reduction. DeepSpeed handles gradient accumulation, clipping, ZeRO partitioning and precision.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Callable

import torch
import torch.nn.functional as F

from .metrics import MetricsWriter, all_reduce_sum, progress

logger = logging.getLogger(__name__)

__all__ = ["train_one_epoch", "evaluate"]

StepFn = Callable[[object, torch.Tensor, torch.Tensor], dict]


def train_one_epoch(
    engine,
    loader,
    step_fn: StepFn,
    *,
    scheduler,
    epoch: int,
    updates_per_epoch: int,
    log_every: int,
    metrics: MetricsWriter,
    show_progress: bool,
) -> dict:
    """Runs ``updates_per_epoch`` optimizer steps (each ``grad_accum`` micro-batches) of epoch ``epoch``.

    Args:
        engine: DeepSpeed engine.
        loader: yields (images (B, 3, H, W), labels (B,)) on the engine's device.
        step_fn: ``(engine, images, labels) -> {"loss": scalar, ...}``.
        scheduler: timm scheduler; ``step_update(global_update)`` is called before every optimizer step.
        updates_per_epoch: optimizer steps in this epoch (the loader may hold more batches: they are not read).
        log_every: optimizer steps between ``metrics.jsonl`` rows.

    Returns:
        ``{"loss": mean over ranks and steps, "img_per_s": global throughput, "steps": optimizer steps}``.

    Raises:
        FloatingPointError: the loss is NaN/inf (names the epoch, step and lr).
    """
    engine.train()
    accum = engine.gradient_accumulation_steps()
    world = engine.world_size if hasattr(engine, "world_size") else 1
    device = engine.device
    first_update = epoch * updates_per_epoch
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    window_loss, window_n, window_imgs, window_t = 0.0, 0, 0, time.time()
    epoch_t, epoch_imgs = time.time(), 0
    total_micro = updates_per_epoch * accum
    bar = progress(loader, total=total_micro, desc=f"epoch {epoch}", enabled=show_progress)
    micro = -1  # stays -1 if the loader yields nothing
    for micro, (images, labels) in enumerate(bar):
        if micro >= total_micro:
            break
        update = first_update + micro // accum
        if micro % accum == 0:
            scheduler.step_update(update)
        out = step_fn(engine, images, labels)
        loss = out["loss"]
        if not torch.isfinite(loss.detach()):
            lr = engine.get_lr()[0]
            raise FloatingPointError(f"non-finite loss {loss.item()} at epoch {epoch}, step {update}, lr {lr:.3g}")
        engine.backward(loss)
        engine.step()
        loss_sum += loss.detach().double()
        window_imgs += images.shape[0]
        epoch_imgs += images.shape[0]
        if (micro + 1) % accum:
            continue
        window_n += 1
        done = micro // accum + 1
        if done % log_every == 0 or done == updates_per_epoch:
            loss_total, n_total = all_reduce_sum([loss_sum.item() - window_loss, float(window_n * accum)], device)
            elapsed = time.time() - window_t
            row = dict(
                step=update + 1, epoch=epoch, epoch_1000x=int((update + 1) / updates_per_epoch * 1000),
                lr=engine.get_lr()[0], loss=loss_total / n_total, img_per_s=window_imgs * world / max(elapsed, 1e-9),
            )
            metrics.write(**row)
            if show_progress:
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", img_s=f"{row['img_per_s']:.0f}")
            window_loss, window_n, window_imgs, window_t = loss_sum.item(), 0, 0, time.time()
    seen = min(micro + 1, total_micro)
    loss_total, n_total = all_reduce_sum([loss_sum.item(), float(seen)], device)
    elapsed = time.time() - epoch_t
    return {
        "loss": loss_total / max(n_total, 1.0),
        "img_per_s": epoch_imgs * world / max(elapsed, 1e-9),
        "steps": seen // max(accum, 1),
        "seconds": elapsed,
    }


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, *, dtype: torch.dtype, show_progress: bool = False) -> dict:
    """Top-1/top-5 accuracy (%) and cross-entropy over the whole val set, exact across ranks.

    Each rank must see a disjoint shard (``build_val_loader`` does this); sums are all-reduced, so every image
    counts once.
    """
    model.eval()
    device = next(model.parameters()).device
    correct1 = correct5 = loss_sum = 0.0
    count = 0
    for images, labels in progress(loader, total=len(loader), desc="eval", enabled=show_progress):
        logits = model(images.to(dtype)).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices  # (B, k)
        hit = top.eq(labels[:, None])
        correct1 += hit[:, 0].sum().item()
        correct5 += hit.any(dim=1).sum().item()
        count += labels.shape[0]
    c1, c5, ls, n = all_reduce_sum([correct1, correct5, loss_sum, float(count)], device)
    model.train()
    if n == 0:
        return {"top1": math.nan, "top5": math.nan, "loss": math.nan, "images": 0}
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": ls / n, "images": int(n)}
