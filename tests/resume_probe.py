"""What a pre-training checkpoint loads as on the ranks this is started with (a test helper, not a test).

Builds the run's model, optimizer and DeepSpeed engine as ``pretrain.main`` does, loads ``CKPT_DIR/TAG`` with
:func:`fastmim_ds.checkpoint.load` (which converts and re-partitions when the world size differs) and gathers, for
every trained parameter, the full fp32 master weight and Adam moments across the ranks; rank 0 writes them to OUT.

    python -m torch.distributed.run --nproc_per_node N tests/resume_probe.py OUT CKPT_DIR TAG --set k=v ...

:func:`conftest.loaded_state` does the same in a process that already has a process group.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from conftest import loaded_state


def main(argv: list[str]) -> None:
    from fastmim_ds.runtime import close_distributed, init_distributed

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
    close_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
