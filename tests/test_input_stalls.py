"""Input stalls: the training loop measures how long it waited for the loader, per window and per epoch."""
from __future__ import annotations

import json
import time

import pytest
import torch
from conftest import FunctionLoop

from fastmim_ds.config import OptimCfg, Resolved, TrainCfg
from fastmim_ds.loop import LoopState
from fastmim_ds.metrics import MetricsWriter
from fastmim_ds.optim import build_scheduler

pytestmark = [pytest.mark.usefixtures("one_rank_group"), pytest.mark.timeout(300)]

DELAY = 0.1  # s the slow loader sleeps before each batch


class SlowBatches:
    """(x, y) micro-batches with ``set_epoch``; sleeps ``delay`` s before yielding each one."""

    def __init__(self, n: int, delay: float):
        g = torch.Generator().manual_seed(1)
        self.data = [(torch.randn(4, 8, generator=g), torch.randn(4, 1, generator=g)) for _ in range(n)]
        self.delay, self.start = delay, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.start = start_batch

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self):
        for item in self.data[self.start:]:
            time.sleep(self.delay)
            yield item


def _run(tmp_path, delay: float) -> tuple[dict, list[dict]]:
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
           "zero_optimization": {"stage": 0}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    sched = build_scheduler(opt, OptimCfg(warmup_epochs=0), Resolved(1, 4, 1e-2, 0.0), epochs=1)
    loader = SlowBatches(6, delay)
    metrics = MetricsWriter(tmp_path / "metrics.jsonl", enabled=True)
    ends = []

    def end_epoch(epoch: int, stats: dict) -> None:  # what PretrainLoop / ClassifierLoop write
        ends.append(stats)
        metrics.write(epoch_end=epoch, data_wait_s=stats["data_wait_s"], data_wait_frac=stats["data_wait_frac"])

    def step(eng, x, y):
        time.sleep(0.01)  # some compute besides waiting
        return {"loss": torch.nn.functional.mse_loss(eng(x), y)}

    FunctionLoop(engine, loader=loader, updates=6, step_fn=step, end=end_epoch, state=LoopState(), scheduler=sched,
                 train=TrainCfg(log_every=2, ckpt_every=100), ckpt_dir=tmp_path / "ckpt", metrics=metrics,
                 show_progress=False).run(1)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return ends[0], rows


def test_loader_wait_measured_in_stats_and_metrics(tmp_path):
    stats, rows = _run(tmp_path, DELAY)
    # 6 batches, each 100 ms late: the loop waited at least 0.6 s, the larger part of the epoch (a step computes for
    # ~10 ms; the bound leaves room for a loaded machine, where DeepSpeed's step overhead grows)
    assert stats["data_wait_s"] >= 6 * DELAY * 0.95
    assert stats["data_wait_s"] <= stats["seconds"]
    assert stats["data_wait_frac"] == pytest.approx(stats["data_wait_s"] / stats["seconds"], rel=1e-6)
    assert 0.3 < stats["data_wait_frac"] <= 1.0
    steps = [r for r in rows if "step" in r]
    # per log window (2 steps) the share is noisier than the epoch's: the first window also pays DeepSpeed's first step
    assert len(steps) == 3 and all(0.1 < r["data_wait_frac"] <= 1.0 for r in steps)
    epoch_rows = [r for r in rows if "epoch_end" in r]
    assert epoch_rows and epoch_rows[0]["data_wait_s"] == pytest.approx(stats["data_wait_s"])
    assert epoch_rows[0]["data_wait_frac"] == pytest.approx(stats["data_wait_frac"])


def test_fast_loader_waits_little(tmp_path):
    stats, rows = _run(tmp_path, 0.0)
    assert 0.0 <= stats["data_wait_s"] < 0.05
    assert stats["data_wait_frac"] < 0.5
