"""Experiment trackers fed by :class:`~fastmim_ds.metrics.MetricsWriter`: Weights & Biases and MLflow (rank 0).

Every numeric field of a ``metrics.jsonl`` row except ``step`` is logged under its own name (``loss``, ``lr``,
``img_per_s``, ``epoch``, ``epoch_1000x``, ``relative_time``, ``train_loss``, ``val_top1``, ...) at the row's
``step`` (optimizer steps); rows without ``step`` (epoch summaries) use the last step written. TensorBoard and the
CSV monitor stay DeepSpeed's (``train.tensorboard`` / ``train.csv_monitor``).

* ``train.wandb``: ``wandb.init(project=train.wandb_project, name=train.wandb_run_name or <run folder name>,
  tags=train.wandb_tags, entity=train.wandb_entity or None, dir=<run>, config=<the experiment config>)``. The
  run id is kept in ``<run>/wandb_id``: a resumed run (``--resume``) continues the same wandb run. Offline:
  ``WANDB_MODE=offline`` (files under ``<run>/wandb/``, upload later with ``wandb sync``).
* ``train.mlflow``: one MLflow run in experiment ``train.mlflow_experiment`` of ``train.mlflow_uri``; empty:
  the local SQLite file ``<output_dir>/mlflow.db`` (no server; ``mlflow ui --backend-store-uri
  sqlite:///<output_dir>/mlflow.db``). MLflow >= 3.7 refuses the plain ``./mlruns`` file store unless
  ``MLFLOW_ALLOW_FILE_STORE=true``, so the local default is SQLite. The run id is kept in ``<run>/mlflow_run_id``
  (a resumed run continues it); the config goes in as dotted params.

DeepSpeed's own wandb monitor is not used: it cannot name or tag a run and logs its lr events at a step counted in
samples, which wandb (steps must not decrease) would mix with the optimizer steps of metrics.jsonl.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Protocol

from .config import ConfigError, TrainCfg

logger = logging.getLogger(__name__)

__all__ = ["Tracker", "WandbTracker", "MlflowTracker", "build_trackers", "check_tracker_packages",
           "default_mlflow_uri"]


class Tracker(Protocol):
    def log(self, values: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def check_tracker_packages(train: TrainCfg) -> None:
    """Raises :class:`ConfigError` (one line) when ``train.wandb`` / ``train.mlflow`` is on without its package."""
    import importlib.util

    for key, pkg in (("wandb", "wandb"), ("mlflow", "mlflow")):
        if getattr(train, key) and importlib.util.find_spec(pkg) is None:
            raise ConfigError(f"train.{key}: needs the {pkg} package (pip install {pkg}, or the project's [track] "
                              "extra)")


def default_mlflow_uri(output_dir: str | Path) -> str:
    """``sqlite:///<absolute output_dir>/mlflow.db``: the tracking store used when ``train.mlflow_uri`` is empty."""
    return f"sqlite:///{(Path(output_dir).absolute() / 'mlflow.db').as_posix()}"


def _flatten(config: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in config.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:6000]  # MLflow's param value limit
    return out


class WandbTracker:
    """A wandb run in ``run_dir/wandb`` (resumed when ``run_dir/wandb_id`` exists)."""

    def __init__(self, run_dir: Path, *, project: str, name: str, tags: tuple[str, ...], entity: str, config: dict):
        import wandb

        id_file = Path(run_dir) / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else None  # None: wandb makes a new id
        self.run = wandb.init(project=project, name=name or Path(run_dir).name, tags=list(tags) or None,
                              entity=entity or None, config=config, dir=str(run_dir), id=run_id, resume="allow")
        id_file.write_text(self.run.id)
        self.last_step = -1

    def log(self, values: dict[str, float], step: int) -> None:
        if step < self.last_step:  # a resumed run repeats steps after its checkpoint: wandb would drop them noisily
            return
        self.last_step = step
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    """An MLflow run (resumed when ``run_dir/mlflow_run_id`` exists), written through ``MlflowClient``."""

    def __init__(self, run_dir: Path, *, uri: str, experiment: str, name: str, config: dict):
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        id_file = Path(run_dir) / "mlflow_run_id"
        if id_file.is_file():
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(experiment)
            run = self.client.create_run(exp_id, run_name=name or Path(run_dir).name,
                                         tags={"run_dir": str(Path(run_dir).absolute())})
            self.run_id = run.info.run_id
            from mlflow.entities import Param

            params = [Param(k, v) for k, v in _flatten(config).items()]
            for i in range(0, len(params), 100):  # MLflow's batch limit
                self.client.log_batch(self.run_id, params=params[i:i + 100])
            id_file.write_text(self.run_id)

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, ts, step) for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def build_trackers(train: TrainCfg, run_dir: Path, *, config: dict, enabled: bool) -> list[Tracker]:
    """The trackers ``train`` asks for (none where ``enabled`` is False: ranks other than 0).

    Args:
        run_dir: the run folder (must exist): wandb files and the tracker run ids go there.
        config: the experiment config as a plain dict (:func:`~fastmim_ds.config.to_dict`).

    Raises:
        ConfigError: a tracker without its package.
    """
    if not enabled:
        return []
    check_tracker_packages(train)
    trackers: list[Tracker] = []
    if train.wandb:
        trackers.append(WandbTracker(run_dir, project=train.wandb_project, name=train.wandb_run_name,
                                     tags=train.wandb_tags, entity=train.wandb_entity, config=config))
    if train.mlflow:
        trackers.append(MlflowTracker(run_dir, uri=train.mlflow_uri or default_mlflow_uri(train.output_dir),
                                      experiment=train.mlflow_experiment, name=train.mlflow_run_name,
                                      config=config))
    return trackers
