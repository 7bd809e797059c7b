"""Run metrics: ``metrics.jsonl`` rows (rank 0), forwarded to DeepSpeed's monitors, cross-rank averages, a tqdm bar
with img/s and ETA."""
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

    Args:
        path: the ``metrics.jsonl`` file; ``None`` disables writing.
        enabled: write at all (rank 0).
        monitor: DeepSpeed's ``engine.monitor`` (``MonitorMaster``); when enabled (``train.tensorboard`` /
            ``train.csv_monitor``), every numeric field of a row except the x-axes goes to it as
            ``("Train/<key>", value, step)``; rows without ``step`` (epoch summaries) use the last step written.
        trackers: :mod:`fastmim_ds.trackers` (wandb, MLflow) fed every numeric field except ``step`` (x-axes
            included: ``epoch``, ``epoch_1000x``, ``relative_time``, ``epoch_end``) as ``{key: float}`` at the row's
            step (the last step written for rows without one); bools and strings are left out. :meth:`close` ends
            their runs.
    """

    X_AXES = ("step", "epoch", "epoch_1000x", "epoch_end", "relative_time")

    def __init__(self, path: Path | None, *, enabled: bool, monitor=None, trackers=()):
        self.path, self.enabled = path, enabled and path is not None
        self.monitor = monitor if enabled and monitor is not None and getattr(monitor, "enabled", False) else None
        self.trackers = list(trackers) if self.enabled else []
        self.t0 = time.time()
        self.last_step = 0

    def write(self, **row) -> None:
        if not self.enabled:
            return
        row = {"relative_time": round(time.time() - self.t0, 3), **row}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.last_step = int(row.get("step", self.last_step))
        if self.monitor is not None:
            events = [(f"Train/{k}", float(v), self.last_step) for k, v in row.items()
                      if k not in self.X_AXES and isinstance(v, (int, float)) and not isinstance(v, bool)]
            if events:
                self.monitor.write_events(events)
        if self.trackers:
            values = {k: float(v) for k, v in row.items()
                      if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
            for tracker in self.trackers:
                tracker.log(values, self.last_step)

    def close(self) -> None:
        """Ends the trackers' runs (wandb ``finish``, MLflow ``set_terminated``); the writer logs nothing after."""
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def progress(iterable, *, total: int, desc: str, enabled: bool, images_per_item: int | None = None):
    """tqdm bar with rate and ETA, shown only where ``enabled`` (rank 0).

    The bar counts images (rate in img/s, summed over ranks) when ``images_per_item`` is given or the iterable
    has a ``loader.batch_size`` (:class:`~fastmim_ds.data.loaders.FFCVLoader`): one item = one batch per rank,
    scaled by the world size. Otherwise it counts items (it/s).
    """
    if images_per_item is None:
        images_per_item = getattr(getattr(iterable, "loader", None), "batch_size", None)
        if images_per_item is not None and dist.is_initialized():
            images_per_item *= dist.get_world_size()
    unit = dict(unit="img", unit_scale=images_per_item) if images_per_item else dict(unit="it")
    return tqdm(iterable, total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False,
                mininterval=2.0, **unit)
