"""Run metrics: ``metrics.jsonl`` rows (rank 0), cross-rank averages, a tqdm bar with img/s."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

__all__ = ["MetricsWriter", "all_reduce_sum", "progress"]


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sums a list of floats over ranks (fp64); identity without torch.distributed."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


class MetricsWriter:
    """Appends one JSON object per call to ``path`` (rank 0 only), adding ``relative_time`` in seconds.

    Rows carry ``step`` (optimizer steps), ``epoch`` and ``epoch_1000x`` (MAE: an integer x-axis that compares
    runs of different batch sizes) when given.
    """

    def __init__(self, path: Path | None, *, enabled: bool):
        self.path, self.enabled = path, enabled and path is not None
        self.t0 = time.time()

    def write(self, **row) -> None:
        if not self.enabled:
            return
        row = {"relative_time": round(time.time() - self.t0, 3), **row}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def progress(iterable, *, total: int, desc: str, enabled: bool):
    """tqdm bar with the given description, shown only where ``enabled`` (rank 0)."""
    return tqdm(iterable, total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False,
                mininterval=2.0, unit="it")
