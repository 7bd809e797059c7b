"""Activation checkpointing (issue 16, part 2): peak memory saved and step time paid, per backbone.

For each backbone the product's pre-training model (FastMIM ViT-B/16, Swin-B and PVTv2-b2 at 128 px; MixMIM-B at
224 px) takes optimizer steps (forward, ``engine.backward``, ``engine.step`` on the ZeRO-2 engine of
``benchmarks.common.build_engine``) with ``model.grad_checkpointing`` off and on. Each (backbone, setting) runs in its
own process, so its memory high-water mark is its own:

* **peak step memory**: what a steady-state step (the second) allocates above what was held before it: CUDA
  ``torch.cuda.max_memory_allocated`` (peak reset before the step) minus ``memory_allocated``; CPU the process's
  ``VmHWM`` (reset through ``/proc/self/clear_refs``) minus its ``VmRSS`` before the step: the activations kept for
  backward plus transient gradient buffers; only the activations differ between the two settings. On CPU the
  numbers are page-granular and include allocator noise, so tiny models (``--tiny``) show none of the saving;
* **step time**: best of ``--steps`` steps after ``--warmup``; the processes alternate off, on, off, on (``--rounds``)
  so load from other jobs hits both settings alike.

Printed per backbone: peak memory off / on, the saving (1 - on / off) and the step-time cost (on / off).

Usage: ``python -m benchmarks.bench_gradckpt [--device cuda] [--families vit swin pvt_v2 mixmim] [--tiny]``.
Writes ``benchmarks/results/<device>/gradckpt.json`` (``--out`` elsewhere).
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import (
    REPO,
    add_device_args,
    build_engine,
    machine_info,
    one_rank_group,
    random_images,
    rss_bytes,
    setup_device,
    sync,
    timed,
    train_step,
    write_result,
)
from fastmim_ds.config import MIMModelCfg
from fastmim_ds.methods import create_mim_model
from fastmim_ds.methods.fastmim import FastMIMCfg
from fastmim_ds.methods.mixmim import MixMIMCfg

logger = logging.getLogger("bench_gradckpt")

# family -> (method config, model config, image size); the product's recipes (bench_step for ViT-B, Swin-B)
FAMILIES = {
    "vit": (FastMIMCfg(block_size=16, decoder_dim=256, decoder_depth=1), MIMModelCfg(encoder="vit_base_patch16_224"),
            128),
    "swin": (FastMIMCfg(block_size=32, decoder_dim=256, decoder_depth=4),
             MIMModelCfg(encoder="swin_base_patch4_window7_224", encoder_kwargs={"window_size": 4}), 128),
    "pvt_v2": (FastMIMCfg(block_size=32, decoder_dim=256, decoder_depth=4), MIMModelCfg(encoder="pvt_v2_b2"), 128),
    "mixmim": (MixMIMCfg(), MIMModelCfg(encoder="mixmim_base"), 224),
}
TINY = {  # --tiny: the test presets (tests/test_compile_checkpointing.py)
    "vit": (FastMIMCfg(block_size=16, decoder_dim=32), MIMModelCfg(encoder_kwargs={"embed_dim": 32, "depth": 2,
                                                                                   "num_heads": 2}), 64),
    "swin": (FastMIMCfg(block_size=32, decoder_dim=32), MIMModelCfg(
        encoder="swin_tiny_patch4_window7_224",
        encoder_kwargs={"embed_dim": 32, "depths": [1, 1, 2, 1], "num_heads": [1, 2, 2, 4], "window_size": 4}), 128),
    "pvt_v2": (FastMIMCfg(block_size=32, decoder_dim=32), MIMModelCfg(encoder="pvt_v2_b2", encoder_kwargs={
        "embed_dims": [16, 32, 32, 64], "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4]}), 64),
    "mixmim": (MixMIMCfg(decoder_dim=32, decoder_depth=1, decoder_heads=1), MIMModelCfg(encoder="mixmim_tiny_test"),
               64),
}


def reset_peak_rss() -> None:
    """Resets this process's ``VmHWM`` to its current RSS (Linux ``/proc/self/clear_refs``, value 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def run_part(family: str, on: bool, *, tiny: bool, device: torch.device, dtype: str, batch: int, steps: int,
             warmup: int) -> dict:
    """One (backbone, setting) in this process: peak memory of the first step, then the best step time."""
    import dataclasses

    method, model_cfg, img_size = (TINY if tiny else FAMILIES)[family]
    model_cfg = dataclasses.replace(model_cfg, grad_checkpointing=on)
    torch.manual_seed(0)
    model = create_mim_model(method, model_cfg, img_size)
    engine = build_engine(model.to(device), dtype=dtype, micro_batch=batch)
    imgs = random_images(batch, img_size, device)
    first = timed(lambda: train_step(engine, imgs), device)  # allocates optimizer states and gradient buffers
    if device.type == "cuda":  # a steady-state step
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        train_step(engine, imgs)
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        reset_peak_rss()
        before = rss_bytes("VmRSS")
        train_step(engine, imgs)
        peak = rss_bytes("VmHWM") - before
    for _ in range(warmup):
        train_step(engine, imgs)
    times = [timed(lambda: train_step(engine, imgs), device) for _ in range(steps)]
    return {"family": family, "grad_checkpointing": on, "img_size": img_size, "peak_bytes": peak,
            "first_step_s": first, "step_s": min(times), "step_s_all": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_args(parser)
    parser.add_argument("--families", nargs="+", choices=tuple(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--batch", type=int, default=None, help="images per step (cpu 8, cuda 128)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per process (cpu 2, cuda 10)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="processes per setting, alternating off/on")
    parser.add_argument("--tiny", action="store_true", help="tiny presets of each family: a smoke run")
    parser.add_argument("--out", type=Path, default=None, help="result file (default benchmarks/results/...)")
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--part-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    device, dtype = setup_device(args)
    cpu = device.type == "cpu"
    batch, steps = args.batch or (8 if cpu else 128), args.steps or (2 if cpu else 10)
    if args.part:
        one_rank_group()
        torch.set_num_threads(args.threads)
        family, setting = args.part.split(":")
        res = run_part(family, setting == "on", tiny=args.tiny, device=device, dtype=dtype, batch=batch,
                       steps=steps, warmup=args.warmup)
        Path(args.part_out).write_text(json.dumps(res))
        return
    info, t0 = machine_info(device), time.perf_counter()
    flags = [f"--device={args.device}", f"--threads={args.threads}", f"--batch={batch}", f"--steps={steps}",
             f"--warmup={args.warmup}"] + (["--tiny"] if args.tiny else []) + ([f"--dtype={args.dtype}"]
                                                                             if args.dtype else [])
    results: dict[str, dict[str, list[dict]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_gradckpt_") as tmp:
        for family in args.families:
            results[family] = {"off": [], "on": []}
            for r in range(args.rounds):
                for setting in (("off", "on") if r % 2 == 0 else ("on", "off")):
                    out = Path(tmp) / f"{family}_{setting}_{r}.json"
                    subprocess.run([sys.executable, "-m", "benchmarks.bench_gradckpt", *flags, "--part",
                                    f"{family}:{setting}", "--part-out", str(out)], cwd=REPO, check=True)
                    results[family][setting].append(json.loads(out.read_text()))
    rows = []
    print(f"\nActivation checkpointing, batch {batch}, {device.type} {dtype}{' (tiny presets)' if args.tiny else ''}")
    print("| backbone | px | peak step memory off (MB) | on (MB) | saving | step s off | on | step-time cost |")
    print("|---|---|---|---|---|---|---|---|")
    for family, res in results.items():
        off_mem = min(p["peak_bytes"] for p in res["off"])
        on_mem = min(p["peak_bytes"] for p in res["on"])
        off_s = min(p["step_s"] for p in res["off"])
        on_s = min(p["step_s"] for p in res["on"])
        row = {"family": family, "img_size": res["off"][0]["img_size"], "peak_bytes_off": off_mem,
               "peak_bytes_on": on_mem, "memory_saving": 1 - on_mem / off_mem if off_mem > 0 else float("nan"),
               "step_s_off": off_s, "step_s_on": on_s, "time_cost": on_s / off_s, "runs": res}
        rows.append(row)
        print(f"| {family} | {row['img_size']} | {off_mem / 1e6:,.0f} | {on_mem / 1e6:,.0f} | "
              f"{row['memory_saving']:.0%} | {off_s:.3f} | {on_s:.3f} | {row['time_cost']:.2f}x |")
    payload = {"machine": info, "dtype": dtype, "batch": batch, "tiny": args.tiny, "rows": rows,
               "seconds": time.perf_counter() - t0}
    logger.info("wrote %s", write_result(device, "gradckpt", payload, args.out))


if __name__ == "__main__":
    main()
