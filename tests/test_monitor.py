"""DeepSpeed monitors from the experiment config: TensorBoard events and CSV files next to metrics.jsonl, carrying
DeepSpeed's own lr events and every numeric metrics.jsonl field (1-rank engine, in-process, CPU)."""
from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import REPO

from fastmim_ds.config import ConfigError, TrainCfg
from fastmim_ds.ds_engine import build_ds_config, create_engine
from fastmim_ds.metrics import MetricsWriter

pytestmark = [pytest.mark.usefixtures("one_rank_group"), pytest.mark.timeout(120)]
DS_FP32 = str(REPO / "ds_configs" / "zero2_fp32.json")


def test_monitor_sections_follow_the_config(tmp_path):
    train = TrainCfg(ds_config=DS_FP32, micro_batch=4, csv_monitor=True)
    ds = build_ds_config(train, clip_grad=0.0, world_size=1, run_dir=tmp_path)
    assert ds["csv_monitor"] == {"enabled": True, "output_path": str(tmp_path), "job_name": "csv"}
    assert "tensorboard" not in ds
    assert "csv_monitor" not in build_ds_config(TrainCfg(ds_config=DS_FP32), clip_grad=0.0, world_size=1,
                                                run_dir=tmp_path)


def test_tensorboard_without_package_is_a_config_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == "tensorboard":
            raise ImportError("no tensorboard")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ConfigError, match="train.tensorboard: needs the tensorboard package"):
        build_ds_config(TrainCfg(ds_config=DS_FP32, tensorboard=True), clip_grad=0.0, world_size=1, run_dir=tmp_path)


def test_engine_monitors_write_events_and_csv(tmp_path):
    pytest.importorskip("tensorboard")
    train = TrainCfg(ds_config=DS_FP32, micro_batch=4, tensorboard=True, csv_monitor=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    engine = create_engine(model, torch.optim.AdamW(model.parameters(), lr=1e-2),
                           build_ds_config(train, clip_grad=0.0, world_size=1, run_dir=tmp_path))
    metrics = MetricsWriter(tmp_path / "metrics.jsonl", enabled=True, monitor=engine.monitor)
    for step in range(1, 4):
        loss = engine(torch.randn(4, 8)).pow(2).mean()
        engine.backward(loss)
        engine.step()
        metrics.write(step=step, epoch=0, epoch_1000x=step * 100, lr=engine.get_lr()[0], loss=float(loss.detach()))
    metrics.write(epoch_end=0, train_loss=0.5, flag=True, note="text")  # epoch row: the last step as x
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4

    with open(tmp_path / "csv" / "Train_loss.csv") as f:
        loss_rows = list(csv.reader(f))
    assert loss_rows[0] == ["step", "loss"] and [int(r[0]) for r in loss_rows[1:]] == [1, 2, 3]
    assert [float(r[1]) for r in loss_rows[1:]] == pytest.approx([r["loss"] for r in rows[:3]])
    with open(tmp_path / "csv" / "Train_train_loss.csv") as f:
        assert list(csv.reader(f))[1] == ["3", "0.5"]
    assert (tmp_path / "csv" / "Train_Samples_lr.csv").is_file()  # DeepSpeed's own event, per optimizer step
    assert not (tmp_path / "csv" / "Train_flag.csv").exists() and not (tmp_path / "csv" / "Train_step.csv").exists()
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert {"Train/loss", "Train/lr", "Train/train_loss", "Train/Samples/lr"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("Train/loss")] == [1, 2, 3]


def test_disabled_writer_forwards_nothing(tmp_path):
    class Recorder:
        enabled = True
        events: list = []

        def write_events(self, events):
            self.events.extend(events)

    rec = Recorder()
    MetricsWriter(tmp_path / "m.jsonl", enabled=False, monitor=rec).write(step=1, loss=1.0)  # not rank 0
    assert rec.events == [] and not (tmp_path / "m.jsonl").exists()
    MetricsWriter(tmp_path / "m.jsonl", enabled=True, monitor=rec).write(step=7, loss=2.0, img_per_s=3)
    assert rec.events == [("Train/loss", 2.0, 7), ("Train/img_per_s", 3.0, 7)]
