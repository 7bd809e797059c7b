"""Pre-trained encoder -> timm classifier: every encoder weight is used, position embedding resampled."""
from __future__ import annotations

import pytest
import torch
from timm.layers import build_sincos2d_pos_embed

from fastmim_ds.config import ClassifierCfg
from fastmim_ds.methods import create_mim_model
from fastmim_ds.models.adapters import ViTAdapter
from fastmim_ds.models.classifier import create_classifier

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def pretrained_file(tiny_vit_cfg, tmp_path_factory):
    torch.manual_seed(0)
    mim = create_mim_model(tiny_vit_cfg.method, tiny_vit_cfg.model, 64)
    path = tmp_path_factory.mktemp("pre") / "mim.pth"
    cfg = {"model": {"encoder": tiny_vit_cfg.model.encoder, "encoder_kwargs": tiny_vit_cfg.model.encoder_kwargs}}
    torch.save({"model": mim.state_dict(), "config": cfg}, path)
    return path, mim


@pytest.mark.parametrize("img_size", [64, 96])
def test_finetune_load_uses_every_encoder_weight(pretrained_file, img_size):
    path, mim = pretrained_file
    clf, report = create_classifier(ClassifierCfg(pretrained=str(path)), num_classes=7, img_size=img_size)
    enc = mim.encoder.state_dict()
    assert report.missing == [] and report.unexpected == []
    assert sorted(report.loaded) == sorted(enc)  # every encoder tensor transferred, nothing of the decoder
    sd = clf.state_dict()
    assert set(sd) - set(enc) == {"head.weight", "head.bias"}
    for k, v in enc.items():
        if k != "pos_embed":
            assert torch.equal(sd[k], v), k
    assert clf.head.weight.shape == (7, 64)
    assert clf.head.weight.std() < 1e-3  # trunc_normal(2e-5) re-init
    # decoder and mask token are not part of the classifier
    assert not any(k.startswith(("decoder", "mask_token")) for k in sd)


def test_pos_embed_interpolation_keeps_cls_and_approximates_sincos(pretrained_file):
    path, mim = pretrained_file
    clf, _ = create_classifier(ClassifierCfg(pretrained=str(path)), num_classes=3, img_size=128)
    pe = clf.pos_embed.detach()
    assert pe.shape == (1, 1 + 8 * 8, 64)  # 4x4 grid at 64 px -> 8x8 at 128 px
    assert torch.equal(pe[:, 0], mim.encoder.pos_embed[:, 0])  # cls row kept as is
    assert clf.pos_embed.requires_grad  # trained during fine-tuning (FastMIM interpolate_pos_embed)
    # bicubic resampling of a smooth sin-cos grid stays close to the sin-cos of the new grid at the grid centre
    state = ViTAdapter().adapt_state_dict({"pos_embed": mim.encoder.pos_embed.detach()}, clf)
    assert torch.equal(state["pos_embed"], pe)
    regenerated = build_sincos2d_pos_embed([8, 8], dim=64)
    assert pe[0, 1:].shape == regenerated.shape


def test_finetune_load_reports_truncated_encoder(pretrained_file, tmp_path):
    path, mim = pretrained_file
    state = {k: v for k, v in mim.state_dict().items() if not k.startswith("encoder.blocks.1.")}
    p = tmp_path / "trunc.pth"
    torch.save({"model": state, "config": torch.load(path, weights_only=False)["config"]}, p)
    _, report = create_classifier(ClassifierCfg(pretrained=str(p)), num_classes=3, img_size=64)
    assert report.missing and all(k.startswith("blocks.1.") for k in report.missing)


def test_finetune_without_name_or_pretrained_raises():
    with pytest.raises(ValueError, match="model.name"):
        create_classifier(ClassifierCfg(), num_classes=3, img_size=64)
