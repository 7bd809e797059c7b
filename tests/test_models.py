"""fastmim_ds.methods.fastmim: the FastMIM wrapper on a tiny timm ViT/16 (fp32, CPU)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from fastmim_ds.config import PretrainCfg
from fastmim_ds.losses import masked_mse
from fastmim_ds.masking import upsample_mask
from fastmim_ds.methods import FastMIM, create_mim_model
from fastmim_ds.targets import HOGTarget

pytestmark = pytest.mark.timeout(120)

B = 2


def _build(cfg: PretrainCfg, img_size: int = 64, **method_changes) -> FastMIM:
    method = dataclasses.replace(cfg.method, **method_changes) if method_changes else cfg.method
    torch.manual_seed(0)
    return create_mim_model(method, cfg.model, img_size)


@pytest.fixture()
def model(tiny_vit_cfg) -> FastMIM:
    return _build(tiny_vit_cfg)


def _imgs(size: int = 64, seed: int = 0, b: int = B) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _grid_mask(seed: int = 0, b: int = B, grid: int = 4, masked: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(grid * grid, generator=g) < masked for _ in range(b)]
    return torch.stack(rows).view(b, grid, grid)


# ------------------------------------------------------------------------------------------- forward


def test_forward_outputs(model):
    out = model(_imgs())
    assert set(out) == {"loss", "pred", "target", "mask"}
    assert out["loss"].shape == () and out["loss"].dtype == torch.float32
    assert torch.isfinite(out["loss"])
    assert out["pred"].shape == (B, 16, 108)
    assert out["target"].shape == (B, 16, 108) and out["target"].dtype == torch.float32
    assert out["mask"].shape == (B, 16) and out["mask"].dtype == torch.bool
    assert out["mask"].sum(1).tolist() == [12] * B  # 4x4 grid, ratio .75: 16 - int(16 * .25)


def test_loss_equals_manual_masked_mean(model):
    out = model(_imgs())
    pred, target, mask = out["pred"], out["target"], out["mask"]
    manual = ((pred - target) ** 2)[mask].mean()
    torch.testing.assert_close(out["loss"], manual, rtol=1e-6, atol=0)
    # and it is not the mean over all tokens
    assert not torch.allclose(out["loss"], ((pred - target) ** 2).mean(), rtol=1e-4, atol=0)


def test_target_is_hog_of_unmasked_image(model):
    imgs = _imgs(seed=1)
    out = model(imgs)
    assert torch.equal(out["target"], HOGTarget(normalize=True)(imgs, 16))


def test_visible_predictions_do_not_change_loss(model):
    with torch.no_grad():
        out = model(_imgs())
    pred, target, mask = out["pred"], out["target"], out["mask"]
    noise = torch.randn(pred.shape, generator=torch.Generator().manual_seed(9)) * 100
    changed_visible = torch.where(mask[..., None], pred, pred + noise)
    changed_masked = torch.where(mask[..., None], pred + noise, pred)
    base = masked_mse(pred, target, mask)
    assert torch.equal(masked_mse(changed_visible, target, mask), base)
    assert not torch.allclose(masked_mse(changed_masked, target, mask), base)


def test_pred_gradient_zero_at_visible_tokens(model):
    out = model(_imgs())
    pred, mask = out["pred"], out["mask"]
    pred.retain_grad()
    out["loss"].backward()
    g = pred.grad
    assert g is not None
    assert torch.all(g[~mask] == 0)
    assert torch.all(g[mask].abs().sum(-1) > 0)
    # d/dpred of mean over masked elements = 2 (pred - target) / (num masked tokens x D)
    expected = 2 * (pred - out["target"]).detach() * mask[..., None] / (mask.sum() * pred.shape[-1])
    torch.testing.assert_close(g, expected)


def test_every_trainable_parameter_gets_gradient(model):
    assert model.decoder.pred.weight.abs().sum() == 0  # a fresh decoder predicts a constant
    torch.nn.init.normal_(model.decoder.pred.weight, std=0.02)  # as after the first update: gradients reach all layers
    out = model(_imgs())
    out["loss"].backward()
    names = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        names.append(name)
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"
    assert "mask_token" in names
    assert model.mask_token.shape == (1, 3, 1, 1)
    assert any(n.startswith("encoder.blocks.") for n in names)
    assert any(n.startswith("decoder.") for n in names)


def test_pos_embed_frozen(model):
    assert model.encoder.pos_embed.requires_grad is False
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"encoder.pos_embed"}
    # fixed 2-D sin-cos table with a zero row for the cls token
    pe = model.encoder.pos_embed
    assert pe.shape == (1, 1 + 16, 64)
    assert torch.all(pe[0, 0] == 0)
    assert pe[0, 1:].abs().max() <= 1.0 and pe[0, 1:].abs().sum() > 0


@pytest.mark.parametrize("size, tokens, masked", [(64, 16, 12), (96, 36, 27), (128, 64, 48)])
def test_same_model_accepts_several_sizes(model, size, tokens, masked):
    out = model(_imgs(size))
    assert out["pred"].shape == (B, tokens, 108)
    assert out["target"].shape == (B, tokens, 108)
    assert out["mask"].shape == (B, tokens)
    assert out["mask"].sum(1).tolist() == [masked] * B
    assert torch.isfinite(out["loss"])


def test_block_larger_than_patch(tiny_vit_cfg):
    cfg = dataclasses.replace(tiny_vit_cfg, method=dataclasses.replace(tiny_vit_cfg.method, block_size=32))
    torch.manual_seed(0)
    m = create_mim_model(cfg.method, cfg.model, 64)
    out = m(_imgs())
    mask = out["mask"].view(B, 4, 4)
    # 2x2 blocks of 32 px, 3 masked; each block covers 2x2 tokens of 16 px
    assert out["mask"].sum(1).tolist() == [12] * B
    blocks = mask.view(B, 2, 2, 2, 2).permute(0, 1, 3, 2, 4).reshape(B, 2, 2, 4)
    assert torch.all(blocks.all(-1) | ~blocks.any(-1))
    assert blocks.all(-1).flatten(1).sum(1).tolist() == [3] * B


# ------------------------------------------------------------------------------------------- validation


def test_img_size_not_divisible_by_block_raises(tiny_vit_cfg, model):
    with pytest.raises(ValueError, match="72"):
        create_mim_model(tiny_vit_cfg.method, tiny_vit_cfg.model, 72)
    with pytest.raises(ValueError, match="divisible"):
        model.check_img_size(72)
    with pytest.raises(ValueError):
        model(_imgs(72))
    model.check_img_size(96)  # fine


def test_block_not_multiple_of_patch_raises(tiny_vit_cfg):
    method = dataclasses.replace(tiny_vit_cfg.method, block_size=24)
    with pytest.raises(ValueError, match="multiple of the encoder stride"):
        create_mim_model(method, tiny_vit_cfg.model, 48)


def test_unknown_method_raises(tiny_vit_cfg):
    with pytest.raises(ValueError, match="fastmim") as ei:
        create_mim_model(dataclasses.replace(tiny_vit_cfg.method, name="simmim_typo"), tiny_vit_cfg.model, 64)
    assert "simmim_typo" in str(ei.value)


@pytest.mark.parametrize("encoder, match", [("not_a_timm_model", "not a timm model"), ("resnet18", "no MIM adapter")])
def test_unknown_encoder_raises(tiny_vit_cfg, encoder, match):
    model_cfg = dataclasses.replace(tiny_vit_cfg.model, encoder=encoder, encoder_kwargs={})
    with pytest.raises(ValueError, match=match):
        create_mim_model(tiny_vit_cfg.method, model_cfg, 64)


# ------------------------------------------------------------------------------------------- masking in the model


def test_masked_pixels_replaced_by_mask_token(model):
    imgs = _imgs(seed=3)
    mask = _grid_mask(seed=1)
    seen = {}

    def hook(module, inputs, output):  # returns None: the output is left alone
        seen["x"] = inputs[0]

    handle = model.encoder.patch_embed.register_forward_hook(hook)
    try:
        out = model(imgs, mask=mask)
    finally:
        handle.remove()
    x = seen["x"].detach()
    assert x.shape == imgs.shape
    pix = upsample_mask(mask, 16)[:, None].expand_as(imgs)  # (B, 3, 64, 64)
    token_colour = model.mask_token.detach().expand_as(imgs)
    assert torch.equal(x[pix], token_colour[pix])
    assert torch.equal(x[~pix], imgs[~pix])
    assert torch.equal(out["mask"], mask.flatten(1))


def test_explicit_mask_is_deterministic(model):
    imgs = _imgs(seed=4)
    mask = _grid_mask(seed=2)
    with torch.no_grad():
        a = model(imgs, mask=mask)["loss"]
        b = model(imgs, mask=mask)["loss"]
        c = model(imgs, mask=_grid_mask(seed=5))["loss"]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_random_mask_drawn_from_global_rng(model):
    imgs = _imgs(seed=4)
    with torch.no_grad():
        torch.manual_seed(11)
        a = model(imgs)
        torch.manual_seed(11)
        b = model(imgs)
    assert torch.equal(a["mask"], b["mask"])
    assert torch.equal(a["loss"], b["loss"])


def test_bf16_images_use_fp32_target(model):
    imgs = _imgs(32, seed=6, b=1).bfloat16()
    with torch.no_grad():
        out = model(imgs)
    assert out["target"].dtype == torch.float32
    assert torch.equal(out["target"], HOGTarget(normalize=True)(imgs.float(), 16))
    assert out["loss"].dtype == torch.float32


def test_pixel_target_model(tiny_vit_cfg):
    m = _build(tiny_vit_cfg, target="pixel")
    out = m(_imgs())
    assert out["pred"].shape == (B, 16, 768)
    assert out["target"].shape == (B, 16, 768)
    torch.testing.assert_close(out["target"].mean(-1), torch.zeros(B, 16), rtol=0, atol=1e-5)


def test_decoder_shape(model):
    dec = model.decoder
    assert dec.embed.in_features == 64 and dec.embed.out_features == 256
    assert len(dec.blocks) == 1
    assert dec.blocks[0].attn.num_heads == 256 // 32
    assert dec.pred.out_features == 108


def test_no_weight_decay(model):
    nwd = model.no_weight_decay()
    assert {"mask_token", "encoder.pos_embed", "encoder.cls_token"} <= nwd
    assert not any(n.startswith("decoder.") for n in nwd)


def test_cls_token_init_follows_reference(model):
    std = model.encoder.cls_token.detach().std().item()
    assert 0.01 < std < 0.03, std
