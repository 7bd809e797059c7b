"""torch.compile (issue 16, part 3): the FastMIM ViT-B/16 step compiled (``train.compile``) vs eager.

Two engines of the same model (same seed) in one process: eager, and compiled the way the product compiles it
(``fastmim_ds.ds_engine.create_engine(..., compile=True)``: DeepSpeed ``engine.compile()``, in place). Measured:

* **compile time**: the first compiled step minus an eager step (dynamo tracing, AOT autograd, code generation);
* **steady-state step time**: rounds alternate eager, compiled (``--rounds`` x ``--steps`` steps each, after
  ``--warmup``), best step of each; the **speed-up** is eager / compiled (target >= 1.15x);
* **recompile at a size change** (FastMIM-P): both models switch to ``--resize`` px (``set_img_size``); the first
  compiled step there minus the eager one is the cost of the recompilation, then the steady speed-up at that size.

Usage: ``python -m benchmarks.bench_compile [--device cuda] [--backend inductor] [--tiny]``.
Writes ``benchmarks/results/<device>/compile.json`` (``--out`` elsewhere).
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from benchmarks.common import (
    REPO,
    TINY_VIT,
    add_device_args,
    machine_info,
    random_images,
    start,
    timed,
    train_step,
    write_result,
)
from fastmim_ds.config import MIMModelCfg, OptimCfg, Resolved, TrainCfg
from fastmim_ds.methods import create_mim_model
from fastmim_ds.methods.fastmim import FastMIMCfg

logger = logging.getLogger("bench_compile")


def _engine(*, tiny: bool, img_size: int, device: torch.device, dtype: str, batch: int, compiled: bool,
            backend: str):
    from benchmarks.common import DS_CONFIGS
    from fastmim_ds.ds_engine import build_ds_config, create_engine
    from fastmim_ds.optim import build_optimizer

    cfg = MIMModelCfg(encoder_kwargs=TINY_VIT["encoder_kwargs"]) if tiny else MIMModelCfg()
    method = FastMIMCfg(block_size=16, decoder_dim=TINY_VIT["decoder_dim"] if tiny else 256, decoder_depth=1)
    torch.manual_seed(0)
    model = create_mim_model(method, cfg, img_size).to(device)
    optim = OptimCfg()
    derived = Resolved(world_size=1, eff_batch=batch, lr=optim.blr * batch / 256, min_lr=0.0)
    train = TrainCfg(micro_batch=batch, ds_config=str(REPO / DS_CONFIGS[dtype]))
    return create_engine(model, build_optimizer(model, optim, derived),
                         build_ds_config(train, clip_grad=0.0, world_size=1), compile=compiled,
                         compile_backend=backend)


def _rounds(engines: dict, imgs: torch.Tensor, device: torch.device, rounds: int, steps: int) -> dict:
    times = {k: [] for k in engines}
    for _ in range(rounds):
        for name, eng in engines.items():
            times[name] += [timed(lambda e=eng: train_step(e, imgs), device) for _ in range(steps)]
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_args(parser)
    parser.add_argument("--backend", default="", help="torch.compile backend (default: the accelerator's, inductor)")
    parser.add_argument("--batch", type=int, default=None, help="images per step (cpu 16, cuda 128)")
    parser.add_argument("--img-size", type=int, default=None, help="px (default 128; --tiny 64)")
    parser.add_argument("--resize", type=int, default=None, help="FastMIM-P size to switch to (default 3/4 of it)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per engine per round (cpu 1, cuda 10)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="2-block ViT at 64 px: a smoke run")
    parser.add_argument("--out", type=Path, default=None, help="result file (default benchmarks/results/...)")
    args = parser.parse_args()
    device, dtype = start(args)
    cpu = device.type == "cpu"
    batch, steps = args.batch or (16 if cpu else 128), args.steps or (1 if cpu else 10)
    size = args.img_size or (TINY_VIT["img_size"] if args.tiny else 128)
    resize = args.resize or max(16, size * 3 // 4 // 16 * 16)
    info, t_start = machine_info(device), time.perf_counter()
    engines = {name: _engine(tiny=args.tiny, img_size=size, device=device, dtype=dtype, batch=batch,
                             compiled=name == "compiled", backend=args.backend) for name in ("eager", "compiled")}
    imgs = random_images(batch, size, device)
    first = {name: timed(lambda e=eng: train_step(e, imgs), device) for name, eng in engines.items()}
    compile_s = first["compiled"] - first["eager"]
    logger.info("first step: eager %.2f s, compiled %.2f s (compilation ~%.1f s)", first["eager"], first["compiled"],
                compile_s)
    for eng in engines.values():
        for _ in range(args.warmup):
            train_step(eng, imgs)
    times = _rounds(engines, imgs, device, args.rounds, steps)
    eager_s, comp_s = min(times["eager"]), min(times["compiled"])

    for eng in engines.values():  # FastMIM-P stage change: the compiled model recompiles for the new input size
        eng.module.set_img_size(resize)
    small = random_images(batch, resize, device)
    first_resize = {name: timed(lambda e=eng: train_step(e, small), device) for name, eng in engines.items()}
    for eng in engines.values():
        train_step(eng, small)
    times_resize = _rounds(engines, small, device, max(1, args.rounds // 2), steps)
    res = {
        "eager_step_s": eager_s, "compiled_step_s": comp_s, "speedup": eager_s / comp_s, "compile_s": compile_s,
        "first_step_s": first, "step_s_all": times,
        "resize": {"img_size": resize, "recompile_s": first_resize["compiled"] - first_resize["eager"],
                   "first_step_s": first_resize, "eager_step_s": min(times_resize["eager"]),
                   "compiled_step_s": min(times_resize["compiled"]),
                   "speedup": min(times_resize["eager"]) / min(times_resize["compiled"])},
    }
    backend = args.backend or "default (inductor)"
    print(f"\nFastMIM ViT-B/16{' (tiny)' if args.tiny else ''}, batch {batch}, {device.type} {dtype}, "
          f"torch.compile backend {backend}")
    print("| image size | eager s/step | compiled s/step | speed-up | compilation s |")
    print("|---|---|---|---|---|")
    print(f"| {size} px | {eager_s:.3f} | {comp_s:.3f} | {res['speedup']:.2f}x | {compile_s:.1f} |")
    r = res["resize"]
    print(f"| {resize} px (after a size change) | {r['eager_step_s']:.3f} | {r['compiled_step_s']:.3f} | "
          f"{r['speedup']:.2f}x | {r['recompile_s']:.1f} (recompile) |")
    payload = {"machine": info, "dtype": dtype, "batch": batch, "img_size": size, "backend": backend,
               "tiny": args.tiny, **res, "seconds": time.perf_counter() - t_start}
    logger.info("wrote %s", write_result(device, "compile", payload, args.out))


if __name__ == "__main__":
    main()
