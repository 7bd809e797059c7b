"""DeepSpeed checkpoints: atomic save, exact resume, finding and reading tags (weights: :mod:`fastmim_ds.weights`).

Layout of a run: ``<run>/ckpt/<tag>/`` with ``tag = step%08d`` (optimizer steps done), written by
``engine.save_checkpoint`` on every rank (model states, ZeRO optimizer shards, ``client_state`` = progress,
config, git sha in ``mp_rank_00_model_states.pt``) plus one ``rng_rank%03d.pt`` per rank (torch/CUDA/numpy/python
RNG states, so masks and drop-path continue exactly). A tag is *complete* only when, after a barrier that every
rank reached having written its files, rank 0 has written ``<tag>/complete``; ``<run>/ckpt/latest`` is replaced
atomically after that. Resume takes the newest complete tag; a tag without the marker (a rank died while writing
it, or the disk filled up) is ignored with a warning and deleted at the next successful save.

Resuming on another number of ranks (:func:`load`): ZeRO-1/2/3 shards do not re-partition, so rank 0 converts the
tag once with DeepSpeed's ``ds_to_universal`` into ``<run>/ckpt/<tag>_universal/`` (reused when present; deleted with
the tag) and every rank loads that with DeepSpeed's ``load_universal``; ZeRO-0 tags hold the whole optimizer state
and load as they are. The RNG states of the old ranks do not carry over: every rank seeds its streams from
(``train.seed``, global step, rank) (:func:`rng_seed_for`).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .config import ConfigError
from .runtime import seed_everything

logger = logging.getLogger(__name__)

__all__ = [
    "save", "find_resume", "load", "complete_tags", "read_client_state", "resolve_tag_dir",
    "model_states_file", "written_world_size", "zero_stage", "repartition_refusal", "convert_to_universal",
    "universal_dir", "universal_command", "rng_seed_for", "CKPT_SUBDIR", "COMPLETE", "UNIVERSAL_SUFFIX",
]

CKPT_SUBDIR = "ckpt"
# DeepSpeed's file with the module weights and the client state: ZeRO 0-2 write one, ZeRO-3 one per rank
MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
COMPLETE = "complete"  # marker file, written last by rank 0
UNIVERSAL_VERSION = 0.2  # deepspeed.checkpoint universal_checkpoint_version for ZeRO-1/2 data-parallel checkpoints
# <ckpt>/<tag>_universal: the tag in DeepSpeed's universal format (resume on another world size). Beside the tag, not
# inside: ds_to_universal reads every file under its input folder (os.walk).
UNIVERSAL_SUFFIX = "_universal"


def model_states_file(tag_dir: Path) -> Path | None:
    """The module/client-state file of a DeepSpeed tag folder (ZeRO 0-2, or rank 0's under ZeRO-3); None if absent."""
    return next((Path(tag_dir) / n for n in MODEL_STATES if (Path(tag_dir) / n).is_file()), None)


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
        marker = {k: client_state.get(k) for k in ("epoch", "update", "global_step", "samples")}
        marker["world_size"] = dist.get_world_size() if dist.is_initialized() else 1
        _atomic_write(tag_dir / COMPLETE, json.dumps(marker).encode())
        _atomic_write(ckpt_dir / "latest", tag.encode())
        done = complete_tags(ckpt_dir)
        stale = [p for p in _tags(ckpt_dir) if not (p / COMPLETE).is_file() and _step_of(p) < _step_of(tag_dir)]
        for old in (done[:-keep_last] if keep_last > 0 else []) + stale:
            shutil.rmtree(old, ignore_errors=True)
        for conv in ckpt_dir.glob(f"*{UNIVERSAL_SUFFIX}"):  # conversions whose tag is gone, or cut short
            if not (ckpt_dir / conv.name[:-len(UNIVERSAL_SUFFIX)]).is_dir():
                shutil.rmtree(conv, ignore_errors=True)
        for conv in ckpt_dir.glob(f".*{UNIVERSAL_SUFFIX}.*.tmp"):
            shutil.rmtree(conv, ignore_errors=True)
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
    """Loads model, optimizer and DeepSpeed state on every rank (all ranks must call), sets this rank's RNG; returns
    the client state.

    Same world size as the checkpoint: DeepSpeed's own load, and this rank's saved RNG states. Another world size:
    a ZeRO-1/2/3 tag is converted once to ``<tag>_universal`` (:func:`convert_to_universal`) and loaded with
    DeepSpeed's ``load_universal`` (fp32 master weights and Adam moments of every parameter, re-partitioned over
    the new ranks; buffers and frozen parameters from the saved module); a ZeRO-0 tag (whole optimizer state in one
    file) loads as it is. Each rank then seeds its RNG from (``train.seed``, global step, rank)
    (:func:`rng_seed_for`); the loop continues at the epoch's image offset (``LoopState.samples``).

    Raises:
        FileNotFoundError: DeepSpeed could not load the tag.
        ValueError: another world size, and one of the checkpoint and the engine is ZeRO-0 while the other
            partitions (stage 1-3).
        ConfigError: the conversion failed (one line naming the command to run by hand).
    """
    tag_dir = Path(ckpt_dir) / tag
    world = dist.get_world_size() if dist.is_initialized() else 1
    written = written_world_size(tag_dir) or world
    problem = repartition_refusal(tag_dir, world, engine.zero_optimization_stage())
    if problem:
        raise ValueError(f"{problem}: resume with the checkpoint's ZeRO stage (0 or 1-3), or on {written} ranks")
    if written == world or zero_stage(tag_dir) == 0:  # ZeRO-0 keeps the whole optimizer state in the model-states file
        path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    else:
        universal = convert_to_universal(tag_dir)
        with _load_universal(engine):
            path, client = engine.load_checkpoint(str(ckpt_dir), tag=universal.name)
        if path is not None:
            _restore_untrained(engine, universal)
    if path is None:
        raise FileNotFoundError(f"could not load checkpoint {tag_dir}")
    if "samples" not in client and written != world:  # written before the offset was saved: updates x batch then
        client["samples"] = client.get("update", 0) * client.get("ds_config", {}).get("train_batch_size", 0)
    if written == world:
        rng = tag_dir / f"rng_rank{engine.global_rank:03d}.pt"
        if rng.is_file():
            _set_rng_state(torch.load(rng, map_location="cpu", weights_only=False))
        else:
            logger.warning("%s missing: random streams (masks, drop-path) restart from the seed", rng.name)
    else:
        seed = client.get("config", {}).get("train", {}).get("seed", 0)
        seed_everything(rng_seed_for(seed, client.get("global_step", 0), engine.global_rank))
        logger.warning("resumed %s, written by %d ranks, on %d: model and optimizer state re-partitioned; the epoch "
                       "continues at image %s; random streams (masks, drop-path) re-seeded from (seed %d, step %s, "
                       "rank)", tag_dir, written, world, client.get("samples"), seed, client.get("global_step"))
    logger.info("resumed from %s (epoch %s, step %s)", tag_dir, client.get("epoch"), client.get("global_step"))
    return client


def written_world_size(tag_dir: Path) -> int | None:
    """Number of ranks that wrote the tag (its ``complete`` marker), or None when the marker does not say."""
    marker = Path(tag_dir) / COMPLETE
    return json.loads(marker.read_text()).get("world_size") if marker.is_file() else None


def zero_stage(tag_dir: Path) -> int:
    """ZeRO stage (0-3) a DeepSpeed tag folder was written with (its stored ``ds_config``; 0 when absent).

    Raises:
        FileNotFoundError: ``tag_dir`` has no model-states file.
    """
    path = model_states_file(tag_dir)
    if path is None:
        raise FileNotFoundError(f"{tag_dir}: not a DeepSpeed checkpoint tag (no model states file)")
    ds_config = torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("ds_config") or {}
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def repartition_refusal(tag_dir: Path, world_size: int, stage: int) -> str | None:
    """Why the tag cannot be loaded on ``world_size`` ranks by an engine of ZeRO stage ``stage``, or None.

    Only another world size where one side is ZeRO-0 (whole optimizer state in the model-states file) and the other
    partitions (stage 1-3) cannot meet; the same world size loads as DeepSpeed wrote it, and other pairs re-partition
    through a universal checkpoint (:func:`load`). The text reads ``<tag> was written by N ranks with ZeRO stage
    S, this run has M ranks and stage T``.
    """
    written = written_world_size(tag_dir)
    if written is None or written == world_size:
        return None
    saved = zero_stage(tag_dir)
    if (saved > 0) == (stage > 0):
        return None
    return (f"{tag_dir} was written by {written} ranks with ZeRO stage {saved}, this run has {world_size} ranks and "
            f"stage {stage}")


def rng_seed_for(seed: int, global_step: int, rank: int) -> int:
    """Seed of rank ``rank``'s torch/numpy/python random streams after a resume on another world size: the saved
    per-rank streams belong to the old ranks, so every rank starts fresh streams from
    ``numpy.random.SeedSequence((seed, global_step, rank))`` (32 bits): distinct per rank and per resume point,
    reproducible. Raises ValueError for negative inputs (SeedSequence's rule)."""
    return int(np.random.SeedSequence([seed, global_step, rank]).generate_state(1)[0])


def universal_command(tag_dir: Path, out: Path | None = None, *, workers: int = 4) -> list[str]:
    """The ``python -m deepspeed.checkpoint.ds_to_universal`` command that converts ``tag_dir`` into ``out`` (default
    ``<tag>_universal`` beside it), as an argument list."""
    out = Path(out) if out is not None else universal_dir(tag_dir)
    return [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
            "--output_folder", str(out), "--num_extract_workers", str(workers),
            "--num_merge_workers", str(max(1, workers // 2))]


def universal_dir(tag_dir: Path) -> Path:
    """Where :func:`convert_to_universal` puts the universal form of ``tag_dir``: ``<tag>_universal`` beside it."""
    return Path(tag_dir).with_name(Path(tag_dir).name + UNIVERSAL_SUFFIX)


def _universal_ready(folder: Path) -> bool:
    # ds_to_universal writes zero/optimizer_state.pt, then copies the model-states file last
    return model_states_file(folder) is not None and (folder / "zero" / "optimizer_state.pt").is_file()


def convert_to_universal(tag_dir: Path, *, workers: int | None = None) -> Path:
    """``<tag>_universal``, DeepSpeed's universal form of the ZeRO tag ``tag_dir``, converted on first use.

    All ranks must call it. Rank 0 runs ``ds_to_universal`` (:func:`universal_command`) in a subprocess into a
    temporary folder beside it and renames it into place, so a conversion cut short is never used; a finished one
    (this function's, or made by hand with that command) is reused. The other ranks wait at a barrier. It costs
    about one more checkpoint of disk (fp32 weights + 2 Adam moments per parameter) and reads every shard once.

    Args:
        workers: extraction processes (default: the CPU count, at most 8).

    Raises:
        ConfigError: on every rank when rank 0's conversion failed: one line with its last output line, the
            command to run by hand and the old world size.
    """
    tag_dir = Path(tag_dir)
    out = universal_dir(tag_dir)
    error = None
    if (not dist.is_initialized() or dist.get_rank() == 0) and not _universal_ready(out):
        workers = workers or max(1, min(8, os.cpu_count() or 1))
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # not ending in digits: never taken for a tag
        shutil.rmtree(tmp, ignore_errors=True)
        t0 = time.time()
        proc = subprocess.run(universal_command(tag_dir, tmp, workers=workers), capture_output=True, text=True)
        (tag_dir.parent / "latest_universal").unlink(missing_ok=True)  # ds_to_universal's pointer to the tmp name
        for line in (proc.stdout + proc.stderr).splitlines():
            logger.debug("ds_to_universal: %s", line)
        if proc.returncode == 0 and _universal_ready(tmp):
            shutil.rmtree(out, ignore_errors=True)  # an unfinished one made by hand
            os.replace(tmp, out)
            logger.info("converted %s to DeepSpeed's universal format in %s (%.1f s)", tag_dir, out, time.time() - t0)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            last = next((ln for ln in reversed((proc.stderr + proc.stdout).splitlines()) if ln.strip()), "no output")
            by_hand = " ".join(["python", *universal_command(tag_dir)[1:]])
            error = (f"could not convert {tag_dir} to a universal checkpoint ({last.strip()}); convert it by hand "
                     f"with `{by_hand}`, or resume on {written_world_size(tag_dir)} ranks")
    if dist.is_initialized():
        shared = [error]
        dist.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error:
        raise ConfigError(error)
    return out


@contextlib.contextmanager
def _load_universal(engine):
    # DeepSpeed reads its "checkpoint": {"load_universal": ...} switch only inside load_checkpoint (runtime/engine.py,
    # 0.19.8), from the engine's config: turning it on for one load spares building the engine knowing the checkpoint
    config = engine._config
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        yield
    finally:
        config.load_universal_checkpoint = before


def _restore_untrained(engine, universal: Path) -> None:
    """Buffers and frozen parameters from the saved module (a universal load restores the optimizer's parameters
    only). ZeRO-3 keeps its module partitioned: there they stay as the model built them."""
    if engine.zero_optimization_stage() == 3:
        return
    trained = {n for n, p in engine.module.named_parameters() if p.requires_grad}
    module = torch.load(model_states_file(universal), map_location="cpu", weights_only=False)["module"]
    saved = {k: v for k, v in module.items() if k not in trained}
    if saved:
        engine.module.load_state_dict(saved, strict=False)


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
