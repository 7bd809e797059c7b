"""Fixed-batch fitting check of the prediction-layer initialisation (the defect found by the pre-training study).

One batch of 32 imagenette val images (centre crops, 64 px) with fixed masks; the study's FastMIM model (6-block
ViT-Tiny, 8-px patches, 128-d decoder); plain AdamW at lr 1e-3, no weight decay, no DeepSpeed. For each target it
trains the model twice, once with the decoder's prediction layer left at xavier initialisation (as MAE/FastMIM) and
once as fastmim_ds builds it (zero weight, bias = the target's typical value), and prints the loss at steps 0, 10,
50 and 150 next to the loss of the batch-mean predictor.

    python studies/fit_check.py [--beton data/imagenette128/val.beton]
"""
from __future__ import annotations

import argparse

import torch

from fastmim_ds.config import MIMModelCfg
from fastmim_ds.data import eval_loader
from fastmim_ds.methods import create_mim_model
from fastmim_ds.methods import fastmim as mim_module
from fastmim_ds.methods.fastmim import FastMIMCfg


def build(target: str, *, xavier: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    keep = mim_module.init_prediction
    if xavier:  # skip our initialisation: the layer keeps the decoder's xavier_uniform weights and zero bias
        mim_module.init_prediction = lambda pred, value: None
    try:
        cfg = MIMModelCfg(encoder="vit_tiny_patch16_224", encoder_kwargs={"depth": 6, "patch_size": 8})
        method = FastMIMCfg(mask_ratio=0.75, block_size=16, decoder_dim=128, target=target)
        return create_mim_model(method, cfg, 64)
    finally:
        mim_module.init_prediction = keep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--beton", default="data/imagenette128/val.beton")
    args = ap.parse_args()
    loader = eval_loader(args.beton, img_size=64, batch_size=32, crop_ratio=0.875, device=torch.device("cpu"))
    images = next(iter(loader))[0].clone()
    for target in ("hog", "pixel"):
        for xavier in (True, False):
            model = build(target, xavier=xavier)
            torch.manual_seed(5)
            mask = model.mask_generator(32, (64, 64))
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
            with torch.no_grad():
                out = model(images, mask)
            t, m = out["target"], out["mask"]
            mean_mse = ((t - t[m].mean(0)) ** 2)[m].mean().item()
            losses = []
            for step in range(151):
                loss = model(images, mask)["loss"]
                opt.zero_grad()
                loss.backward()
                opt.step()
                if step in (0, 10, 50, 150):
                    losses.append(f"step {step}: {loss.item():.4f}")
            name = "xavier" if xavier else "fastmim_ds"
            print(f"{target:5s} {name:10s} batch-mean predictor {mean_mse:.4f} | " + " | ".join(losses), flush=True)


if __name__ == "__main__":
    main()
