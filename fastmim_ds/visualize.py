"""Reconstruction pictures of a pre-training run: input, masked input, target and prediction per image.

``fastmim-ds visualize CKPT --images DIR --out grid.png`` builds the MIM model from the checkpoint's config, loads its
consolidated fp32 weights, masks a few images with a fixed seed and draws one row per image:

1. **input**: the image as the model sees it (shorter side resized to the run's ``img_size``, centre crop);
2. **masked input**: what the encoder got, as the method draws it (``MIMMethod.reconstruct``). FastMIM: masked
   blocks filled with the learned mask colour (the (1, 3, 1, 1) ``mask_token`` in normalised-pixel space, shown
   un-normalised); MixMIM: the mixed image (masked tokens taken from the partner image B - 1 - i); MAE and SimMIM
   (which drop or replace masked tokens after the patch embedding): masked patches in the mean colour (grey);
3. **target** and 4. **prediction**, on the token grid:

   * HOG (FastMIM's target, docs/methods.md §1.6-1.7): per 8-px cell, an orientation glyph: a star of ``nbins`` line
     segments through the cell centre, each along the edge direction of its bin (perpendicular to the gradient) and
     as bright as the bin's magnitude (colour channels summed). Tokens are regrouped from the target's
     (c * nbins + bin, dy, dx) layout back to cells. The prediction panel draws the predicted histograms (negative
     values clipped) at masked tokens; both panels shade masked tokens grey; brightness uses the target's maximum
     in both panels, so they compare directly.
   * pixels (MixMIM, MAE, SimMIM, or FastMIM with ``method.target: pixel``): the target un-patchified to an image;
     the prediction un-normalised with each target patch's own mean/std when ``norm_pix_loss`` is on (MAE's
     visualisation), shown at masked tokens with the visible input pasted elsewhere ("reconstruction + visible").

Pre-training also writes such a picture every ``vis.every`` epochs to ``<run>/vis/epochXXXX.png``
(:class:`EpochVisualizer`: every rank computes it, which keeps ZeRO-3 parameter gathering collective; rank 0 writes;
the mask comes from its own seeded generator, so the training RNG streams are untouched).
Pictures are drawn with numpy and PIL only.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageDraw
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform

from .config import PretrainCfg, VisCfg, load_config
from .masking import upsample_mask
from .methods import create_mim_model
from .targets import HOGTarget, PixelTarget, patchify

logger = logging.getLogger(__name__)

__all__ = [
    "Reconstruction", "load_mim_model", "load_images", "reconstruct", "unpatchify", "tokens_to_cells", "hog_glyphs",
    "render_grid", "visualize", "EpochVisualizer", "IMAGE_SUFFIXES",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
MASKED_SHADE = 45  # grey level (0-255) behind masked tokens in HOG panels


@dataclass
class Reconstruction:
    """One batch through a MIM model, as pictures and arrays (all on CPU, fp32).

    Attributes:
        images: (B, 3, H, W) input in [0, 1].
        masked: (B, 3, H, W) what the encoder saw, in [0, 1].
        mask: (B, h, w) bool on the token grid (stride ``stride`` px), True = masked (predicted).
        target: (B, N, D) the model's target; pred: (B, N, D) its prediction (N = h * w).
        stride: px per token.
        kind: ``"hog"`` or ``"pixel"``.
        target_img, pred_img: (B, 3, H, W) in [0, 1] for pixel targets (``None`` for HOG).
        hog_bins, hog_cell: the HOG target's bins and cell side in px (glyph layout; unused for pixels).
    """

    images: torch.Tensor
    masked: torch.Tensor
    mask: torch.Tensor
    target: torch.Tensor
    pred: torch.Tensor
    stride: int
    kind: str
    target_img: torch.Tensor | None = None
    pred_img: torch.Tensor | None = None
    hog_bins: int = 9
    hog_cell: int = 8


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised (B, 3, H, W) -> [0, 1]."""
    return (x.float().cpu() * _STD + _MEAN).clamp(0, 1)


def unpatchify(x: torch.Tensor, patch: int, grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`fastmim_ds.targets.patchify`: (B, N, patch * patch * C) -> (B, C, h * patch, w * patch).

    Args:
        x: tokens row-major on the (h, w) grid, inner order (p, q, c) as MAE.
        patch: token side in px.
        grid: (h, w) tokens.
    """
    B, N, D = x.shape
    h, w = grid
    C = D // (patch * patch)
    x = x.reshape(B, h, w, patch, patch, C)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(B, C, h * patch, w * patch)


def tokens_to_cells(t: torch.Tensor, grid: tuple[int, int], u: int) -> torch.Tensor:
    """HOG tokens back to cells: (B, N, K * u * u) -> (B, K, h * u, w * u).

    Inverse of :class:`~fastmim_ds.targets.HOGTarget`'s regrouping (inner order (k, dy, dx), k = c * nbins + bin;
    u = cells per token side), so ``tokens_to_cells(target(imgs, s), grid, s // cell) == target.histograms(imgs)``.
    """
    B, N, D = t.shape
    h, w = grid
    K = D // (u * u)
    x = t.reshape(B, h, w, K, u, u).permute(0, 3, 1, 4, 2, 5)  # (B, K, h, dy, w, dx)
    return x.reshape(B, K, h * u, w * u)


def hog_glyphs(hist: np.ndarray, cell_px: int, scale: float, background: np.ndarray | None = None) -> np.ndarray:
    """Draws HOG orientation glyphs.

    Bin ``b`` covers gradient angles phi in [b, b + 1) * 180 / nbins degrees, phi = atan2(gx, gy) as the HOG target
    (docs/methods.md §1.6): the gradient points along (x, y) = (sin phi, cos phi), so its edge, drawn here, runs along
    (cos phi, -sin phi) at the bin centre (b + 0.5) * 180 / nbins. Bin 0 is a horizontal edge, bin nbins / 2 vertical.

    Args:
        hist: (nbins, Hc, Wc) non-negative magnitudes per cell.
        cell_px: output pixels per cell side.
        scale: magnitude drawn at full brightness (larger values clip).
        background: optional (Hc, Wc) uint8 grey level behind each cell.

    Returns:
        (Hc * cell_px, Wc * cell_px) uint8 image; stronger bins are drawn over weaker ones.
    """
    nbins, Hc, Wc = hist.shape
    bg = np.zeros((Hc, Wc), np.uint8) if background is None else background.astype(np.uint8)
    canvas = Image.fromarray(np.kron(bg, np.ones((cell_px, cell_px), np.uint8)))
    draw = ImageDraw.Draw(canvas)
    phi = (np.arange(nbins) + 0.5) * math.pi / nbins
    r = cell_px / 2 - 0.5
    dx, dy = np.cos(phi) * r, -np.sin(phi) * r
    level = np.clip(hist / max(scale, 1e-12), 0, 1) * 255
    for flat in np.argsort(level, axis=None):  # ascending: the strongest orientation ends on top
        b, i, j = np.unravel_index(flat, level.shape)
        if level[b, i, j] < 1:
            continue
        cx, cy = (j + 0.5) * cell_px - 0.5, (i + 0.5) * cell_px - 0.5
        value = int(max(level[b, i, j], bg[i, j]))
        draw.line([(cx - dx[b], cy - dy[b]), (cx + dx[b], cy + dy[b])], fill=value, width=1)
    return np.asarray(canvas)


def load_mim_model(path: str | Path) -> tuple[nn.Module, PretrainCfg]:
    """The pre-training model of a run, with its consolidated fp32 weights (eval mode, CPU).

    Args:
        path: pre-training run folder, ``<run>/ckpt`` or tag folder.

    Raises:
        FileNotFoundError: no complete checkpoint.
        ValueError: not a pre-training checkpoint.
    """
    from .checkpoint import read_client_state, resolve_tag_dir
    from .weights import load_module_state

    tag_dir = resolve_tag_dir(Path(path))
    saved = read_client_state(tag_dir).get("config", {})
    if "method" not in saved:
        raise ValueError(f"{tag_dir} is not a pre-training checkpoint (reconstruction pictures need the decoder)")
    keys = ("method", "model", "mask", "data")  # "mask": a checkpoint of the old layout (upgraded by load_config)
    cfg = load_config(PretrainCfg, None, [f"{k}={_yaml(saved[k])}" for k in keys if k in saved])
    model = create_mim_model(cfg.method, cfg.model, cfg.data.img_size)
    state = load_module_state(tag_dir, "")  # the whole MIM module
    model.load_state_dict(state, strict=True)
    return model.eval(), cfg


def _yaml(value) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip()


def load_images(source: str | Path | list, img_size: int, *, limit: int) -> tuple[torch.Tensor, list[str]]:
    """Up to ``limit`` images as the run sees them at evaluation: shorter side to ``img_size`` (bicubic), centre crop,
    ImageNet mean/std (timm ``create_transform``, crop_pct 1).

    Args:
        source: an image file or folder (searched recursively, sorted), or a list of them (in that order).

    Returns:
        ((B, 3, img_size, img_size) normalised fp32, ``folder/file`` names).

    Raises:
        FileNotFoundError: a path that does not exist, or no images at all.
    """
    files: list[Path] = []
    for item in [source] if isinstance(source, (str, Path)) else source:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such image file or folder")
    files = files[:limit]
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {source}")
    tf = create_transform(img_size, is_training=False, crop_pct=1.0, interpolation="bicubic",
                          mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
    with torch.no_grad():
        imgs = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
    return imgs, [f"{f.parent.name}/{f.name}" for f in files]  # class folder + file: ImageFolder names repeat


@torch.no_grad()
def reconstruct(model: nn.Module, imgs: torch.Tensor, *, seed: int = 0) -> Reconstruction:
    """Runs the MIM method ``model`` on ``imgs`` with a mask drawn from ``torch.Generator().manual_seed(seed)``
    (its :meth:`~fastmim_ds.methods.MIMMethod.reconstruct`: the forward outputs and the masked input).

    Args:
        model: the pre-training model (a :class:`~fastmim_ds.methods.MIMMethod`); switched to eval for the call and
            restored.
        imgs: (B, 3, H, W) ImageNet-normalised.

    Raises:
        ValueError: a target that is neither HOG nor pixels.
    """
    device = next(model.parameters()).device
    imgs = imgs.to(device=device, dtype=torch.float32)
    n = imgs.shape[0]
    g = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        out = model.reconstruct(imgs, generator=g)
    finally:
        model.train(was_training)
    masked = out["masked"]
    stride = model.stride
    H, W = imgs.shape[-2:]
    grid = (H // stride, W // stride)
    target, pred = out["target"].float(), out["pred"].float()
    mask = out["mask"].reshape(n, *grid).cpu()
    rec = Reconstruction(images=_to_unit(imgs), masked=_to_unit(masked), mask=mask, target=target.cpu(),
                         pred=pred.cpu(), stride=stride, kind="hog" if isinstance(model.target, HOGTarget) else "pixel")
    if isinstance(model.target, HOGTarget):
        rec.hog_bins, rec.hog_cell = model.target.nbins, model.target.cell
    if isinstance(model.target, PixelTarget):
        x = patchify(imgs, stride)  # (B, N, stride^2 * 3), normalised-pixel space
        if model.target.normalize:  # MAE: show the prediction with the target patch's own statistics
            mean, std = x.mean(-1, keepdim=True), (x.var(-1, keepdim=True) + 1e-6).sqrt()
            pred_x, target_x = pred * std + mean, target * std + mean
        else:
            pred_x, target_x = pred, target
        token_mask = mask.flatten(1).to(device).unsqueeze(-1)  # (B, N, 1)
        pasted = torch.where(token_mask, pred_x, x)  # reconstruction + visible
        rec.target_img = _to_unit(unpatchify(target_x, stride, grid))
        rec.pred_img = _to_unit(unpatchify(pasted, stride, grid))
    elif not isinstance(model.target, HOGTarget):
        raise ValueError(f"no picture for target {type(model.target).__name__} (HOG or pixels)")
    return rec


def _hog_panels(rec: Reconstruction, i: int, nbins: int, cell: int, scale_px: int) -> tuple[np.ndarray, np.ndarray]:
    """(target, prediction) glyph panels of image ``i`` (uint8, H * scale_px / cell square)."""
    H, W = rec.images.shape[-2:]
    grid = (H // rec.stride, W // rec.stride)
    u = rec.stride // cell
    cells_t = tokens_to_cells(rec.target[i:i + 1], grid, u)[0].view(3, nbins, H // cell, W // cell).sum(0)
    cells_p = tokens_to_cells(rec.pred[i:i + 1], grid, u)[0].view(3, nbins, H // cell, W // cell).clamp(min=0).sum(0)
    masked_cells = upsample_mask(rec.mask[i:i + 1], u)[0].numpy()  # (Hc, Wc)
    cells_p = cells_p * torch.from_numpy(masked_cells)  # prediction shown where the loss is: masked tokens
    bg = masked_cells.astype(np.uint8) * MASKED_SHADE
    scale = float(cells_t.max())
    return (hog_glyphs(cells_t.numpy(), scale_px, scale, bg), hog_glyphs(cells_p.numpy(), scale_px, scale, bg))


def _rgb(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W, 3) uint8."""
    return (x.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def render_grid(rec: Reconstruction, *, panel: int = 128, names: list[str] | None = None) -> Image.Image:
    """One row per image: input | masked input | target | prediction, each ``panel`` px wide, titles on top.

    Args:
        rec: :func:`reconstruct`'s output.
        panel: panel side in px (images are enlarged by an integer factor, nearest neighbour, so pixels stay sharp).
        names: optional row labels (file names).
    """
    B, _, H, W = rec.images.shape
    f = max(1, panel // H)
    ph, pw = H * f, W * f
    title_h, label_w, gap = 14, 0, 2
    titles = ["input", "masked input", f"target ({rec.kind})", "prediction"]
    canvas = Image.new("RGB", (4 * pw + 5 * gap + label_w, title_h + B * (ph + gap) + gap), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, t in enumerate(titles):
        draw.text((gap + c * (pw + gap) + 2, 1), t, fill=(0, 0, 0))
    for i in range(B):
        if rec.kind == "hog":
            tgt, prd = _hog_panels(rec, i, rec.hog_bins, rec.hog_cell, rec.hog_cell * f)
            tgt, prd = np.stack([tgt] * 3, -1), np.stack([prd] * 3, -1)
        else:
            tgt, prd = _rgb(rec.target_img[i]), _rgb(rec.pred_img[i])
        panels = [_rgb(rec.images[i]), _rgb(rec.masked[i]), tgt, prd]
        y = title_h + i * (ph + gap) + gap
        for c, p in enumerate(panels):
            img = Image.fromarray(p)
            if img.size != (pw, ph):
                img = img.resize((pw, ph), Image.NEAREST)
            canvas.paste(img, (gap + c * (pw + gap), y))
        if names:
            draw.text((gap + 2, y + 1), names[i][-20:], fill=(255, 255, 0))
    return canvas


def visualize(path: str | Path, images: str | Path | list, out: str | Path, *, num_images: int = 4, seed: int = 0,
              panel: int = 128) -> Path:
    """Writes the reconstruction grid of the pre-training checkpoint ``path`` on ``images`` to ``out`` (PNG).

    Raises:
        FileNotFoundError: no checkpoint or no images.
        ValueError: not a pre-training checkpoint.
    """
    model, cfg = load_mim_model(path)
    imgs, names = load_images(images, cfg.data.img_size, limit=num_images)
    rec = reconstruct(model, imgs, seed=seed)
    grid = render_grid(rec, panel=panel, names=names)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out, optimize=True)
    logger.info("wrote %s (%d images, %s target, %s)", out, len(names), rec.kind, cfg.method.name)
    return out


class EpochVisualizer:
    """The pre-training hook: every ``vis.every`` epochs, a reconstruction grid to ``<run_dir>/vis/epochXXXX.png``.

    Images: ``vis.images`` (a folder), else the first ``vis.num_images`` images of ``data_train`` (centre crops
    through :func:`fastmim_ds.data.eval_loader`, rows named by sample index and class id). They are read once per image
    size (FastMIM-P stages) and kept on CPU.

    Args:
        vis: the config section.
        data_train: the training .beton (used when ``vis.images`` is empty).
        run_dir: the run folder.
        write: write the file (rank 0); every rank must call (ZeRO-3 gathers parameters collectively).
    """

    def __init__(self, vis: VisCfg, *, data_train: str, run_dir: Path, write: bool):
        self.vis, self.data_train, self.write = vis, data_train, write
        self.out_dir = Path(run_dir) / "vis"
        self._images: dict[int, tuple[torch.Tensor, list[str]]] = {}

    def due(self, epoch: int) -> bool:
        """True after epoch ``epoch`` (0-based) when a picture is due."""
        return self.vis.every > 0 and (epoch + 1) % self.vis.every == 0

    def images(self, img_size: int) -> tuple[torch.Tensor, list[str]]:
        if img_size not in self._images:
            if self.vis.images:
                self._images[img_size] = load_images(self.vis.images, img_size, limit=self.vis.num_images)
            else:
                self._images[img_size] = self._dataset_images(img_size)
        return self._images[img_size]

    def _dataset_images(self, img_size: int) -> tuple[torch.Tensor, list[str]]:
        from .data import dataset_info, eval_loader

        loader = eval_loader(self.data_train, img_size=img_size, batch_size=self.vis.num_images, crop_ratio=1.0,
                             device=torch.device("cpu"))
        imgs, labels = next(iter(loader))
        imgs = imgs.clone().contiguous()  # the loader reuses its batch buffers
        classes = dataset_info(self.data_train).classes
        return imgs, [f"#{i} {classes[y]}" if classes else f"train #{i}" for i, y in enumerate(labels.tolist())]

    def __call__(self, model: nn.Module, epoch: int, img_size: int) -> Path | None:
        """Draws the picture after epoch ``epoch`` (0-based) at ``img_size``; returns its path on the writing rank."""
        imgs, names = self.images(img_size)
        rec = reconstruct(model, imgs, seed=self.vis.seed)
        if not self.write:
            return None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        out = self.out_dir / f"epoch{epoch + 1:04d}.png"
        render_grid(rec, names=names).save(out, optimize=True)
        logger.info("reconstructions: %s", out)
        return out
