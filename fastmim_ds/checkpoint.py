"""DeepSpeed checkpoints: atomic save, exact resume, and reading a pre-trained encoder back as fp32 weights.

Layout of a run: ``<run>/ckpt/<tag>/`` with ``tag = step%08d`` (optimizer steps done), written by
``engine.save_checkpoint`` on every rank (model states, ZeRO optimizer shards, ``client_state`` = progress,
config, git sha in ``mp_rank_00_model_states.pt``) plus one ``rng_rank%03d.pt`` per rank (torch/CUDA/numpy/python
RNG states, so masks and drop-path continue exactly). A tag is *complete* only when, after a barrier that every
rank reached having written its files, rank 0 has written ``<tag>/complete``; ``<run>/ckpt/latest`` is replaced
atomically after that. Resume takes the newest complete tag; a tag without the marker (a rank died while writing
it, or the disk filled up) is ignored with a warning and deleted at the next successful save.
"""
from __future__ import annotations

import io
import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .runtime import stdout_to_log

logger = logging.getLogger(__name__)

__all__ = [
    "save", "find_resume", "load", "complete_tags", "read_client_state", "resolve_tag_dir", "load_pretrained_encoder",
    "model_states_file", "read_module_state", "CKPT_SUBDIR", "COMPLETE",
]

CKPT_SUBDIR = "ckpt"
# DeepSpeed's file with the module weights and the client state: ZeRO 0-2 write one, ZeRO-3 one per rank
MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
COMPLETE = "complete"  # marker file, written last by rank 0
UNIVERSAL_VERSION = 0.2  # deepspeed.checkpoint universal_checkpoint_version for ZeRO-1/2 data-parallel checkpoints


def model_states_file(tag_dir: Path) -> Path | None:
    """The module/client-state file of a DeepSpeed tag folder (ZeRO 0-2, or rank 0's under ZeRO-3); None if absent."""
    return next((Path(tag_dir) / n for n in MODEL_STATES if (Path(tag_dir) / n).is_file()), None)


def read_module_state(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The module weights DeepSpeed stored in a tag's model-states file (complete for ZeRO-0 tags, whose weights live
    there rather than in optimizer shards)."""
    return torch.load(model_states_file(tag_dir), map_location="cpu", weights_only=False)["module"]


def _step_of(tag_dir: Path) -> int:
    m = re.search(r"(\d+)$", tag_dir.name)
    return int(m.group(1)) if m else -1


def _tags(ckpt_dir: Path) -> list[Path]:
    if not ckpt_dir.is_dir():
        return []
    return sorted((p for p in ckpt_dir.iterdir() if p.is_dir() and _step_of(p) >= 0), key=_step_of)


def complete_tags(ckpt_dir: Path) -> list[Path]:
    """Complete tag folders of ``ckpt_dir``, oldest first."""
    return [p for p in _tags(Path(ckpt_dir)) if (p / COMPLETE).is_file()]


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, ckpt_dir: Path, *, tag: str, client_state: dict, keep_last: int) -> Path:
    """Writes a complete checkpoint ``ckpt_dir/tag`` (all ranks must call); returns its folder.

    Every rank writes its DeepSpeed files and RNG state, all ranks meet at a barrier, then rank 0 writes the
    ``complete`` marker, replaces ``latest`` and deletes complete tags beyond the newest ``keep_last`` and any
    incomplete tag older than this one.

    Raises:
        OSError: writing failed (e.g. disk full); the tag stays incomplete and is ignored on resume.
    """
    ckpt_dir = Path(ckpt_dir)
    tag_dir = ckpt_dir / tag
    t0 = time.time()
    # what deepspeed.checkpoint.ds_to_universal requires to convert the tag (plain data parallelism: no patterns)
    client_state = {"universal_checkpoint_info": {"universal_checkpoint_version": UNIVERSAL_VERSION}, **client_state}
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    buf = _serialize(_rng_state())
    _atomic_write(tag_dir / f"rng_rank{engine.global_rank:03d}.pt", buf)
    if dist.is_initialized():
        dist.barrier()
    if engine.global_rank == 0:
        marker = {k: client_state.get(k) for k in ("epoch", "update", "global_step")}
        marker["world_size"] = dist.get_world_size() if dist.is_initialized() else 1
        _atomic_write(tag_dir / COMPLETE, json.dumps(marker).encode())
        _atomic_write(ckpt_dir / "latest", tag.encode())
        done = complete_tags(ckpt_dir)
        stale = [p for p in _tags(ckpt_dir) if not (p / COMPLETE).is_file() and _step_of(p) < _step_of(tag_dir)]
        for old in (done[:-keep_last] if keep_last > 0 else []) + stale:
            shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    logger.info("saved checkpoint %s (%.1f s)", tag_dir, time.time() - t0)
    return tag_dir


def _serialize(obj) -> bytes:
    f = io.BytesIO()
    torch.save(obj, f)
    return f.getvalue()


def find_resume(ckpt_dir: Path, resume: str | None) -> tuple[Path, str] | None:
    """Resolves ``--resume``: ``auto`` -> the newest complete tag in ``ckpt_dir`` (or None); a path -> that tag.

    Incomplete tags newer than the chosen one are reported (warning) and skipped.

    Raises:
        FileNotFoundError: an explicit path that is no run folder, ``<run>/ckpt`` or tag folder.
        ValueError: an explicit tag folder that is incomplete.
    """
    if not resume:
        return None
    if resume == "auto":
        ckpt_dir = Path(ckpt_dir)
        done = complete_tags(ckpt_dir)
        newest = _step_of(done[-1]) if done else -1
        for p in _tags(ckpt_dir):
            if not (p / COMPLETE).is_file() and _step_of(p) > newest:
                logger.warning("ignoring partial checkpoint %s (no '%s' marker: a rank stopped while writing it)",
                               p, COMPLETE)
        if not done:
            return None
        return ckpt_dir, done[-1].name
    tag_dir = resolve_tag_dir(Path(resume))
    if not (tag_dir / COMPLETE).is_file():
        raise ValueError(f"{tag_dir} is an incomplete checkpoint (no '{COMPLETE}' marker); pick another tag")
    return tag_dir.parent, tag_dir.name


def load(engine, ckpt_dir: Path, tag: str) -> dict:
    """Loads model, optimizer and DeepSpeed state on every rank, restores this rank's RNG; returns the client state.

    Raises:
        FileNotFoundError: DeepSpeed could not load the tag.
        ValueError: the checkpoint was written with another number of ranks (ZeRO shards do not re-partition;
            convert it with DeepSpeed's universal checkpoint tools or resume on the same world size).
    """
    tag_dir = Path(ckpt_dir) / tag
    marker = json.loads((tag_dir / COMPLETE).read_text()) if (tag_dir / COMPLETE).is_file() else {}
    world = dist.get_world_size() if dist.is_initialized() else 1
    if marker.get("world_size", world) != world:
        raise ValueError(f"{tag_dir} was written by {marker['world_size']} ranks, this run has {world}")
    path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise FileNotFoundError(f"could not load checkpoint {tag_dir}")
    rng = tag_dir / f"rng_rank{engine.global_rank:03d}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, map_location="cpu", weights_only=False))
    else:
        logger.warning("%s missing: random streams (masks, drop-path) restart from the seed", rng.name)
    logger.info("resumed from %s (epoch %s, step %s)", tag_dir, client.get("epoch"), client.get("global_step"))
    return client


def read_client_state(tag_dir: Path) -> dict:
    """Client state (epoch, step, config, ...) of a checkpoint tag folder, without building an engine.

    The file is memory-mapped: only the pickled structure is read, not the weights (a resume reads them once, in
    DeepSpeed's ``load_checkpoint``).
    """
    path = model_states_file(tag_dir)
    if path is None:
        raise FileNotFoundError(f"{tag_dir}: no DeepSpeed model states ({' or '.join(MODEL_STATES)})")
    state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    known = {"module", "buffer_names", "optimizer", "lr_scheduler", "param_shapes", "frozen_param_shapes",
             "frozen_param_fragments", "shared_params", "sparse_tensor_module_names", "skipped_steps",
             "global_steps", "global_samples", "dp_world_size", "mp_world_size", "ds_config", "ds_version",
             "data_sampler", "random_ltd", "universal_checkpoint_info"}
    return {k: v for k, v in state.items() if k not in known}


def resolve_tag_dir(path: Path) -> Path:
    """Tag folder of a run folder or ``<run>/ckpt`` (its newest complete tag), or a tag folder itself.

    Raises:
        FileNotFoundError: none of these.
    """
    path = Path(path)
    if model_states_file(path):
        return path
    for ckpt_dir in (path, path / CKPT_SUBDIR):
        done = complete_tags(ckpt_dir)
        if done:
            return done[-1]
    raise FileNotFoundError(f"{path}: no complete checkpoint found (expected a run folder, <run>/ckpt or a tag folder)")


def load_pretrained_encoder(path: str | Path, prefix: str = "encoder.") -> tuple[dict[str, torch.Tensor], dict]:
    """Reads the fp32 encoder weights of a pre-training run.

    Args:
        path: run folder, ``<run>/ckpt``, a tag folder, a ``.pth``/``.safetensors`` state dict (keys with or
            without ``prefix``), or a pre-training YAML config: its model as the run would start (untrained, seeded
            with ``train.seed``), the baseline that shows what pre-training added.
        prefix: module prefix of the encoder inside the MIM model.

    Returns:
        (state dict with ``prefix`` stripped, pre-training config dict or {} for plain files).

    Raises:
        FileNotFoundError: nothing loadable at ``path``.
    """
    path = Path(path)
    if path.is_file() and path.suffix in (".yaml", ".yml"):  # the untrained baseline: the run's initialisation
        from .config import to_dict
        from .methods import initial_mim_model

        model, pre_cfg = initial_mim_model(path)
        state, cfg = model.state_dict(), to_dict(pre_cfg)
    elif path.is_file():
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state, cfg = load_file(str(path)), {}
        else:
            obj = torch.load(path, map_location="cpu", weights_only=False)
            state = obj.get("model", obj.get("module", obj)) if isinstance(obj, dict) else obj
            cfg = obj.get("config", {}) if isinstance(obj, dict) else {}
    else:
        tag_dir = resolve_tag_dir(path)
        cfg = read_client_state(tag_dir).get("config", {})
        try:  # fp32 master weights, consolidated from the ZeRO shards
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            with stdout_to_log(logger, stderr=True):  # "Reconstructed fp32 state dict ...", progress bars, per rank
                state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        except (ValueError, FileNotFoundError, KeyError, AssertionError, TypeError) as e:  # ZeRO-0: in the module
            logger.info("no ZeRO shards in %s (%s); reading module weights", tag_dir, e)
            state = read_module_state(tag_dir)
    has_prefix = any(k.startswith(prefix) for k in state)
    enc = {k[len(prefix):] if has_prefix else k: v.float() for k, v in state.items()
           if k.startswith(prefix) or not has_prefix}
    return enc, cfg
