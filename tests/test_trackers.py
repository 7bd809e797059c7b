"""Experiment trackers (wandb offline, MLflow on a temporary local store): every numeric metrics.jsonl field except
``step`` is logged under its name at the row's optimizer step, read back from what the trackers wrote."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import wandb_history

from fastmim_ds.config import ConfigError, PretrainCfg, TrainCfg, load_config
from fastmim_ds.metrics import MetricsWriter
from fastmim_ds.trackers import build_trackers, check_tracker_packages, default_mlflow_uri

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_CODE", "true")


def _rows(writer: MetricsWriter, steps) -> None:
    for s in steps:
        writer.write(step=s, epoch=0, epoch_1000x=s * 250, lr=1e-3 * s, loss=2.0 / s, img_per_s=100.0 + s,
                     skipped_steps=0)
    writer.write(epoch_end=0, train_loss=0.75, img_per_s=99.0, img_size=64, note="text", flag=True)


def test_config_keys_are_typed():
    cfg = load_config(PretrainCfg, None, ["train.wandb=true", "train.wandb_tags=[a, b]", "train.mlflow=true",
                                          "train.wandb_project=proj"])
    assert cfg.train.wandb and cfg.train.mlflow and cfg.train.wandb_tags == ("a", "b")
    with pytest.raises(ConfigError, match="train.wandb: expected true/false"):
        load_config(PretrainCfg, None, ["train.wandb=yes please"])
    with pytest.raises(ConfigError, match=r"train.wandb_tags\[0\]: expected a string"):
        load_config(PretrainCfg, None, ["train.wandb_tags=[1]"])
    assert default_mlflow_uri("out") == f"sqlite:///{(Path('out').absolute() / 'mlflow.db').as_posix()}"


def test_missing_package_is_one_config_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"^train.mlflow: needs the mlflow package \(pip install mlflow"):
        check_tracker_packages(TrainCfg(mlflow=True))
    check_tracker_packages(TrainCfg())  # off: nothing needed


def test_other_ranks_build_no_tracker(tmp_path):
    assert build_trackers(TrainCfg(wandb=True, mlflow=True), tmp_path, config={}, enabled=False) == []
    assert not list(tmp_path.iterdir())


def test_wandb_and_mlflow_log_every_numeric_field_at_its_step(tmp_path, offline):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    run_dir, uri = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir.mkdir()
    train = TrainCfg(output_dir=str(tmp_path), wandb=True, wandb_project="proj", wandb_run_name="tiny",
                     wandb_tags=("vit", "ci"), mlflow=True, mlflow_uri=uri, mlflow_experiment="exp")
    config = {"train": {"epochs": 2, "wandb_tags": ["vit", "ci"]}, "method": "fastmim"}
    writer = MetricsWriter(run_dir / "metrics.jsonl", enabled=True,
                           trackers=build_trackers(train, run_dir, config=config, enabled=True))
    _rows(writer, [1, 2, 3])
    writer.close()
    # a resumed run (same run folder) continues both tracker runs; a repeated step is not sent to wandb again
    writer = MetricsWriter(run_dir / "metrics.jsonl", enabled=True,
                           trackers=build_trackers(train, run_dir, config=config, enabled=True))
    _rows(writer, [4])
    writer.close()

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged_rows: list[tuple[int, dict]] = []  # (step, numeric fields) of every row, in order
    last = 0
    for r in rows:
        last = r.get("step", last)
        logged_rows.append((last, {k: float(v) for k, v in r.items() if k != "step"
                                   and isinstance(v, (int, float)) and not isinstance(v, bool)}))
    expected: dict[int, dict] = {}  # wandb: one history row per step (an epoch row joins its step's row)
    for step, values in logged_rows:
        expected.setdefault(step, {}).update(values)
    assert sorted(expected) == [1, 2, 3, 4] and "train_loss" in expected[3] and "note" not in expected[3]

    wb_run, history = wandb_history(run_dir)
    assert wb_run == {"id": (run_dir / "wandb_id").read_text(), "name": "tiny", "project": "proj",
                      "tags": ["vit", "ci"]}
    assert len(list(run_dir.glob("wandb/offline-run-*"))) == 2  # the resumed process wrote to the same run id
    assert sorted(history) == [1, 2, 3, 4]
    for step, values in expected.items():
        assert history[step] == pytest.approx(values), step

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run((run_dir / "mlflow_run_id").read_text())
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "exp"
    assert run.data.params["train.epochs"] == "2" and run.data.params["method"] == "fastmim"
    assert set(run.data.metrics) == {k for v in expected.values() for k in v}
    for key in run.data.metrics:
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert logged == sorted((s, v[key]) for s, v in logged_rows if key in v), key
    assert len(client.search_runs([run.info.experiment_id])) == 1
