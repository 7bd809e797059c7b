"""``make gpu-check``: what one GPU does with the product, measured in <= 6 minutes, written to ``results/cuda/``.

Stages (each writes ``<out>/<stage>.json``; a failing stage records its error and the others still run):

1. ``peak``: the measured dense bf16 matmul peak of the GPU (and TF32 fp32), n x n @ n x n, best size;
2. ``step``: the FastMIM ViT-B/16 pre-training step at 128 px in bf16 on the product's ZeRO-2 engine: img/s and
   its utilisation of the measured bf16 peak (model FLOPs of forward + backward from ``torch.utils.flop_counter``);
3. ``ffcv``: FFCV decoding to the GPU at 128 px: the product's training loader (``data.train_loader``, RRC + flip,
   normalised batches landing on the device) on the imagenette beton, img/s after one warm-up epoch;
4. ``zero``: ZeRO-2 vs ZeRO-0 memory of the FastMIM ViT-B engine on this rank after two steps: parameters,
   optimizer state, gradients and buffers (the storage walk of ``benchmarks.bench_zero``) and CUDA's peak allocation.
   One GPU is one rank, so ZeRO-2 partitions nothing here; what it saves per rank at N ranks is
   ``(optimizer + grads) x (1 - 1/N)``, the 2-rank CPU measurement of ``bench_zero``;
5. ``pretrain``: a real pre-training run (``python -m fastmim_ds pretrain``, configs/fastmim_vit_base_128_800ep.yaml)
   on imagenette for ``--pretrain-seconds`` (120), stopped with SIGTERM (the product's preemption path: it
   checkpoints and exits); from its ``metrics.jsonl``: img/s, loss first / last, the share of time waiting for data.

The imagenette beton is written first with ``fastmim-ds prepare`` (``../shared/datasets/imagenette2-224``, longest
side 256 px) into ``data/gpu_check/`` and reused. Then :func:`render` writes ``<out>/REPORT.md`` from the JSON
files (``python -m benchmarks.gpu_check --report-only`` re-renders).

``--device cpu --dry-run``: every stage end to end with tiny sizes on the CPU (a 2-block ViT at 64 px, fp32, a
generated 10-class dataset, a 15 s pre-training run) into ``results/cpu-dry/``; the test suite runs it.

Usage: ``python -m benchmarks.gpu_check [--device cuda] [--out results/cuda] [--stages peak step ...]``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from benchmarks.common import REPO, machine_info, random_images, sync, timed, train_step

logger = logging.getLogger("gpu_check")

STAGES = ("peak", "step", "ffcv", "zero", "pretrain")
IMAGENETTE = next((p for p in (REPO.parent / "shared" / "datasets" / "imagenette2-224",
                               REPO / "shared" / "datasets" / "imagenette2-224") if p.is_dir()),
                  REPO.parent / "shared" / "datasets" / "imagenette2-224")
TINY_KW = {"embed_dim": 32, "depth": 2, "num_heads": 2}


class Plan:
    """Sizes of one check: the real one on a GPU, or the tiny CPU dry run."""

    def __init__(self, device: str, dry: bool):
        self.device, self.dry = torch.device(device), dry
        self.dtype = "fp32" if dry else "bf16"
        self.img_size = 64 if dry else 128
        self.batch = 4 if dry else 256
        self.steps = 2 if dry else 20
        self.matmul_sizes = (128, 256) if dry else (4096, 8192, 16384)
        self.ffcv_batches = 4 if dry else 60
        self.loader_threads = 2 if dry else min(16, os.cpu_count() or 1)
        self.pretrain_seconds = 15.0 if dry else 120.0
        self.encoder_kwargs = TINY_KW if dry else {}


def _model(plan: Plan):
    from fastmim_ds.config import MIMModelCfg
    from fastmim_ds.methods import create_mim_model
    from fastmim_ds.methods.fastmim import FastMIMCfg

    method = FastMIMCfg(mask_ratio=0.75, block_size=16, decoder_dim=32 if plan.dry else 256, decoder_depth=1)
    torch.manual_seed(0)
    return create_mim_model(method, MIMModelCfg(encoder_kwargs=plan.encoder_kwargs), plan.img_size).to(plan.device)


def _engine(plan: Plan, model, stage: int | None = None):
    from benchmarks.common import DS_CONFIGS, build_engine

    ds_config = None
    if stage is not None:
        cfg = json.loads((REPO / DS_CONFIGS[plan.dtype]).read_text())
        cfg["zero_optimization"] = {**cfg["zero_optimization"], "stage": stage} if stage else {"stage": 0}
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"gpu_check_zero{stage}_{os.getpid()}.json"
        path.write_text(json.dumps(cfg))
        ds_config = str(path)
    return build_engine(model, dtype=plan.dtype, micro_batch=plan.batch, ds_config=ds_config)


def stage_peak(plan: Plan, ctx: dict) -> dict:
    from benchmarks.common import DTYPES, peak_matmul

    res = {d: peak_matmul(plan.device, DTYPES[d], sizes=plan.matmul_sizes, min_time=0.2 if plan.dry else 1.0)
           for d in ("bf16", "fp32")}
    ctx["peak_tflops"] = res[plan.dtype]["tflops"]
    return {"bf16_tflops": res["bf16"]["tflops"], "fp32_tflops": res["fp32"]["tflops"], "per_size": res}


def stage_step(plan: Plan, ctx: dict) -> dict:
    from benchmarks.common import count_flops

    model = _model(plan)
    probe = random_images(2, plan.img_size, plan.device)
    flops, _ = count_flops(lambda: model(probe)["loss"].backward())
    model.zero_grad(set_to_none=True)
    engine = _engine(plan, model)
    imgs = random_images(plan.batch, plan.img_size, plan.device)
    for _ in range(2):
        train_step(engine, imgs)
    times = [timed(lambda: train_step(engine, imgs), plan.device) for _ in range(plan.steps)]
    step = sorted(times)[len(times) // 2]  # median: a GPU has no other jobs to dodge
    achieved = flops / 2 * plan.batch / step / 1e12
    peak = ctx.get("peak_tflops")
    return {"batch": plan.batch, "img_size": plan.img_size, "dtype": plan.dtype, "step_s": step,
            "img_per_s": plan.batch / step, "gflops_per_img": flops / 2 / 1e9, "achieved_tflops": achieved,
            "utilisation": achieved / peak if peak else None, "step_s_all": times}


def ensure_dataset(plan: Plan, data_root: Path) -> Path:
    """The beton folder of the check: imagenette (``fastmim-ds prepare``), or a generated tiny set (dry run)."""
    out = data_root / ("synthetic" if plan.dry else "imagenette")
    if (out / "train.beton").is_file():
        return out
    src = IMAGENETTE
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if plan.dry:
        src = data_root / "synthetic_images"
        subprocess.run([sys.executable, str(REPO / "data_prep" / "make_synthetic.py"), "--out", str(src),
                        "--train-per-class", "4", "--val-per-class", "1", "--size", "64"], check=True, env=env)
    elif not (src / "train").is_dir():
        raise FileNotFoundError(f"{src}/train not found (imagenette2-224 ImageFolder)")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fastmim_ds", "prepare", "--src", str(src), "--out", str(out),
                    "--max-res", "96" if plan.dry else "256"], check=True, env=env, cwd=REPO)
    logger.info("prepared %s in %.0f s", out, time.perf_counter() - t0)
    return out


def stage_ffcv(plan: Plan, ctx: dict) -> dict:
    from fastmim_ds.config import DataCfg
    from fastmim_ds.data import train_loader

    beton = ctx["data"] / "train.beton"
    batch = 8 if plan.dry else 256
    # RandomResizedCrop (0.2, 1), ratio (3/4, 4/3), flip: DataCfg's pre-training defaults
    loader = train_loader(DataCfg(train=str(beton), num_workers=plan.loader_threads), img_size=plan.img_size,
                          batch_size=batch, seed=0, device=plan.device)
    n = min(plan.ffcv_batches, len(loader) - 1)
    t0 = time.perf_counter()
    for _ in loader:  # warm-up epoch: numba JIT, page cache
        pass
    warm = time.perf_counter() - t0
    loader.set_epoch(1)
    it = iter(loader)
    next(it)  # start-up batch
    sync(plan.device)
    t0 = time.perf_counter()
    for _ in range(n):
        images, _ = next(it)
    sync(plan.device)
    seconds = time.perf_counter() - t0
    del it
    return {"img_size": plan.img_size, "batch": batch, "threads": plan.loader_threads, "batches": n,
            "img_per_s": n * batch / seconds, "device": str(images.device), "warmup_epoch_s": warm}


def stage_zero(plan: Plan, ctx: dict) -> dict:
    from benchmarks.bench_zero import held_bytes

    out = {}
    imgs = random_images(plan.batch, plan.img_size, plan.device)
    for stage in (0, 2):
        if plan.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(plan.device)
        engine = _engine(plan, _model(plan), stage=stage)
        for _ in range(2):
            train_step(engine, imgs)
        sync(plan.device)
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
        held = held_bytes(engine, inner)
        if plan.device.type == "cuda":
            held["cuda_peak_allocated"] = torch.cuda.max_memory_allocated(plan.device)
        out[f"zero{stage}"] = held
        engine.destroy()
        del engine
    out["zero2_over_zero0"] = out["zero2"]["total"] / out["zero0"]["total"]
    return out


def stage_pretrain(plan: Plan, ctx: dict) -> dict:
    run_root = ctx["runs"]  # under --data (git-ignored): the run's checkpoint is ~1.5 GB for ViT-B
    sets = [f"data.train={ctx['data'] / 'train.beton'}", f"train.output_dir={run_root}", "train.run_name=check",
            "train.epochs=10000", "train.log_every=5", "train.ckpt_every=100000", "optim.warmup_epochs=1",
            f"data.num_workers={plan.loader_threads}"]
    if plan.dry:
        sets += ["model.encoder_kwargs={embed_dim: 32, depth: 2, num_heads: 2}", "method.decoder_dim=32",
                 "data.img_size=64", "train.micro_batch=8", "train.log_every=1",
                 "train.ds_config=ds_configs/zero2_fp32.json"]
    else:
        sets += ["train.micro_batch=256"]
    cmd = [sys.executable, "-m", "fastmim_ds", "pretrain", "--config", "configs/fastmim_vit_base_128_800ep.yaml",
           "--resume", "auto"] + [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "PYTHONPATH": str(REPO),
           "DS_ACCELERATOR": "cpu" if plan.device.type == "cpu" else os.environ.get("DS_ACCELERATOR", "cuda")}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_SIZE"):
        env.pop(k, None)
    log = ctx["out"] / "pretrain.log"
    metrics = run_root / "check" / "metrics.jsonl"
    if metrics.exists():
        metrics.unlink()
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
        # the budget counts from the first logged step: start-up (imports, engine) is not training
        while proc.poll() is None and time.perf_counter() - t0 < 600:  # SIGTERM before the handler would kill it
            if metrics.is_file() and metrics.stat().st_size:
                break
            time.sleep(0.5)
        started = time.perf_counter()
        while proc.poll() is None and time.perf_counter() - started < plan.pretrain_seconds:
            time.sleep(0.5)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # preemption: checkpoint at the next step, exit 0
        rc = proc.wait(timeout=300)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    steps = [r for r in rows if "step" in r]
    epochs = [r for r in rows if "epoch_end" in r]
    if rc != 0 or not steps:
        raise RuntimeError(f"pre-training exited {rc} with {len(steps)} logged steps; see {log}:\n"
                           + "\n".join(log.read_text().splitlines()[-20:]))
    tail = steps[len(steps) // 2:] or steps  # past start-up
    return {"exit_code": rc, "seconds_training": time.perf_counter() - started, "start_up_s": started - t0,
            "steps": steps[-1]["step"], "epochs_done": len(epochs), "loss_first": steps[0]["loss"],
            "loss_last": steps[-1]["loss"], "img_per_s": sorted(r["img_per_s"] for r in tail)[len(tail) // 2],
            "data_wait_frac": (sorted(r["data_wait_frac"] for r in tail)[len(tail) // 2]
                               if "data_wait_frac" in tail[0] else None),
            "epoch_data_wait_frac": [r.get("data_wait_frac") for r in epochs], "log": str(log)}


RUNNERS = {"peak": stage_peak, "step": stage_step, "ffcv": stage_ffcv, "zero": stage_zero, "pretrain": stage_pretrain}


def _fmt(v, spec: str = ".2f", unit: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{unit}"


def render(out: Path) -> Path:
    """``out/REPORT.md`` from the stage files present in ``out``; returns its path."""
    res = {s: json.loads((out / f"{s}.json").read_text()) for s in STAGES if (out / f"{s}.json").is_file()}
    m = json.loads((out / "machine.json").read_text()) if (out / "machine.json").is_file() else {}
    v = m.get("versions", {})
    dry = " (dry run: tiny sizes on the CPU, not a measurement)" if m.get("dry_run") else ""
    lines = ["# GPU check", "", f"Written by `make gpu-check` (`benchmarks/gpu_check.py`) on {m.get('date', '?')}: "
             f"{m.get('gpu', m.get('cpu', '?'))}{dry}.",
             f"torch {v.get('torch', '?')}, deepspeed {v.get('deepspeed', '?')}, ffcv {v.get('ffcv', '?')}.", "",
             "| stage | result |", "|---|---|"]

    def row(stage: str, text) -> None:
        r = res.get(stage)
        if r is None:
            lines.append(f"| {stage} | not run |")
        elif "error" in r:
            lines.append(f"| {stage} | **failed**: {r['error'].splitlines()[0][:200]} |")
        else:
            lines.append(f"| {stage} | {text(r)} |")

    row("peak", lambda r: f"bf16 matmul peak {r['bf16_tflops']:.1f} TFLOP/s (fp32/TF32 {r['fp32_tflops']:.1f})")
    row("step", lambda r: f"FastMIM ViT-B/16 {r['img_size']} px {r['dtype']}, batch {r['batch']}: "
                          f"{r['img_per_s']:,.0f} img/s ({r['step_s'] * 1e3:.1f} ms/step), {r['achieved_tflops']:.1f} "
                          f"TFLOP/s = {_fmt(r['utilisation'], '.0%')} of the measured peak")
    row("ffcv", lambda r: f"FFCV decoding to {r['device']} at {r['img_size']} px, {r['threads']} threads: "
                          f"{r['img_per_s']:,.0f} img/s")
    row("zero", lambda r: f"held per rank: ZeRO-0 {r['zero0']['total'] / 2**20:,.0f} MiB, ZeRO-2 "
                          f"{r['zero2']['total'] / 2**20:,.0f} MiB ({r['zero2_over_zero0']:.2f}x; one rank: nothing "
                          f"to partition)"
                          + (f"; CUDA peak {r['zero0']['cuda_peak_allocated'] / 2**30:.1f} / "
                             f"{r['zero2']['cuda_peak_allocated'] / 2**30:.1f} GiB"
                             if "cuda_peak_allocated" in r["zero0"] else ""))
    row("pretrain", lambda r: f"{r['seconds_training']:.0f} s of pre-training on imagenette: {r['steps']} steps, "
                              f"{r['epochs_done']} epochs, {r['img_per_s']:,.0f} img/s, loss {r['loss_first']:.4f} -> "
                              f"{r['loss_last']:.4f}, waiting for data {_fmt(r['data_wait_frac'], '.1%')}")
    seconds = {s: r.get("seconds") for s, r in res.items()}
    lines += ["", "Stage seconds: " + ", ".join(f"{s} {_fmt(v, '.0f')}" for s, v in seconds.items())
              + f"; total {_fmt(m.get('total_s'), '.0f')} s.", ""]
    path = out / "REPORT.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, every stage end to end (CPU test)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default results/cuda, "
                                                                 "results/cpu-dry for a dry run)")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "gpu_check", help="where betons are written")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--pretrain-seconds", type=float, default=None)
    parser.add_argument("--report-only", action="store_true", help="re-render REPORT.md from the files in --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    out = args.out or REPO / "results" / ("cpu-dry" if args.dry_run else args.device)
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        logger.info("wrote %s", render(out))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU (use --device cpu --dry-run to test the check)")
    if args.device == "cpu" and not args.dry_run:
        raise SystemExit("the GPU check needs --device cuda; --device cpu runs only as --dry-run")
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if args.device == "cpu" else "cuda")
    plan = Plan(args.device, args.dry_run)
    if args.pretrain_seconds:
        plan.pretrain_seconds = args.pretrain_seconds
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    t_all = time.perf_counter()
    from benchmarks.common import one_rank_group

    one_rank_group()
    ctx: dict = {"out": out, "runs": args.data / "runs"}
    info = {**machine_info(plan.device), "dry_run": args.dry_run, "stages": args.stages}
    for stage in args.stages:
        t0 = time.perf_counter()
        try:
            if stage in ("ffcv", "pretrain") and "data" not in ctx:
                ctx["data"] = ensure_dataset(plan, args.data)
            res = RUNNERS[stage](plan, ctx)
        except Exception:  # one stage's failure must not cost the others their GPU time
            res = {"error": traceback.format_exc()}
            logger.error("stage %s failed:\n%s", stage, res["error"])
        res["seconds"] = time.perf_counter() - t0
        (out / f"{stage}.json").write_text(json.dumps(res, indent=1, default=str))
        logger.info("%s: %.0f s", stage, res["seconds"])
    info["total_s"] = time.perf_counter() - t_all
    (out / "machine.json").write_text(json.dumps(info, indent=1))
    logger.info("wrote %s", render(out))
    print((out / "REPORT.md").read_text())


if __name__ == "__main__":
    main()
