"""fastmim_ds.models.mixmim: MixMIM backbones in timm, mixing, same-image attention, dual reconstruction (fp32, CPU).

Full-size checks (parameter count, FLOPs, layer-decay table) build on the ``meta`` device; everything that runs
numbers uses the ``mixmim_tiny_test`` preset at 64-96 px.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, resize_rel_pos_bias_table_simple
from timm.models.swin_transformer import PatchMerging
from timm.optim import param_groups_layer_decay
from torch.utils.flop_counter import FlopCounterMode

from fastmim_ds.config import ClassifierCfg, ConfigError, FinetuneCfg, PretrainCfg, load_config
from fastmim_ds.methods import METHODS, create_mim_model
from fastmim_ds.methods.mixmim import MixMIM, draw_mix_mask, dual_decoder_inputs, unmix
from fastmim_ds.models import adapter_for
from fastmim_ds.models.classifier import create_classifier
from fastmim_ds.models.mixmim import (
    MixMIMAdapter,
    MixMIMTransformer,
    WindowAttention,
    checkpoint_filter_fn,
    mix_tokens,
    sincos_pos_embed,
    stage_windows,
)
from fastmim_ds.targets import PixelTarget

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[1]
B = 4
TINY = [
    "method.name=mixmim", "model.encoder=mixmim_tiny_test", "method.decoder_dim=32", "method.decoder_depth=1",
    "method.decoder_heads=2", "method.target=pixel", "method.norm_pix_loss=true", "method.mask_ratio=0.5",
    "data.img_size=64",
]
# 96 px: stage grids 24/12/6/3, mask cells of 8/4/2/1 tokens; windows 12/6 straddle mask cells (like W14 over
# 8-token cells at 224 px), so windows hold tokens of both images in every stage
WIN96 = ["data.img_size=96", "model.encoder_kwargs={window_size: [12, 6, 6, 3]}"]


def _cfg(*extra: str) -> PretrainCfg:
    return load_config(PretrainCfg, None, [*TINY, *extra])


def _build(*extra: str) -> MixMIM:
    cfg = _cfg(*extra)
    torch.manual_seed(0)
    return create_mim_model(cfg.method, cfg.model, cfg.data.img_size)


@pytest.fixture(scope="module")
def mim() -> MixMIM:
    return _build()


@pytest.fixture(scope="module")
def mim96() -> MixMIM:
    return _build(*WIN96)


def _imgs(size: int = 64, b: int = B, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _mask(grid: tuple[int, int], seed: int = 0) -> torch.Tensor:
    return draw_mix_mask(grid, 0.5, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- registry, size, FLOPs


def test_registered_in_timm_with_adapter():
    assert set(timm.list_models("mixmim_*")) == {"mixmim_base", "mixmim_large", "mixmim_huge", "mixmim_tiny_test"}
    assert "mixmim" in METHODS and isinstance(adapter_for("mixmim_tiny_test"), MixMIMAdapter)
    assert isinstance(adapter_for("mixmim_base"), MixMIMAdapter)
    model = timm.create_model("mixmim_tiny_test", num_classes=5)
    assert isinstance(model, MixMIMTransformer)
    assert model.pretrained_cfg["classifier"] == "head"
    logits = model(_imgs(b=2))
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    assert model.forward_features(_imgs(b=2)).shape == (2, 2, 2, 128)  # NHWC, 64 px / 32, C 16 * 8


@pytest.mark.parametrize(
    "name, dim, heads", [("mixmim_base", 128, (4, 8, 16, 32)), ("mixmim_large", 192, (6, 12, 24, 48)),
                         ("mixmim_huge", 352, (11, 22, 44, 88))]
)
def test_architecture(name, dim, heads):
    with torch.device("meta"):
        m = timm.create_model(name)
    assert m.patch_embed.proj.kernel_size == (4, 4) and m.patch_embed.proj.out_channels == dim
    assert [len(s.blocks) for s in m.layers] == [2, 2, 18, 2]
    assert [s.blocks[0].attn.num_heads for s in m.layers] == list(heads)
    assert [s.window_size for s in m.layers] == [14, 14, 14, 7]  # 56/14, 28/14, 14/14 (global), 7/7 (global)
    assert [s.grid for s in m.layers] == [(56, 56), (28, 28), (14, 14), (7, 7)]
    assert m.num_features == 8 * dim and m.stride == 32 and m.out_grid == (7, 7)
    assert m.absolute_pos_embed.shape == (1, 56 * 56, dim) and not m.absolute_pos_embed.requires_grad
    assert m.layers[0].blocks[0].attn.relative_position_bias_table.shape == (27 * 27, heads[0])


def test_mixmim_base_parameter_count():
    """mmpretrain metafile: 88,344,000 params for MixMIM-B *with its 1000-class head*, 114.7 M with the decoder.

    docs/methods.md §3.1 calls 88.3 M "the encoder"; the count includes the head (1,025,000) and the frozen absolute
    position table (401,408). Without the head the encoder has 87.32 M (86.92 M trainable).
    """
    with torch.device("meta"):
        clf = timm.create_model("mixmim_base", num_classes=1000)
        enc = timm.create_model("mixmim_base", num_classes=0)
        cfg = load_config(PretrainCfg, REPO / "configs/mixmim_base_224_600ep.yaml")
        mim = create_mim_model(cfg.method, cfg.model, cfg.data.img_size)

    def count(m, trainable=False):
        return sum(p.numel() for p in m.parameters() if p.requires_grad or not trainable)

    assert abs(count(clf) - 88.344e6) < 0.1e6, count(clf)
    assert count(clf) - count(enc) == 1024 * 1000 + 1000
    assert abs(count(enc) - 87.32e6) < 0.01e6, count(enc)
    assert count(enc) - count(enc, trainable=True) == 56 * 56 * 128  # frozen absolute position embedding
    assert abs(count(mim) - 114.7e6) < 0.1e6, count(mim)
    assert count(mim.encoder) == count(enc)


def test_mixmim_base_flops_at_224():
    """torch.utils.flop_counter counts 2 FLOPs per multiply-add (matmul, conv, attention) and nothing else.

    Measured: 32.63 GFLOPs = 16.32 GMACs per 224 px image. mmpretrain's 16.35 "GFLOPs" is an fvcore-style
    count of multiply-adds that also counts LayerNorm (~0.035 G), so the two agree.
    """
    with torch.device("meta"):
        m = timm.create_model("mixmim_base").eval()
        x = torch.empty(1, 3, 224, 224)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        m(x)
    gmacs = counter.get_total_flops() / 2e9
    assert 16.30 < gmacs < 16.35, gmacs


# ------------------------------------------------------------------------------------------- building blocks


def _mae_sincos(h: int, w: int, dim: int) -> np.ndarray:
    """MAE/MixMIM ``get_2d_sincos_pos_embed`` (float64), written out: [sin x, cos x, sin y, cos y]."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    xs, ys = xs.reshape(-1, 1) * omega, ys.reshape(-1, 1) * omega
    return np.concatenate([np.sin(xs), np.cos(xs), np.sin(ys), np.cos(ys)], axis=1)


@pytest.mark.parametrize("h, w, dim", [(7, 7, 512), (4, 6, 16)])
def test_sincos_matches_official_layout(h, w, dim):
    ours = sincos_pos_embed((h, w), dim)
    assert ours.shape == (h * w, dim)
    np.testing.assert_allclose(ours.numpy(), _mae_sincos(h, w, dim), atol=1e-5)


def test_stage_windows_and_size_errors():
    assert stage_windows(224, patch_size=4, window_size=(14, 14, 14, 7)) == [14, 14, 14, 7]
    assert stage_windows(384, patch_size=4, window_size=(16, 16, 24, 12)) == [16, 16, 24, 12]  # official 384 model
    assert stage_windows(64, patch_size=4, window_size=(8, 4, 4, 2)) == [8, 4, 4, 2]
    with pytest.raises(ValueError, match="multiples of the output stride 32") as e:
        stage_windows(200, patch_size=4, window_size=(14, 14, 14, 7))
    assert "224" in str(e.value)
    with pytest.raises(ValueError, match="224"):  # 128 px: a 32x32 grid is not tiled by 14x14 windows
        stage_windows(128, patch_size=4, window_size=(14, 14, 14, 7))


def test_patch_merging_order_matches_official():
    """timm's NHWC PatchMerging concatenates x0 = [0::2, 0::2], x1 = [1::2, 0::2], x2 = [0::2, 1::2], x3 = [1::2, 1::2],
    the order of the timm 0.4 class in the official code, so official downsample weights load unchanged."""
    torch.manual_seed(0)
    pm = PatchMerging(8, 16)
    x = torch.randn(2, 4, 6, 8)
    cat = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
    torch.testing.assert_close(pm(x), pm.reduction(pm.norm(cat)))


def test_draw_mix_mask_count_and_rng():
    m = draw_mix_mask((7, 7), 0.5, generator=torch.Generator().manual_seed(0))
    assert m.shape == (7, 7) and m.dtype == torch.bool and int(m.sum()) == 24  # int(49 * 0.5), ratio 0.49
    assert int(draw_mix_mask((3, 3), 0.5).sum()) == 4
    torch.manual_seed(5)
    a = draw_mix_mask((7, 7), 0.5)
    torch.manual_seed(5)
    assert torch.equal(a, draw_mix_mask((7, 7), 0.5))


# ------------------------------------------------------------------------------------------- mixing


def test_mixed_input_equals_source_tokens_position_by_position(mim):
    enc = mim.encoder
    imgs = _imgs()
    mask = _mask((2, 2))
    seen = {}
    handle = enc.layers[0].register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0].detach()))
    try:
        with torch.no_grad():
            enc.forward_features(imgs, mask=mask)
            tokens = enc.patch_embed(imgs)  # (B, 16, 16, C) before mixing
    finally:
        handle.remove()
    mixed = seen["x"] - enc.absolute_pos_embed.view(1, 16, 16, -1)  # stage-1 input minus the position table
    m1 = mask.repeat_interleave(8, 0).repeat_interleave(8, 1)  # 32-px cells -> 8x8 stage-1 tokens
    assert int(m1.sum()) == 2 * 64
    for i in range(B):
        for h in range(16):
            for w in range(16):
                src = B - 1 - i if m1[h, w] else i
                torch.testing.assert_close(mixed[i, h, w], tokens[src, h, w], rtol=0, atol=1e-6)
    assert torch.equal(mix_tokens(tokens, m1), torch.where(m1[None, :, :, None], tokens.flip(0), tokens))


def test_image_i_prediction_depends_on_image_i_only(mim96):
    """Pixels of another image get exactly zero gradient from image i's prediction: mixing, attention masking,
    patch merging and the dual decoder never route information between images."""
    imgs = _imgs(96).requires_grad_(True)
    out = mim96(imgs, mask=_mask((3, 3), seed=1))
    for i in range(B):
        (g,) = torch.autograd.grad(out["pred"][i].sum(), imgs, retain_graph=True)
        for j in range(B):
            if j == i:
                assert g[j].abs().sum() > 0
            else:
                assert torch.all(g[j] == 0), f"prediction of image {i} depends on image {j}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_encoder_tokens_do_not_see_the_partner(mim96, dtype):
    """Changing image 1 leaves every image-0 token of mixed input 0 bit-identical (also in bf16: -inf masking)."""
    enc = mim96.encoder.to(dtype)
    try:
        imgs = _imgs(96, b=2).to(dtype)
        mask = _mask((3, 3), seed=2)
        other = imgs.clone()
        other[1] = torch.randn(3, 96, 96).to(dtype)
        with torch.no_grad():
            a = enc.forward_features(imgs, mask=mask)
            b = enc.forward_features(other, mask=mask)
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
        assert torch.equal(a[0][~mask], b[0][~mask])  # image 0's positions of input 0
        assert torch.equal(a[1][mask], b[1][mask])  # image 0's positions of input 1
        assert not torch.equal(a[0][mask], b[0][mask])
    finally:
        enc.float()


# ------------------------------------------------------------------------------------------- attention masking


def test_no_attention_weight_crosses_images(mim96):
    """Recompute the attention probabilities of every block from its inputs; the SDPA output must equal them."""
    enc = mim96.encoder
    imgs = _imgs(96)
    mask = _mask((3, 3), seed=3)
    captured = []
    hooks = [
        blk.attn.register_forward_hook(lambda mod, args, out: captured.append((mod, args[0], args[1], out)))
        for stage in enc.layers for blk in stage.blocks
    ]
    try:
        with torch.no_grad():
            enc.forward_features(imgs, mask=mask)
    finally:
        for h in hooks:
            h.remove()
    assert len(captured) == 5
    stage_of = {id(blk.attn): s for s, stage in enumerate(enc.layers) for blk in stage.blocks}
    for attn, x, same, out in captured:
        Bx, nW, N, C = x.shape
        nH, hd = attn.num_heads, attn.head_dim
        # which image each token of each window comes from, written out: window (a, b), token (r, c) of a w x w
        # window sits at stage-grid row a * w + r, column b * w + c; the stage mask is the 3x3 mask upsampled
        s, w = stage_of[id(attn)], attn.window_size
        cell = 8 // 2**s  # stage-s tokens per 32-px mask cell
        side = 24 // 2**s
        src = torch.tensor([[bool(mask[(a * w + n // w) // cell, (b * w + n % w) // cell]) for n in range(w * w)]
                            for a in range(side // w) for b in range(side // w)])  # (nW, N)
        assert same is not None and torch.equal(same, src[:, :, None] == src[:, None, :])
        assert (~same).any(), "some window must hold tokens of both images (else the test is vacuous)"
        qkv = attn.qkv(x).view(Bx, nW, N, 3, nH, hd).permute(3, 0, 1, 4, 2, 5)
        q, k, v = qkv.unbind(0)  # (B, nW, nH, N, hd)
        logits = q @ k.transpose(-2, -1) * hd**-0.5 + attn.attn_bias(same, nW).view(1, nW, nH, N, N)
        probs = logits.softmax(-1)
        cross = ~same[None, :, None]  # (1, nW, 1, N, N)
        assert torch.all(probs.masked_select(cross.expand_as(probs)) == 0)
        torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs[..., 0]))
        expected = attn.proj((probs @ v).transpose(2, 3).reshape(Bx, nW, N, C))
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_attention_bias_is_relative_position_table(mim96):
    attn = mim96.encoder.layers[1].blocks[0].attn
    w = attn.window_size
    bias = attn.attn_bias(None, 2).view(2, attn.num_heads, w * w, w * w)
    table = attn.relative_position_bias_table
    # token (0, 0) to token (1, 2): offset (-1, -2) -> table row ((w-1) - 1) * (2w - 1) + (w-1) - 2
    row = (w - 2) * (2 * w - 1) + (w - 3)
    assert torch.equal(bias[0, :, 0, 1 * w + 2], table[row])
    assert torch.equal(bias[0], bias[1])


def test_window_attention_without_mask_equals_plain_sdpa():
    torch.manual_seed(0)
    attn = WindowAttention(16, num_heads=2, window_size=2)
    x = torch.randn(3, 4, 4, 16)
    with torch.no_grad():
        attn.relative_position_bias_table.zero_()
        q, k, v = attn.qkv(x).view(3, 4, 4, 3, 2, 8).permute(3, 0, 1, 4, 2, 5).unbind(0)
        ref = attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(3, 4, 4, 16))
        torch.testing.assert_close(attn(x), ref)


# ------------------------------------------------------------------------------------------- dual reconstruction


def test_dual_reconstruction_bookkeeping_with_image_ids():
    """Trace image ids through mixing, the two decoder inputs and unmixing: every token of every image is
    predicted exactly once, from a decoder row where that token is a mask token and every visible token
    belongs to the same image."""
    b, grid = 6, (3, 3)
    n = grid[0] * grid[1]
    mask = _mask(grid, seed=4)
    flat = mask.flatten()
    ids = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, *grid, 1)
    src = mix_tokens(ids, mask).reshape(b, n)  # source image of every token of every mixed input
    token = torch.tensor([[[-1.0]]])
    rows = dual_decoder_inputs(src.unsqueeze(-1), flat, token)[..., 0]  # (2B, N); -1 = mask token
    # decoder "output": (row, position) of each output token
    rec = torch.stack(torch.meshgrid(torch.arange(2 * b), torch.arange(n), indexing="ij"), dim=-1).float()
    who = unmix(rec, flat).long()  # (B, N, 2): the decoder row/position supervising image i, token p
    used = torch.zeros(2 * b, n, dtype=torch.long)
    for i in range(b):
        for p in range(n):
            r, q = who[i, p].tolist()
            assert q == p
            used[r, q] += 1
            assert rows[r, p] == -1, "the supervised token must be hidden in its decoder input"
            visible = rows[r][rows[r] >= 0]
            assert visible.numel() > 0 and torch.all(visible == i), "visible tokens must belong to image i"
    assert int(used.sum()) == b * n and int(used.max()) == 1  # each image token once, no decoder output twice
    assert torch.equal(used.bool(), rows == -1)  # exactly the mask-token outputs are used


def test_decoder_output_supervised_exactly_at_mask_tokens(mim):
    imgs = _imgs()
    mask = _mask((2, 2), seed=5)
    seen = {}

    def keep(module, args, out):
        out.retain_grad()
        seen["rec"] = out

    handle = mim.decoder.pred.register_forward_hook(keep)
    try:
        out = mim(imgs, mask=mask)
        out["loss"].backward()
    finally:
        handle.remove()
        mim.zero_grad(set_to_none=True)
    rec, flat = seen["rec"], mask.flatten()
    assert rec.shape == (2 * B, 4, 3 * 32 * 32)
    hidden = torch.cat([flat.expand(B, -1), (~flat).expand(B, -1)])  # (2B, N): mask token in the input
    g = rec.grad.abs().sum(-1)
    assert torch.all(g[~hidden] == 0) and torch.all(g[hidden] > 0)
    diff = (out["pred"] - out["target"]).detach()
    # row i supervises image i where the mask is True; row B + (B - 1 - i) supervises image i where it is False
    scale = 2 / diff.numel()
    torch.testing.assert_close(rec.grad[:B][:, flat], scale * diff[:, flat])
    torch.testing.assert_close(rec.grad[B:].flip(0)[:, ~flat], scale * diff[:, ~flat])


def test_forward_outputs_and_loss_over_all_tokens(mim):
    imgs = _imgs(seed=6)
    out = mim(imgs)
    assert set(out) == {"loss", "pred", "target", "mask"}
    assert out["pred"].shape == out["target"].shape == (B, 4, 3072)
    assert out["target"].dtype == torch.float32 and out["loss"].dtype == torch.float32
    assert out["mask"].shape == (B, 4) and out["mask"].dtype == torch.bool
    assert out["mask"].sum(1).tolist() == [2] * B and torch.all(out["mask"] == out["mask"][0])  # one shared mask
    assert torch.equal(out["target"], PixelTarget(normalize=True)(imgs, 32))  # norm-pix, 32-px patches
    torch.testing.assert_close(out["loss"], ((out["pred"] - out["target"]) ** 2).mean(), rtol=1e-6, atol=0)


def test_gradients_reach_every_parameter(mim):
    out = mim(_imgs(seed=7))
    out["loss"].backward()
    try:
        trained = []
        for name, p in mim.named_parameters():
            if not p.requires_grad:
                continue
            trained.append(name)
            assert p.grad is not None, f"{name} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
            assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"
        frozen = {n for n, p in mim.named_parameters() if not p.requires_grad}
        assert frozen == {"encoder.absolute_pos_embed", "decoder_pos_embed"}
        assert "mask_token" in trained and any("relative_position_bias_table" in n for n in trained)
        assert any(n.startswith("encoder.layers.2.downsample") for n in trained)
    finally:
        mim.zero_grad(set_to_none=True)


def test_odd_batch_rejected(mim):
    with pytest.raises(ValueError, match="even"):
        mim(_imgs(b=3))
    with pytest.raises(ValueError, match="even"):
        mix_tokens(torch.zeros(3, 2, 2, 1), torch.zeros(2, 2, dtype=torch.bool))


def test_random_mask_from_global_rng(mim):
    imgs = _imgs(seed=8)
    with torch.no_grad():
        torch.manual_seed(3)
        a = mim(imgs)
        torch.manual_seed(3)
        b = mim(imgs)
    assert torch.equal(a["mask"], b["mask"]) and torch.equal(a["loss"], b["loss"])


def test_pretrain_decoder_and_init(mim):
    assert mim.decoder.embed.in_features == 128 and mim.decoder.embed.out_features == 32
    assert len(mim.decoder.blocks) == 1 and mim.decoder.blocks[0].attn.num_heads == 2
    assert mim.decoder_pos_embed.shape == (1, 4, 32)
    torch.testing.assert_close(mim.decoder_pos_embed[0], sincos_pos_embed((2, 2), 32))
    torch.testing.assert_close(mim.encoder.absolute_pos_embed[0], sincos_pos_embed((16, 16), 16))
    assert mim.no_weight_decay() == {"encoder.absolute_pos_embed", "decoder_pos_embed"}


# ------------------------------------------------------------------------------------------- validation


def test_build_errors():
    with pytest.raises(ValueError, match="multiples of the output stride"):
        _build("data.img_size=80")
    with pytest.raises(ConfigError, match="unknown key 'method.block_size' for method mixmim"):
        _build("method.block_size=32")  # the mixing mask lives on the last-stage grid: no block size to set
    with pytest.raises(ValueError, match="mixmim_base"):
        _build("model.encoder=vit_base_patch16_224")
    with pytest.raises(ValueError, match="at least one token"):
        _build("method.mask_ratio=0.2")  # int(4 * 0.2) = 0 of the 2x2 grid
    with pytest.raises(ValueError, match="window"):  # 96 px with the preset's windows (8, 4, 4, 2): 6 % 4
        _build("data.img_size=96")


def test_image_size_is_fixed(mim):
    mim.check_img_size(64)
    mim.set_img_size(64)
    with pytest.raises(ValueError, match="built for"):
        mim.check_img_size(32)
    with pytest.raises(ValueError, match="does not match"):
        mim(_imgs(32))


def test_configs_load_and_build():
    pre = load_config(PretrainCfg, REPO / "configs/mixmim_base_224_600ep.yaml")
    assert pre.method.name == "mixmim" and pre.model.encoder == "mixmim_base" and pre.train.micro_batch % 2 == 0
    with torch.device("meta"):
        m = create_mim_model(pre.method, pre.model, pre.data.img_size)
    assert isinstance(m, MixMIM) and m.grid == (7, 7) and int(49 * m.mask_ratio) == 24
    assert len(m.decoder.blocks) == 8 and m.decoder.blocks[0].attn.num_heads == 16
    assert m.decoder.embed.out_features == 512
    ft = load_config(FinetuneCfg, REPO / "configs/finetune_mixmim_base_224_100ep.yaml")
    assert ft.optim.layer_decay == 0.7 and ft.model.drop_path == 0.1


def test_encoder_blocks_truncates_across_stages(tmp_path):
    m = _build("model.encoder_blocks=3")
    assert [len(s.blocks) for s in m.encoder.layers] == [1, 1, 1, 0]  # of (1, 1, 2, 1); merges and norm stay
    out = m(_imgs(b=2))
    assert out["pred"].shape == (2, 4, 3072) and torch.isfinite(out["loss"])
    path = tmp_path / "trunc.pth"
    torch.save({"model": m.state_dict(), "config": {"model": {"encoder": "mixmim_tiny_test"}}}, path)
    _, report = create_classifier(ClassifierCfg(pretrained=str(path)), num_classes=3, img_size=64)
    assert sorted({k.split(".attn")[0].split(".norm")[0].split(".mlp")[0] for k in report.missing}) == [
        "layers.2.blocks.1", "layers.3.blocks.0"
    ]


def test_fastmim_method_runs_on_a_mixmim_encoder():
    """The adapter makes MixMIM backbones usable by the FastMIM wrapper too (pixel mask token, 32-px blocks)."""
    cfg = _cfg("method.name=fastmim", "method.block_size=32", "method.target=hog", "method.mask_ratio=0.75")
    torch.manual_seed(0)
    m = create_mim_model(cfg.method, cfg.model, 64)
    out = m(_imgs(b=2))
    assert out["pred"].shape == (2, 4, 3 * 9 * 16) and torch.isfinite(out["loss"])


# ------------------------------------------------------------------------------------------- fine-tuning


def test_layer_decay_head_at_full_lr():
    """mmpretrain's table (docs/methods.md §2): 26 groups, scale 0.7^(25 - id); head 1.0, final norm 0.7, PatchMerging
    with its stage's last block, patch embedding 0.7^25; the frozen absolute position table is not optimised."""
    with torch.device("meta"):
        m = timm.create_model("mixmim_base", num_classes=10)
    groups = param_groups_layer_decay(m, weight_decay=0.05, no_weight_decay_list=m.no_weight_decay(), layer_decay=0.7)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    by_name = {n: scale.get(id(p)) for n, p in m.named_parameters()}
    assert len({g["lr_scale"] for g in groups}) == 26
    assert by_name["absolute_pos_embed"] is None
    assert by_name["head.weight"] == 1.0 and by_name["head.bias"] == 1.0
    assert math.isclose(by_name["norm.weight"], 0.7)
    assert math.isclose(by_name["layers.3.blocks.1.mlp.fc2.weight"], 0.7)
    assert math.isclose(by_name["layers.3.blocks.0.attn.qkv.weight"], 0.7**2)
    assert math.isclose(by_name["layers.0.blocks.0.norm1.weight"], 0.7**24)
    assert math.isclose(by_name["layers.0.downsample.reduction.weight"], by_name["layers.0.blocks.1.attn.qkv.weight"])
    assert math.isclose(by_name["layers.2.downsample.norm.weight"], 0.7 ** (25 - 22))
    assert math.isclose(by_name["patch_embed.proj.weight"], 0.7**25)
    decay_ids = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    decayed = {n for n, p in m.named_parameters() if id(p) in decay_ids}
    assert "layers.0.blocks.0.attn.relative_position_bias_table" in decayed  # official and mmpretrain decay it


@pytest.fixture(scope="module")
def pretrained_file(tmp_path_factory, mim):
    cfg = _cfg()
    path = tmp_path_factory.mktemp("mixmim") / "mim.pth"
    torch.save({"model": mim.state_dict(), "config": {"model": {"encoder": cfg.model.encoder,
                                                               "encoder_kwargs": cfg.model.encoder_kwargs}}}, path)
    return path


def test_finetune_load_transfers_every_encoder_weight(pretrained_file, mim):
    clf, report = create_classifier(ClassifierCfg(pretrained=str(pretrained_file)), num_classes=7, img_size=64)
    assert isinstance(clf, MixMIMTransformer)
    enc = mim.encoder.state_dict()
    assert report.missing == [] and report.unexpected == []
    assert sorted(report.loaded) == sorted(enc)  # final norm included, nothing of the decoder
    sd = clf.state_dict()
    assert set(sd) - set(enc) == {"head.weight", "head.bias"}
    for k, v in enc.items():
        assert torch.equal(sd[k], v), k
    assert clf.head.weight.shape == (7, 128) and clf.head.weight.std() < 1e-3  # trunc_normal(2e-5)
    assert not clf.absolute_pos_embed.requires_grad  # frozen in fine-tuning too (official)
    assert isinstance(clf.layers[0].blocks[0].drop_path, torch.nn.Identity)  # linear 0 -> 0.1 over 5 blocks
    assert math.isclose(clf.layers[3].blocks[0].drop_path.drop_prob, 0.1, rel_tol=1e-6)
    x = _imgs(seed=9)
    clf.eval()
    with torch.no_grad():
        torch.testing.assert_close(clf.forward_features(x), mim.encoder.forward_features(x))


def test_finetune_load_resamples_grid_and_windows(pretrained_file, mim):
    cfg = ClassifierCfg(pretrained=str(pretrained_file), name="mixmim_tiny_test", kwargs={"window_size": [16, 8, 4, 2]})
    clf, report = create_classifier(cfg, num_classes=3, img_size=128)
    assert report.missing == [] and report.unexpected == []
    enc = mim.encoder.state_dict()
    pe = clf.absolute_pos_embed
    assert pe.shape == (1, 32 * 32, 16) and not pe.requires_grad
    expected = resample_abs_pos_embed(
        enc["absolute_pos_embed"], new_size=[32, 32], num_prefix_tokens=0, antialias=False
    )
    assert torch.equal(pe.detach(), expected)
    t_old = enc["layers.0.blocks.0.attn.relative_position_bias_table"]
    t_new = clf.layers[0].blocks[0].attn.relative_position_bias_table.detach()
    assert t_old.shape == (15 * 15, 1) and t_new.shape == (31 * 31, 1)  # window 8 -> 16
    assert torch.equal(t_new, resize_rel_pos_bias_table_simple(t_old, (16, 16), (31 * 31, 1)))
    key = "layers.2.blocks.0.attn.relative_position_bias_table"  # window 4 -> 4: copied as is
    assert torch.equal(clf.layers[2].blocks[0].attn.relative_position_bias_table, enc[key])
    assert clf(_imgs(128, b=2)).shape == (2, 3)


def test_official_checkpoint_layout_loads():
    """Official ``checkpoint.pth`` keys: encoder at top level, decoder_*/mask_token, relative_position_index buffers."""
    torch.manual_seed(0)
    src = timm.create_model("mixmim_tiny_test", num_classes=0)
    state = dict(src.state_dict())
    for k in [k for k in state if k.endswith("relative_position_bias_table")]:
        state[k.replace("bias_table", "index")] = torch.zeros(1)
    state.update({"mask_token": torch.zeros(1, 1, 8), "decoder_embed.weight": torch.zeros(8, 128),
                  "decoder_pos_embed": torch.zeros(1, 4, 8)})
    for key in ("patch_embed.proj.weight", "patch_embed.norm.weight", "layers.0.blocks.0.norm1.weight",
                "layers.0.blocks.0.attn.qkv.weight", "layers.0.blocks.0.attn.relative_position_bias_table",
                "layers.0.blocks.0.mlp.fc1.weight", "layers.0.downsample.norm.weight",
                "layers.0.downsample.reduction.weight", "norm.weight", "absolute_pos_embed"):
        assert key in state, key
    clf = timm.create_model("mixmim_tiny_test", num_classes=4)
    result = clf.load_state_dict(checkpoint_filter_fn({"model": state}, clf), strict=False)
    assert sorted(result.missing_keys) == ["head.bias", "head.weight"] and result.unexpected_keys == []
