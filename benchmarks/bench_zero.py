"""ZeRO memory per rank (issue 6, part 4): parameters + gradients + optimizer state held at stages 0, 1, 2, 3.

For each stage a 2-rank job is launched (``deepspeed --num_gpus 2``; CPU ranks with ``DS_ACCELERATOR=cpu``, gloo)
that builds the product's FastMIM ViT-B/16 (86.7 M trainable parameters) under the stage's engine config (the
repo's ``ds_configs/zero2_fp32.json`` or, for bf16, ``ds_configs/zero2_bf16.json``, with the stage changed) and
runs two optimizer steps on a tiny batch (2 images of 64 px: activations are negligible next to the states).
At each inner AdamW call of step 2 (a ``register_step_pre_hook``; ZeRO 1/2 call it once per parameter group and
make that group's fp32 gradient partition right before), each rank measures what it actually holds and keeps the
largest; once more late in step 2's backward (a backward pre-hook on the patch embedding, the last layer to get its
gradient), when the gradient buckets are live:

* ``params``: storages of the module's parameters (ZeRO-3: each parameter's ``ds_tensor`` partition);
* ``optimizer``: AdamW state tensors (exp_avg, exp_avg_sq) and the parameters the inner optimizer updates when they
  are not the module's (ZeRO 1-3 keep an fp32 master partition, cloned even in fp32 training);
* ``grads + buffers``: every other tensor storage reachable from the engine's (ZeRO) optimizer object and the
  parameters' ``.grad``: gradient partitions and the contiguous-gradient (IPG) bucket buffers;
* cross-checks: every live tensor storage in the process (``gc``), the process RSS growth since before the model
  was built and its peak over the job (``VmRSS``/``VmHWM`` in ``/proc/self/status``; an untouched ``torch.empty``
  page does not count there, allocator caching does).

Storages are de-duplicated by data pointer, so flat buffers and the views into them count once. Measured, not
computed: the same walk gives whatever DeepSpeed allocates. fp32 runs use DeepSpeed's default buckets (5e8
elements: a 2 GB fp32 bucket for an 87 M-parameter model) and, for stages 2 and 3, the 5e7 of every shipped config;
bf16 runs use the shipped config as is. bf16 matmul is emulated on an AVX2 CPU: slow steps, same bytes held.

Usage: ``python -m benchmarks.bench_zero [--stages 0 1 2 3] [--bf16-stages 0 1 2 3] [--port 29660]``. Writes
``benchmarks/results/cpu/zero.json``. The per-rank worker is this module with ``--worker`` (started by the
launcher; it accepts ``--local_rank``).
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from benchmarks.common import DS_CONFIGS, REPO, build_engine, machine_info, train_step, write_result

logger = logging.getLogger("bench_zero")

PORTS = range(29660, 29691)  # this benchmark's master ports (other jobs on the machine use others)
SMALL_BUCKET = 50_000_000  # elements


def _rss_bytes(field: str = "VmRSS") -> int:
    """The process's resident set (``VmRSS``) or its high-water mark (``VmHWM``) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


class _Storages:
    """Unique tensor storages by category: the first category that reaches a storage owns it."""

    def __init__(self):
        self.owner: dict[int, str] = {}
        self.nbytes: dict[int, int] = {}

    def add(self, t: torch.Tensor | None, category: str) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        s = t.untyped_storage()
        ptr, n = s.data_ptr(), s.nbytes()
        if n == 0 or ptr in self.owner:
            return
        self.owner[ptr], self.nbytes[ptr] = category, n

    def walk(self, obj, category: str, seen: set[int], depth: int = 0) -> None:
        """Adds every tensor reachable from ``obj`` through containers and DeepSpeed objects' attributes."""
        if depth > 8 or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            self.add(obj, category)
            self.add(obj.grad, category)
            return
        if isinstance(obj, torch.nn.Module):  # the module's parameters are counted as params already
            return
        if isinstance(obj, dict):
            for v in obj.values():
                self.walk(v, category, seen, depth + 1)
        elif isinstance(obj, (list, tuple, set)):
            for v in obj:
                self.walk(v, category, seen, depth + 1)
        elif type(obj).__module__.startswith("deepspeed") and hasattr(obj, "__dict__"):
            for v in vars(obj).values():
                self.walk(v, category, seen, depth + 1)

    def total(self, category: str | None = None) -> int:
        return sum(n for p, n in self.nbytes.items() if category is None or self.owner[p] == category)


def held_bytes(engine, inner: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of params / optimizer / grads + buffers this rank holds now (see the module docstring)."""
    st = _Storages()
    params = list(engine.module.parameters())
    for p in params:
        st.add(p.ds_tensor if hasattr(p, "ds_tensor") else p.data, "params")
    # the parameters AdamW updates (its state keys; DeepSpeed swaps param_groups per group while stepping)
    for p, state in inner.state.items():
        st.add(p.data, "optimizer")
        for v in state.values():
            st.add(v, "optimizer")
    for group in inner.param_groups:
        for p in group["params"]:
            st.add(p.data, "optimizer")
    for p in params:
        st.add(p.grad, "grads")
    live = _Storages()
    with warnings.catch_warnings():  # isinstance() on torch.distributed's deprecated module attributes warns
        warnings.simplefilter("ignore")
        st.walk(engine.optimizer, "grads", set())
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor):
                live.add(obj, "live")
    out = {k: st.total(k) for k in ("params", "optimizer", "grads")}
    out["total"] = st.total()
    out["all_live_tensors"] = live.total()
    if torch.cuda.is_available() and params[0].device.type == "cuda":
        out["cuda_allocated"] = torch.cuda.memory_allocated()
    return out


def _ds_config(stage: int, bucket: int | None, dtype: str) -> dict:
    """The shipped config for ``dtype`` (``DS_CONFIGS``) at ``stage``; ``bucket`` None = DeepSpeed's default buckets."""
    cfg = json.loads((REPO / DS_CONFIGS[dtype]).read_text())
    zero = cfg["zero_optimization"]
    zero["stage"] = stage
    zero.pop("reduce_bucket_size", None)
    zero.pop("allgather_bucket_size", None)
    if stage == 3:  # the ZeRO-3 keys of ds_configs/zero3_bf16.json (fp32 here); no reduce_scatter knob there
        zero.pop("reduce_scatter", None)
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    if bucket:
        zero["reduce_bucket_size"] = bucket
        zero["allgather_bucket_size"] = bucket
    return cfg


def worker(args: argparse.Namespace) -> None:
    """One rank: build, two steps, measure at the inner optimizer's step pre-hook of step 2, write rank<r>.json."""
    from fastmim_ds.config import MIMModelCfg
    from fastmim_ds.methods import create_mim_model
    from fastmim_ds.methods.fastmim import FastMIMCfg
    from fastmim_ds.runtime import close_distributed, init_distributed

    dist = init_distributed()
    gc.collect()
    rss0 = _rss_bytes()
    torch.manual_seed(0)
    model = create_mim_model(FastMIMCfg(), MIMModelCfg(encoder="vit_base_patch16_224"), 64)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cfg_path = Path(args.out) / f"ds_stage{args.stage}.json"
    if dist.rank == 0:
        cfg_path.write_text(json.dumps(_ds_config(args.stage, args.bucket, args.dtype)))
    torch.distributed.barrier()
    engine = build_engine(model.to(dist.device), dtype=args.dtype, micro_batch=2, ds_config=str(cfg_path))
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    found: dict[str, dict] = {}
    armed = {"step": False, "backward": False}

    def measure(point: str) -> None:
        if not armed[point.split("_")[-1]] or (point == "in_backward" and point in found):
            return
        now = {**held_bytes(engine, inner), "rss_delta": _rss_bytes() - rss0}
        if point not in found or now["total"] > found[point]["total"]:
            found[point] = now

    # ZeRO 1/2 run the inner optimizer once per parameter group, each group's fp32 gradient partition made right
    # before its call (and its bit16 gradients freed): keep the largest of the calls of step 2
    inner.register_step_pre_hook(lambda *_: measure("at_step"))
    # the patch embedding's backward comes last: every other gradient is in the ZeRO buckets/partitions by then
    engine.module.encoder.patch_embed.register_full_backward_pre_hook(lambda *_: measure("in_backward"))
    imgs = torch.randn(2, 3, 64, 64, device=dist.device)
    train_step(engine, imgs)
    armed["backward"] = True
    loss = engine(imgs)["loss"]
    engine.backward(loss)
    armed["step"] = True
    engine.step()
    found["peak_rss_delta"] = _rss_bytes("VmHWM") - rss0
    out = {"rank": dist.rank, "world_size": dist.world_size, "stage": args.stage, "bucket": args.bucket,
           "dtype": args.dtype,
           "trainable_params": n_params, "optimizer_class": type(engine.optimizer).__name__, **found}
    (Path(args.out) / f"rank{dist.rank}.json").write_text(json.dumps(out))
    close_distributed()


def _free_port(candidates) -> int:
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError(f"no free port in {candidates}")


def run_stage(stage: int, bucket: int | None, dtype: str, port: int, timeout: int) -> list[dict]:
    """Launches the 2-rank worker for ``stage``; returns the ranks' measurements.

    Raises:
        RuntimeError: the job failed (its output tail is in the message).
    """
    with tempfile.TemporaryDirectory(prefix="bench_zero_") as out:
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", str(port),
               "--module", "benchmarks.bench_zero", "--worker", "--stage", str(stage), "--dtype", dtype, "--out", out]
        if bucket:
            cmd += ["--bucket", str(bucket)]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False)
        ranks = sorted(Path(out).glob("rank*.json"))
        if proc.returncode != 0 or len(ranks) != 2:
            raise RuntimeError(f"stage {stage}: exit {proc.returncode}\n{(proc.stdout + proc.stderr)[-3000:]}")
        return [json.loads(p.read_text()) for p in ranks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3],
                        help="fp32 stages run with DeepSpeed's default buckets")
    parser.add_argument("--small-bucket-stages", type=int, nargs="*", default=[2, 3],
                        help=f"fp32 stages also run with reduce/allgather buckets of {SMALL_BUCKET:.0e} elements")
    parser.add_argument("--bf16-stages", type=int, nargs="*", default=[0, 1, 2, 3],
                        help=f"stages run in bf16 (ds_configs/zero2_bf16.json, the GPU config: {SMALL_BUCKET:.0e} "
                             "buckets, overlap_comm); bf16 matmul is emulated on an AVX2 CPU, which slows the steps "
                             "but does not change what is held")
    parser.add_argument("--port", type=int, default=None, help="master port (default: first free in 29660-29690)")
    parser.add_argument("--timeout", type=int, default=600)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--bucket", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    info = machine_info(torch.device("cpu"))
    t0 = time.perf_counter()
    runs = []
    jobs = ([(s, None, "fp32") for s in args.stages] + [(s, SMALL_BUCKET, "fp32") for s in args.small_bucket_stages]
            + [(s, SMALL_BUCKET, "bf16") for s in args.bf16_stages])
    for stage, bucket, dtype in jobs:
        port = args.port or _free_port(PORTS)
        ranks = run_stage(stage, bucket, dtype, port, args.timeout)
        runs.append({"stage": stage, "bucket": bucket, "dtype": dtype, "ranks": ranks})
        at = max(ranks, key=lambda r: r["at_step"]["total"])["at_step"]
        logger.info("%s stage %d%s: %.0f MB held per rank (params %.0f, optimizer %.0f, grads+buffers %.0f), "
                    "RSS +%.0f MB", dtype, stage, f" bucket {bucket:.0e}" if bucket else "", at["total"] / 1e6,
                    at["params"] / 1e6, at["optimizer"] / 1e6, at["grads"] / 1e6, at["rss_delta"] / 1e6)
    write_result(torch.device("cpu"), "zero", {"machine": info, "model": "FastMIM ViT-B/16 (HOG, 256-d x 1 decoder)",
                                               "world_size": 2, "runs": runs, "seconds": time.perf_counter() - t0})


if __name__ == "__main__":
    main()
