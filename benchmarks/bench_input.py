"""Input stalls (issue 16, part 1): the real pre-training path fed by FFCV from a beton vs fed synthetic tensors.

Both sides run the product's training loop (``fastmim_ds.loop.train_one_epoch``) on the same DeepSpeed engine
(ZeRO-2, ``benchmarks.common.build_engine``) and the same FastMIM ViT-B/16 at 128 px:

* **real**: ``fastmim_ds.data.train_loader`` on the imagenette beton (``benchmarks.bench_loader``'s,
  converted once into ``data/bench/``), ``--loader-threads`` FFCV decoding threads, batches landing on the device;
* **synthetic**: the same number of batches of random normalised images already on the device (no loader work).

Rounds alternate synthetic, real (threads n1), real (threads n2), ...; every run is a fresh epoch of ``--steps``
optimizer steps after ``--warmup`` steps outside the timing (the first real epoch JIT-compiles FFCV's numba
pipeline and maps the beton: it is run once before the rounds). Printed per loader-thread count: images/s of both,
the **ratio real / synthetic** (1.0 = the loader never stalls the step; target >= 0.95 at 128 px) and the share of
the epoch the loop spent waiting for the loader (``data_wait_frac``, what ``metrics.jsonl`` logs in training).
Best round of each (load from other jobs only slows a run down).

Usage: ``python -m benchmarks.bench_input [--device cuda] [--loader-threads 2 4 8] [--steps N] [--tiny]``.
Writes ``benchmarks/results/<device>/input.json`` (``--out`` elsewhere). ``--tiny``: a 2-block ViT at 64 px on a
small beton (``--beton``), to check the script runs.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
import types
from pathlib import Path

import torch

from benchmarks.common import (
    TINY_VIT,
    add_device_args,
    build_engine,
    machine_info,
    random_images,
    start,
    sync,
    write_result,
)
from fastmim_ds.config import DataCfg, MIMModelCfg
from fastmim_ds.loop import LoopState, train_one_epoch
from fastmim_ds.methods import create_mim_model
from fastmim_ds.methods.fastmim import FastMIMCfg
from fastmim_ds.metrics import MetricsWriter

logger = logging.getLogger("bench_input")


class SyntheticBatches:
    """``n`` batches of the same random images on the device, with the training loader's ``set_epoch``."""

    def __init__(self, n: int, batch: int, img_size: int, device: torch.device):
        self.n, self.imgs = n, random_images(batch, img_size, device)
        self.labels = torch.zeros(batch, dtype=torch.long, device=device)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        pass

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter([(self.imgs, self.labels)] * self.n)


def run_loop(engine, loader, steps: int, warmup: int, device: torch.device) -> dict:
    """``warmup`` then ``steps`` optimizer steps of ``train_one_epoch`` on a fresh epoch; the timed part's stats."""
    quiet = dict(scheduler=types.SimpleNamespace(step=lambda *_: None), log_every=10**9, show_progress=False,
                 metrics=MetricsWriter(None, enabled=False))
    loader.set_epoch(0)
    if warmup:
        train_one_epoch(engine, loader, lambda eng, x, y: eng(x), state=LoopState(), updates_per_epoch=warmup,
                        **quiet)
    loader.set_epoch(1)
    sync(device)
    stats = train_one_epoch(engine, loader, lambda eng, x, y: eng(x), state=LoopState(), updates_per_epoch=steps,
                            **quiet)
    sync(device)
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_args(parser)
    parser.add_argument("--loader-threads", type=int, nargs="+", default=None,
                        help="FFCV decoding threads per rank to try (default: the machine's cores)")
    parser.add_argument("--batch", type=int, default=None, help="images per step (cpu 16, cuda 128)")
    parser.add_argument("--img-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (cpu 6, cuda 50)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--beton", type=Path, default=None,
                        help="train.beton to read (default: the imagenette beton of benchmarks.bench_loader)")
    parser.add_argument("--tiny", action="store_true", help="2-block ViT at 64 px: a smoke run")
    parser.add_argument("--out", type=Path, default=None, help="result file (default benchmarks/results/...)")
    args = parser.parse_args()
    device, dtype = start(args)
    cpu = device.type == "cpu"
    batch = args.batch or (16 if cpu else 128)
    steps = args.steps or (6 if cpu else 50)
    threads = args.loader_threads or [os.cpu_count() or 1]
    img_size = TINY_VIT["img_size"] if args.tiny else args.img_size
    if args.beton is None:
        from benchmarks.bench_loader import CACHE, SOURCE, ensure_beton

        args.beton = ensure_beton(SOURCE, CACHE)
    info = machine_info(device)

    model_cfg = MIMModelCfg(encoder_kwargs=TINY_VIT["encoder_kwargs"]) if args.tiny else MIMModelCfg()
    method = FastMIMCfg(block_size=16, decoder_dim=TINY_VIT["decoder_dim"] if args.tiny else 256, decoder_depth=1)
    torch.manual_seed(0)
    model = create_mim_model(method, model_cfg, img_size)
    engine = build_engine(model.to(device), dtype=dtype, micro_batch=batch)

    from fastmim_ds.data import train_loader

    loaders = {}
    for n in threads:  # RandomResizedCrop (0.2, 1), ratio (3/4, 4/3), flip: DataCfg's pre-training defaults
        loader = train_loader(DataCfg(train=str(args.beton), num_workers=n), img_size=img_size, batch_size=batch,
                              seed=0, device=device)
        need = args.warmup + steps
        if len(loader) < need:
            raise ValueError(f"{args.beton}: {len(loader)} batches of {batch}, need {need} (lower --steps/--batch)")
        t0 = time.perf_counter()
        run_loop(engine, loader, min(len(loader), need), 0, device)  # JIT-compiles the pipeline, maps the beton
        logger.info("loader with %d threads: first epoch (JIT, page cache) %.1f s", n, time.perf_counter() - t0)
        loaders[n] = loader
    synthetic = SyntheticBatches(args.warmup + steps, batch, img_size, device)

    runs: dict[str, list[dict]] = {"synthetic": [], **{f"real_{n}": [] for n in threads}}
    for r in range(args.rounds):
        runs["synthetic"].append(run_loop(engine, synthetic, steps, args.warmup, device))
        for n in threads:
            runs[f"real_{n}"].append(run_loop(engine, loaders[n], steps, args.warmup, device))
        logger.info("round %d/%d: %s", r + 1, args.rounds,
                    ", ".join(f"{k} {v[-1]['img_per_s']:.1f} img/s (wait {v[-1]['data_wait_frac']:.1%})"
                              for k, v in runs.items()))
    best = {k: max(v, key=lambda s: s["img_per_s"]) for k, v in runs.items()}
    syn = best["synthetic"]["img_per_s"]
    rows = []
    print(f"\nFastMIM ViT-B/16{' (tiny)' if args.tiny else ''} at {img_size} px, batch {batch}, {device.type} {dtype}: "
          f"synthetic tensors {syn:.2f} img/s")
    print("| loader threads | FFCV img/s | ratio real / synthetic | waited for data |")
    print("|---|---|---|---|")
    for n in threads:
        b = best[f"real_{n}"]
        row = {"loader_threads": n, "img_per_s": b["img_per_s"], "ratio": b["img_per_s"] / syn,
               "data_wait_frac": b["data_wait_frac"], "data_wait_s": b["data_wait_s"], "seconds": b["seconds"],
               "img_per_s_all": [s["img_per_s"] for s in runs[f"real_{n}"]]}
        rows.append(row)
        print(f"| {n} | {row['img_per_s']:.2f} | {row['ratio']:.3f} | {row['data_wait_frac']:.1%} |")
    enough = [r["loader_threads"] for r in rows if r["ratio"] >= 0.95]
    print(f"threads reaching ratio >= 0.95: {enough[0] if enough else 'none tried'}")
    payload = {"machine": info, "dtype": dtype, "img_size": img_size, "batch": batch, "steps": steps,
               "tiny": args.tiny, "beton": str(args.beton), "synthetic_img_per_s": syn,
               "synthetic_img_per_s_all": [s["img_per_s"] for s in runs["synthetic"]], "rows": rows}
    logger.info("wrote %s", write_result(device, "input", payload, args.out))


if __name__ == "__main__":
    main()
