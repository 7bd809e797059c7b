"""DeepSpeed engine creation: engine knobs from ``ds_configs/*.json``, batch fields from the experiment config."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn as nn

from .config import ConfigError, TrainCfg

logger = logging.getLogger(__name__)

__all__ = ["BATCH_KEYS", "load_ds_config", "build_ds_config", "create_engine", "compile_model"]

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def load_ds_config(path: str) -> dict:
    """Reads a ``ds_configs`` JSON file.

    Raises:
        ConfigError: file missing, invalid JSON, batch keys or an optimizer/scheduler section inside (those come
            from the experiment config), or fp16 (use bf16: no loss scaling, same range as fp32).
    """
    p = Path(path)
    if not p.is_file():
        choices = ", ".join(sorted(map(str, Path("ds_configs").glob("*.json"))))
        raise ConfigError(f"train.ds_config: file not found: {p} (choices: {choices})")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"train.ds_config: {p} is not valid JSON ({e})") from None
    bad = [k for k in (*BATCH_KEYS, "optimizer", "scheduler", "gradient_clipping") if k in cfg]
    if bad:
        raise ConfigError(
            f"train.ds_config: {p} sets {', '.join(bad)}; remove them: batch sizes come from train.micro_batch/"
            "train.grad_accum, the optimizer and lr schedule from optim.*, clipping from optim.clip_grad"
        )
    if cfg.get("fp16", {}).get("enabled"):
        raise ConfigError(f"train.ds_config: {p} enables fp16; use a bf16 config (ds_configs/zero2_bf16.json)")
    return cfg


def build_ds_config(train: TrainCfg, *, clip_grad: float, world_size: int, run_dir: Path | None = None) -> dict:
    """The engine config passed to ``deepspeed.initialize`` (batch triple consistent by construction).

    With ``train.tensorboard`` / ``train.csv_monitor`` and a ``run_dir``, DeepSpeed's monitors write to
    ``<run_dir>/tensorboard/`` and ``<run_dir>/csv/`` (DeepSpeed ``tensorboard`` / ``csv_monitor`` sections:
    ``output_path`` + ``job_name``); rank 0 only.

    Raises:
        ConfigError: ``train.tensorboard`` without the ``tensorboard`` package.
    """
    cfg = load_ds_config(train.ds_config)
    cfg.update(
        train_micro_batch_size_per_gpu=train.micro_batch,
        gradient_accumulation_steps=train.grad_accum,
        train_batch_size=train.micro_batch * train.grad_accum * world_size,
        gradient_clipping=clip_grad,  # explicit: DeepSpeed >= 0.19.3 defaults it to 1.0
    )
    if run_dir is not None:
        if train.tensorboard:
            try:
                import tensorboard  # noqa: F401  (DeepSpeed's TensorBoardMonitor imports it on rank 0 only)
            except ImportError:
                raise ConfigError("train.tensorboard: needs the tensorboard package "
                                  "(pip install tensorboard, or the project's [monitor] extra)") from None
            cfg["tensorboard"] = {"enabled": True, "output_path": str(run_dir), "job_name": "tensorboard"}
        if train.csv_monitor:
            cfg["csv_monitor"] = {"enabled": True, "output_path": str(run_dir), "job_name": "csv"}
    return cfg


def create_engine(model: nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict, *, compile: bool = False,
                  compile_backend: str = ""):
    """``deepspeed.initialize`` with a client optimizer; returns the engine (its ``module`` is ``model``).

    Args:
        compile: ``engine.compile()`` (``train.compile``): DeepSpeed compiles the module *in place*
            (``nn.Module.compile``), so ``engine.module`` stays ``model`` and its ``state_dict`` keys (checkpoints,
            export) get no ``_orig_mod.`` prefix. Compilation happens at the first forward, with static shapes: a
            new input shape (FastMIM-P stage, a smaller last evaluation batch) compiles once more.
        compile_backend: torch.compile backend; empty: the accelerator's (inductor on CUDA and CPU).
    """
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if compile:
        compile_model(engine, compile_backend)
    return engine


def compile_model(engine, backend: str = "") -> None:
    """Compiles ``engine.module`` in place with DeepSpeed's ``engine.compile`` (see :func:`create_engine`)."""
    from deepspeed.accelerator import get_accelerator

    backend = backend or get_accelerator().get_compile_backend()
    # static shapes: one graph per input size (a FastMIM-P stage, the last evaluation batch) rather than a dynamic-
    # shape graph, whose fake-tensor tracing fails on the mask generator's torch.rand of a symbolic size (torch 2.14)
    engine.compile(backend=backend, compile_kwargs={"dynamic": False})
    logger.info("torch.compile (backend %s): the first steps compile the model", backend)
