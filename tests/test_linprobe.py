"""Linear probe: frozen encoder + BatchNorm/Linear head (MAE), LARS as MAE's, ZeRO stage 0, and a 1-rank in-process
run on real images whose checkpoint exports to plain timm with the BatchNorm folded into the head."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from conftest import REPO, TINY_SWIN, TINY_VIT, pretrain_run  # noqa: F401  (fixture)

from fastmim_ds.config import ClassifierCfg, ConfigError, LinprobeCfg, LinprobeOptimCfg, load_config
from fastmim_ds.export import create_model_from_export, export, read_checkpoint_model
from fastmim_ds.linprobe import build_probe_optimizer, check_linprobe, create_probe, probe_ds_config

pytestmark = [pytest.mark.usefixtures("one_rank_group"), pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    return pretrain_run(tmp_path_factory.mktemp("lp_vit"), TINY_VIT)


@pytest.mark.parametrize("overrides, head", [(TINY_VIT, "head"), (TINY_SWIN, "head.fc")])
def test_probe_trains_only_the_head(tmp_path, overrides, head):
    cfg, mim, run = pretrain_run(tmp_path, overrides)
    model, report = create_probe(ClassifierCfg(pretrained=str(run), drop_path=0.0), num_classes=5,
                                 img_size=cfg.data.img_size)
    assert report.missing == [] and report.loaded
    probe = model.get_submodule(head)
    assert isinstance(probe, torch.nn.Sequential) and isinstance(probe[0], torch.nn.BatchNorm1d)
    assert not probe[0].affine and probe[0].eps == 1e-6 and isinstance(probe[1], torch.nn.Linear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{head}.1.weight", f"{head}.1.bias"}
    assert 0.005 < probe[1].weight.std() < 0.015 and torch.all(probe[1].bias == 0)  # MAE: trunc_normal(0.01)
    enc = mim.encoder.state_dict()
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in enc.items() if k in own and k != "pos_embed")
    x = torch.randn(4, 3, cfg.data.img_size, cfg.data.img_size)
    model(x).sum().backward()  # gradients reach the head only
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())


def test_lars_adapts_weight_matrices_like_mae_and_not_biases():
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(6, affine=False), torch.nn.Linear(6, 3))
    opt = build_probe_optimizer(model, LinprobeOptimCfg(name="lars", momentum=0.9), lr=2.0)
    w0, b0 = model[1].weight.detach().clone(), model[1].bias.detach().clone()
    model(torch.randn(8, 6)).pow(2).sum().backward()
    gw, gb = model[1].weight.grad.clone(), model[1].bias.grad.clone()
    opt.step()
    # MAE util/lars.py, first step (momentum buffer = update): w -= lr * 0.001 * |w| / |g| * g; bias: plain SGD
    assert torch.allclose(model[1].weight, w0 - 2.0 * 0.001 * w0.norm() / gw.norm() * gw, atol=1e-6)
    assert torch.allclose(model[1].bias, b0 - 2.0 * gb, atol=1e-6)
    sgd = build_probe_optimizer(model, LinprobeOptimCfg(name="sgd"), lr=0.1)
    assert isinstance(sgd, torch.optim.SGD)
    with pytest.raises(ConfigError, match="optim.name: unknown 'adam'"):
        build_probe_optimizer(model, LinprobeOptimCfg(name="adam"), lr=0.1)


def test_probe_ds_config_is_stage0_and_bf16_becomes_autocast():
    ds = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2, "overlap_comm": True}}
    cpu = probe_ds_config(ds, torch.device("cpu"))
    assert cpu["zero_optimization"] == {"stage": 0} and not cpu["bf16"]["enabled"] and "torch_autocast" not in cpu
    gpu = probe_ds_config(ds, torch.device("cuda", 0))
    assert gpu["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and not gpu["bf16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 2  # input untouched


def test_check_linprobe_errors(tmp_path, vit_run):
    with pytest.raises(ConfigError, match="model.pretrained: a linear probe needs"):
        check_linprobe(LinprobeCfg(), 1, check_files=False)
    with pytest.raises(ConfigError, match="model.pretrained: .*no complete checkpoint"):
        check_linprobe(load_config(LinprobeCfg, None, [f"model.pretrained={tmp_path}"]), 1, check_files=False)
    _, _, run = vit_run
    with pytest.raises(ConfigError, match="optim.name: unknown 'adamw'"):
        check_linprobe(load_config(LinprobeCfg, None, [f"model.pretrained={run}", "optim.name=adamw"]), 1,
                       check_files=False)
    derived = check_linprobe(load_config(LinprobeCfg, None, [f"model.pretrained={run}"]), 8, check_files=False)
    assert derived.eff_batch == 512 * 8 and derived.lr == pytest.approx(0.1 * 512 * 8 / 256)


def test_linprobe_run_freezes_encoder_and_exports_folded_head(tmp_path, vit_run, small_beton):
    from fastmim_ds import linprobe

    cfg, mim, run = vit_run
    out = tmp_path / "out"
    lp = load_config(LinprobeCfg, None, [
        f"model.pretrained={run}", f"data.train={small_beton / 'train.beton'}", f"data.val={small_beton / 'val.beton'}",
        "data.img_size=64", "data.num_workers=1", "optim.warmup_epochs=0.5", "optim.blr=6.4", "train.epochs=2",
        "train.micro_batch=16", "train.max_steps_per_epoch=4", "train.log_every=2", "train.csv_monitor=true",
        f"train.ds_config={REPO / 'ds_configs' / 'zero2_fp32.json'}", f"train.output_dir={out}", "train.run_name=lp",
    ])
    result = linprobe.main(lp)
    assert 0.0 <= result["top1"] <= 100.0 and result["run_dir"] == str(out / "lp")
    rows = [json.loads(r) for r in (out / "lp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_top1"] for r in rows if "val_top1" in r][-1] == pytest.approx(result["top1"])
    assert (out / "lp" / "csv" / "Train_val_top1.csv").is_file()
    # resuming a finished run trains nothing and reports the saved model's top-1 again
    again = linprobe.main(lp, resume="auto")
    assert again["top1"] == pytest.approx(result["top1"]) and again["best_top1"] == pytest.approx(result["best_top1"])
    assert len((out / "lp" / "metrics.jsonl").read_text().splitlines()) == len(rows)

    cm = read_checkpoint_model(out / "lp")
    assert cm.kind == "classifier" and cm.label_names and cm.model_args["num_classes"] == len(cm.label_names)
    enc = mim.encoder.state_dict()
    assert all(torch.equal(cm.state[k], v) for k, v in enc.items() if k != "pos_embed")  # frozen: unchanged
    assert cm.state["head.0.running_var"].ne(1).any()  # the BatchNorm saw the features
    head_w = cm.state["head.1.weight"]
    # the probe as trained (BatchNorm in eval mode) and the exported plain timm classifier agree
    probe, _ = create_probe(ClassifierCfg(pretrained=str(run), drop_path=0.0), num_classes=len(cm.label_names),
                            img_size=64)
    probe.load_state_dict(cm.state)
    probe.eval()
    weights, config = export(out / "lp", tmp_path / "lp.safetensors")
    plain = create_model_from_export(weights)
    assert isinstance(plain.head, torch.nn.Linear) and config["label_names"] == cm.label_names
    assert not torch.equal(plain.head.weight, head_w)  # folded: scaled by 1 / sqrt(var + eps)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(plain(x), probe(x), atol=1e-4)
    assert isinstance(plain, timm.models.VisionTransformer)
