"""Writes ``benchmarks/RESULTS.md`` and the PNG plots from ``benchmarks/results/<device>/*.json``.

Nothing here measures: every number comes from a result file written by a ``bench_*`` script, so re-running one
benchmark (or adding a GPU run's files) and then this script refreshes the report. Targets are the issue's.

Usage: ``python -m benchmarks.report``.
"""
from __future__ import annotations

import logging
from pathlib import Path

from benchmarks.common import REPO, read_results

logger = logging.getLogger("report")

OUT = REPO / "benchmarks"
TARGETS = {"loader_128": 3.0, "step_vs_simmim": 3.0, "hog_share": 0.05, "util_cpu": 0.50, "util_gpu": 0.45,
           "zero2_vs_zero0": 0.55, "convert": 0.9}
METHOD_NAMES = {"fastmim": "FastMIM", "simmim": "SimMIM", "mae": "MAE"}


def _ok(met: bool) -> str:
    return "**met**" if met else "**missed**"


def _sci(n: float) -> str:
    """5e7 for 50,000,000."""
    return f"{n:.0e}".replace("e+0", "e").replace("e+", "e")


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f}"


def _machine(res: dict[str, dict], device: str) -> list[str]:
    m = next(p["machine"] for p in res.values() if "date" in p.get("machine", {}))
    v = m["versions"]
    lines = [f"**{device.upper()}**: {m.get('gpu', m['cpu'])}"
             + (f" ({m['gpu_mem_gib']} GiB) with {m['cpu']}" if "gpu" in m else "")
             + f", {m['cores']} cores ({m['cpu_capability']}), torch threads {m['torch_threads']}, "
               f"Python {m['python']}",
             "",
             "versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
             "",
             "| benchmark | date | seconds | load average (1 min) at start / end |",
             "|---|---|---|---|"]
    for name, p in res.items():
        mm = p.get("machine", {})
        if "date" in mm:
            lines.append(f"| {name} | {mm['date']} | {p.get('seconds', 0):.0f} | {mm.get('load_avg_start', 0):.1f} / "
                         f"{mm.get('load_avg_end', 0):.1f} |")
    run = res.get("run")
    if run:
        lines += ["", f"`make bench` total: **{run['total_s'] / 60:.1f} min** "
                      f"({', '.join(f'{k} {s:.0f} s' for k, s in run['scripts'].items())})."]
    return lines


# ----------------------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_loader(results: dict[str, dict[str, dict]]) -> str | None:
    devices = [d for d in results if "loader" in results[d]]
    if not devices:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(devices), figsize=(5 * len(devices), 3.2), squeeze=False)
    for ax, dev in zip(axes[0], devices):
        rows = [r for r in results[dev]["loader"]["rows"] if r["torchvision_interp"] == "bicubic"]
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["ffcv_img_s"] for r in rows], 0.4, label="FFCV (product)")
        ax.bar([i + 0.2 for i in x], [r["torchvision_img_s"] for r in rows], 0.4, label="torchvision + PIL")
        for i, r in zip(x, rows):
            ax.text(i, max(r["ffcv_img_s"], r["torchvision_img_s"]), f"{r['ratio']:.2f}x", ha="center", va="bottom",
                    fontsize=8)
        ax.set_xticks(list(x), [f"{r['size']} px" for r in rows])
        ax.set_ylabel("images / s")
        ax.set_title(f"loader, {results[dev]['loader']['workers']} workers ({dev})", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / "loader.png", dpi=90)
    plt.close(fig)
    return "loader.png"


def _plot_step(results: dict[str, dict[str, dict]]) -> str | None:
    panels = [(d, fam, p) for d in results if "step" in results[d]
              for fam, p in results[d]["step"]["families"].items()]
    if not panels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False)
    for ax, (dev, fam, p) in zip(axes[0], panels):
        names = list(p["methods"])
        vals = [p["methods"][m]["img_per_s"] for m in names]
        ax.bar(range(len(names)), vals, color=["tab:green", "tab:red", "tab:orange"][: len(names)])
        ax.set_xticks(range(len(names)), [f"{m}\n{p['methods'][m]['img_size']} px" for m in names], fontsize=8)
        for i, m in enumerate(names):
            ax.text(i, vals[i], f"{vals[i]:.3g}", ha="center", va="bottom", fontsize=8)
        ax.set_ylabel("images / s (fwd + bwd + step)")
        ax.set_title(f"{p['label'].split(' (')[0]}, batch {p['batch']} ({dev})", fontsize=9)
    fig.tight_layout()
    fig.savefig(OUT / "step.png", dpi=90)
    plt.close(fig)
    return "step.png"


def _plot_scaling(results: dict[str, dict[str, dict]]) -> str | None:
    devices = [d for d in results if "scaling" in results[d]]
    if not devices:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(devices), 2, figsize=(9, 3.2 * len(devices)), squeeze=False)
    for row, dev in zip(axes, devices):
        rows = results[dev]["scaling"]["rows"]
        by_size = [r for r in rows if r["sweep"] == "size"]
        by_batch = [r for r in rows if r["sweep"] == "batch"]
        ax = row[0]
        sizes = [r["img_size"] for r in by_size]
        ax.plot(sizes, [r["step_s"] for r in by_size], "o-", label="measured step")
        ref = next((r for r in by_size if r["img_size"] == 128), by_size[0])
        ax.plot(sizes, [ref["step_s"] * r["gflops_per_img"] / ref["gflops_per_img"] for r in by_size], "--",
                label="model FLOPs, scaled at 128 px")
        ax.set_xlabel("image size (px)")
        ax.set_ylabel("seconds / step")
        ax.set_title(f"FastMIM ViT-B, batch {by_size[0]['batch']} ({dev})", fontsize=9)
        ax.legend(fontsize=7)
        ax = row[1]
        ax.plot([r["batch"] for r in by_batch], [r["img_per_s"] for r in by_batch], "o-")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (128 px)")
        ax.set_ylabel("images / s")
        ax.set_title(f"FastMIM ViT-B, 128 px ({dev})", fontsize=9)
    fig.tight_layout()
    fig.savefig(OUT / "scaling.png", dpi=90)
    plt.close(fig)
    return "scaling.png"


def _plot_zero(zero: dict) -> str:
    plt = _plt()
    runs = zero["runs"]
    fig, ax = plt.subplots(figsize=(9, 3.4))
    labels, bottoms = [], [0.0] * len(runs)
    for cat, color in (("params", "tab:blue"), ("grads", "tab:orange"), ("optimizer", "tab:green")):
        vals = [_rank_max(r)[cat] / 1e6 for r in runs]
        ax.bar(range(len(runs)), vals, bottom=bottoms, color=color,
               label={"grads": "grads + buffers"}.get(cat, cat))
        bottoms = [b + v for b, v in zip(bottoms, vals)]
    ax.scatter(range(len(runs)), [_rank_max(r, "in_backward")["total"] / 1e6 for r in runs], marker="_", s=900,
               color="black", label="peak in backward (gradient buckets live)", zorder=3)
    for r in runs:
        labels.append(f"{r.get('dtype', 'fp32')}\nstage {r['stage']}" + (f"\nbucket {_sci(r['bucket'])}" if r["bucket"]
                                                                         else "\nbucket 5e8"))
    ax.set_xticks(range(len(runs)), labels, fontsize=8)
    ax.set_ylabel("MB per rank (2 ranks)")
    ax.set_title(f"ZeRO, 2 ranks: {zero['model'].split(' (')[0]}, held at the optimizer step (bars)", fontsize=9)
    ax.set_ylim(0, 1.45 * max(max(bottoms), *(_rank_max(r, "in_backward")["total"] / 1e6 for r in runs)))
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(OUT / "zero.png", dpi=90)
    plt.close(fig)
    return "zero.png"


def _rank_max(run: dict, point: str = "at_step") -> dict:
    return max((r[point] for r in run["ranks"]), key=lambda m: m["total"])


# ----------------------------------------------------------------------------------------------- sections
def _loader_section(results: dict) -> list[str]:
    out = ["## 1. Loader: FFCV pipeline vs torchvision ImageFolder + PIL", ""]
    for dev, res in results.items():
        if "loader" not in res:
            continue
        p = res["loader"]
        out += [f"{dev.upper()}: {p['workers']} workers on each side (FFCV threads, DataLoader processes), batch "
                f"{p['batch']}, best of {p['rounds']} interleaved trials of {p['batches_per_trial']} batches each "
                "(medians in parentheses), "
                f"steady state (each trial on a fresh epoch iterator, skipping start-up and read-ahead batches). "
                f"Warm-up excluded: FFCV's numba compilation ({p['ffcv_compile_s']:.1f} s) inside a whole first "
                f"epoch ({p.get('ffcv_first_epoch_s', float('nan')):.1f} s), and one read of every source JPEG. "
                f"Beton: `{p['beton']}` ({p['images']:,} images, JPEG q90, as stored by `make prepare-data`); "
                "torchvision reads the original JPEG files (every image is 224 x 224 px in both).",
                "", "| size | torchvision interpolation | FFCV img/s | torchvision img/s | FFCV / torchvision |",
                "|---|---|---|---|---|"]
        for r in p["rows"]:
            fm, tm = r.get("ffcv_median_img_s"), r.get("torchvision_median_img_s")
            out.append(f"| {r['size']} px | {r['torchvision_interp']} | {r['ffcv_img_s']:,.0f}"
                       + (f" ({fm:,.0f})" if fm else "") + f" | {r['torchvision_img_s']:,.0f}"
                       + (f" ({tm:,.0f})" if tm else "") + f" | {r['ratio']:.2f}x"
                       + (f" ({fm / tm:.2f}x)" if fm and tm else "") + " |")
        r128 = next((r for r in p["rows"] if r["size"] == 128 and r["torchvision_interp"] == "bicubic"), None)
        if r128:
            out += ["", f"Target >= {TARGETS['loader_128']:.0f}x at 128 px: {r128['ratio']:.2f}x, "
                        f"{_ok(r128['ratio'] >= TARGETS['loader_128'])}."]
        prof = p.get("stage_profile")
        if prof:
            out += ["", "Per-image cost of each stage, one thread, same 224-px JPEGs (where the time goes):", "",
                    "| pipeline | stage | ms / image |", "|---|---|---|"]
            for row in prof:
                out.append(f"| {row['pipeline']} | {row['stage']} | {row['ms']:.3f} |")
        out.append("")
    return out


def _step_section(results: dict) -> list[str]:
    out = ["## 2. Pre-training step cost: FastMIM vs SimMIM vs MAE", "",
           "The product's methods (`fastmim_ds.methods`; result files written before issue 15 measured the equivalent "
           "private copies of SimMIM and MAE then kept in `benchmarks/baselines.py`). One optimizer step (forward + "
           "`engine.backward` + `engine.step`) under the same DeepSpeed engine config "
           "(ZeRO-2; AdamW groups from `fastmim_ds.optim`), random normalised images already on the device. "
           "Methods run interleaved round by round; each method's best round is shown (other jobs on this shared "
           "machine only ever slow a step down; medians are in the result files). GFLOP/img = forward + backward "
           "model FLOPs "
           "(`torch.utils.flop_counter`: matmuls, convolutions, attention).", ""]
    for dev, res in results.items():
        if "step" not in res:
            continue
        p = res["step"]
        for f in p["families"].values():
            out += [f"**{f['label']}** ({dev.upper()}, {p['dtype']}, batch {f['batch']}, encoder `{f['encoder']}`)", "",
                    "| method | input | trainable params | GFLOP/img | s / step | img/s | FastMIM speed-up | "
                    "achieved TFLOP/s | utilisation |", "|---|---|---|---|---|---|---|---|---|"]
            for m, r in f["methods"].items():
                out.append(f"| {METHOD_NAMES[m]} | {r['img_size']} px | {r['params_m']:.1f} M | "
                           f"{r['gflops_per_img']:.1f} | {r['step_s']:.3f} | {r['img_per_s']:.2f} | "
                           f"{r['speedup_of_fastmim']:.2f}x | {r['achieved_tflops']:.3f} | "
                           f"{r['util_dtype_peak']:.0%} |")
            sim = f["methods"].get("simmim")
            hog = f["hog"]
            target = TARGETS["step_vs_simmim"]
            if f.get("half_batch"):
                out += ["", f"Split of the step time from the best steps at batch {f['half_batch']} and {f['batch']} "
                            "(same engine, interleaved): step = fixed + per-image x batch.", "",
                        f"| method | s / step at {f['half_batch']} | s / step at {f['batch']} | fixed s / step | "
                        "per-image s | FastMIM speed-up per image |", "|---|---|---|---|---|---|"]
                for m, r in f["methods"].items():
                    out.append(f"| {METHOD_NAMES[m]} | {r['step_s_half']:.3f} | {r['step_s']:.3f} | "
                               f"{r['fixed_s']:.3f} | {r['per_img_s']:.4f} | {r['per_img_speedup_of_fastmim']:.2f}x |")
            line = ""
            if sim:
                line = (f"- FastMIM vs SimMIM @224: at batch {f['batch']} **{sim['speedup_of_fastmim']:.2f}x** "
                        f"(target >= {target:.0f}x: {_ok(sim['speedup_of_fastmim'] >= target)})")
                if "per_img_speedup_of_fastmim" in sim:
                    per = sim["per_img_speedup_of_fastmim"]
                    line += (f"; per image, i.e. at pre-training batch sizes where the fixed per-step cost is spread "
                             f"thin, **{per:.2f}x** ({_ok(per >= target)})")
                line += "."
            out += ["", line,
                    f"- HOG target: {hog['share_in_step']:.1%} of FastMIM's step measured inside the real steps "
                    f"(forward hooks); alone on the same batch {hog['alone_s'] * 1e3:.1f} ms = "
                    f"{hog['share_alone']:.1%} of the step (target <= {TARGETS['hog_share']:.0%}: "
                    f"{_ok(max(hog['share_in_step'], hog['share_alone']) <= TARGETS['hog_share'])}).", ""]
        z0 = p.get("vit_zero0")
        if z0:
            fm, sm = z0["methods"]["fastmim"], z0["methods"]["simmim"]
            zero2 = p["families"].get("vit", {}).get("methods", {})
            out += [f"**Where the ViT ratio goes** ({dev.upper()}): the FLOP ratio SimMIM / FastMIM is "
                    f"{sm['gflops_per_img'] / fm['gflops_per_img']:.2f}x. The same two steps under the same engine "
                    f"with ZeRO stage 0 (one rank: nothing to shard) take {fm['step_s']:.3f} s and "
                    f"{sm['step_s']:.3f} s: "
                    f"**{sm['speedup_of_fastmim']:.2f}x**. ZeRO-2's per-step bookkeeping "
                    "(gradients copied into buckets and partitions, flattened, master weights copied back: the "
                    "`aten::copy_`/`aten::cat` rows of the profile below) costs about the same absolute time in both "
                    "steps"
                    + (f" ({zero2['fastmim']['step_s'] - fm['step_s']:.2f} s for FastMIM, "
                       f"{zero2['simmim']['step_s'] - sm['step_s']:.2f} s for SimMIM), " if zero2 else ", ")
                    + "so it takes a larger share of the shorter step. It does not grow with the batch (the 'fixed "
                    "s / step' column above, which also holds the AdamW update), so at the batch sizes of real "
                    "pre-training the images/s ratio tends to the per-image one. Both splits come from two batch "
                    "sizes on a shared machine: read them to about +-10% (a fixed cost below zero is that noise).", ""]
        ab = p.get("optimizer_ab")
        if ab:
            out += _optimizer_ab(ab, dev, p["dtype"])
        for f in p["families"].values():
            if f.get("profile_fastmim"):
                out += [f"<details><summary>torch.profiler: one FastMIM {f['label'].split(' (')[0]} step "
                        f"({dev.upper()}), top operators by self time</summary>", "", "```",
                        f["profile_fastmim"].rstrip(), "```", "</details>", ""]
    return out


def _optimizer_ab(ab: dict, dev: str, dtype: str) -> list[str]:
    before, after = ab["before"], ab["after"]
    return [f"**Before/after: fused AdamW** (FastMIM ViT-B/16, {dev.upper()}, {dtype}, batch {ab['batch']}, "
            f"interleaved A, B, A, B; {ab['rounds']} rounds). Profiling the step put torch's default AdamW update "
            "(a chain of element-wise ops over the ZeRO flat fp32 partition) at "
            f"{before['update_s'] / before['step_s']:.0%} "
            f"of it; `fastmim_ds.optim.build_optimizer` now builds `torch.optim.AdamW(..., fused=True)` (one fused "
            f"kernel; numerically the same update up to fp32 rounding).", "",
            "| optimizer | s / step | img/s | optimizer update alone (s) |", "|---|---|---|---|",
            f"| before: AdamW default (`fused=False`) | {before['step_s']:.3f} | "
            f"{ab['batch'] / before['step_s']:.2f} | "
            f"{before['update_s']:.3f} |",
            f"| after: AdamW `fused=True` (product) | {after['step_s']:.3f} | {ab['batch'] / after['step_s']:.2f} | "
            f"{after['update_s']:.3f} |",
            "", f"Step time {before['step_s'] / after['step_s']:.2f}x faster; the update itself "
                f"{before['update_s'] / after['update_s']:.1f}x.", ""]


def _util_section(results: dict) -> list[str]:
    out = ["## 3. Utilisation: achieved model FLOP/s over measured peak matmul throughput", ""]
    for dev, res in results.items():
        if "step" not in res:
            continue
        p = res["step"]
        peak = p["peak_matmul"]
        out += [f"{dev.upper()}: dense n x n matmul measured in the same run, per size the better of a sweep before "
                "and one after the step benchmarks:", "",
                "| dtype | peak TFLOP/s | at n | per size (TFLOP/s) |", "|---|---|---|---|"]
        for d, pk in peak.items():
            sizes = ", ".join(f"{n}: {v:.4g}" for n, v in pk["per_size"].items())
            out.append(f"| {d} | {pk['tflops']:.4g} | {pk['size']} | {sizes} |")
        rounds = [f"{f['label'].split(' (')[0]}: "
                  + ", ".join(f"{r[p['dtype']]:.4g}" for r in f.get("peaks_tflops", []))
                  for f in p["families"].values() if f.get("peaks_tflops")]
        if rounds:
            out += ["", f"The {p['dtype']} peaks measured right before each round, which the utilisation below "
                        f"divides by (the machine's load changes between rounds), were (TFLOP/s) "
                        + "; ".join(rounds) + "."]
        target = TARGETS["util_cpu" if dev == "cpu" else "util_gpu"]
        both = p["dtype"] != "fp32"
        out += ["", f"Training precision: **{p['dtype']}**. Utilisation = model FLOPs per step / step time / peak "
                    f"{p['dtype']} matmul (n = 2048 on CPU, 8192 on GPU) measured right before each round, i.e. in the "
                    "same machine state as the steps it is compared with: the best step over the best of these peaks.",
                "",
                "| family | method | achieved TFLOP/s | peak " + p["dtype"] + " TFLOP/s (best of rounds) | "
                "utilisation |" + (" vs peak fp32 |" if both else ""),
                "|---|---|---|---|---|" + ("---|" if both else "")]
        for f in p["families"].values():
            round_peak = max(r[p["dtype"]] for r in f["peaks_tflops"])
            for m, r in f["methods"].items():
                out.append(f"| {f['label'].split(' (')[0]} | {METHOD_NAMES[m]} | {r['achieved_tflops']:.4g} | "
                           f"{round_peak:.4g} | {r['util_dtype_peak']:.0%} |"
                           + (f" {r['util_fp32_peak']:.0%} |" if both else ""))
        vit = p["families"].get("vit", {}).get("methods", {}).get("fastmim")
        if vit:
            out += ["", f"Target >= {target:.0%} for the ViT-B pre-training step ({dev.upper()}): "
                        f"{vit['util_dtype_peak']:.0%}, {_ok(vit['util_dtype_peak'] >= target)}."]
        if dev == "cpu" and "bf16" in peak:
            ratio = peak["fp32"]["tflops"] / peak["bf16"]["tflops"]
            out += ["", f"The issue asks for utilisation against the **bf16** peak. On this CPU "
                        f"({p['machine']['cpu_capability']}, no AVX512-BF16/AMX) bf16 matmul is emulated: "
                        f"{peak['bf16']['tflops'] * 1e3:.2f} GFLOP/s vs {peak['fp32']['tflops'] * 1e3:.1f} GFLOP/s "
                        f"in fp32 ({ratio:.0f}x slower), so training runs in fp32 and a bf16-peak ratio would be "
                        f"meaningless (the fp32 step alone reaches "
                        f"{vit['achieved_tflops'] / peak['bf16']['tflops']:.0f}x the bf16 \"peak\")."
                    if vit else ""]
        out.append("")
    return out


def _zero_section(results: dict) -> list[str]:
    zero = results.get("cpu", {}).get("zero")
    if not zero:
        return []
    runs = zero["runs"]
    n = runs[0]["ranks"][0]["trainable_params"]
    out = ["## 4. ZeRO memory per rank (2 CPU ranks, measured)", "",
           f"{zero['model']}, {n / 1e6:.1f} M trainable parameters (P), {zero['world_size']} ranks (gloo), in fp32 "
           "(`ds_configs/zero2_fp32.json`, what CPU runs use) and in bf16 (`ds_configs/zero2_bf16.json`, the GPU "
           "config; on this CPU bf16 matmul is emulated, which makes its steps slow but does not change what is "
           "held). Bytes of the tensor storages each rank holds (de-duplicated by storage; see "
           "`benchmarks/bench_zero.py`), the larger rank shown: 'at step' = the largest of the inner AdamW calls of "
           "step 2 (ZeRO runs one per parameter group and makes a group's fp32 gradient partition right before it); "
           "'in backward' = late in step 2's backward, when the gradient buckets are live. Cross-checks: every live "
           "tensor in the process at the step, and the process's peak RSS growth over the job (allocator caching "
           "and start-up included). 'bucket' = `reduce_bucket_size`/`allgather_bucket_size` in elements "
           "(DeepSpeed's default is 5e8; every shipped config sets 5e7).", "",
           "| precision | stage | bucket | params MB | optimizer MB | grads + buffers MB | at step MB | x stage 0 | "
           "in backward MB | peak of both x stage 0's | all live tensors MB | peak RSS growth MB |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    ratios = {}
    for r in runs:
        dtype = r.get("dtype", "fp32")
        stage0 = next(x for x in runs if x["stage"] == 0 and x.get("dtype", "fp32") == dtype)
        base = _rank_max(stage0)["total"]
        base_peak = max(base, _rank_max(stage0, "in_backward")["total"])
        m, back = _rank_max(r), _rank_max(r, "in_backward")
        peak = max(m["total"], back["total"])
        ratios[(dtype, r["stage"], r["bucket"])] = (m["total"] / base, peak / base_peak)
        rss = max(x.get("peak_rss_delta", 0) for x in r["ranks"])
        bucket = _sci(r["bucket"]) if r["bucket"] else "default 5e8"
        out.append(f"| {dtype} | {r['stage']} | {bucket} | "
                   f"{_mb(m['params'])} | {_mb(m['optimizer'])} | {_mb(m['grads'])} | {_mb(m['total'])} | "
                   f"{m['total'] / base:.2f}x | {_mb(back['total'])} | {peak / base_peak:.2f}x | "
                   f"{_mb(m['all_live_tensors'])} | {_mb(rss) if rss else '-'} |")
    target = TARGETS["zero2_vs_zero0"]
    lines = []
    for dtype in ("bf16", "fp32"):
        s2 = {b: v for (d, s, b), v in ratios.items() if d == dtype and s == 2}
        if s2:
            held, peak = s2.get(50_000_000, next(iter(s2.values())))
            lines.append(f"{dtype}, shipped 5e7 buckets: at the step **{held:.2f}x** ({_ok(held <= target)}), peak "
                         f"including the backward's gradient buckets {peak:.2f}x"
                         + (f" (DeepSpeed's default 5e8 buckets: {s2[None][1]:.2f}x)" if None in s2 else ""))
    out += ["", f"Target: stage 2 <= {target}x of stage 0 (parameters + gradients + optimizer state per rank).", ""]
    out += [f"- {line}." for line in lines]
    out += ["",
            "Why (bytes per parameter, N = 2 ranks; each matches the table to within a few MB). **bf16**: at stage 0 "
            "DeepSpeed wraps AdamW in its unfused mixed-precision optimizer, which holds 2P bf16 params + 2P bf16 "
            "grads + 4P fp32 master + 4P fp32 grads + 8P Adam moments = 20P. Stage 2 keeps the 2P bf16 params and "
            "partitions the rest: at a group's AdamW call its bf16 gradient partition has been replaced by the fp32 "
            "one, so 2P + (4P grads + 4P master + 8P moments) / N = 10P = 0.50x. During backward it holds the bf16 "
            "gradient partition (2P / N) and, with `overlap_comm`, two bf16 reduce buckets (2 x 100 MB at 5e7 "
            "elements): 9P + 200 MB. **fp32**: stage 0 holds P params + P grads + 2P moments = 16P; ZeRO-1/2 keep an "
            "fp32 master copy of their partition even when the model is already fp32 (`single_partition_of_fp32_"
            "groups`, a clone), so 4P + (4P master + 4P grads + 8P moments) / N = 12P = 0.75x at N = 2, the floor "
            "for fp32 at 2 ranks (N = 4: 0.50x). ZeRO-3 also partitions the parameters, but at 2 ranks its "
            "reduce and prefetch buffers (the grads + buffers column) take back more than that saves. DeepSpeed's "
            "default `reduce_bucket_size` of 5e8 elements is a 2 GB fp32 buffer, 6x this model's gradients: it "
            "made stage 1-3 peak *above* stage 0 in backward, which is why every shipped config sets 5e7.", ""]
    return out


def _scaling_section(results: dict) -> list[str]:
    out = ["## 5. Scaling: step time vs image size and batch size", ""]
    for dev, res in results.items():
        if "scaling" not in res:
            continue
        p = res["scaling"]
        out += [f"{p['model']}, {dev.upper()}, {p['dtype']}; best of two sweeps (the second in reverse order).", "",
                "| sweep | image size | batch | s / step | img/s | GFLOP/img | achieved TFLOP/s |",
                "|---|---|---|---|---|---|---|"]
        for r in p["rows"]:
            out.append(f"| {r['sweep']} | {r['img_size']} px | {r['batch']} | {r['step_s']:.3f} | "
                       f"{r['img_per_s']:.2f} | {r['gflops_per_img']:.1f} | {r['achieved_tflops']:.3f} |")
        out.append("")
    return out


def _round2_section(results: dict) -> list[str]:
    """Issue 16: input stalls, activation checkpointing, torch.compile, ZeRO-2 knobs (rendered when measured)."""
    out = []
    for dev, res in results.items():
        if "input" in res:
            p = res["input"]
            out += [f"## 6. Input stalls: FFCV from the beton vs synthetic tensors ({dev.upper()}, {p['dtype']})", "",
                    f"FastMIM ViT-B/16{' (tiny smoke run)' if p.get('tiny') else ''} at {p['img_size']} px, batch "
                    f"{p['batch']}, the real training loop; synthetic "
                    f"{p['synthetic_img_per_s']:.2f} img/s. Target: ratio >= 0.95.", "",
                    "| loader threads | FFCV img/s | ratio | waited for data | target |", "|---|---|---|---|---|"]
            out += [f"| {r['loader_threads']} | {r['img_per_s']:.2f} | {r['ratio']:.3f} | {r['data_wait_frac']:.1%} | "
                    f"{_ok(r['ratio'] >= 0.95)} |" for r in p["rows"]] + [""]
        if "gradckpt" in res:
            p = res["gradckpt"]
            out += [f"## 7. Activation checkpointing ({dev.upper()}, {p['dtype']}, batch {p['batch']})", "",
                    "| backbone | px | peak step memory off (MB) | on (MB) | saving | step-time cost |",
                    "|---|---|---|---|---|---|"]
            out += [f"| {r['family']} | {r['img_size']} | {_mb(r['peak_bytes_off'])} | {_mb(r['peak_bytes_on'])} | "
                    f"{r['memory_saving']:.0%} | {r['time_cost']:.2f}x |" for r in p["rows"]] + [""]
        if "compile" in res:
            p = res["compile"]
            r = p["resize"]
            out += [f"## 8. torch.compile ({dev.upper()}, {p['dtype']}, backend {p['backend']})", "",
                    f"FastMIM ViT-B/16, batch {p['batch']}. Target: speed-up >= 1.15x.", "",
                    "| image size | eager s/step | compiled s/step | speed-up | compilation s | target |",
                    "|---|---|---|---|---|---|",
                    f"| {p['img_size']} px | {p['eager_step_s']:.3f} | {p['compiled_step_s']:.3f} | "
                    f"{p['speedup']:.2f}x | {p['compile_s']:.0f} | {_ok(p['speedup'] >= 1.15)} |",
                    f"| {r['img_size']} px (size change) | {r['eager_step_s']:.3f} | {r['compiled_step_s']:.3f} | "
                    f"{r['speedup']:.2f}x | {r['recompile_s']:.0f} (recompile) | |", ""]
        if "zero_knobs" in res:
            p = res["zero_knobs"]
            out += [f"## 9. ZeRO-2 knobs ({dev.upper()}, {p['dtype']}, ViT-B/16, batch {p['batch']}, 1 rank)", "",
                    "| variant | FastMIM s/step | SimMIM s/step | ratio | FastMIM fixed s/step | target 3.0x |",
                    "|---|---|---|---|---|---|"]
            out += [f"| {r['variant']} | {r['fastmim_step_s']:.3f} | {r['simmim_step_s']:.3f} | {r['ratio']:.2f}x | "
                    f"{r['fastmim_fixed_s']:.3f} | {_ok(r['ratio'] >= 3.0)} |" for r in p["rows"]] + [""]
    return out


def _convert_section(results: dict) -> list[str]:
    """Issue 13: ``fastmim-ds prepare`` against FFCV's plain ``DatasetWriter`` (``bench_convert``)."""
    out = []
    for dev, res in results.items():
        if "convert" not in res:
            continue
        p = res["convert"]
        m = p["machine"]
        out += ["## 10. Conversion: `fastmim-ds prepare` vs FFCV's `DatasetWriter`", "",
                f"{dev.upper()}: `{p['src']}` ({p['images']:,} JPEGs, train + val), max resolution {p['max_res']} px, "
                f"JPEG quality {p['jpeg_quality']}, write mode {p['write_mode']}, {p['workers']} workers on each side; "
                "each trial a whole process (interpreter start and imports included); best of "
                f"{p['repeats']} interleaved rounds (FFCV, prepare folder, prepare tar, rotating who goes first), "
                f"medians in parentheses; load average {m['load_avg_start']:.1f} at the start, "
                f"{m['load_avg_end']:.1f} at the end. FFCV: ffcv-imagenet's `write_imagenet.py` (ImageFolder + "
                "`RGBImageField` + `IntField`) on the folder; `prepare` also detects the layout, checks every header, "
                "verifies the written file and writes the skip reports. Tar mode: the same images as the official "
                "ILSVRC2012 tars + devkit, streamed by `prepare`; FFCV has no tar reader and converts the extracted "
                "folder (extraction not counted).", "",
                "| input to prepare | FFCV s | prepare s | FFCV img/s | prepare img/s | FFCV time / prepare time | "
                f"median CPU s, FFCV / prepare | target >= {TARGETS['convert']} |", "|---|---|---|---|---|---|---|---|"]
        for r in p["rows"]:
            mode, med = r["mode"], p["median_s"]
            out.append(f"| {mode} | {r['ffcv_best_s']:.1f} ({med['ffcv']:.1f}) | {r['prepare_best_s']:.1f} "
                       f"({med[f'prepare_{mode}']:.1f}) | {r['ffcv_img_s']:,.0f} | {r['prepare_img_s']:,.0f} | "
                       f"{r['ratio']:.2f} ({r['median_ratio']:.2f}) | {r['ffcv_median_cpu_s']:.1f} / "
                       f"{r['prepare_median_cpu_s']:.1f} | {_ok(r['ratio'] >= TARGETS['convert'])} |")
        out.append("")
    return out


def write_report() -> Path:
    """Renders RESULTS.md (and the PNGs) from the result files present; returns its path."""
    results = read_results()
    if not results:
        raise FileNotFoundError("no benchmark results under benchmarks/results/ (run `make bench` first)")
    plots = [p for p in (_plot_loader(results), _plot_step(results), _plot_scaling(results),
                         _plot_zero(results["cpu"]["zero"]) if "zero" in results.get("cpu", {}) else None) if p]
    lines = ["# Benchmarks", "",
             "Generated by `make bench` (`benchmarks/run_all.py`, then `python -m benchmarks.report`) from "
             "`benchmarks/results/<device>/*.json`; do not edit by hand. GPU numbers: `make bench "
             "BENCH_DEVICE=cuda` on a GPU machine adds `results/cuda/` and re-renders this file.", "",
             "## Machines", ""]
    for dev, res in results.items():
        lines += _machine(res, dev) + [""]
    lines += _loader_section(results) + _step_section(results) + _util_section(results) + _zero_section(results)
    lines += _scaling_section(results) + _round2_section(results) + _convert_section(results)
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    path = OUT / "RESULTS.md"
    path.write_text("\n".join(lines))
    return path


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logger.info("wrote %s", write_report())


if __name__ == "__main__":
    main()
