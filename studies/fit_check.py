import torch, sys, time
from fastmim_ds.config import MIMModelCfg, MaskCfg
from fastmim_ds.models import create_mim_model
from fastmim_ds.models import mim as mimmod
from fastmim_ds.data.loaders import build_val_loader
torch.manual_seed(0)
ld = build_val_loader("data/imagenette128/val.beton", img_size=64, batch_size=32, crop_ratio=0.875, num_workers=1, rank=0, world_size=1, device=torch.device("cpu"))
imgs, _ = next(iter(ld))
for target in ["hog", "pixel"]:
  for mode in ["xavier", "new"]:
    torch.manual_seed(0)
    if mode == "xavier":
        orig = mimmod.init_prediction; mimmod.init_prediction = lambda p, v: None
    m = create_mim_model("fastmim", MIMModelCfg(encoder="vit_tiny_patch16_224", encoder_kwargs=dict(depth=6, patch_size=8), decoder_dim=128, target=target), MaskCfg(0.75, 16), 64)
    if mode == "xavier": mimmod.init_prediction = orig
    g = torch.Generator().manual_seed(1)
    mask = m.mask_generator(32, (64, 64), device=imgs.device) if False else None
    torch.manual_seed(5); mask = m.mask_generator(32, (64,64), device=imgs.device)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0)
    out = m(imgs, mask); t = out["target"]; tm = out["mask"]
    mean_pred = ((t - t[tm].mean(0))**2)[tm].mean().item()
    res = []
    for s in range(151):
        out = m(imgs, mask); opt.zero_grad(); out["loss"].backward(); opt.step()
        if s in (0, 10, 50, 150): res.append(f"{s}:{out['loss'].item():.4f}")
    print(target, mode, "mean-pred", f"{mean_pred:.4f}", *res, flush=True)
