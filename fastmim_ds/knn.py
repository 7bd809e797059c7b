"""Weighted k-NN classification of frozen features: is the encoder learning anything?

The protocol of DINO (``eval_knn.py``, arXiv 2104.14294) and solo-learn (``WeightedKNNClassifier``): features are
L2-normalised, the similarity is their dot product (cosine), each of the k most similar bank samples votes for its
class with weight ``exp(similarity / temperature)``, and the class with the largest summed weight wins. Defaults
k = 20, temperature 0.07. The bank is the train set, the queries are the val set.

Distributed: every rank embeds its shard of the bank and of the queries (images r, r + W, ...; ranks with fewer
batches run dummy forwards so that ZeRO-3's collective parameter gathers stay matched), the queries are
all-gathered, each rank ranks all queries against its own bank shard, and the per-rank top-k lists are
all-gathered and merged. Every rank returns the same top-1; the bank is never gathered, so its size is bounded by
one rank's memory, not the world's.
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["knn_predict", "knn_top1", "embed", "encoder_features", "knn_evaluate"]

logger = logging.getLogger(__name__)

FeatureFn = Callable[[torch.Tensor], torch.Tensor]


def knn_predict(
    query: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, *, num_classes: int, k: int = 20,
    temperature: float = 0.07,
) -> torch.Tensor:
    """Weighted k-NN class scores on one process.

    Args:
        query: (Q, C) features (normalised here).
        bank: (M, C) features (normalised here).
        bank_labels: (M,) int64 in [0, num_classes).
        num_classes: K.
        k: neighbours (clipped to M).
        temperature: the vote of a neighbour at cosine similarity s is exp(s / temperature).

    Returns:
        (Q, K) summed vote weights; ``argmax(1)`` is the prediction.
    """
    sims, labels = _local_topk(F.normalize(query.float(), dim=1), F.normalize(bank.float(), dim=1), bank_labels, k)
    return _vote(sims, labels, num_classes=num_classes, temperature=temperature)


def _local_topk(query: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, k: int,
                chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, k') similarities and labels of each query's k' = min(k, M) nearest bank rows (normalised inputs)."""
    k = min(k, bank.shape[0])
    sims, labels = [], []
    for i in range(0, query.shape[0], chunk):
        s, idx = (query[i:i + chunk] @ bank.t()).topk(k, dim=1)
        sims.append(s)
        labels.append(bank_labels[idx])
    return torch.cat(sims), torch.cat(labels)


def _vote(sims: torch.Tensor, labels: torch.Tensor, *, num_classes: int, temperature: float) -> torch.Tensor:
    weights = (sims / temperature).exp()
    scores = torch.zeros(sims.shape[0], num_classes, dtype=torch.float32, device=sims.device)
    return scores.scatter_add_(1, labels, weights.float())


def knn_top1(query: torch.Tensor, query_labels: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, *,
             num_classes: int, k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 accuracy (%) of :func:`knn_predict` on one process; shapes as there, ``query_labels`` (Q,)."""
    pred = knn_predict(query, bank, bank_labels, num_classes=num_classes, k=k, temperature=temperature).argmax(1)
    return 100.0 * (pred == query_labels).float().mean().item()


def encoder_features(model: nn.Module) -> FeatureFn:
    """Pooled features of a MIM model's encoder: the mean of its patch tokens (prefix tokens such as [CLS] left
    out), (B, 3, H, W) -> (B, C). Uses the model's ``adapter.forward_tokens`` (every FastMIM family).

    Raises:
        ValueError: the model has no ``encoder`` + ``adapter`` pair.
    """
    encoder, adapter = getattr(model, "encoder", None), getattr(model, "adapter", None)
    if encoder is None or adapter is None or not hasattr(adapter, "forward_tokens"):
        raise ValueError(f"{type(model).__name__} has no encoder/adapter pair to take k-NN features from")

    def features(images: torch.Tensor) -> torch.Tensor:
        dtype = next(encoder.parameters()).dtype
        tokens, num_prefix = adapter.forward_tokens(encoder, images.to(dtype))
        return tokens[:, num_prefix:].float().mean(dim=1)

    return features


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def embed(feature_fn: FeatureFn, loader: Iterable, *, device: torch.device,
          dummy_shape: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised features and labels of every batch of ``loader`` (this rank's shard).

    With torch.distributed, ranks with fewer batches run ``feature_fn`` on zeros of ``dummy_shape`` (one image
    batch, (B, 3, H, W)) until all ranks have run the same number of forwards (ZeRO-3 gathers parameters in each).

    Returns:
        ((n, C) float32, (n,) int64) on ``device``.
    """
    feats, labels = [], []
    for images, y in loader:
        feats.append(F.normalize(feature_fn(images), dim=1))
        labels.append(y.to(device))
        dummy_shape = tuple(images.shape)
    _, world = _world()
    if world > 1:
        n = torch.tensor([len(feats)], device=device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        for _ in range(int(n.item()) - len(feats)):
            feature_fn(torch.zeros(dummy_shape, device=device))
    if not feats:
        raise ValueError("k-NN: a rank got no images (fewer images than ranks)")
    return torch.cat(feats), torch.cat(labels)


def _all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenates (n_r, ...) tensors of every rank along dim 0 (n_r may differ)."""
    _, world = _world()
    if world == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    top = int(max(s.item() for s in sizes))
    padded = x.new_zeros((top, *x.shape[1:]))
    padded[: x.shape[0]] = x
    out = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes)])


def _gathered(model: nn.Module | None):
    """ZeRO-3 keeps each parameter partitioned and gathers it only inside its own module's forward, but the feature
    path reads some outside one (ViT's ``cls_token`` in ``forward_features``): gather the whole model once for the
    evaluation (a collective: every rank enters). A no-op for unpartitioned models."""
    params = [p for p in model.parameters() if hasattr(p, "ds_id")] if model is not None else []
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


@torch.no_grad()
def knn_evaluate(
    feature_fn: FeatureFn, bank_loader: Iterable, query_loader: Iterable, *, num_classes: int, device: torch.device,
    k: int = 20, temperature: float = 0.07, model: nn.Module | None = None,
) -> dict:
    """Weighted k-NN top-1 of ``feature_fn`` with the train set as bank, on every rank (see the module docstring).

    Args:
        feature_fn: (B, 3, H, W) -> (B, C) pooled features (e.g. :func:`encoder_features`).
        bank_loader, query_loader: this rank's shards of the train and val sets, yielding (images, labels).
        num_classes: K.
        model: put in eval mode for the duration (and back to its previous mode).

    Returns:
        ``{"knn_top1": %, "knn_seconds": wall time, "knn_bank": bank size, "knn_queries": query count}``, the same
        on every rank.
    """
    t0 = time.time()
    was_training = model.training if model is not None else False
    if model is not None:
        model.eval()
    try:
        with _gathered(model):
            bank, bank_labels = embed(feature_fn, bank_loader, device=device)
            query, query_labels = embed(feature_fn, query_loader, device=device)
    finally:
        if model is not None:
            model.train(was_training)
    query, query_labels = _all_gather_rows(query), _all_gather_rows(query_labels)
    sims, labels = _local_topk(query, bank, bank_labels, k)  # (Q, k_r) against this rank's bank shard
    sims, labels = _all_gather_rows(sims.t().contiguous()).t(), _all_gather_rows(labels.t().contiguous()).t()
    if sims.shape[1] > k:  # merge the ranks' candidates
        sims, pick = sims.topk(k, dim=1)
        labels = labels.gather(1, pick)
    pred = _vote(sims, labels, num_classes=num_classes, temperature=temperature).argmax(1)
    top1 = 100.0 * (pred == query_labels).float().mean().item()
    n_bank = int(_all_gather_rows(torch.tensor([bank.shape[0]], device=device)).sum().item())
    return {"knn_top1": top1, "knn_seconds": time.time() - t0, "knn_bank": n_bank, "knn_queries": query.shape[0]}


def load_source(source: str, *, img_size: int | None = None) -> tuple[nn.Module, dict]:
    """The model whose encoder ``fastmim-ds knn`` measures, and the data settings that come with it.

    Args:
        source: a pre-training run folder, ``<run>/ckpt`` or tag folder (its trained encoder); a pre-training YAML
            config (the encoder exactly as that run would start: same initialisation and seed); or
            ``timm:<name>`` (timm's own initialisation of that encoder).
        img_size: the input size (default: the config's ``data.img_size``; 224 for ``timm:``).

    Returns:
        (model with ``encoder`` and ``adapter`` in eval mode on CPU, ``{"train", "val", "img_size"}`` from its
        config; paths empty for ``timm:``).

    Raises:
        FileNotFoundError: no checkpoint or config at ``source``.
        ValueError: a checkpoint that is not a pre-training one, or an encoder without an adapter.
    """
    from pathlib import Path

    from .methods import initial_mim_model
    from .models import adapter_for

    if source.startswith("timm:"):
        name = source[len("timm:"):]
        size = img_size or 224
        adapter = adapter_for(name)
        holder = nn.Module()
        holder.encoder, holder.adapter = adapter.create(name, img_size=size, drop_path=0.0), adapter
        return holder.eval(), {"train": "", "val": "", "img_size": size}
    path = Path(source)
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        model, cfg = initial_mim_model(path)
    else:
        from .visualize import load_mim_model

        model, cfg = load_mim_model(path)
    size = img_size or cfg.data.img_size
    if size != cfg.data.img_size:
        model.set_img_size(size)
    return model.eval(), {"train": cfg.data.train, "val": cfg.data.val, "img_size": size}
