"""Pre-training step cost (issue 6, parts 2 and 3): FastMIM vs SimMIM vs MAE on the same backbone.

One optimizer step = forward + ``engine.backward`` + ``engine.step`` under the same DeepSpeed engine config
(``ds_configs/zero2_fp32.json`` on CPU, ``zero2_bf16.json`` on GPU; AdamW groups from ``fastmim_ds.optim``), on
random normalised images already on the device (the loader is benchmarked separately):

* FastMIM (``fastmim_ds.methods.fastmim``) at 128 px, HOG target, its released recipe;
* SimMIM (``fastmim_ds.methods.simmim``) at 224 px (C-dim mask token, all tokens encoded, pixel head, L1);
* MAE (``fastmim_ds.methods.mae``) at 224 px (25% visible tokens encoded, 8 x 512-d decoder, norm-pix MSE); ViT only.

All three are the product's methods (``fastmim_ds.methods.create_mim_model``), each with its config section's
defaults (its paper's recipe) unless noted in :data:`FAMILIES`.

Per family (ViT-B/16; Swin-B) the methods run interleaved, round after round (A, B, C, A, B, C, ...), so a load
change on a shared machine hits all of them alike. Each method's best round is reported (load from other jobs only
ever slows a step down, so the fastest step is the closest to the method's own cost) with the ratios; the median is
kept in the result file.

Also measured in the same run:

* HOG share: time inside FastMIM's ``HOGTarget`` during the real steps (forward hooks, device-synchronised) over the
  step time, plus the HOG target timed alone on the same batch;
* utilisation: model FLOPs of forward + backward (``torch.utils.flop_counter``) per step time, over the peak dense
  matmul throughput measured right before each round (fp32 and bf16), best step over best peak;
* a ``torch.profiler`` table of one FastMIM step (where the time goes);
* the same steps on half the batch (same engine, interleaved too), which splits each method's step time into a
  per-step fixed cost (ZeRO's gradient bookkeeping, the optimizer update: independent of the batch) and a per-image
  cost. The per-image ratio is the images/s ratio at pre-training batch sizes (128-256 per GPU), where the fixed
  cost is spread over many more images than a CPU benchmark can afford.

Usage: ``python -m benchmarks.bench_step [--device cuda] [--families vit swin] [--batch N] [--rounds R] [--tiny]``
(``--tiny``: the same methods on 2-block 64-d encoders, a smoke run).
Writes ``benchmarks/results/<device>/step.json`` (``--out`` elsewhere).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
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
    DTYPES,
    REPO,
    add_device_args,
    build_engine,
    count_flops,
    machine_info,
    median,
    one_rank_group,
    peak_matmul,
    random_images,
    setup_device,
    sync,
    timed,
    train_step,
    write_result,
)
from fastmim_ds.config import MIMModelCfg
from fastmim_ds.methods import create_mim_model
from fastmim_ds.methods.fastmim import FastMIMCfg
from fastmim_ds.methods.mae import MAECfg
from fastmim_ds.methods.simmim import SimMIMCfg

logger = logging.getLogger("bench_step")

VIT_B, SWIN_B = "vit_base_patch16_224", "swin_base_patch4_window7_224"
# Per family: method -> (its config section, the encoder, image size). FastMIM: the released recipe (methods.md §1.1)
# at 128 px; SimMIM and MAE: their papers' recipes (the sections' defaults) at 224 px. "fastmim" comes first: the
# ratios are taken against it.
FAMILIES: dict[str, dict] = {
    "vit": {
        "label": "ViT-B/16",
        "encoder": VIT_B,
        "methods": {
            "fastmim": (FastMIMCfg(mask_ratio=0.75, block_size=16, decoder_dim=256, decoder_depth=1),
                        MIMModelCfg(encoder=VIT_B), 128),
            "simmim": (SimMIMCfg(), MIMModelCfg(encoder=VIT_B), 224),
            "mae": (MAECfg(), MIMModelCfg(encoder=VIT_B), 224),
        },
    },
    "swin": {
        "label": "Swin-B (window 4 at 128 px, 7 at 224 px)",
        "encoder": SWIN_B,
        "methods": {
            "fastmim": (FastMIMCfg(mask_ratio=0.75, block_size=32, decoder_dim=256, decoder_depth=4),
                        MIMModelCfg(encoder=SWIN_B, encoder_kwargs={"window_size": 4}), 128),
            "simmim": (SimMIMCfg(), MIMModelCfg(encoder=SWIN_B), 224),  # MAE drops tokens: ViT only
        },
    },
}
# --tiny: the same methods and sizes on 2-block 64-d encoders and 64-d x 1 decoders
TINY_ENCODERS = {"vit": {"embed_dim": 64, "depth": 2, "num_heads": 2},
                 "swin": {"embed_dim": 32, "depths": [1, 1, 2, 1], "num_heads": [1, 2, 2, 4]}}
TINY_DECODER = {"decoder_dim": 64, "decoder_depth": 1, "decoder_heads": 2}


def use_tiny_encoders() -> None:
    """Shrinks every model of :data:`FAMILIES` to its :data:`TINY_ENCODERS` preset (and the methods' decoders to
    :data:`TINY_DECODER`), in place: a smoke run."""
    for name, fam in FAMILIES.items():
        for method, (method_cfg, model_cfg, size) in fam["methods"].items():
            small = dataclasses.replace(model_cfg, encoder_kwargs={**model_cfg.encoder_kwargs, **TINY_ENCODERS[name]})
            method_cfg = dataclasses.replace(method_cfg, **{k: v for k, v in TINY_DECODER.items()
                                                            if hasattr(method_cfg, k)})
            fam["methods"][method] = (method_cfg, small, size)


class _HOGTimer:
    """Device-synchronised wall time spent inside a module's forward (forward pre-hook + hook)."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.device, self.seconds, self._t0 = device, 0.0, 0.0
        self.handles = [module.register_forward_pre_hook(self._start), module.register_forward_hook(self._stop)]

    def _start(self, *_):
        sync(self.device)
        self._t0 = time.perf_counter()

    def _stop(self, *_):
        sync(self.device)
        self.seconds += time.perf_counter() - self._t0

    def take(self) -> float:
        s, self.seconds = self.seconds, 0.0
        return s


class _UpdateTimer(_HOGTimer):
    """Device-synchronised wall time inside the inner torch optimizer's ``step`` (DeepSpeed calls it per group)."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device):
        self.device, self.seconds, self._t0 = device, 0.0, 0.0
        self.handles = [optimizer.register_step_pre_hook(self._start), optimizer.register_step_post_hook(self._stop)]


def optimizer_ab(*, device: torch.device, dtype: str, batch: int, rounds: int, warmup: int) -> dict:
    """FastMIM ViT-B/16 step with torch's default AdamW ("before") vs the product's fused AdamW ("after"), interleaved.

    Returns ``{"before"/"after": {"step_s", "update_s"}, "batch", "rounds"}`` (best of the rounds; update = inner
    AdamW time).
    """
    fam = FAMILIES["vit"]
    runs = {}
    for name, fused in (("before", False), ("after", None)):
        torch.manual_seed(0)
        model, img_size = _build("fastmim", fam)
        engine = build_engine(model.to(device), dtype=dtype, micro_batch=batch, fused=fused)
        timer = _UpdateTimer(getattr(engine.optimizer, "optimizer", engine.optimizer), device)
        imgs = random_images(batch, img_size, device)
        for _ in range(warmup):
            train_step(engine, imgs)
        runs[name] = {"engine": engine, "imgs": imgs, "timer": timer, "step": [], "update": []}
    for _ in range(rounds):
        for run in runs.values():
            run["timer"].take()
            run["step"].append(timed(lambda r=run: train_step(r["engine"], r["imgs"]), device))
            run["update"].append(run["timer"].take())
    out = {name: {"step_s": min(r["step"]), "update_s": min(r["update"]), "step_s_all": r["step"]}
           for name, r in runs.items()}
    fused_flags = {g.get("fused") for g in runs["after"]["engine"].optimizer.param_groups}
    logger.info("AdamW before %.3f s/step (update %.3f s), after %.3f s/step (update %.3f s); product fused=%s",
                out["before"]["step_s"], out["before"]["update_s"], out["after"]["step_s"], out["after"]["update_s"],
                fused_flags)
    runs.clear()
    gc.collect()
    return {**out, "batch": batch, "rounds": rounds, "product_fused": sorted(map(str, fused_flags))}


def _build(method: str, fam: dict) -> tuple[torch.nn.Module, int]:
    method_cfg, model_cfg, img_size = fam["methods"][method]
    return create_mim_model(method_cfg, model_cfg, img_size), img_size


def _profile_table(engine, imgs: torch.Tensor, device: torch.device, rows: int = 15) -> str:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        train_step(engine, imgs)
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)


def bench_family(name: str, *, device: torch.device, dtype: str, batch: int, rounds: int, steps: int,
                 warmup: int, profile: bool, methods: list[str] | None = None, ds_config: str | None = None,
                 half: int | None = None, fused: bool | None = None) -> dict:
    """Interleaved step timings of the methods of one backbone family (see module docstring).

    ``methods`` (default: all of the family's) and ``ds_config`` (default: the ZeRO-2 file of ``dtype``) narrow it.
    ``half``: also time steps on the first ``half`` images of the batch (same engine), to split the step time into
    a per-step fixed cost and a per-image cost (``fixed_s``, ``per_img_s``). ``fused``: as
    :func:`benchmarks.common.build_engine`.
    """
    fam = FAMILIES[name]
    methods = methods or list(fam["methods"])
    runs = {}
    for method in methods:
        torch.manual_seed(0)
        model, img_size = _build(method, fam)
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        probe = random_images(2, img_size, torch.device("cpu"))  # FLOPs do not depend on the device
        flops, by_op = count_flops(lambda m=model, x=probe: m(x)["loss"].backward())
        model.zero_grad(set_to_none=True)
        engine = build_engine(model.to(device), dtype=dtype, micro_batch=batch, ds_config=ds_config, fused=fused)
        imgs = random_images(batch, img_size, device)
        for _ in range(warmup):  # first steps allocate optimizer state, pick kernels
            train_step(engine, imgs)
        if half:
            train_step(engine, imgs[:half])  # the half batch's kernels
        sync(device)
        runs[method] = {"engine": engine, "imgs": imgs, "img_size": img_size, "params_m": n_params / 1e6,
                        "flops_per_img": flops / 2, "flops_by_op": {k: v / 2 for k, v in by_op.items()},
                        "times": [], "times_half": [], "util_fp32_peak": [], "util_dtype_peak": []}
        logger.info("%s %s: %d px, %.1fM params, %.1f GFLOP/img (fwd+bwd)", name, method, img_size,
                    n_params / 1e6, flops / 2 / 1e9)

    fm = runs["fastmim"]
    target, stride = fm["engine"].module.target, fm["engine"].module.stride
    hog_timer = _HOGTimer(target, device)
    hog_in_step, hog_alone, peaks = [], [], []
    for r in range(rounds):
        # the peak right before the round: the same machine state (load) as the steps it is compared with
        peak = {d: peak_matmul(device, DTYPES[d], sizes=(2048,) if device.type == "cpu" else (8192,),
                               min_time=0.5)["tflops"] for d in sorted({"fp32", dtype})}
        peaks.append(peak)
        for method in methods:
            run = runs[method]
            hog_timer.take()
            for _ in range(steps):
                t = timed(lambda r=run: train_step(r["engine"], r["imgs"]), device)
                run["times"].append(t)
                achieved = run["flops_per_img"] * batch / t / 1e12
                run["util_fp32_peak"].append(achieved / peak["fp32"])
                run["util_dtype_peak"].append(achieved / peak[dtype])
                if method == "fastmim":
                    hog_in_step.append(hog_timer.take() / t)
            for _ in range(steps if half else 0):
                run["times_half"].append(timed(lambda r=run: train_step(r["engine"], r["imgs"][:half]), device))
            hog_timer.take()
        with torch.no_grad():
            x = fm["imgs"]
            hog_alone.append(median([timed(lambda x=x: target(x, stride), device) for _ in range(3)]))
        logger.info("%s round %d/%d: %s", name, r + 1, rounds,
                    ", ".join(f"{m} {batch / runs[m]['times'][-1]:.2f} img/s" for m in methods))
    for h in hog_timer.handles:
        h.remove()

    table = _profile_table(fm["engine"], fm["imgs"], device) if profile else ""
    out = {"label": fam["label"], "encoder": fam["encoder"], "batch": batch, "methods": {}, "profile_fastmim": table,
           "peaks_tflops": peaks}
    step_fm = min(fm["times"])
    best_peak = {d: max(pk[d] for pk in peaks) for d in peaks[0]}
    for method in methods:
        run = runs[method]
        step = min(run["times"])
        achieved = run["flops_per_img"] * batch / step / 1e12
        out["methods"][method] = {
            "img_size": run["img_size"], "params_m": run["params_m"], "step_s": step, "step_s_all": run["times"],
            "step_s_median": median(run["times"]), "img_per_s": batch / step, "speedup_of_fastmim": step / step_fm,
            "gflops_per_img": run["flops_per_img"] / 1e9,
            "flops_by_op_per_img": run["flops_by_op"],
            "achieved_tflops": achieved,
            "util_fp32_peak": achieved / best_peak["fp32"], "util_dtype_peak": achieved / best_peak[dtype],
            "util_dtype_peak_median_of_rounds": median(run["util_dtype_peak"]),
        }
        if half:  # step time = fixed + per_img x batch, from the best steps at the two batch sizes
            per_img = (step - min(run["times_half"])) / (batch - half)
            out["methods"][method].update(step_s_half=min(run["times_half"]), step_s_half_all=run["times_half"],
                                          per_img_s=per_img, fixed_s=step - per_img * batch)
    if half:
        for m in out["methods"].values():
            m["per_img_speedup_of_fastmim"] = m["per_img_s"] / out["methods"]["fastmim"]["per_img_s"]
        out["half_batch"] = half
    out["hog"] = {"share_in_step": median(hog_in_step), "alone_s": median(hog_alone),
                  "share_alone": median(hog_alone) / step_fm}
    for run in runs.values():
        del run["engine"]
    runs.clear()
    gc.collect()
    return out


def _run_part(args: argparse.Namespace, device: torch.device, dtype: str) -> dict:
    """One family (or the AdamW before/after) in this process; returns its result."""
    cpu = device.type == "cpu"
    if args.tiny:
        use_tiny_encoders()
    one_rank_group()
    torch.set_num_threads(args.threads)  # init_distributed shares the cores between the node's ranks (1 here)
    if args.part == "ab":
        return optimizer_ab(device=device, dtype=dtype, batch=args.batch or (16 if cpu else 128), rounds=args.rounds,
                            warmup=args.warmup)
    if args.part == "vit_zero0":  # the same engine without ZeRO's partition bookkeeping (1 rank: nothing to shard)
        cfg = json.loads((REPO / DS_CONFIGS[dtype]).read_text())
        cfg["zero_optimization"] = {"stage": 0}
        path = Path(args.part_out).with_suffix(".ds.json")
        path.write_text(json.dumps(cfg))
        return bench_family("vit", device=device, dtype=dtype, batch=args.batch or (16 if cpu else 128),
                            rounds=args.rounds, steps=args.steps or (1 if cpu else 5), warmup=args.warmup,
                            profile=False, methods=["fastmim", "simmim"], ds_config=str(path))
    batch = (args.swin_batch if args.part == "swin" else args.batch) or (16 if cpu else 128)
    return bench_family(args.part, device=device, dtype=dtype, batch=batch, rounds=args.rounds,
                        steps=args.steps or (1 if cpu else 5), warmup=args.warmup, profile=not args.no_profile,
                        half=batch // 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_args(parser)
    parser.add_argument("--families", nargs="+", choices=tuple(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--batch", type=int, default=None, help="images per step, all methods (cpu 16, cuda 128)")
    parser.add_argument("--swin-batch", type=int, default=None, help="Swin-B batch (cpu 16, cuda 128)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (A, B, C per round)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per method per round (cpu 1, cuda 5)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="2-block 64-d encoders: a smoke run")
    parser.add_argument("--out", type=Path, default=None, help="result file (default benchmarks/results/...)")
    parser.add_argument("--no-optimizer-ab", action="store_true", help="skip the fused-AdamW before/after")
    parser.add_argument("--no-zero0", action="store_true",
                        help="skip the ViT FastMIM/SimMIM comparison under ZeRO stage 0 (run on cpu only)")
    parser.add_argument("--part", choices=(*FAMILIES, "ab", "vit_zero0"), help=argparse.SUPPRESS)
    parser.add_argument("--part-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    device, dtype = setup_device(args)
    if args.part:
        Path(args.part_out).write_text(json.dumps(_run_part(args, device, dtype)))
        return
    cpu = device.type == "cpu"
    info = machine_info(device)
    t0 = time.perf_counter()
    sizes = (512, 1024, 2048, 4096) if cpu else (1024, 2048, 4096, 8192)
    peak = {d: peak_matmul(device, DTYPES[d], sizes=sizes) for d in ("fp32", "bf16")}  # size sweep, once
    logger.info("peak matmul: %s", {d: f"{p['tflops'] * 1e3:.1f} GFLOP/s at {p['size']}" for d, p in peak.items()})
    # Each family (and the before/after) in its own process: DeepSpeed engines are not freed when dropped (hooks keep
    # them reachable), and three ViT-B engines plus another family's would not fit a 24 GB machine.
    parts = [*args.families] + ([] if args.no_optimizer_ab else ["ab"])
    parts += ["vit_zero0"] if cpu and "vit" in args.families and not args.no_zero0 else []
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
             if k in ("device", "dtype", "threads", "batch", "swin_batch", "rounds", "steps", "warmup")
             and v is not None]
    flags += ["--no-profile"] if args.no_profile else []
    flags += ["--tiny"] if args.tiny else []
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_step_") as tmp:
        for part in parts:
            out = Path(tmp) / f"{part}.json"
            subprocess.run([sys.executable, "-m", "benchmarks.bench_step", *flags, "--part", part, "--part-out",
                            str(out)], cwd=REPO, check=True)
            results[part] = json.loads(out.read_text())
    # the sweep again after the step runs; per size the better of the two (a busy moment only lowers a peak)
    for d in peak:
        again = peak_matmul(device, DTYPES[d], sizes=sizes)["per_size"]
        per_size = {n: max(v, again.get(n, 0.0)) for n, v in peak[d]["per_size"].items()}
        best = max(per_size, key=per_size.get)
        peak[d] = {"tflops": per_size[best], "size": best, "per_size": per_size}
    payload = {"machine": info, "dtype": dtype, "peak_matmul": peak, "tiny": args.tiny,
               "families": {k: v for k, v in results.items() if k in FAMILIES}}
    if "ab" in results:
        payload["optimizer_ab"] = results["ab"]
    if "vit_zero0" in results:
        payload["vit_zero0"] = results["vit_zero0"]
    logger.info("wrote %s", write_result(device, "step", {**payload, "seconds": time.perf_counter() - t0}, args.out))


if __name__ == "__main__":
    main()
