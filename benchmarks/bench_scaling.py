"""Scaling curve (issue 6, part 5): FastMIM ViT-B/16 step time vs image size and vs batch size.

The product's model and engine (FastMIM from ``fastmim_ds.methods.create_mim_model``, ZeRO-2 config of ``--dtype``);
the image size changes between points as FastMIM-P changes it between stages (``model.set_img_size``: position
table regenerated for the new grid). Sizes 64, 96, ..., 224 px at a fixed batch, then batch sizes at 128 px. Every
point is timed in two sweeps, the second in reverse order, so a drift in machine load does not tilt the curve; the
faster of the two is reported (load from other jobs only slows a step down) with the model FLOPs per image
(``torch.utils.flop_counter``) and the achieved FLOP/s.

Usage: ``python -m benchmarks.bench_scaling [--device cuda] [--sizes ...] [--batches ...]``.
Writes ``benchmarks/results/<device>/scaling.json``.
"""
from __future__ import annotations

import argparse
import logging
import time

import torch

from benchmarks.common import (
    add_device_args,
    build_engine,
    count_flops,
    machine_info,
    random_images,
    start,
    timed,
    train_step,
    write_result,
)
from fastmim_ds.config import MIMModelCfg
from fastmim_ds.methods import create_mim_model
from fastmim_ds.methods.fastmim import FastMIMCfg

logger = logging.getLogger("bench_scaling")

MODEL = MIMModelCfg(encoder="vit_base_patch16_224")  # FastMIM ViT-B recipe
METHOD = FastMIMCfg(mask_ratio=0.75, block_size=16, decoder_dim=256, decoder_depth=1)


def _flops_per_img(sizes: list[int]) -> dict[int, float]:
    """Forward + backward model FLOPs per image at each size (a separate CPU copy: the engine's hooks stay idle)."""
    model = create_mim_model(METHOD, MODEL, 128)
    out = {}
    for s in sizes:
        model.set_img_size(s)
        x = random_images(2, s, torch.device("cpu"))
        out[s] = count_flops(lambda x=x: model(x)["loss"].backward())[0] / 2
        model.zero_grad(set_to_none=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_args(parser)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 128, 160, 192, 224])
    parser.add_argument("--size-batch", type=int, default=None, help="batch of the size sweep (cpu 8, cuda 256)")
    parser.add_argument("--batches", type=int, nargs="+", default=None,
                        help="batch sweep at 128 px (cpu 2 4 8 16 32, cuda 32 64 128 256 512)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per point per sweep (cpu 1, cuda 5)")
    args = parser.parse_args()
    device, dtype = start(args)
    cpu = device.type == "cpu"
    info = machine_info(device)
    t0 = time.perf_counter()
    size_batch = args.size_batch or (8 if cpu else 256)
    batches = args.batches or ([2, 4, 8, 16, 32] if cpu else [32, 64, 128, 256, 512])
    steps = args.steps or (1 if cpu else 5)
    points = [("size", s, size_batch) for s in args.sizes] + [("batch", 128, b) for b in batches]
    flops = _flops_per_img(sorted({s for _, s, _ in points}))

    torch.manual_seed(0)
    model = create_mim_model(METHOD, MODEL, 128)
    engine = build_engine(model.to(device), dtype=dtype, micro_batch=size_batch)
    times: dict[int, list[float]] = {i: [] for i in range(len(points))}
    for sweep, order in enumerate((range(len(points)), reversed(range(len(points))))):
        for i in order:
            _, size, batch = points[i]
            engine.module.set_img_size(size)
            imgs = random_images(batch, size, device)
            if sweep == 0:
                train_step(engine, imgs)  # warm-up at a new shape (allocations, kernel choice)
            times[i] += [timed(lambda x=imgs: train_step(engine, x), device) for _ in range(steps)]
            logger.info("sweep %d: %d px x %d: %.2f s/step", sweep + 1, size, batch, times[i][-1])
    rows = []
    for i, (kind, size, batch) in enumerate(points):
        step = min(times[i])
        rows.append({"sweep": kind, "img_size": size, "batch": batch, "step_s": step, "step_s_all": times[i],
                     "img_per_s": batch / step, "gflops_per_img": flops[size] / 1e9,
                     "achieved_tflops": flops[size] * batch / step / 1e12})
    write_result(device, "scaling", {"machine": info, "dtype": dtype, "model": "FastMIM ViT-B/16 (HOG, 256-d x 1 "
                                     "decoder)", "rows": rows, "seconds": time.perf_counter() - t0})


if __name__ == "__main__":
    main()
