"""ZeRO-2 knobs side by side (issue 16, part 4): the per-step fixed cost of the ViT-B step, FastMIM vs SimMIM.

Each variant is the shipped ZeRO-2 config (``ds_configs/zero2_fp32.json`` on CPU, ``zero2_bf16.json`` on GPU) with
one change, run in its own process with :func:`benchmarks.bench_step.bench_family` (the same engine, models and
interleaved FastMIM / SimMIM rounds as ``bench_step``, plus the half-batch steps that split a step into a fixed
cost and a per-image cost):

* ``shipped``: as shipped (contiguous_gradients, reduce_scatter, overlap_comm off, 5e7-element buckets);
* ``overlap_comm``: overlap_comm on; ``no_contiguous_gradients``; ``no_reduce_scatter``;
* ``bucket_2e8`` / ``bucket_5e8``: reduce and allgather buckets of 2e8 / 5e8 elements;
* ``adamw_foreach``: torch's multi-tensor AdamW instead of the product's fused kernel (the fused optimizer's part);
* ``offload_optimizer`` (``--device cuda`` only): ZeRO-Offload, the optimizer states and update on the CPU;
* ``zero0``: no ZeRO at all, the floor of the fixed cost on one rank.

One rank (no gradient exchange): what is measured is each knob's bookkeeping (bucketing, copies into the
contiguous buffer, the partitioned update), the fixed cost that made ViT-B miss 3x at batch 16. Printed per
variant: FastMIM and SimMIM s/step, the ratio (target >= 3.0 at batch 16), FastMIM's fixed cost per step and
its per-image cost.

Usage: ``python -m benchmarks.bench_zero_knobs [--device cuda] [--variants shipped overlap_comm ...] [--tiny]``.
Writes ``benchmarks/results/<device>/zero_knobs.json`` (``--out`` elsewhere).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import (
    DS_CONFIGS,
    REPO,
    add_device_args,
    machine_info,
    one_rank_group,
    setup_device,
    write_result,
)

logger = logging.getLogger("bench_zero_knobs")

# variant -> (zero_optimization changes, build_engine fused flag, devices it runs on)
VARIANTS = {
    "shipped": ({}, None, ("cpu", "cuda")),
    "overlap_comm": ({"overlap_comm": True}, None, ("cpu", "cuda")),
    "no_contiguous_gradients": ({"contiguous_gradients": False}, None, ("cpu", "cuda")),
    "no_reduce_scatter": ({"reduce_scatter": False}, None, ("cpu", "cuda")),
    "bucket_2e8": ({"reduce_bucket_size": 200_000_000, "allgather_bucket_size": 200_000_000}, None, ("cpu", "cuda")),
    "bucket_5e8": ({"reduce_bucket_size": 500_000_000, "allgather_bucket_size": 500_000_000}, None, ("cpu", "cuda")),
    "adamw_foreach": ({}, False, ("cpu", "cuda")),
    "offload_optimizer": ({"offload_optimizer": {"device": "cpu"}}, None, ("cuda",)),
    "zero0": ({"stage": 0}, None, ("cpu", "cuda")),
}


def variant_config(name: str, dtype: str) -> dict:
    """The shipped ZeRO-2 engine config of ``dtype`` with variant ``name``'s changes."""
    cfg = json.loads((REPO / DS_CONFIGS[dtype]).read_text())
    changes = VARIANTS[name][0]
    if changes.get("stage") == 0:
        cfg["zero_optimization"] = {"stage": 0}
    else:
        cfg["zero_optimization"] = {**copy.deepcopy(cfg["zero_optimization"]), **changes}
    if "offload_optimizer" in changes:
        cfg["zero_force_ds_cpu_optimizer"] = False  # the product's torch AdamW, stepping on the CPU
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_args(parser)
    parser.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=None)
    parser.add_argument("--batch", type=int, default=None, help="images per step (cpu 16, cuda 128)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved FastMIM / SimMIM rounds per variant")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per method per round (cpu 1, cuda 5)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="2-block 64-d ViTs: a smoke run")
    parser.add_argument("--out", type=Path, default=None, help="result file (default benchmarks/results/...)")
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--part-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    device, dtype = setup_device(args)
    cpu = device.type == "cpu"
    batch, steps = args.batch or (16 if cpu else 128), args.steps or (1 if cpu else 5)
    if args.part:
        from benchmarks import bench_step

        one_rank_group()
        torch.set_num_threads(args.threads)
        if args.tiny:  # the same families with 2-block, 64-d encoders
            bench_step.use_tiny_encoders()
        path = Path(args.part_out).with_suffix(".ds.json")
        path.write_text(json.dumps(variant_config(args.part, dtype)))
        res = bench_step.bench_family("vit", device=device, dtype=dtype, batch=batch, rounds=args.rounds,
                                      steps=steps, warmup=args.warmup, profile=False, methods=["fastmim", "simmim"],
                                      ds_config=str(path), half=batch // 2, fused=VARIANTS[args.part][1])
        Path(args.part_out).write_text(json.dumps(res))
        return
    names = [v for v in (args.variants or VARIANTS) if device.type in VARIANTS[v][2]]
    info, t0 = machine_info(device), time.perf_counter()
    flags = [f"--device={args.device}", f"--threads={args.threads}", f"--batch={batch}", f"--steps={steps}",
             f"--warmup={args.warmup}", f"--rounds={args.rounds}"] + (["--tiny"] if args.tiny else [])
    flags += [f"--dtype={args.dtype}"] if args.dtype else []
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_zero_knobs_") as tmp:
        for name in names:
            out = Path(tmp) / f"{name}.json"
            proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_zero_knobs", *flags, "--part", name,
                                   "--part-out", str(out)], cwd=REPO)
            if proc.returncode:
                logger.warning("%s failed (exit %d): left out", name, proc.returncode)
                continue
            results[name] = json.loads(out.read_text())
    rows = []
    print(f"\nZeRO-2 knobs, ViT-B/16{' (tiny)' if args.tiny else ''}, batch {batch} (half {batch // 2}), 1 rank, "
          f"{device.type} {dtype}")
    print("| variant | FastMIM s/step | SimMIM s/step | SimMIM / FastMIM | FastMIM fixed s/step | "
          "FastMIM s/img |")
    print("|---|---|---|---|---|---|")
    for name, res in results.items():
        fm, sm = res["methods"]["fastmim"], res["methods"]["simmim"]
        row = {"variant": name, "zero_optimization": variant_config(name, dtype)["zero_optimization"],
               "fused": VARIANTS[name][1], "fastmim_step_s": fm["step_s"], "simmim_step_s": sm["step_s"],
               "ratio": sm["step_s"] / fm["step_s"], "fastmim_fixed_s": fm["fixed_s"],
               "fastmim_per_img_s": fm["per_img_s"], "simmim_fixed_s": sm["fixed_s"], "result": res}
        rows.append(row)
        print(f"| {name} | {row['fastmim_step_s']:.3f} | {row['simmim_step_s']:.3f} | {row['ratio']:.2f}x | "
              f"{row['fastmim_fixed_s']:.3f} | {row['fastmim_per_img_s']:.4f} |")
    payload = {"machine": info, "dtype": dtype, "batch": batch, "tiny": args.tiny, "rows": rows,
               "seconds": time.perf_counter() - t0}
    logger.info("wrote %s", write_result(device, "zero_knobs", payload, args.out))


if __name__ == "__main__":
    main()
