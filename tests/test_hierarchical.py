"""Hierarchical backbones (timm Swin, PVTv2) under the one FastMIM wrapper, tiny presets in fp32 on CPU.

Covers pre-training (shapes, gradients, mask/target grid at stride 32), image-size changes between epochs
(FastMIM-P; ViT too), truncation to the first k blocks, fine-tuning loads (Swin window 4 -> 7) and layer decay.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
from pathlib import Path

import pytest
import timm
import torch
from timm.layers import build_sincos2d_pos_embed, resample_abs_pos_embed
from timm.models.swin_transformer import get_relative_position_index
from timm.optim import param_groups_layer_decay

from fastmim_ds.config import (
    ClassifierCfg,
    FinetuneCfg,
    MIMModelCfg,
    OptimCfg,
    PretrainCfg,
    Resolved,
    load_config,
)
from fastmim_ds.masking import upsample_mask
from fastmim_ds.methods import FastMIM, create_mim_model
from fastmim_ds.methods.fastmim import FastMIMCfg
from fastmim_ds.models import adapter_for
from fastmim_ds.models.adapters import PVTv2Adapter, SwinAdapter, clipped_relative_position_index, fastmim_layer_id
from fastmim_ds.models.classifier import create_classifier
from fastmim_ds.optim import build_optimizer
from fastmim_ds.targets import HOGTarget

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]

B = 2
SWIN = "swin_tiny_patch4_window7_224"
# Swin-B's grid at 128 px (stage grids 32/16/8/4, window 4, stride 32) with tiny widths and depths
SWIN_KW = {"embed_dim": 32, "depths": [1, 1, 2, 1], "num_heads": [1, 2, 2, 4], "window_size": 4}
PVT = "pvt_v2_b2"
PVT_KW = {"embed_dims": [16, 32, 32, 64], "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4]}
FAMILIES = {"swin": (SWIN, SWIN_KW), "pvt_v2": (PVT, PVT_KW)}
RESOLVED = Resolved(world_size=1, eff_batch=256, lr=1e-3, min_lr=0.0)
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _build(family: str, img_size: int = 128, **kwargs_changes) -> FastMIM:
    name, kw = FAMILIES[family]
    model = MIMModelCfg(encoder=name, encoder_kwargs={**kw, **kwargs_changes})
    torch.manual_seed(0)
    method = FastMIMCfg(mask_ratio=0.75, block_size=32, decoder_dim=64, decoder_depth=2)
    return create_mim_model(method, model, img_size)


def _imgs(size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _grid_mask(grid: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    masked = grid * grid - int(grid * grid * 0.25)
    return torch.stack([torch.randperm(grid * grid, generator=g) < masked for _ in range(B)]).view(B, grid, grid)


def _save_pretrained(mim: FastMIM, path, name: str, kwargs: dict, extra: dict | None = None):
    cfg = {"model": {"encoder": name, "encoder_kwargs": kwargs}}
    torch.save({"model": {**mim.state_dict(), **(extra or {})}, "config": cfg}, path)
    return path


def _windows(encoder) -> list[int]:
    return [b.window_size[0] for stage in encoder.layers for b in stage.blocks]


# ------------------------------------------------------------------------------------------- pre-training


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_backward_every_parameter_gets_gradient(family):
    model = _build(family)
    assert model.stride == 32 and model.decoder.pred.out_features == 432  # 3 x 9 bins x (32 / 8)^2 cells
    out = model(_imgs(128))
    assert out["pred"].shape == (B, 16, 432) and out["target"].shape == (B, 16, 432)
    assert out["mask"].sum(1).tolist() == [12] * B  # 4x4 blocks of 32 px, 16 - int(16 * 0.25) masked
    assert torch.isfinite(out["loss"])
    # a fresh decoder predicts a constant (zero prediction weight), which stops gradients to the layers before it
    # until the first update: give that weight the values an update would, then check every parameter
    torch.nn.init.normal_(model.decoder.pred.weight, std=0.02)
    out = model(_imgs(128))
    out["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


@pytest.mark.parametrize("family", FAMILIES)
def test_mask_token_and_target_align_with_stride32_grid(family):
    model = _build(family)
    imgs, mask = _imgs(128, seed=3), _grid_mask(4, seed=1)
    seen = {}
    handle = model.encoder.patch_embed.register_forward_hook(lambda m, inputs, out: seen.update(x=inputs[0]))
    try:
        with torch.no_grad():
            out = model(imgs, mask=mask)
    finally:
        handle.remove()
    # the stem sees the learned colour exactly on the masked 32x32 blocks, the image elsewhere
    pix = upsample_mask(mask, 32)[:, None].expand_as(imgs)
    assert torch.equal(seen["x"][pix], model.mask_token.detach().expand_as(imgs)[pix])
    assert torch.equal(seen["x"][~pix], imgs[~pix])
    # token n of the 4x4 stage-4 grid (row-major) is block (n // 4, n % 4): its mask bit and its 4x4 HOG cells
    assert torch.equal(out["mask"], mask.flatten(1))
    tokens, prefix = model.adapter.forward_tokens(model.encoder, imgs)
    assert prefix == 0 and tokens.shape == (B, 16, model.adapter.num_features(model.encoder))
    hist = HOGTarget(normalize=True).histograms(imgs)  # (B, 27, 16, 16): 8-px cells
    for n in (0, 6, 15):
        r, c = divmod(n, 4)
        cells = hist[:, :, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4].reshape(B, 432)  # (channel * 9 + bin, dy, dx)
        assert torch.equal(out["target"][:, n], cells)
    # and the encoder's token n sits on block n: with every residual branch zeroed only the (local) stems and
    # downsampling layers remain, so changing block (row 0, col 3) changes token 3 most (token 12 if column-major)
    with torch.no_grad():
        for name, p in model.encoder.named_parameters():
            if re.search(r"blocks\.\d+\.(attn\.proj|mlp\.fc2)\.", name):
                p.zero_()
        changed = imgs.clone()
        changed[:, :, 0:32, 96:128] += 1.0
        diff = (model.adapter.forward_tokens(model.encoder, changed)[0] - model.adapter.forward_tokens(
            model.encoder, imgs)[0]).abs().sum(-1)  # (B, 16)
    assert diff.argmax(1).tolist() == [3] * B
    if family == "swin":  # non-overlapping patches and merges: nothing else moves
        assert torch.all(diff[:, torch.arange(16) != 3] == 0)


@pytest.mark.parametrize("family", ["vit", *FAMILIES])
def test_resolution_schedule_64_96_128_trains(family, tiny_vit_cfg):
    if family == "vit":
        torch.manual_seed(0)
        model = create_mim_model(tiny_vit_cfg.method, tiny_vit_cfg.model, 128)
    else:
        model = _build(family, img_size=128)  # FastMIM-P builds at the final size (data.img_size)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    start = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.AdamW(params.values(), lr=1e-3)
    for size in (64, 96, 128):
        model.set_img_size(size)
        if family == "swin":  # window 4 at 128 px scales to 2 at 64, 3 at 96 (every stage grid divisible)
            assert _windows(model.encoder) == [size // 32] * 5
        for step in range(2):
            out = model(_imgs(size, seed=step))
            assert out["pred"].shape == (B, (size // model.stride) ** 2, out["target"].shape[-1])
            assert torch.isfinite(out["loss"]), (size, step)
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
    # same Parameter objects throughout: the optimizer (and a DeepSpeed engine) still trains every one of them
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in params.values()}
    for n, p in params.items():
        assert not torch.equal(p.detach(), start[n]), f"{n} was not updated"
    if family == "swin":
        assert all(a.relative_position_bias_table.shape == (49, a.num_heads)
                   for a in model.encoder.modules() if isinstance(a, timm.models.swin_transformer.WindowAttention))


def test_swin_smaller_window_reads_exact_centre_of_table_and_round_trips():
    assert torch.equal(clipped_relative_position_index(4, 4), get_relative_position_index(4, 4))
    big = _build("swin", img_size=128).eval()
    imgs128, imgs64 = _imgs(128, seed=5), _imgs(64, seed=6)
    mask128, mask64 = _grid_mask(4, seed=2), _grid_mask(2, seed=3)
    with torch.no_grad():
        before = big(imgs128, mask=mask128)["pred"]
        big.set_img_size(64)
        small_out = big(imgs64, mask=mask64)["pred"]
    # a model built at 64 px / window 2 whose (3x3)-offset tables are the centres of the 7x7 ones
    small = _build("swin", img_size=64, window_size=2).eval()
    state = big.state_dict()
    for k, v in state.items():
        if k.endswith("relative_position_bias_table"):
            state[k] = v.view(7, 7, -1)[2:5, 2:5].reshape(9, -1)
    small.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(small(imgs64, mask=mask64)["pred"], small_out, rtol=1e-5, atol=1e-5)
        big.set_img_size(128)
        assert torch.equal(big(imgs128, mask=mask128)["pred"], before)  # 128 -> 64 -> 128 is lossless


def test_swin_growing_beyond_build_size_clips_offsets(caplog):
    model = _build("swin", img_size=64, window_size=2)  # 3x3-offset tables
    tables = [a.relative_position_bias_table for a in model.encoder.modules() if hasattr(a, "relative_position_index")]
    with caplog.at_level(logging.WARNING, logger="fastmim_ds.models.adapters"):
        model.set_img_size(128)
    assert "exceeds" in caplog.text
    attn = model.encoder.layers[0].blocks[0].attn
    assert attn.relative_position_bias_table is tables[0] and tables[0].shape[0] == 9
    idx = attn.relative_position_index
    assert idx.shape == (16, 16) and idx.min() == 0 and idx.max() == 8
    assert idx[0, 15] == idx[0, 10] == 0  # offsets (-3, -3) and (-2, -2) both clip to the (-1, -1) corner
    assert torch.isfinite(model(_imgs(128))["loss"])


def test_swin_window_rule_errors_name_sizes_that_work():
    model = _build("swin", img_size=128, window_size=2)  # 16/8/4/2 windows per side
    with pytest.raises(ValueError, match=r"1\.5 at 96 px.*sizes that work: 64, 128, 192, 256"):
        model.check_img_size(96)
    with pytest.raises(ValueError, match="64, 128, 192, 256"):
        model.set_img_size(96)
    assert _windows(model.encoder) == [2] * 5  # a refused size changes nothing
    model.check_img_size(192)
    with pytest.raises(ValueError, match=r"window 3 does not divide the stage grids \[32, 16, 8, 4\].*1, 2, 4"):
        _build("swin", img_size=128, window_size=3)
    with pytest.raises(ValueError, match="set_img_size"):
        model(_imgs(64))
    pvt = _build("pvt_v2")
    with pytest.raises(ValueError, match="not divisible by the pvt_v2 output stride 32"):
        pvt.adapter.check_img_size(pvt.encoder, 48)


def test_vit_set_img_size_regenerates_sincos(tiny_vit_cfg):
    torch.manual_seed(0)
    model = create_mim_model(tiny_vit_cfg.method, tiny_vit_cfg.model, 64).eval()
    pe = model.encoder.pos_embed
    original = pe.detach().clone()
    model.set_img_size(96)
    assert model.encoder.pos_embed is pe and not pe.requires_grad
    assert model.encoder.patch_embed.grid_size == (6, 6)
    expected = torch.cat([torch.zeros(1, 64), build_sincos2d_pos_embed([6, 6], dim=64)])
    assert torch.equal(pe[0], expected)
    # what timm's dynamic_img_size would have used: a bicubic resampling of the 4x4 table, not a sin-cos table
    resampled = resample_abs_pos_embed(original, new_size=[6, 6], old_size=[4, 4], num_prefix_tokens=1)
    assert (resampled[0, 1:] - expected[1:]).abs().max() > 0.1
    # the encoder at 96 px is exactly the encoder built at 96 px with the same weights
    torch.manual_seed(0)
    built96 = create_mim_model(tiny_vit_cfg.method, tiny_vit_cfg.model, 96).eval()
    built96.load_state_dict(model.state_dict())
    imgs, mask = _imgs(96, seed=7), _grid_mask(6, seed=4)
    with torch.no_grad():
        assert torch.equal(model(imgs, mask=mask)["pred"], built96(imgs, mask=mask)["pred"])
    # a checkpoint written in a 96-px stage resumes into an encoder built (and still) at 64 px, and vice versa
    fresh = create_mim_model(tiny_vit_cfg.method, tiny_vit_cfg.model, 64).eval()
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.encoder.pos_embed, original)
    built96.load_state_dict(fresh.state_dict())
    assert torch.equal(built96.encoder.pos_embed, pe)
    model.set_img_size(64)
    assert torch.equal(pe, original)
    with pytest.raises(ValueError, match="patch size 16"):
        model.adapter.set_img_size(model.encoder, 72)


# ------------------------------------------------------------------------------------------- truncation


@pytest.mark.parametrize(
    "family, k, removed",
    [
        ("vit", 1, ["blocks.1."]),
        ("swin", 2, ["layers.2.blocks.0.", "layers.2.blocks.1.", "layers.3.blocks.0."]),  # stages 3-4 keep 0 blocks
        ("pvt_v2", 3, ["stages.3.blocks.0."]),
    ],
)
def test_truncated_encoder_keeps_grid_and_finetune_reports_removed_blocks(family, k, removed, tiny_vit_cfg, tmp_path):
    if family == "vit":
        name, kw, size = tiny_vit_cfg.model.encoder, tiny_vit_cfg.model.encoder_kwargs, 64
        torch.manual_seed(0)
        mim = create_mim_model(tiny_vit_cfg.method, tiny_vit_cfg.model, size)
    else:
        (name, kw), size = FAMILIES[family], 128
        mim = _build(family, img_size=size)
    full_shape = mim(_imgs(size))["pred"].shape
    total = sum(1 for n, _ in mim.encoder.named_modules() if re.fullmatch(r"(.+\.)?blocks\.\d+", n))
    with pytest.raises(ValueError, match=rf"\[1, {total}\]"):
        mim.adapter.truncate(mim.encoder, total + 1)
    assert mim.adapter.truncate(mim.encoder, k) == removed
    out = mim(_imgs(size))
    assert out["pred"].shape == full_shape and torch.isfinite(out["loss"])  # same stride and token grid
    if family == "swin":
        mim.set_img_size(64)  # stages without blocks have no window
        assert torch.isfinite(mim(_imgs(64))["loss"])
    path = _save_pretrained(mim, tmp_path / "trunc.pth", name, kw)
    clf, report = create_classifier(ClassifierCfg(pretrained=str(path)), num_classes=3, img_size=size)
    expected_missing = sorted(key for key in clf.state_dict() if key.startswith(tuple(removed)))
    assert expected_missing and sorted(report.missing) == expected_missing
    assert report.unexpected == []
    assert sorted(report.loaded) == sorted(mim.encoder.state_dict())


def test_pretrained_weights_of_another_architecture_raise(tmp_path):
    path = _save_pretrained(_build("pvt_v2"), tmp_path / "pvt.pth", PVT, PVT_KW)
    wider = {**PVT_KW, "embed_dims": [16, 32, 64, 64]}
    with pytest.raises(ValueError, match=r"do not fit pvt_v2_b2: stages\.2\."):
        create_classifier(ClassifierCfg(name=PVT, kwargs=wider, pretrained=str(path)), num_classes=3, img_size=64)


def test_encoder_blocks_config_truncates():
    name, kw = FAMILIES["swin"]
    cfg = MIMModelCfg(encoder=name, encoder_kwargs=kw, encoder_blocks=3)
    mim = create_mim_model(FastMIMCfg(block_size=32, decoder_dim=64, decoder_depth=1), cfg, 128)
    assert [len(s.blocks) for s in mim.encoder.layers] == [1, 1, 1, 0]


# ------------------------------------------------------------------------------------------- fine-tuning


def _table(module) -> torch.Tensor:
    return module.relative_position_bias_table.detach()


def test_swin_finetune_224_window7_from_128_window4(tmp_path):
    mim = _build("swin", img_size=128)
    enc = mim.encoder.state_dict()
    # reference (FastMIM/original Swin) checkpoints also hold the buffers the model rebuilds
    block = "encoder.layers.1.blocks.0.attn."
    extra = {f"{block}relative_position_index": torch.zeros(16, 16, dtype=torch.long),
             "encoder.layers.2.blocks.1.attn_mask": torch.zeros(4, 16, 16)}
    path = _save_pretrained(mim, tmp_path / "swin.pth", SWIN, SWIN_KW, extra)
    tiny = {k: v for k, v in SWIN_KW.items() if k != "window_size"}  # the name's window 7
    cfg = ClassifierCfg(name=SWIN, kwargs=tiny, pretrained=str(path))
    clf, report = create_classifier(cfg, num_classes=5, img_size=224)
    assert report.missing == [] and report.unexpected == []
    assert sorted(report.loaded) == sorted(enc)  # every encoder tensor, final norm included; buffers dropped
    assert _windows(clf) == [7] * 5
    sd = clf.state_dict()
    for k, v in enc.items():
        if not k.endswith("relative_position_bias_table"):
            assert torch.equal(sd[k], v), k
    old = _table(mim.encoder.layers[2].blocks[1].attn).view(7, 7, -1)
    new = _table(clf.layers[2].blocks[1].attn).view(13, 13, -1)
    torch.testing.assert_close(new[5:8, 5:8], old[2:5, 2:5], rtol=0, atol=1e-6)  # offsets 0, +-1 keep their value
    torch.testing.assert_close(new[0, 0], old[0, 0], rtol=0, atol=1e-6)  # the (-6, -6) corner takes the edge value
    assert clf(torch.randn(1, 3, 224, 224)).shape == (1, 5)
    # same window: the tables load unchanged
    same, _ = create_classifier(ClassifierCfg(pretrained=str(path)), num_classes=5, img_size=128)
    assert torch.equal(_table(same.layers[2].blocks[1].attn), old.reshape(49, -1))
    # the pre-training window does not tile 224 px: a clear error, not silent padding
    with pytest.raises(ValueError, match=r"window 4 does not divide the stage grids \[56, 28, 14, 7\].*window_size"):
        create_classifier(ClassifierCfg(pretrained=str(path)), num_classes=5, img_size=224)


def _lr_scales(model, groups) -> dict[str, tuple[float, float]]:
    ids = {id(p): n for n, p in model.named_parameters()}
    return {ids[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}


def test_layer_decay_follows_fastmim_ids():
    kw = {**SWIN_KW, "window_size": 2}
    clf, _ = create_classifier(ClassifierCfg(name=SWIN, kwargs=kw), num_classes=3, img_size=64)
    scale = _lr_scales(clf, build_optimizer(clf, OptimCfg(layer_decay=0.8, weight_decay=0.05), RESOLVED).param_groups)
    # depths (1, 1, 2, 1): stem 0, blocks 1..5, downsample with the block before it, final norm + head 6
    expected = {
        "patch_embed.proj.weight": 6, "layers.0.blocks.0.attn.qkv.weight": 5,
        "layers.1.downsample.reduction.weight": 5, "layers.1.blocks.0.mlp.fc1.weight": 4,
        "layers.2.downsample.norm.weight": 4, "layers.2.blocks.1.norm1.weight": 2,
        "layers.3.downsample.reduction.weight": 2, "layers.3.blocks.0.attn.proj.weight": 1,
        "norm.weight": 0, "head.fc.weight": 0,
    }
    for name, power in expected.items():
        assert scale[name][0] == pytest.approx(0.8**power), name
    assert scale["layers.0.blocks.0.attn.relative_position_bias_table"][1] == 0.0  # Swin's no_weight_decay()
    assert scale["layers.0.blocks.0.attn.qkv.weight"][1] == 0.05
    # timm's own Swin grouping, for contrast: same stem and blocks, but the final norm joins the last block and a
    # downsampling layer the next block
    timm_model = timm.create_model(SWIN, num_classes=3, img_size=64, **kw)
    timm_scale = _lr_scales(timm_model, param_groups_layer_decay(timm_model, layer_decay=0.8))
    for name in ("patch_embed.proj.weight", "layers.2.blocks.1.norm1.weight", "head.fc.weight"):
        assert timm_scale[name][0] == pytest.approx(scale[name][0]), name
    assert timm_scale["norm.weight"][0] == pytest.approx(0.8)
    assert timm_scale["layers.1.downsample.reduction.weight"][0] == pytest.approx(0.8**4)
    # Swin-B (2, 2, 18, 2) ids of FastMIM util/lr_decay.py (docs/methods.md §2): 25 layers, stem 0.8^25 = 0.0038
    swin_b = {"patch_embed.proj.weight": 0, "layers.1.downsample.reduction.weight": 2,
              "layers.1.blocks.0.norm1.bias": 3, "layers.2.blocks.17.mlp.fc2.weight": 22,
              "layers.3.downsample.norm.weight": 22, "layers.3.blocks.1.attn.qkv.weight": 24, "norm.weight": 25,
              "head.fc.bias": 25}
    for name, layer in swin_b.items():
        assert fastmim_layer_id(name, stages="layers", depths=(2, 2, 18, 2)) == layer, name
    assert 0.8**25 == pytest.approx(0.0038, abs=1e-4)
    # PVTv2: stage-end norms join their stage's last block, the last one the head (FastMIM get_layer_id_for_pvtv2)
    pvt, _ = create_classifier(ClassifierCfg(name=PVT, kwargs=PVT_KW), num_classes=3, img_size=64)
    pscale = _lr_scales(pvt, build_optimizer(pvt, OptimCfg(layer_decay=0.8), RESOLVED).param_groups)
    for name, power in {"patch_embed.proj.weight": 5, "stages.0.norm.weight": 4, "stages.1.downsample.proj.weight": 4,
                        "stages.1.blocks.0.attn.q.weight": 3, "stages.3.blocks.0.mlp.dwconv.weight": 1,
                        "stages.3.norm.weight": 0, "head.weight": 0}.items():
        assert pscale[name][0] == pytest.approx(0.8**power), name


# ------------------------------------------------------------------------------------------- configs and registry


def test_adapter_registry():
    assert isinstance(adapter_for("swin_base_patch4_window7_224"), SwinAdapter)
    assert isinstance(adapter_for("pvt_v2_b2"), PVTv2Adapter)


def test_swin_base_and_pvtv2_b2_configs_build(tmp_path):
    swin = load_config(PretrainCfg, CONFIGS / "fastmim_swin_base_128_400ep.yaml")
    pvt = load_config(PretrainCfg, CONFIGS / "fastmim_pvtv2_b2_128_400ep.yaml")
    with torch.device("meta"):
        swin_b = create_mim_model(swin.method, swin.model, swin.data.img_size)
        pvt_b2 = create_mim_model(pvt.method, pvt.model, pvt.data.img_size)
    for m in (swin_b, pvt_b2):
        assert m.stride == 32 and m.decoder.pred.out_features == 432 and len(m.decoder.blocks) == 4
        assert m.decoder.embed.out_features == 256 and m.mask_generator.block_size == 32
    assert _windows(swin_b.encoder) == [4] * 24
    assert sum(p.numel() for p in swin_b.encoder.parameters()) == 86_698_104
    assert sum(p.numel() for p in pvt_b2.encoder.parameters()) == 24_849_856
    swin_b.check_img_size(96)
    with pytest.raises(ValueError):
        swin_b.check_img_size(112)
    ft = load_config(FinetuneCfg, CONFIGS / "finetune_swin_base_224_100ep.yaml")
    assert ft.optim.layer_decay == 0.8 and math.isclose(ft.optim.blr, 1e-3)
    with torch.device("meta"):
        clf, _ = create_classifier(dataclasses.replace(ft.model, pretrained=""), num_classes=1000, img_size=224)
    assert _windows(clf) == [7] * 24
    layer = fastmim_layer_id("patch_embed.proj.weight", stages="layers", depths=(2, 2, 18, 2))
    assert ft.optim.layer_decay ** (25 - layer) == pytest.approx(0.0038, abs=1e-4)
