"""Setting up a run, the same for pre-training, fine-tuning and linear probing.

:func:`start_run` does, in this order: distributed init, the task's pre-launch checks, the run folder, finding the
checkpoint to resume (and checking it fits the config), ``config.yaml``, ``log.txt`` logging, per-rank seeding. The
task builds its model only after it, so everything the model build logs reaches ``log.txt``. :func:`open_metrics`
opens ``metrics.jsonl`` with DeepSpeed's monitors and the experiment trackers.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .checkpoint import CKPT_SUBDIR, find_resume, load, read_client_state, written_world_size
from .checks import check_resume_compatible
from .config import Resolved, dump_yaml, to_dict
from .metrics import MetricsWriter
from .runtime import Dist, init_distributed, make_run_dir, seed_everything, setup_logging
from .trackers import build_trackers

logger = logging.getLogger(__name__)

__all__ = ["Run", "start_run", "open_metrics"]


@dataclass(frozen=True)
class Run:
    """One rank's view of a started run."""

    dist: Dist
    derived: Resolved  # effective batch, lr (first stage)
    dir: Path  # the run folder
    resume_from: tuple[Path, str] | None  # (ckpt dir, tag) to resume, or None for a fresh start

    @property
    def ckpt_dir(self) -> Path:
        return self.dir / CKPT_SUBDIR

    @property
    def resume_tag(self) -> Path | None:
        """The tag folder resumed from (None for a fresh start)."""
        return self.resume_from[0] / self.resume_from[1] if self.resume_from else None

    def load(self, engine) -> dict:
        """Restores ``engine`` (weights, optimizer, lr schedule, this rank's RNG) from :attr:`resume_from`; returns
        the checkpoint's client state ({} for a fresh start).

        A checkpoint of another number of ranks is re-partitioned (:func:`~fastmim_ds.checkpoint.load`), and one
        warning says what that changes: the effective batch and with it the peak lr (blr x batch / 256); the lr
        schedule keeps its position in epochs.
        """
        if not self.resume_from:
            return {}
        client = load(engine, *self.resume_from)
        written = written_world_size(self.resume_tag)
        if written and written != self.dist.world_size:
            train = client.get("config", {}).get("train", {})
            old = train.get("micro_batch", 0) * train.get("grad_accum", 1) * written
            logger.warning("resumed with world size %d from a checkpoint of world size %d: effective batch %d -> %d "
                           "images per step, peak lr %.3g (blr x %d / 256); the lr schedule continues at the same "
                           "epoch fraction", self.dist.world_size, written, old, self.derived.eff_batch,
                           self.derived.lr, self.derived.eff_batch)
        return client


def start_run(cfg, *, check: Callable[[object, int], Resolved], default_name: str, resume: str | None,
              zero_stage: int | None = None) -> Run:
    """Starts a run of ``cfg`` on this rank (collective: every rank calls it).

    Args:
        cfg: the whole task config (``train.output_dir``, ``train.run_name``, ``train.seed``; saved as
            ``config.yaml``, compared with a resumed checkpoint's).
        check: ``check(cfg, world_size) -> Resolved``, the task's pre-launch checks.
        default_name: the run folder's name when ``train.run_name`` is empty (a timestamp is prepended).
        resume: ``--resume`` (a run folder, a tag or ``auto``), or None.
        zero_stage: the ZeRO stage the task's engine will run (None: ``train.ds_config``'s); a checkpoint of
            another world size must agree on ZeRO-0 vs 1-3.

    Raises:
        ConfigError: from ``check``, or a checkpoint to resume that another config wrote.
    """
    dist = init_distributed()
    derived = check(cfg, dist.world_size)
    run_dir = make_run_dir(cfg.train.output_dir, cfg.train.run_name, default_name, resume=resume)
    found = find_resume(run_dir / CKPT_SUBDIR, resume)
    if found:
        tag = found[0] / found[1]
        check_resume_compatible(cfg, read_client_state(tag).get("config", {}), tag, world_size=dist.world_size,
                                zero_stage=zero_stage)
    if dist.is_main:
        (run_dir / CKPT_SUBDIR).mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_yaml(cfg, derived))
    setup_logging(dist.rank, run_dir / "log.txt" if dist.is_main else None)
    seed_everything(cfg.train.seed + dist.rank)  # per-rank masks, drop-path and heads differ; data order is seeded
    return Run(dist=dist, derived=derived, dir=run_dir, resume_from=found)


def open_metrics(cfg, run: Run, engine) -> MetricsWriter:
    """``<run>/metrics.jsonl`` (rank 0), mirrored to DeepSpeed's monitors and the configured trackers."""
    return MetricsWriter(run.dir / "metrics.jsonl", enabled=run.dist.is_main, monitor=engine.monitor,
                         trackers=build_trackers(cfg.train, run.dir, config=to_dict(cfg), enabled=run.dist.is_main))
