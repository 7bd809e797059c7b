"""Shared pieces of the benchmark scripts: device and precision flags, timing, peak matmul throughput, FLOP counting,
the DeepSpeed engine every training-step benchmark runs under, the machine description and the result files.

Every benchmark writes ``benchmarks/results/<device>/<name>.json`` (``device`` is ``cpu`` or ``cuda``);
:mod:`benchmarks.report` turns whatever is there into ``benchmarks/RESULTS.md`` and the PNG plots, so a GPU run on
another machine adds its numbers next to the CPU ones.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import logging
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = [
    "REPO", "RESULTS", "DTYPES", "DS_CONFIGS", "add_device_args", "setup_device", "sync", "timed", "median",
    "peak_matmul", "count_flops", "one_rank_group", "build_engine", "train_step", "machine_info", "write_result",
    "read_results", "random_images", "rss_bytes", "TINY_VIT",
]

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# The same engine config for every model of a run: ZeRO-2, precision from --dtype (CPU: fp32, see cpu_precision.py).
DS_CONFIGS = {"fp32": "ds_configs/zero2_fp32.json", "bf16": "ds_configs/zero2_bf16.json"}


def add_device_args(parser: argparse.ArgumentParser) -> None:
    """``--device`` (default: cuda when available), ``--dtype`` (default: bf16 on cuda, fp32 on cpu), ``--threads``."""
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="training precision (default: bf16 on cuda; fp32 on cpu, where bf16 matmul is emulated)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads (cpu)")


def setup_device(args: argparse.Namespace) -> tuple[torch.device, str]:
    """Applies the device flags; returns (device, dtype name).

    Raises:
        RuntimeError: ``--device cuda`` without a visible GPU.
    """
    if args.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch sees no GPU")
    dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 runs on GPUs use TF32, as any trainer would
        torch.backends.cudnn.allow_tf32 = True
    return torch.device(args.device), dtype


def sync(device: torch.device) -> None:
    """Waits for queued device work, so that wall-clock intervals cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes, device work included."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def peak_matmul(device: torch.device, dtype: torch.dtype, *, sizes: tuple[int, ...] = (512, 1024, 2048, 4096, 8192),
                min_time: float = 1.0, max_call: float = 1.0) -> dict:
    """Measured dense matmul throughput: the best of n x n @ n x n over ``sizes`` (2 n^3 FLOPs per call).

    Sizes grow until one call takes longer than ``max_call`` s (so an emulated dtype, e.g. bf16 on an AVX2 CPU,
    stops at a small size instead of running for minutes).

    Returns:
        ``{"tflops": best TFLOP/s, "size": n of the best, "per_size": {n: TFLOP/s}}``.
    """
    per_size: dict[int, float] = {}
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        first = timed(lambda a=a, b=b: a @ b, device)  # warm-up (kernel selection, page faults)
        calls, t0 = 0, time.perf_counter()
        if first <= max_call:
            while time.perf_counter() - t0 < min_time:
                torch.mm(a, b)
                calls += 1
            sync(device)
            seconds = time.perf_counter() - t0
        else:
            calls, seconds = 1, first
        per_size[n] = 2 * n**3 * calls / seconds / 1e12
        if first > max_call:
            break
    best = max(per_size, key=per_size.get)
    return {"tflops": per_size[best], "size": best, "per_size": per_size}


def _sdpa_cpu_formulas() -> dict:
    # torch's FlopCounterMode knows the CUDA fused-attention ops but not the CPU flash kernel timm's ViT runs on;
    # same arithmetic (QK^T and AV matmuls; backward 2x that), so reuse torch's own formulas.
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    return {
        aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *args, out_shape=None, **kw: fc.sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda g, q, k, v, *args, out_shape=None, **kw: fc.sdpa_backward_flop_count(g, q, k, v),
    }


def count_flops(fn: Callable[[], object]) -> tuple[int, dict[str, int]]:
    """FLOPs of the matmuls, convolutions and attention ``fn`` runs (``torch.utils.flop_counter``; a multiply-add
    counts 2). Element-wise work (norms, activations, the optimizer) is not counted: the usual "model FLOPs".

    Returns:
        (total, {aten op name: FLOPs}).
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_sdpa_cpu_formulas()) as counter:
        fn()
    by_op = {str(k): int(v) for k, v in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops(), by_op


def start(args: argparse.Namespace) -> tuple[torch.device, str]:
    """The usual start of an in-process benchmark: INFO logging, the device flags (:func:`setup_device`) and a 1-rank
    process group, with ``--threads`` restored after it (``init_distributed`` sets torch's threads per rank)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    device, dtype = setup_device(args)
    one_rank_group()
    torch.set_num_threads(args.threads)
    return device, dtype


def one_rank_group() -> None:
    """A 1-rank torch.distributed group for an in-process DeepSpeed engine (``fastmim_ds.runtime.init_distributed``)."""
    from fastmim_ds.runtime import init_distributed

    if not torch.distributed.is_initialized():
        for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"):
            os.environ.pop(k, None)
        init_distributed()


def build_engine(model: torch.nn.Module, *, dtype: str, micro_batch: int, ds_config: str | None = None,
                 fused: bool | None = None):
    """The product's engine around ``model``: AdamW groups from ``fastmim_ds.optim.build_optimizer`` (no decay on
    1-D params and tokens, lr = 1.5e-4 x batch / 256), ``ds_configs`` file for ``dtype`` with the batch filled in.

    Args:
        fused: ``None`` keeps the product's AdamW as built; ``True``/``False`` forces torch's fused kernel on/off
            (``False`` = torch's default implementation, what the product used before it chose ``fused=True``).

    Call :func:`one_rank_group` first (or run under the ``deepspeed`` launcher).
    """
    from fastmim_ds.config import OptimCfg, Resolved, TrainCfg
    from fastmim_ds.ds_engine import build_ds_config, create_engine
    from fastmim_ds.optim import build_optimizer

    world = torch.distributed.get_world_size()
    optim = OptimCfg()
    derived = Resolved(world_size=world, eff_batch=micro_batch * world, lr=optim.blr * micro_batch * world / 256,
                       min_lr=0.0)
    train = TrainCfg(micro_batch=micro_batch, grad_accum=1, ds_config=str(REPO / (ds_config or DS_CONFIGS[dtype])))
    cfg = build_ds_config(train, clip_grad=optim.clip_grad, world_size=world)
    optimizer = build_optimizer(model, optim, derived)
    if fused is not None:  # DeepSpeed keeps these per-group flags when it swaps in its flat partitions
        for group in optimizer.param_groups:
            group["fused"], group["foreach"] = fused, None
        optimizer.defaults["fused"] = fused
    return create_engine(model, optimizer, cfg)


def train_step(engine, imgs: torch.Tensor) -> torch.Tensor:
    """One optimizer step as ``fastmim_ds.loop`` runs it: forward, ``engine.backward``, ``engine.step``."""
    loss = engine(imgs)["loss"]
    engine.backward(loss)
    engine.step()
    return loss.detach()


# --tiny smoke runs of the benchmark scripts: a 2-block 32-d ViT/16 at 64 px (seconds on a CPU)
TINY_VIT = {"encoder_kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2}, "decoder_dim": 32, "img_size": 64}


def rss_bytes(field: str = "VmRSS") -> int:
    """This process's resident set (``VmRSS``) or its high-water mark (``VmHWM``) in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def random_images(batch: int, img_size: int, device: torch.device) -> torch.Tensor:
    """(B, 3, H, W) fp32 N(0, 1) images (mean/std-normalised range), channels-last as the FFCV loader yields them."""
    return torch.randn(batch, 3, img_size, img_size, device=device).contiguous(memory_format=torch.channels_last)


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    """Where and with what a result was measured: CPU/GPU model, cores, threads, versions, date, load average."""
    versions = {}
    for dist in ("torch", "torchvision", "timm", "deepspeed", "ffcv", "numpy", "numba", "pillow", "matplotlib"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "-"
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "versions": versions,
        "load_avg_start": os.getloadavg()[0],
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_mem_gib"] = round(props.total_memory / 2**30, 1)
    return info


def write_result(device: torch.device, name: str, payload: dict, out: Path | str | None = None) -> Path:
    """Writes ``payload`` (plus the load average at the end) to ``benchmarks/results/<device>/<name>.json`` (or to
    ``out``: smoke runs and the GPU check keep their files elsewhere)."""
    out = Path(out) if out else RESULTS / device.type / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload.setdefault("machine", {})["load_avg_end"] = os.getloadavg()[0]
    out.write_text(json.dumps(payload, indent=1))
    return out


def read_results() -> dict[str, dict[str, dict]]:
    """{device: {name: payload}} of every result file present."""
    found: dict[str, dict[str, dict]] = {}
    for path in sorted(RESULTS.glob("*/*.json")):
        found.setdefault(path.parent.name, {})[path.stem] = json.loads(path.read_text())
    return found
