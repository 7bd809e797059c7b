"""The MIM method contract (fastmim_ds.methods): every method on tiny encoders (fp32, CPU), a toy method and a toy
backbone family added through the public seams only, MAE and SimMIM pre-trained then fine-tuned end to end."""
from __future__ import annotations

import ast
import dataclasses
import json
import logging
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
from conftest import REPO
from timm.models import register_model

from fastmim_ds.checks import check_pretrain
from fastmim_ds.config import ConfigError, FinetuneCfg, MethodCfg, MIMModelCfg, PretrainCfg, dump_yaml, load_config
from fastmim_ds.losses import masked_mse
from fastmim_ds.masking import BlockMaskGenerator, upsample_mask
from fastmim_ds.methods import METHODS, MIMMethod, create_mim_model, register_method
from fastmim_ds.models import ADAPTERS, adapter_for, register_adapter
from fastmim_ds.targets import PixelTarget
from fastmim_ds.visualize import reconstruct, render_grid

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_thread")]

B = 4
# a 1-block 32-d ViT with 8-px patches at 32 px: a 4x4 token grid
VIT = ["model.encoder=vit_base_patch16_224", "data.img_size=32",
       "model.encoder_kwargs={embed_dim: 32, depth: 1, num_heads: 2, patch_size: 8}"]
CONFIGS = {
    "fastmim": [*VIT, "method.name=fastmim", "method.block_size=8", "method.decoder_dim=32"],
    "mixmim": ["method.name=mixmim", "model.encoder=mixmim_tiny_test", "data.img_size=64", "method.decoder_dim=32",
               "method.decoder_depth=1", "method.decoder_heads=1"],
    "mae": [*VIT, "method.name=mae", "method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2"],
    "simmim": [*VIT, "method.name=simmim", "method.block_size=8"],
}
OTHER_SIZE = {"fastmim": 48, "mae": 48, "simmim": 48}  # MixMIM is built for one size


def _build(name: str, *extra: str) -> tuple[MIMMethod, PretrainCfg]:
    cfg = load_config(PretrainCfg, None, [*CONFIGS[name], *extra])
    torch.manual_seed(0)
    return create_mim_model(cfg.method, cfg.model, cfg.data.img_size), cfg


def _imgs(size: int, b: int = B, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _mask(model: MIMMethod, size: int, b: int = B, seed: int = 0) -> torch.Tensor:
    return model.draw_mask(b, (size, size), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_contract_and_loss_over_the_masked_tokens(name):
    model, cfg = _build(name)
    assert isinstance(model, METHODS[name]) and model.name == name and isinstance(cfg.method, model.config)
    size = cfg.data.img_size
    out = model(_imgs(size), _mask(model, size))
    n = (size // model.stride) ** 2
    assert set(out) == {"loss", "pred", "target", "mask"}
    assert out["loss"].shape == () and out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    assert out["pred"].shape == out["target"].shape and out["pred"].shape[:2] == (B, n)
    assert out["target"].dtype == torch.float32
    assert out["mask"].shape == (B, n) and out["mask"].dtype == torch.bool
    assert 0 < int(out["mask"][0].sum()) < n
    err = out["pred"].float() - out["target"]
    per_token = (err.abs() if name == "simmim" else err.pow(2)).mean(-1)  # SimMIM: L1 (its paper); others: MSE
    counted = torch.ones_like(out["mask"]) if name == "mixmim" else out["mask"]  # MixMIM: every token, both images
    torch.testing.assert_close(out["loss"], per_token[counted].mean(), rtol=1e-5, atol=1e-7)
    # the same generator seed gives the same mask, and forward draws one itself from the global RNG
    assert torch.equal(_mask(model, size, seed=3), _mask(model, size, seed=3))
    assert model(_imgs(size))["mask"].shape == (B, n)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_loss_decreases_and_gradients_reach_the_encoder(name):
    model, cfg = _build(name)
    size = cfg.data.img_size
    imgs, mask = _imgs(size, seed=1), _mask(model, size, seed=1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(6):
        opt.zero_grad(set_to_none=True)
        loss = model(imgs, mask)["loss"]
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert losses[-1] < 0.95 * losses[0], losses
    grads = {n: p.grad for n, p in model.encoder.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), [n for n, g in grads.items()
                                                                                     if g is None]
    assert grads["patch_embed.proj.weight"].abs().sum() > 0  # the loss reaches the first encoder layer


@pytest.mark.parametrize("name", ["fastmim", "mae", "simmim"])
def test_mask_true_means_hidden_from_the_encoder(name):
    """The prediction does not depend on the pixels of masked tokens (True = masked): FastMIM paints them over,
    MAE drops them, SimMIM replaces their embeddings."""
    model, cfg = _build(name)
    model.eval()
    if name == "fastmim":  # its prediction layer starts at zero weight: a constant, whatever the input
        torch.nn.init.normal_(model.decoder.pred.weight, std=0.02)
    size = cfg.data.img_size
    imgs, mask = _imgs(size, seed=2), _mask(model, size, seed=2)
    with torch.no_grad():
        out = model(imgs, mask)
        hidden = upsample_mask(out["mask"].view(B, size // model.stride, -1), model.stride).unsqueeze(1)
        changed = torch.where(hidden, torch.randn_like(imgs), imgs)
        again = model(changed, mask)
        visible_changed = model(torch.where(hidden, imgs, torch.randn_like(imgs)), mask)
    torch.testing.assert_close(again["pred"], out["pred"], rtol=0, atol=1e-6)
    assert not torch.allclose(again["target"], out["target"])  # the target does see them
    assert not torch.allclose(visible_changed["pred"], out["pred"], atol=1e-3)


def test_mae_encoder_sees_the_visible_tokens_and_the_class_token_only():
    model, cfg = _build("mae")
    seen = []
    model.encoder.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    n = (32 // 8) ** 2
    out = model(_imgs(32))
    assert seen == [(B, int(n * (1 - 0.75)) + 1, 32)]  # 4 of 16 patches + [CLS]
    assert out["mask"].sum(1).tolist() == [n - int(n * 0.25)] * B
    with pytest.raises(ValueError, match="same number of patches"):
        mask = _mask(model, 32)
        mask[0].view(-1)[mask[0].view(-1).nonzero()[0]] = False  # one sample with one masked patch fewer
        model(_imgs(32), mask)
    assert model.decoder_pos_embed.shape == (1, 1 + n, 32) and not model.decoder_pos_embed.any(-1)[0, 0]


@pytest.mark.parametrize("name", list(OTHER_SIZE))
def test_set_img_size_to_another_size(name):
    model, _ = _build(name)
    size = OTHER_SIZE[name]
    model.set_img_size(size)
    out = model(_imgs(size, b=2), _mask(model, size, b=2))
    assert out["pred"].shape[1] == (size // model.stride) ** 2 and torch.isfinite(out["loss"])
    model.set_img_size(32)
    assert model(_imgs(32, b=2))["pred"].shape[1] == 16
    with pytest.raises(ValueError, match="divisible"):
        model.set_img_size(36)


def test_mixmim_is_built_for_one_size_and_checks_its_batch_before_launch():
    model, cfg = _build("mixmim")
    model.set_img_size(64)
    with pytest.raises(ValueError, match="built for"):
        model.set_img_size(32)
    with pytest.raises(ConfigError, match="^train.micro_batch: MixMIM pairs sample i with B-1-i"):
        check_pretrain(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch=3)), 1,
                       check_files=False)


def test_simmim_on_swin_injects_its_mask_token_at_the_stem_grid():
    cfg = load_config(PretrainCfg, None, [
        "method.name=simmim", "method.block_size=32", "model.encoder=swin_tiny_patch4_window7_224", "data.img_size=64",
        "model.encoder_kwargs={embed_dim: 16, depths: [1, 1, 1, 1], num_heads: [1, 1, 2, 2], window_size: 2}"])
    torch.manual_seed(0)
    model = create_mim_model(cfg.method, cfg.model, 64)
    seen = {}
    model.encoder.layers[0].register_forward_pre_hook(lambda m, args: seen.update(x=args[0].detach()))
    mask = _mask(model, 64, b=2)
    out = model(_imgs(64, b=2), mask)
    assert model.stride == 32 and out["pred"].shape == (2, 4, 32 * 32 * 3) and torch.isfinite(out["loss"])
    stem = upsample_mask(mask, 32 // 4)  # (2, 16, 16) on the 4-px patch grid
    assert torch.equal(seen["x"][stem], model.mask_token.detach().view(1, -1).expand(int(stem.sum()), -1))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_method_section_is_strict(name):
    with pytest.raises(ConfigError, match=rf"^unknown key 'method.bogus' for method {name} \(valid keys of {name}: "):
        load_config(PretrainCfg, None, [*CONFIGS[name], "method.bogus=1"])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_pictures(name):
    model, cfg = _build(name)
    size = cfg.data.img_size
    imgs = _imgs(size, b=3).clamp(-2, 2)  # an odd batch: MixMIM pads its pairing
    rec = reconstruct(model, imgs, seed=4)
    assert rec.images.shape == rec.masked.shape == (3, 3, size, size) and rec.mask.shape[0] == 3
    hidden = upsample_mask(rec.mask, model.stride).unsqueeze(1).expand_as(rec.images)
    assert torch.equal(rec.masked[~hidden], rec.images[~hidden])
    if name in ("mae", "simmim"):  # token-space masking: masked patches in the mean colour
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1).expand_as(rec.images)
        torch.testing.assert_close(rec.masked[hidden], mean[hidden])
    if rec.kind == "pixel":  # reconstruction pasted into the visible input
        torch.testing.assert_close(rec.pred_img[~hidden], rec.images[~hidden], rtol=0, atol=1e-4)
    assert render_grid(rec, panel=size).size[0] == 4 * size + 5 * 2
    assert torch.equal(reconstruct(model, imgs, seed=4).mask, rec.mask)


def test_configs_for_the_imagenette_comparison_build_at_the_same_budget():
    base = load_config(PretrainCfg, REPO / "configs" / "imagenette_pretrain.yaml")
    for name in ("mae", "simmim"):
        cfg = load_config(PretrainCfg, REPO / "configs" / f"imagenette_{name}.yaml")
        assert cfg.method.name == name and cfg.model == base.model and cfg.data == base.data
        assert (cfg.train.epochs, cfg.train.micro_batch, cfg.train.max_steps_per_epoch) == (
            base.train.epochs, base.train.micro_batch, base.train.max_steps_per_epoch)
        check_pretrain(cfg, 2, check_files=False)


# ------------------------------------------------------------------------------------------- public seams


class ToyPatchNet(nn.Module):
    """A toy backbone family: conv patch embedding + one residual MLP, NHWC tokens (any multiple of the patch)."""

    def __init__(self, img_size: int = 32, patch: int = 8, dim: int = 16, num_classes: int = 0,
                 global_pool: str = "avg", drop_path_rate: float = 0.0, **_timm_kwargs):
        super().__init__()
        self.patch, self.num_features, self.num_classes = patch, dim, num_classes
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.head = nn.Linear(dim, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(x).permute(0, 2, 3, 1)  # (B, h, w, C)
        return x + self.mlp(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x).mean((1, 2)))


@register_model
def toy_patchnet_test(pretrained: bool = False, **kwargs) -> ToyPatchNet:
    return ToyPatchNet(**kwargs)


class ToyAdapter:
    """The toy family's :class:`~fastmim_ds.models.adapters.EncoderAdapter`."""

    family = "toy"

    def create(self, name, *, img_size, drop_path, **kwargs):
        return timm.create_model(name, img_size=img_size, drop_path_rate=drop_path, **kwargs)

    def stride(self, encoder):
        return encoder.patch

    def num_features(self, encoder):
        return encoder.num_features

    def check_img_size(self, encoder, img_size):
        if img_size % encoder.patch:
            raise ValueError(f"image size {img_size} is not divisible by the toy patch {encoder.patch}")

    def set_img_size(self, encoder, img_size):
        self.check_img_size(encoder, img_size)

    def truncate(self, encoder, num_blocks):
        return []

    def forward_tokens(self, encoder, x):
        return encoder.forward_features(x).flatten(1, 2), 0

    def embed(self, encoder, x):
        return encoder.patch_embed.proj(x).permute(0, 2, 3, 1)

    def forward_embedded(self, encoder, x):
        return (x + encoder.mlp(x)).flatten(1, 2), 0

    def no_weight_decay(self, encoder):
        return set()

    def create_classifier(self, name, *, img_size, num_classes, drop_path, global_pool, **kwargs):
        return timm.create_model(name, img_size=img_size, num_classes=num_classes, **kwargs)

    def adapt_state_dict(self, state, classifier):
        return state


@dataclass
class ToyCfg(MethodCfg):
    name: str = "toy_inpaint"
    mask_ratio: float = 0.5
    noise: float = 0.0  # std of noise added to the visible pixels


class ToyInpaint(MIMMethod):
    """A toy method: masked patches zeroed in pixel space, a linear head predicts their raw pixels (masked MSE)."""

    name = "toy_inpaint"
    config = ToyCfg

    def __init__(self, encoder, adapter, method: ToyCfg):
        super().__init__()
        self.encoder, self.adapter, self.noise = encoder, adapter, method.noise
        self.stride = adapter.stride(encoder)
        self.target = PixelTarget(normalize=False)
        self.masks = BlockMaskGenerator(ratio=method.mask_ratio, block_size=self.stride)
        self.head = nn.Linear(adapter.num_features(encoder), self.target.out_dim(self.stride))
        self.mask_token = nn.Parameter(torch.zeros(()))  # not used in the forward: checks the no-decay default

    @classmethod
    def build(cls, model: MIMModelCfg, method: ToyCfg, img_size: int) -> "ToyInpaint":
        adapter = adapter_for(model.encoder)
        encoder = adapter.create(model.encoder, img_size=img_size, drop_path=model.drop_path, **model.encoder_kwargs)
        mim = cls(encoder, adapter, method)
        mim.check_img_size(img_size)
        return mim

    def draw_mask(self, batch_size, img_size, *, device="cpu", generator=None):
        return self.masks(batch_size, img_size, device=device, generator=generator)

    def forward(self, imgs, mask=None):
        if mask is None:
            mask = self.draw_mask(imgs.shape[0], imgs.shape[-2:], device=imgs.device)
        hidden = upsample_mask(mask, self.stride).unsqueeze(1)
        x = torch.where(hidden, torch.zeros_like(imgs), imgs + self.noise * torch.randn_like(imgs))
        tokens, prefix = self.adapter.forward_tokens(self.encoder, x)
        pred = self.head(tokens[:, prefix:])
        target, token_mask = self.target(imgs, self.stride), mask.flatten(1)
        return {"loss": masked_mse(pred, target, token_mask), "pred": pred, "target": target, "mask": token_mask}


@pytest.fixture()
def toy_seams():
    """The toy family and the toy method, added through the public registries (removed afterwards)."""
    register_adapter(ToyPatchNet, ToyAdapter())
    register_method(ToyInpaint)
    yield
    METHODS.pop(ToyInpaint.name)
    ADAPTERS.pop(ToyPatchNet)


def test_a_toy_method_and_a_toy_backbone_through_the_public_seams(toy_seams, tmp_path):
    overrides = ["method.name=toy_inpaint", "method.noise=0.01", "model.encoder=toy_patchnet_test",
                 "model.encoder_kwargs={dim: 24}", "data.img_size=32", "train.micro_batch=4"]
    cfg = load_config(PretrainCfg, None, overrides)
    assert isinstance(cfg.method, ToyCfg) and cfg.method.noise == 0.01
    with pytest.raises(ConfigError, match="unknown key 'method.block_size' for method toy_inpaint"):
        load_config(PretrainCfg, None, [*overrides, "method.block_size=8"])
    # the config round-trips through the run folder's config.yaml
    (tmp_path / "config.yaml").write_text(dump_yaml(cfg))
    assert load_config(PretrainCfg, tmp_path / "config.yaml") == cfg
    check_pretrain(cfg, 1, check_files=False)  # pre-launch: built on the meta device, every stage checked
    torch.manual_seed(0)
    model = create_mim_model(cfg.method, cfg.model, cfg.data.img_size)
    assert model.no_weight_decay() == {"mask_token"}
    imgs = _imgs(32, seed=5)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    mask = _mask(model, 32)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = model(imgs, mask)["loss"]
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    rec = reconstruct(model, imgs, seed=0)  # the picture: the default masked input (mean colour), pixel panels
    assert rec.kind == "pixel" and rec.pred_img.shape == imgs.shape
    model.set_img_size(48)
    assert model(_imgs(48))["pred"].shape[1] == 36
    # the fine-tuning classifier of the family takes the encoder's weights
    clf = ToyAdapter().create_classifier("toy_patchnet_test", img_size=32, num_classes=3, drop_path=0.0,
                                         global_pool="avg", dim=24)
    missing, unexpected = clf.load_state_dict(model.encoder.state_dict(), strict=False)
    assert missing == ["head.weight", "head.bias"] and not unexpected


def test_register_method_checks_what_it_registers():
    class NoConfig(ToyInpaint):
        name = "no_config"
        config = FinetuneCfg

    with pytest.raises(ValueError, match="MethodCfg dataclass"):
        register_method(NoConfig)
    with pytest.raises(ValueError, match="already registered"):
        register_method(type("FastMIM2", (ToyInpaint,), {"name": "fastmim", "config": METHODS["fastmim"].config}))
    with pytest.raises(ValueError, match="not a MIMMethod"):
        register_method(nn.Linear)


# ------------------------------------------------------------------------------------------- package-level rules


@pytest.mark.timeout(600)  # two fresh interpreters importing torch: ~20 s each on an idle 2-core machine
def test_importing_the_package_registers_its_backbones_in_timm():
    light = "import sys, fastmim_ds\nassert 'torch' not in sys.modules, 'import fastmim_ds must stay light'\n"
    create = ("import timm\nm = timm.create_model('mixmim_tiny_test', num_classes=0)\n"
              "assert type(m).__name__ == 'MixMIMTransformer' and timm.is_model('mixmim_base')\n")
    # timm imported after the package (registered when timm's import finishes), and before it (registered at once)
    for code in (light + create, "import timm, fastmim_ds\n" + create):
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                              env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
        assert proc.returncode == 0, proc.stderr[-3000:]


def test_no_module_imports_another_modules_private_names():
    bad = []
    for root in ("fastmim_ds", "benchmarks", "studies", "data_prep"):
        for path in sorted((REPO / root).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                    bad += [f"{path.relative_to(REPO)}:{node.lineno} {a.name}" for a in node.names
                            if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, bad


# ------------------------------------------------------------------------------------------- end to end


@pytest.fixture()
def runs_in_this_process():
    """pretrain/finetune ``main`` set the root logger's handlers and a SIGTERM handler: put pytest's back after."""
    root = logging.getLogger()
    handlers, level, sigterm = list(root.handlers), root.level, signal.getsignal(signal.SIGTERM)
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
        if h not in handlers:
            h.close()
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)
    signal.signal(signal.SIGTERM, sigterm)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name, method", [("mae", ["method.decoder_dim=32", "method.decoder_depth=1"]),
                                          ("simmim", ["method.block_size=16"])], ids=["mae", "simmim"])
def test_pretrain_resume_export_then_finetune(name, method, small_beton, tmp_path, one_rank_group,
                                              runs_in_this_process):
    """One DeepSpeed rank in this process: 2 steps of pre-training with the quality monitor and a picture, a resumed
    second epoch, an export of the encoder, then 2 steps of fine-tuning from the run."""
    from fastmim_ds import finetune, pretrain
    from fastmim_ds.export import create_model_from_export, export

    sets = [f"method.name={name}", *method, "model.encoder=vit_base_patch16_224",
            "model.encoder_kwargs={embed_dim: 32, depth: 1, num_heads: 2}",
            "data.img_size=64", f"data.train={small_beton / 'train.beton'}", f"data.val={small_beton / 'val.beton'}",
            "data.num_workers=1", "optim.warmup_epochs=0", "train.micro_batch=8", "train.max_steps_per_epoch=2",
            "train.log_every=1", "train.ds_config=ds_configs/zero2_fp32.json", f"train.output_dir={tmp_path}",
            "train.run_name=pre", "eval.skill_images=8", "eval.skill_mean_images=16", "eval.batch_size=8",
            "vis.every=1", "vis.num_images=2"]
    pretrain.main(load_config(PretrainCfg, None, [*sets, "train.epochs=1"]))
    stats = pretrain.main(load_config(PretrainCfg, None, [*sets, "train.epochs=2"]), resume="auto")
    run = Path(stats["run_dir"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "step" in r] == [1, 2, 3, 4]
    epochs = [r for r in rows if "epoch_end" in r]
    assert [r["epoch_end"] for r in epochs] == [0, 1] and all(r["skill_ratio"] > 0 for r in epochs)
    assert "resumed from" in (run / "log.txt").read_text()
    assert sorted(p.name for p in (run / "vis").iterdir()) == ["epoch0001.png", "epoch0002.png"]
    assert f"name: {name}" in (run / "config.yaml").read_text()

    weights, _ = export(run, tmp_path / "enc.safetensors")
    assert not any(k.startswith(("decoder", "mask_token", "head")) for k in create_model_from_export(weights)
                   .state_dict())

    ft = load_config(FinetuneCfg, None, [
        f"model.pretrained={run}", f"data.train={small_beton / 'train.beton'}", f"data.val={small_beton / 'val.beton'}",
        "data.img_size=64", "data.num_workers=1", "optim.warmup_epochs=0", "train.epochs=1", "train.micro_batch=8",
        "train.max_steps_per_epoch=2", "train.ds_config=ds_configs/zero2_fp32.json", f"train.output_dir={tmp_path}",
        "train.run_name=ft"])
    result = finetune.main(ft)
    assert 0.0 <= result["top1"] <= 100.0
    log = (tmp_path / "ft" / "log.txt").read_text()
    assert "not pre-trained: none" in log
