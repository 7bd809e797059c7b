"""bf16 vs fp32 on this machine's CPU, measured side by side in one run (why the CPU configs use fp32).

Prints GFLOP/s of a ViT-B-sized linear (M=1024, K=768, N=3072) and a 2048^2 matmul, and images/s of one FastMIM
training step (forward + backward) of the README's imagenette model, each in fp32 and bf16, with the ratios.
Usage: ``.venv/bin/python benchmarks/cpu_precision.py [--threads N]``.
"""
from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F


def _rate(fn, work: float, min_time: float = 2.0) -> float:
    fn()  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_time:
        fn()
        n += 1
    return work * n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from fastmim_ds.config import PretrainCfg, load_config
    from fastmim_ds.methods import create_mim_model

    print(f"{platform.processor() or platform.machine()} | torch {torch.__version__} | "
          f"{torch.backends.cpu.get_cpu_capability()} | {args.threads} threads")
    m, k, n = 1024, 768, 3072
    cfg = load_config(PretrainCfg, "configs/imagenette_pretrain.yaml")
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        a, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
        x = torch.randn(2048, 2048, dtype=dtype)
        linear = _rate(lambda: F.linear(a, w), 2 * m * k * n / 1e9)
        matmul = _rate(lambda: x @ x, 2 * 2048**3 / 1e9, min_time=1.0)
        torch.manual_seed(0)
        model = create_mim_model(cfg.method, cfg.model, cfg.data.img_size).to(dtype)
        imgs = torch.randn(64, 3, cfg.data.img_size, cfg.data.img_size)
        step = _rate(lambda: model(imgs)["loss"].backward(), 64)
        rows.append((str(dtype).replace("torch.", ""), linear, matmul, step))
    print(f"{'dtype':10}{'linear GFLOP/s':>16}{'2048^2 matmul GFLOP/s':>24}{'MIM step img/s':>17}")
    for name, lin, mm, st in rows:
        print(f"{name:10}{lin:16.1f}{mm:24.2f}{st:17.1f}")
    (_, l32, m32, s32), (_, l16, m16, s16) = rows
    print(f"{'fp32/bf16':10}{l32 / l16:15.1f}x{m32 / m16:23.1f}x{s32 / s16:16.1f}x")


if __name__ == "__main__":
    main()
