"""Runs every benchmark of one device in turn, then renders ``benchmarks/RESULTS.md`` (``make bench``).

Each benchmark is its own process (FFCV's loader threads, DeepSpeed's process group and the 2-rank ZeRO jobs stay
apart). Issue 16 added ``input`` (loader stalls), ``gradckpt`` (activation checkpointing), ``compile``
(torch.compile) and ``zero_knobs`` (ZeRO-2 knobs); their result files render in RESULTS.md's last sections.
Issue 13 added ``convert`` (``prepare`` vs FFCV's ``DatasetWriter``, folder and tar input; CPU work, any device).
On ``--device cuda`` the ZeRO memory benchmark (2 ranks, measured on CPU ranks) and ``convert`` are not run.

Usage: ``python -m benchmarks.run_all [--device cuda] [--only loader step ...]``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time

import torch

from benchmarks.common import REPO, RESULTS
from benchmarks.report import write_report

logger = logging.getLogger("run_all")

BENCHMARKS = ("loader", "step", "scaling", "zero", "input", "gradckpt", "compile", "zero_knobs",
              "convert")  # benchmarks.bench_*
CUDA_SKIP = ("zero", "convert")  # CPU jobs (2 CPU ranks; image conversion): not run with --device cuda
NO_DEVICE_FLAG = ("zero", "convert")  # take no --device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    names = [n for n in (args.only or BENCHMARKS) if not (n in CUDA_SKIP and args.device == "cuda")]
    env = {**os.environ, "DS_ACCELERATOR": "cpu" if args.device == "cpu" else os.environ.get("DS_ACCELERATOR", "cuda"),
           "PYTHONPATH": str(REPO)}
    seconds = {}
    t0 = time.perf_counter()
    for name in names:
        cmd = [sys.executable, "-m", f"benchmarks.bench_{name}"] + ([] if name in NO_DEVICE_FLAG else
                                                                     ["--device", args.device])
        logger.info("running %s", " ".join(cmd[1:]))
        start = time.perf_counter()
        subprocess.run(cmd, cwd=REPO, env=env, check=True)
        seconds[name] = time.perf_counter() - start
        logger.info("%s: %.0f s", name, seconds[name])
    run = RESULTS / args.device / "run.json"
    previous = json.loads(run.read_text())["scripts"] if run.is_file() and args.only else {}
    scripts = {**previous, **seconds}
    run.parent.mkdir(parents=True, exist_ok=True)
    run.write_text(json.dumps({"scripts": scripts, "total_s": sum(scripts.values()),
                               "this_invocation_s": time.perf_counter() - t0}, indent=1))
    logger.info("wrote %s", write_report())


if __name__ == "__main__":
    main()
