"""Reconstruction losses with explicit mask semantics."""
from __future__ import annotations

import torch

__all__ = ["masked_mse", "masked_l1"]


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error over the masked tokens only (FastMIM ``forward_hog_loss``).

    Every selected element counts once: the result equals ``((pred - target)[mask] ** 2).mean()``, i.e. the
    mean over masked tokens x D values. Visible tokens carry no loss. Computed in fp32.

    Args:
        pred: (B, N, D) predictions.
        target: (B, N, D) targets.
        mask: (B, N) bool, True = masked (counted); ``None`` counts every token (MixMIM).

    Returns:
        Scalar fp32 loss.

    Raises:
        ValueError: shapes differ, or no token is masked.
    """
    return _masked_mean(pred, target, mask, torch.square)


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean absolute error over the masked tokens only (SimMIM: ``l1_loss`` summed over masked pixels / their count).

    Shapes, mask semantics (True = masked, counted), errors and fp32 as :func:`masked_mse`.
    """
    return _masked_mean(pred, target, mask, torch.abs)


def _masked_mean(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None, error) -> torch.Tensor:
    """Mean of ``error(pred - target)`` (fp32) over the masked tokens' values (every token when ``mask`` is None)."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    err = error(pred.float() - target.float()).mean(dim=-1)  # (B, N)
    if mask is None:
        return err.mean()
    if mask.shape != err.shape:
        raise ValueError(f"mask {tuple(mask.shape)} does not match tokens {tuple(err.shape)}")
    m = mask.to(err.dtype)
    count = m.sum()
    # a host sync: skipped under torch.compile (train.compile), where it would split the graph in two
    if not torch.compiler.is_compiling() and count.item() == 0:
        raise ValueError("no token is masked: the loss would be empty")
    return (err * m).sum() / count
