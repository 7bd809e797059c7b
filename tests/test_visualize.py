"""Reconstruction pictures: layout inverses, HOG glyph orientation, masked inputs, pixel un-normalisation, the grid
file and the pre-training hook (tiny models, CPU, fp32)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_MIXMIM, TINY_VIT, pretrain_run  # noqa: F401  (fixture)
from PIL import Image

from fastmim_ds.config import PretrainCfg, VisCfg, load_config
from fastmim_ds.masking import upsample_mask
from fastmim_ds.methods import create_mim_model
from fastmim_ds.targets import HOGTarget, patchify
from fastmim_ds.visualize import (
    EpochVisualizer,
    hog_glyphs,
    load_images,
    reconstruct,
    render_grid,
    tokens_to_cells,
    unpatchify,
    visualize,
)

pytestmark = [pytest.mark.usefixtures("one_rank_group"), pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """Five RGB images of different sizes and patterns (synthetic)."""
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(5):
        h, w = 64 + 16 * i, 80
        y, x = np.mgrid[0:h, 0:w]
        base = (np.sin(x / (3 + i)) * 0.5 + 0.5)[..., None] * rng.uniform(0.3, 1.0, size=3)
        Image.fromarray((base * 255).astype(np.uint8)).save(d / f"{i}.png")
    return d


def _model(overrides: list[str]):
    cfg = load_config(PretrainCfg, None, overrides)
    torch.manual_seed(0)
    return create_mim_model(cfg.method, cfg.model, cfg.data.img_size), cfg


def test_unpatchify_inverts_patchify():
    x = torch.randn(2, 3, 32, 48)
    assert torch.equal(unpatchify(patchify(x, 8), 8, (4, 6)), x)


def test_tokens_to_cells_inverts_hog_token_layout():
    hog = HOGTarget()
    x = torch.randn(2, 3, 64, 64)
    for stride in (16, 32):  # u = 2 (ViT/16), 4 (Swin, stride 32)
        tokens = hog(x, stride)  # (B, N, 27 * u * u)
        cells = tokens_to_cells(tokens, (64 // stride, 64 // stride), stride // 8)
        assert torch.equal(cells, hog.histograms(x))


def _lit(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.nonzero(img > 0)
    return ys, xs


def test_glyph_bins_draw_their_edge_direction():
    for b, vertical in ((4, True), (0, False)):
        hist = np.zeros((9, 1, 1))
        hist[b] = 1.0
        ys, xs = _lit(hog_glyphs(hist, 16, scale=1.0))
        if vertical:  # bin 4 of 9: gradient along x, edge vertical -> one column
            assert len(set(xs.tolist())) <= 2 and np.ptp(ys) >= 13
        else:  # bin 0: gradient along y (10 degrees off), edge nearly horizontal
            assert np.ptp(xs) >= 13 and np.ptp(ys) <= 3


def test_hog_of_vertical_edges_renders_vertical_glyphs():
    # intensity changes along x only: every cell's histogram peaks in bin 4, drawn as a vertical segment
    x = torch.zeros(1, 3, 32, 32)
    x[..., :, ::8] = 1.0
    x[..., :, 1::8] = 1.0
    hist = HOGTarget(normalize=False).histograms(x)[0].view(3, 9, 4, 4).sum(0)  # (9, Hc, Wc)
    assert (hist.argmax(0) == 4).all()
    img = hog_glyphs(hist.numpy(), 16, scale=float(hist.max()))
    cell = img[:16, :16]
    ys, xs = _lit(cell)
    assert np.ptp(ys) > 3 * max(1, np.ptp(xs))


def test_fastmim_masked_input_uses_the_learned_colour_and_same_seed_same_mask(image_dir):
    model, cfg = _model(TINY_VIT)
    imgs, names = load_images(image_dir, 64, limit=3)
    assert imgs.shape == (3, 3, 64, 64) and names == [f"{image_dir.name}/{i}.png" for i in range(3)]
    rec = reconstruct(model, imgs, seed=5)
    assert rec.kind == "hog" and rec.mask.shape == (3, 4, 4) and rec.target.shape == rec.pred.shape == (3, 16, 108)
    assert int(rec.mask[0].sum()) == 12  # 0.75 of 16 tokens
    pixel = upsample_mask(rec.mask, 16).unsqueeze(1).expand_as(rec.images)
    colour = (model.mask_token.detach() * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
              + torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)).clamp(0, 1).expand_as(rec.images)
    assert torch.allclose(rec.masked[pixel], colour[pixel], atol=1e-6)
    assert torch.equal(rec.masked[~pixel], rec.images[~pixel])
    assert torch.equal(reconstruct(model, imgs, seed=5).mask, rec.mask)
    assert not torch.equal(reconstruct(model, imgs, seed=6).mask, rec.mask)
    assert model.training  # restored


def test_pixel_target_unnormalised_with_patch_statistics(image_dir):
    model, _ = _model([*TINY_VIT, "method.target=pixel"])
    imgs, _ = load_images(image_dir, 64, limit=2)
    rec = reconstruct(model, imgs, seed=0)
    assert rec.kind == "pixel"
    # the norm-pix target, un-normalised with its own patch mean/std and un-patchified, is the input image
    assert torch.allclose(rec.target_img, rec.images, atol=1e-4)
    # reconstruction + visible: visible tokens show the input exactly, masked tokens the prediction
    visible = ~upsample_mask(rec.mask, 16).unsqueeze(1).expand_as(rec.images)
    assert torch.allclose(rec.pred_img[visible], rec.images[visible], atol=1e-5)
    assert not torch.allclose(rec.pred_img[~visible], rec.images[~visible], atol=1e-2)


def test_mixmim_masked_input_is_the_mixed_image_and_odd_batches_work(image_dir):
    model, _ = _model(TINY_MIXMIM)
    imgs, _ = load_images(image_dir, 64, limit=3)
    rec = reconstruct(model, imgs, seed=0)
    assert rec.kind == "pixel" and rec.images.shape == (3, 3, 64, 64) and rec.mask.shape == (3, 2, 2)
    padded = torch.cat([rec.images, rec.images[:1]])  # the partner of image i is image 3 - i of the padded batch
    pixel = upsample_mask(rec.mask[:1], 32)[0]
    for i in range(3):
        assert torch.equal(rec.masked[i][:, pixel], padded[3 - i][:, pixel])
        assert torch.equal(rec.masked[i][:, ~pixel], rec.images[i][:, ~pixel])
    grid = render_grid(rec, panel=64)
    assert grid.size == (4 * 64 + 5 * 2, 14 + 3 * (64 + 2) + 2)


def test_visualize_writes_the_grid_of_a_deepspeed_checkpoint(tmp_path, image_dir):
    _, mim, run = pretrain_run(tmp_path, TINY_VIT)
    out = visualize(run, image_dir, tmp_path / "grid.png", num_images=4, panel=128)
    img = Image.open(out)
    assert img.size == (4 * 128 + 5 * 2, 14 + 4 * (128 + 2) + 2)
    a = np.asarray(img.convert("L"), dtype=np.float32)
    target_panel = a[16:16 + 128, 2 * 130 + 2:2 * 130 + 2 + 128]
    assert target_panel.max() > 200  # glyphs were drawn
    with pytest.raises(ValueError, match="not a pre-training checkpoint"):
        from conftest import finetune_run

        _, ft = finetune_run(tmp_path)
        visualize(ft, image_dir, tmp_path / "x.png")


def test_epoch_hook_writes_on_schedule_and_leaves_rng_alone(tmp_path, image_dir):
    model, cfg = _model(TINY_VIT)
    vis = EpochVisualizer(VisCfg(every=2, images=str(image_dir), num_images=2), data_train="unused.beton",
                          run_dir=tmp_path, write=True)
    assert [e for e in range(6) if vis.due(e)] == [1, 3, 5]
    state = torch.get_rng_state()
    out = vis(model, 1, 64)
    assert out == tmp_path / "vis" / "epoch0002.png" and out.is_file()
    assert torch.equal(torch.get_rng_state(), state)  # masks come from the hook's own generator
    assert EpochVisualizer(VisCfg(every=2, images=str(image_dir)), data_train="x", run_dir=tmp_path / "r1",
                           write=False)(model, 1, 64) is None  # other ranks compute, do not write
    assert not (tmp_path / "r1").exists()
    assert not EpochVisualizer(VisCfg(), data_train="x", run_dir=tmp_path, write=True).due(0)  # every=0: off
