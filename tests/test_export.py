"""Export to timm: DeepSpeed ZeRO-2 checkpoints (1 rank, in-process) -> .safetensors -> plain ``timm.create_model``.

Features (encoders) and logits (classifiers) of the re-created timm model equal those of the trained module on the
same input; the file carries timm's pretrained_cfg (input size, mean/std) and a classifier's class names.
"""
from __future__ import annotations

import pytest
import timm
import torch
from conftest import (
    CLASSES,
    TINY_MAE,
    TINY_MIXMIM,
    TINY_SIMMIM,
    TINY_SWIN,
    TINY_VIT,
    ZERO3_ALL_PARTITIONED,
    finetune_run,
    pretrain_run,
    save_with_engine,
)

from fastmim_ds.config import PretrainCfg, load_config, to_dict
from fastmim_ds.export import (
    create_model_from_export,
    export,
    read_checkpoint_model,
    read_export_config,
    timm_call,
)
from fastmim_ds.methods import create_mim_model
from fastmim_ds.models.classifier import fold_probe_head

pytestmark = [pytest.mark.usefixtures("one_rank_group"), pytest.mark.timeout(300)]

def _images(size: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("overrides, family", [(TINY_VIT, "vit"), (TINY_SWIN, "swin"), (TINY_MIXMIM, "mixmim"),
                                               (TINY_MAE, "vit"), (TINY_SIMMIM, "vit")],
                         ids=["fastmim-vit", "fastmim-swin", "mixmim", "mae-vit", "simmim-vit"])
def test_pretrain_export_loads_in_plain_timm_with_equal_features(tmp_path, overrides, family):
    cfg, mim, run = pretrain_run(tmp_path, overrides)
    out = tmp_path / "model.safetensors"
    weights, config = export(run, out)
    assert weights == out and out.is_file()
    pcfg = config["pretrained_cfg"]
    size = cfg.data.img_size
    assert tuple(pcfg["input_size"]) == (3, size, size) and pcfg["num_classes"] == 0
    assert tuple(pcfg["mean"]) == pytest.approx((0.485, 0.456, 0.406)) and tuple(pcfg["std"]) == pytest.approx(
        (0.229, 0.224, 0.225))
    assert config["architecture"] == cfg.model.encoder and "tag" not in pcfg or pcfg.get("tag") == "fastmim_ds"
    # the loading call of the issue: plain timm, the file as pretrained weights, the encoder's kwargs
    kwargs = config["model_args"]
    model = timm.create_model(cfg.model.encoder, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(out), num_classes=0), **kwargs).eval()
    assert not list(model.get_classifier().parameters())  # no head: num_classes=0
    assert not any(k.startswith(("decoder", "mask_token")) for k in model.state_dict())
    x = _images(size)
    with torch.no_grad():
        ours = mim.encoder.forward_features(x)
        theirs = model.forward_features(x)
        assert torch.allclose(ours, theirs, atol=1e-6, rtol=0), (ours - theirs).abs().max()
        pooled = model(x)  # (B, C) pooled features (num_classes=0)
        assert pooled.shape == (2, model.num_features) and torch.isfinite(pooled).all()
    # every saved tensor is a trained one: it equals the engine's module weight under the same timm name
    enc = mim.encoder.state_dict()
    for k, v in model.state_dict().items():
        if k in enc:
            assert torch.equal(v, enc[k].float()), k
    assert create_model_from_export(out).state_dict().keys() == model.state_dict().keys()
    assert f"pretrained_cfg_overlay=dict(file='{out}'" in timm_call(out)


def test_vit_export_folder_is_a_timm_local_dir_and_resamples_pos_embed(tmp_path):
    _, mim, run = pretrain_run(tmp_path, TINY_VIT)
    folder = tmp_path / "export"
    weights, _ = export(run, folder)
    assert weights == folder / "model.safetensors" and (folder / "config.json").is_file()
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x = _images(64)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), mim.encoder.forward_features(x), atol=1e-6, rtol=0)
    # another input size: timm's checkpoint_filter_fn resamples the 4x4 sin-cos table to 6x6 (bicubic)
    big = create_model_from_export(weights, img_size=96)
    assert big.pos_embed.shape == (1, 1 + 36, 64)
    with torch.no_grad():
        assert big.forward_features(_images(96)).shape == (2, 37, 64)


def test_truncated_encoder_exports_as_shallower_model(tmp_path):
    cfg, mim, run = pretrain_run(tmp_path, [*TINY_VIT, "model.encoder_kwargs={embed_dim: 64, depth: 3, num_heads: 2}",
                                            "model.encoder_blocks=2"])
    cm = read_checkpoint_model(run)
    assert cm.model_args["depth"] == 2 and any("truncated" in n for n in cm.notes)
    out = tmp_path / "trunc.safetensors"
    _, config = export(run, out)
    assert config["model_args"]["depth"] == 2 and "truncated" in config["fastmim_ds"]["notes"][0]
    model = create_model_from_export(out)
    x = _images(64)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), mim.encoder.forward_features(x), atol=1e-6, rtol=0)


def test_finetune_export_keeps_head_and_class_names(tmp_path):
    clf, run = finetune_run(tmp_path)
    out = tmp_path / "clf.safetensors"
    _, config = export(run, out)
    assert config["label_names"] == CLASSES and config["pretrained_cfg"]["num_classes"] == 3
    assert read_export_config(out) == config
    model = create_model_from_export(out)
    assert model.pretrained_cfg["label_names"] == tuple(CLASSES) or list(model.pretrained_cfg["label_names"]) == CLASSES
    x = _images(64, n=4)
    with torch.no_grad():
        assert torch.allclose(model(x), clf(x), atol=1e-5, rtol=0)
    # without num_classes in the overlay, timm would drop a head of another class count than its registered default:
    # the overlay from the export keeps it
    assert torch.equal(model.head.weight, clf.head.weight.float())


def test_fold_probe_head_matches_batchnorm_then_linear():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm1d(8, affine=False, eps=1e-6)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    lin = torch.nn.Linear(8, 3)
    head = torch.nn.Sequential(bn, lin).eval()
    state = {f"head.{k}": v for k, v in head.state_dict().items()}
    folded = fold_probe_head(state, "head")
    assert set(folded) == {"head.weight", "head.bias"}
    x = torch.randn(5, 8)
    with torch.no_grad():
        ref = head(x)
    assert torch.allclose(x @ folded["head.weight"].t() + folded["head.bias"], ref, atol=1e-5)


def test_export_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        export(tmp_path / "nothing", tmp_path / "x.safetensors")
    plain = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(plain))
    with pytest.raises(ValueError, match="fastmim-ds export"):
        read_export_config(plain)


@pytest.mark.parametrize("command, shown", [
    ("export", "(default: model.safetensors)"),
    ("visualize", "(default: reconstructions.png)"),
    ("predict", "(default: 1)"),
    ("linprobe", "--pretrained"),
])
def test_cli_help_shows_defaults(capsys, command, shown):
    from fastmim_ds.cli import main

    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert shown in " ".join(capsys.readouterr().out.split())


def test_cli_export_prints_the_timm_call(tmp_path, capsys):
    from fastmim_ds.cli import main

    cfg, _, run = pretrain_run(tmp_path, TINY_VIT)
    out = tmp_path / "e.safetensors"
    assert main(["export", str(run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"-> {out}" in printed and "timm.create_model('vit_base_patch16_224', pretrained=True" in printed
    assert "depth=2" in printed and "global_pool='avg'" in printed
    assert main(["export", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert main(["visualize", str(run), "--images", str(tmp_path / "none")]) == 2


def test_zero3_checkpoint_exports_the_trained_weights_and_resumes_the_same_step(tmp_path):
    """ZeRO-3 partitions the parameters themselves: the export consolidates them from the optimizer shards, and a
    fresh ZeRO-3 engine that loads the tag takes the same next step as the engine that wrote it."""
    import deepspeed

    from fastmim_ds.checkpoint import load

    cfg = load_config(PretrainCfg, None, TINY_VIT)
    client = {"config": to_dict(cfg), "method": cfg.method.name}

    def fresh():
        torch.manual_seed(0)
        return create_mim_model(cfg.method, cfg.model, cfg.data.img_size)

    init = fresh().encoder.state_dict()
    run = tmp_path / "run"
    engine = save_with_engine(fresh(), run / "ckpt", client, steps=2, stage=3)
    params = dict(engine.module.encoder.named_parameters())
    assert all(p.numel() == 0 for p in params.values())  # partitioned: the module holds empty placeholders
    with deepspeed.zero.GatheredParameters(list(params.values())):
        trained = {k: v.detach().clone() for k, v in params.items()}

    weights, _ = export(run, tmp_path / "z3.safetensors")
    exported = create_model_from_export(weights).state_dict()
    for k, v in trained.items():
        assert torch.equal(exported[k], v), k
    assert not torch.equal(exported["blocks.0.attn.qkv.weight"], init["blocks.0.attn.qkv.weight"])  # trained

    def next_step(eng) -> float:
        torch.manual_seed(7)  # same images and masks
        loss = eng(torch.randn(2, 3, 64, 64))["loss"]
        eng.backward(loss)
        eng.step()
        return loss.item()

    cfg_ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
              "zero_optimization": ZERO3_ALL_PARTITIONED, "steps_per_print": 10**9}
    model2 = fresh()
    engine2, *_ = deepspeed.initialize(model=model2, config=cfg_ds,
                                       optimizer=torch.optim.AdamW(model2.parameters(), lr=1e-2))
    client2 = load(engine2, run / "ckpt", "step00000002")
    assert client2["global_step"] == 2
    assert next_step(engine2) == pytest.approx(next_step(engine), rel=1e-6)
    p1, p2 = list(engine.module.parameters()), list(engine2.module.parameters())
    with deepspeed.zero.GatheredParameters(p1 + p2):
        assert all(torch.equal(a, b) for a, b in zip(p1, p2))


def test_consolidation_and_collectives_are_quiet(tmp_path, capfd):
    """issue 17: reading ZeRO shards prints nothing (DeepSpeed's zero_to_fp32 "Reconstructed fp32 state dict" lines
    and progress bars, once per rank in fine-tuning), and DeepSpeed's all-gather / reduce-scatter use torch's current
    collectives (torch 2.14 deprecates all_gather_into_tensor with a FutureWarning on every rank)."""
    import warnings

    import deepspeed.comm as ds_dist

    from fastmim_ds.weights import load_pretrained_encoder

    _, mim, run = pretrain_run(tmp_path, TINY_VIT)
    capfd.readouterr()
    state, _ = load_pretrained_encoder(run)
    out, err = capfd.readouterr()
    assert len(state) == len(mim.encoder.state_dict()) and (out, err) == ("", "")
    x, y = torch.arange(4.0), torch.empty(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        ds_dist.all_gather_into_tensor(y, x)
        assert torch.equal(y, x)  # one rank: the gather is the input
        ds_dist.reduce_scatter_tensor(y, x * 2)
        assert torch.equal(y, x * 2)
