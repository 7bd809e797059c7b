"""What a pre-training checkpoint loads as on the ranks this is started with (a test helper, not a test).

Builds the run's model, optimizer and DeepSpeed engine as ``pretrain.main`` does, loads ``CKPT_DIR/TAG`` with
:func:`fastmim_ds.checkpoint.load` (which converts and re-partitions when the world size differs) and gathers, for
every trained parameter, the full fp32 master weight and Adam moments across the ranks; rank 0 writes them to OUT.

    python -m torch.distributed.run --nproc_per_node N tests/resume_probe.py OUT CKPT_DIR TAG --set k=v ...

:func:`loaded_state` does the same in a process that already has a process group.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def loaded_state(overrides: list[str], ckpt_dir: Path, tag: str) -> tuple[dict, dict]:
    """({name: {"fp32", "exp_avg", "exp_avg_sq"} full tensors}, client state) after loading the tag on this group."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from fastmim_ds.checkpoint import load
    from fastmim_ds.config import PretrainCfg, load_config, resolve
    from fastmim_ds.ds_engine import build_ds_config, create_engine
    from fastmim_ds.models import create_mim_model
    from fastmim_ds.optim import build_optimizer

    world = torch.distributed.get_world_size()
    cfg = load_config(PretrainCfg, None, overrides)
    model = create_mim_model(cfg.method, cfg.model, cfg.mask, cfg.data.img_size)
    optimizer = build_optimizer(model, cfg.optim, resolve(cfg.optim, cfg.train, world))
    engine = create_engine(model, optimizer, build_ds_config(cfg.train, clip_grad=cfg.optim.clip_grad,
                                                             world_size=world))
    client = load(engine, ckpt_dir, tag)
    state = {}
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            state[name] = {"fp32": safe_get_full_fp32_param(p).clone(),
                           **{k: safe_get_full_optimizer_state(p, k).clone() for k in ("exp_avg", "exp_avg_sq")}}
    return state, client


def main(argv: list[str]) -> None:
    from fastmim_ds.runtime import init_distributed

    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("ckpt_dir", type=Path)
    parser.add_argument("tag")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args(argv)
    dist = init_distributed()
    state, client = loaded_state(args.overrides, args.ckpt_dir, args.tag)
    if dist.is_main:
        torch.save({"state": state, "samples": client.get("samples"), "global_step": client.get("global_step")},
                   args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
