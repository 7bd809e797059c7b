"""DeepSpeed checkpoints: save/resume, and reading a pre-trained encoder back as a plain fp32 state dict.

Layout of a run: ``<run>/ckpt/<tag>/`` written by ``engine.save_checkpoint`` on every rank (model states, ZeRO
optimizer shards), ``<run>/ckpt/latest`` naming the newest complete tag (DeepSpeed writes it after the tag's
files), ``client_state`` = {epoch, step, config, git_sha} inside ``mp_rank_00_model_states.pt``.
"""
from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

__all__ = ["save", "find_resume", "load", "read_client_state", "resolve_tag_dir", "load_pretrained_encoder", "CKPT_SUBDIR"]

CKPT_SUBDIR = "ckpt"
MODEL_STATES = "mp_rank_00_model_states.pt"


def _epoch_of(tag: str) -> int:
    m = re.search(r"(\d+)$", tag)
    return int(m.group(1)) if m else -1


def save(engine, ckpt_dir: Path, *, tag: str, client_state: dict, keep_last: int) -> None:
    """Saves on every rank (DeepSpeed requires all ranks), then rank 0 deletes tags beyond ``keep_last``."""
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state)
    if dist.is_initialized():
        dist.barrier()
    if engine.global_rank == 0 and keep_last > 0:
        tags = sorted((p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("epoch")),
                      key=lambda p: _epoch_of(p.name))
        for old in tags[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    logger.info("saved checkpoint %s/%s", ckpt_dir, tag)


def find_resume(ckpt_dir: Path, resume: str | None) -> tuple[Path, str] | None:
    """Resolves ``--resume``: ``auto`` -> newest tag in ``ckpt_dir`` (or None), a tag folder path -> that tag.

    Raises:
        FileNotFoundError: an explicit path that is no run folder, ``<run>/ckpt`` or tag folder.
    """
    if not resume:
        return None
    if resume == "auto":
        latest = ckpt_dir / "latest"
        if latest.is_file():
            tag = latest.read_text().strip()
            if (ckpt_dir / tag / MODEL_STATES).is_file():
                return ckpt_dir, tag
            logger.warning("%s names %s, which is incomplete; starting from scratch", latest, tag)
        return None
    tag_dir = resolve_tag_dir(Path(resume))
    return tag_dir.parent, tag_dir.name


def load(engine, ckpt_dir: Path, tag: str) -> dict:
    """Loads model, optimizer and DeepSpeed state on every rank; returns the client state."""
    path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise FileNotFoundError(f"could not load checkpoint {ckpt_dir}/{tag}")
    logger.info("resumed from %s (epoch %s)", path, client.get("epoch"))
    return client


def read_client_state(tag_dir: Path) -> dict:
    """Client state (epoch, step, config, ...) of a checkpoint tag folder, without building an engine."""
    state = torch.load(Path(tag_dir) / MODEL_STATES, map_location="cpu", weights_only=False)
    known = {"module", "buffer_names", "optimizer", "lr_scheduler", "param_shapes", "frozen_param_shapes",
             "frozen_param_fragments", "shared_params", "sparse_tensor_module_names", "skipped_steps",
             "global_steps", "global_samples", "dp_world_size", "mp_world_size", "ds_config", "ds_version",
             "data_sampler", "random_ltd"}
    return {k: v for k, v in state.items() if k not in known}


def resolve_tag_dir(path: Path) -> Path:
    """Tag folder of a run folder, ``<run>/ckpt`` (via ``latest``) or a tag folder itself.

    Raises:
        FileNotFoundError: none of these.
    """
    if (path / MODEL_STATES).is_file():
        return path
    for ckpt_dir in (path, path / CKPT_SUBDIR):
        latest = ckpt_dir / "latest"
        if latest.is_file():
            return ckpt_dir / latest.read_text().strip()
    raise FileNotFoundError(f"{path}: no checkpoint found (expected a run folder, <run>/ckpt or a tag folder)")


def load_pretrained_encoder(path: str | Path, prefix: str = "encoder.") -> tuple[dict[str, torch.Tensor], dict]:
    """Reads the fp32 encoder weights of a pre-training run.

    Args:
        path: run folder, ``<run>/ckpt``, a tag folder, or a ``.pth``/``.safetensors`` state dict (keys with or
            without ``prefix``).
        prefix: module prefix of the encoder inside the MIM model.

    Returns:
        (state dict with ``prefix`` stripped, pre-training config dict or {} for plain files).

    Raises:
        FileNotFoundError: nothing loadable at ``path``.
    """
    path = Path(path)
    if path.is_file():
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

            state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        except (ValueError, FileNotFoundError, KeyError, AssertionError) as e:  # ZeRO-0: weights are in the module
            logger.info("no ZeRO shards in %s (%s); reading module weights", tag_dir, e)
            state = torch.load(tag_dir / MODEL_STATES, map_location="cpu", weights_only=False)["module"]
    has_prefix = any(k.startswith(prefix) for k in state)
    enc = {k[len(prefix):] if has_prefix else k: v.float() for k, v in state.items() if k.startswith(prefix) or not has_prefix}
    return enc, cfg
