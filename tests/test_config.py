"""fastmim_ds.config: precedence, strict typing, derived batch arithmetic, YAML round trip."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from fastmim_ds.config import (
    ConfigError,
    FinetuneCfg,
    OptimCfg,
    PretrainCfg,
    Resolved,
    TrainCfg,
    dump_yaml,
    load_config,
    resolve,
    to_dict,
)

pytestmark = pytest.mark.timeout(120)


def _write(tmp_path, text: str, name: str = "cfg.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


# ------------------------------------------------------------------------------------------- precedence


def test_defaults_only():
    cfg = load_config(PretrainCfg)
    assert cfg == PretrainCfg()
    assert cfg.method.name == "fastmim"
    assert cfg.data.img_size == 128
    assert cfg.method.mask_ratio == 0.75 and cfg.method.block_size == 16
    assert cfg.optim.blr == 1.5e-4 and cfg.optim.betas == (0.9, 0.95)


def test_precedence_defaults_yaml_overrides(tmp_path):
    path = _write(
        tmp_path,
        "optim:\n  blr: 2.0e-4\n  weight_decay: 0.1\ntrain:\n  epochs: 5\n  micro_batch: 64\ndata:\n  img_size: 96\n",
    )
    cfg = load_config(PretrainCfg, path, ["train.epochs=7", "optim.weight_decay=0.2", "method.mask_ratio=0.6"])
    # --set wins over the YAML file
    assert cfg.train.epochs == 7
    assert cfg.optim.weight_decay == 0.2
    # YAML wins over the defaults where --set is silent
    assert cfg.optim.blr == 2.0e-4
    assert cfg.train.micro_batch == 64
    assert cfg.data.img_size == 96
    # --set alone overrides a default
    assert cfg.method.mask_ratio == 0.6
    # untouched keys keep their defaults, including siblings of overridden keys
    d = PretrainCfg()
    assert cfg.optim.betas == d.optim.betas
    assert cfg.train.grad_accum == d.train.grad_accum
    assert cfg.data.hflip == d.data.hflip
    assert cfg.method.block_size == d.method.block_size
    assert cfg.model == d.model


def test_later_override_wins():
    cfg = load_config(PretrainCfg, None, ["train.epochs=3", "train.epochs=9"])
    assert cfg.train.epochs == 9


def test_loading_does_not_mutate_defaults():
    load_config(PretrainCfg, None, ["train.epochs=3", "model.encoder_kwargs={depth: 2}"])
    assert PretrainCfg().train.epochs == 800
    assert PretrainCfg().model.encoder_kwargs == {}


def test_override_dict_value():
    cfg = load_config(PretrainCfg, None, ["model.encoder_kwargs={embed_dim: 64, depth: 2, num_heads: 2}"])
    assert cfg.model.encoder_kwargs == {"embed_dim": 64, "depth": 2, "num_heads": 2}


def test_override_string_value():
    cfg = load_config(PretrainCfg, None, ["train.run_name=my-run", "method.target=pixel"])
    assert cfg.train.run_name == "my-run"
    assert cfg.method.target == "pixel"


def test_empty_yaml_file_gives_defaults(tmp_path):
    assert load_config(PretrainCfg, _write(tmp_path, "")) == PretrainCfg()


# ------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "override, dotted",
    [
        ("optim.blrr=1e-4", "optim.blrr"),
        ("train.epoch=10", "train.epoch"),
        ("nosuchsection.key=1", "nosuchsection"),
        ("model.decoder_dims=128", "model.decoder_dims"),
        ("method.decoder_dims=128", "method.decoder_dims"),
    ],
)
def test_unknown_override_key_names_full_dotted_key(override, dotted):
    with pytest.raises(ConfigError) as ei:
        load_config(PretrainCfg, None, [override])
    assert f"'{dotted}'" in str(ei.value)


def test_unknown_yaml_key_names_full_dotted_key(tmp_path):
    path = _write(tmp_path, "data:\n  img_sise: 64\n")
    with pytest.raises(ConfigError, match=r"data\.img_sise"):
        load_config(PretrainCfg, path)


def test_finetune_cfg_rejects_pretrain_only_key():
    with pytest.raises(ConfigError, match=r"'method'"):
        load_config(FinetuneCfg, None, ["method.mask_ratio=0.5"])


# ------------------------------------------------------------------------------------------- method section


def test_method_section_is_parsed_by_the_methods_own_dataclass():
    cfg = load_config(PretrainCfg, None, ["method.name=mae", "method.mask_ratio=0.6"])
    assert type(cfg.method).__name__ == "MAECfg" and cfg.method.mask_ratio == 0.6
    assert cfg.method.decoder_depth == 8 and cfg.method.decoder_dim == 512  # MAE's defaults, not FastMIM's
    simmim = load_config(PretrainCfg, None, ["method.name=simmim"]).method
    assert (simmim.mask_ratio, simmim.block_size, simmim.norm_pix_loss) == (0.6, 32, False)


@pytest.mark.parametrize("overrides, message", [
    (["method.name=mae", "method.block_size=16"],
     "unknown key 'method.block_size' for method mae (valid keys of mae: name, mask_ratio, norm_pix_loss, "
     "decoder_dim, decoder_depth, decoder_heads)"),
    (["method.name=simmim", "method.target=hog"], "unknown key 'method.target' for method simmim"),
    (["method.hog_bin=9"], "unknown key 'method.hog_bin' for method fastmim"),
    (["method.name=nope"], "method.name: unknown 'nope' (choices: fastmim, mixmim, mae, simmim)"),
    (["method.mask_ratio=high"], "method.mask_ratio: expected a number, got 'high'"),
])
def test_method_keys_are_strict_per_method(overrides, message):
    with pytest.raises(ConfigError) as ei:
        load_config(PretrainCfg, None, overrides)
    assert str(ei.value).startswith(message) and "\n" not in str(ei.value)


def test_old_layout_is_read_with_a_warning(tmp_path, caplog):
    old = _write(tmp_path, "method: mixmim\nmodel: {encoder: mixmim_base, decoder_dim: 128, target: pixel}\n"
                           "mask: {ratio: 0.5, block_size: 32}\n")
    with caplog.at_level("WARNING", logger="fastmim_ds.config"):
        cfg = load_config(PretrainCfg, old, ["mask.ratio=0.25"])
    assert (cfg.method.name, cfg.method.mask_ratio, cfg.method.decoder_dim) == ("mixmim", 0.25, 128)
    assert cfg.model.encoder == "mixmim_base"
    (warning,) = caplog.messages
    assert "old layout" in warning and "mask.ratio -> method.mask_ratio" in warning
    assert "block_size dropped (method mixmim has no such key)" in warning  # MixMIM masks the last-stage grid


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.epochs=ten", "train.epochs"),
        ("train.epochs=1.5", "train.epochs"),
        ("train.epochs=true", "train.epochs"),  # bool is not an int here
        ("data.hflip=3", "data.hflip"),
        ("data.hflip=yes_please", "data.hflip"),
        ("optim.blr=abc", "optim.blr"),
        ("optim.blr=true", "optim.blr"),
        ("train.output_dir=3", "train.output_dir"),
        ("model.encoder_kwargs=[1, 2]", "model.encoder_kwargs"),
        ("optim.betas=0.9", "optim.betas"),
        ("optim.betas=[0.9, x]", "optim.betas[1]"),
        ("train={epochs: 3, bad: 1}", "train.bad"),
        ("optim=3", "optim"),
    ],
)
def test_wrong_type_raises_naming_key(override, key):
    with pytest.raises(ConfigError) as ei:
        load_config(PretrainCfg, None, [override])
    assert key in str(ei.value)


def test_wrong_type_in_yaml_raises(tmp_path):
    path = _write(tmp_path, "train:\n  epochs: ten\n")
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        load_config(PretrainCfg, path)


def test_tuple_length_checked():
    with pytest.raises(ConfigError, match=r"optim\.betas.*expected 2 values"):
        load_config(PretrainCfg, None, ["optim.betas=[0.9, 0.95, 0.99]"])
    with pytest.raises(ConfigError, match=r"optim\.betas"):
        load_config(PretrainCfg, None, ["optim.betas=[0.9]"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(PretrainCfg, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError):
        load_config(PretrainCfg, _write(tmp_path, "train: [unclosed\n", "bad.yaml"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(PretrainCfg, _write(tmp_path, "- 1\n- 2\n", "list.yaml"))


@pytest.mark.parametrize("cls, override, key, spelling", [
    # YAML flow syntax without spaces: keys "depth:6", "patch_size:8" holding None, which timm would drop
    (PretrainCfg, "model.encoder_kwargs={depth:6,patch_size:8}", "model.encoder_kwargs", "{depth: 6, patch_size: 8}"),
    (PretrainCfg, "model.encoder_kwargs={depth: 6, patch_size:8}", "model.encoder_kwargs",
     "{depth: 6, patch_size: 8}"),
    (FinetuneCfg, "model.kwargs={depth:6,patch_size:8}", "model.kwargs", "{depth: 6, patch_size: 8}"),
    (FinetuneCfg, "model.kwargs={depth}", "model.kwargs", "{depth: <value>}"),
    (PretrainCfg, "optim={blr:1e-4}", "optim", "{blr: 1e-4}"),
])
def test_flow_mapping_without_spaces_is_rejected_with_the_spelling(cls, override, key, spelling):
    with pytest.raises(ConfigError) as ei:
        load_config(cls, None, [override])
    msg = str(ei.value)
    assert msg.startswith(f"{key}: key ") and f'--set "{key}={spelling}"' in msg, msg
    assert "\n" not in msg


def test_none_valued_kwarg_in_yaml_file_is_rejected(tmp_path):
    path = _write(tmp_path, "model:\n  encoder_kwargs: {depth:6, drop_rate: 0.1}\n")
    with pytest.raises(ConfigError, match=r"model\.encoder_kwargs: key 'depth:6' .*\{depth: 6, drop_rate: 0\.1\}"):
        load_config(PretrainCfg, path)
    # a file value with a space is fine, and a later override spelled right merges into it
    path = _write(tmp_path, "model:\n  encoder_kwargs: {depth: 6}\n")
    assert load_config(PretrainCfg, path, ["model.encoder_kwargs={patch_size: 8}"]).model.encoder_kwargs == {
        "depth": 6, "patch_size": 8}


def test_override_without_equals_raises():
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(PretrainCfg, None, ["train.epochs"])


# ------------------------------------------------------------------------------------------- coercion


def test_int_to_float_coercion():
    cfg = load_config(PretrainCfg, None, ["optim.blr=1", "optim.warmup_epochs=5", "optim.weight_decay=0"])
    for v, expected in ((cfg.optim.blr, 1.0), (cfg.optim.warmup_epochs, 5.0), (cfg.optim.weight_decay, 0.0)):
        assert type(v) is float
        assert v == expected


def test_yaml_exponent_string_becomes_float(tmp_path):
    # PyYAML (YAML 1.1) reads "1e-4" without a dot as a *string*
    assert yaml.safe_load("blr: 1e-4")["blr"] == "1e-4"
    cfg = load_config(PretrainCfg, _write(tmp_path, "optim:\n  blr: 1e-4\n  min_lr: 1e-6\n"))
    assert type(cfg.optim.blr) is float and cfg.optim.blr == pytest.approx(1e-4, rel=0, abs=0)
    assert type(cfg.optim.min_lr) is float and cfg.optim.min_lr == 1e-6
    cfg = load_config(PretrainCfg, None, ["optim.blr=3e-4"])
    assert type(cfg.optim.blr) is float and cfg.optim.blr == 3e-4


def test_list_to_tuple_coercion_with_int_elements():
    cfg = load_config(PretrainCfg, None, ["optim.betas=[1, 0.99]", "data.rrc_scale=[0, 1]"])
    assert cfg.optim.betas == (1.0, 0.99)
    assert isinstance(cfg.optim.betas, tuple)
    assert all(type(b) is float for b in cfg.optim.betas)
    assert cfg.data.rrc_scale == (0.0, 1.0) and isinstance(cfg.data.rrc_scale, tuple)


# ------------------------------------------------------------------------------------------- resolve


@pytest.mark.parametrize("world_size", [1, 2, 8, 16])
@pytest.mark.parametrize("micro, accum", [(64, 1), (32, 4)])
def test_resolve_batch_arithmetic(world_size, micro, accum):
    cfg = load_config(
        PretrainCfg, None, [f"train.micro_batch={micro}", f"train.grad_accum={accum}", "optim.blr=1.5e-4",
                            "optim.min_lr=1e-6"],
    )
    r = resolve(cfg.optim, cfg.train, world_size)
    assert isinstance(r, Resolved)
    assert r.world_size == world_size
    assert r.eff_batch == micro * accum * world_size
    assert r.lr == pytest.approx(1.5e-4 * micro * accum * world_size / 256, rel=1e-12)
    assert r.min_lr == 1e-6


def test_resolve_known_values():
    # FastMIM ViT-B recipe: 512 per GPU x 8 GPUs = 4096, lr = 1.5e-4 * 16 = 2.4e-3
    r = resolve(OptimCfg(), TrainCfg(), 8)
    assert r.eff_batch == 4096
    assert r.lr == pytest.approx(2.4e-3)


def test_resolve_is_frozen():
    r = resolve(OptimCfg(), TrainCfg(), 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "optim, train, world, match",
    [
        (OptimCfg(), TrainCfg(micro_batch=0), 1, "micro_batch"),
        (OptimCfg(), TrainCfg(micro_batch=-4), 1, "micro_batch"),
        (OptimCfg(), TrainCfg(grad_accum=0), 1, "grad_accum"),
        (OptimCfg(), TrainCfg(), 0, "world size"),
        (OptimCfg(blr=0.0), TrainCfg(), 1, "blr"),
        (OptimCfg(blr=float("nan")), TrainCfg(), 1, "blr"),
    ],
)
def test_resolve_rejects_bad_values(optim, train, world, match):
    with pytest.raises(ConfigError, match=match):
        resolve(optim, train, world)


# ------------------------------------------------------------------------------------------- finetune


def test_finetune_defaults_differ_from_pretrain():
    ft, pt = load_config(FinetuneCfg), load_config(PretrainCfg)
    assert ft.data.img_size == 224 and pt.data.img_size == 128
    assert ft.optim.layer_decay == 0.7 and pt.optim.layer_decay == 1.0
    assert ft.optim.betas == (0.9, 0.999) and pt.optim.betas == (0.9, 0.95)
    assert ft.data.rrc_scale == (0.08, 1.0) and pt.data.rrc_scale == (0.2, 1.0)
    assert ft.optim.blr == 6e-4 and ft.optim.min_lr == 1e-6 and ft.optim.warmup_epochs == 5
    assert ft.train.epochs == 100 and ft.train.micro_batch == 128
    assert not hasattr(ft, "mask")
    # overriding a FinetuneCfg starts from *its* defaults, not from the dataclass field defaults
    ft2 = load_config(FinetuneCfg, None, ["optim.blr=1e-3"])
    assert ft2.optim.layer_decay == 0.7 and ft2.optim.betas == (0.9, 0.999) and ft2.optim.blr == 1e-3


# ------------------------------------------------------------------------------------------- round trip


def _nondefault_pretrain():
    return load_config(
        PretrainCfg,
        None,
        [
            "model.encoder_kwargs={embed_dim: 64, depth: 2, num_heads: 2}",
            "data.img_size=64",
            "optim.betas=[0.8, 0.9]",
            "optim.blr=1e-4",
            "train.run_name=rt",
            "data.hflip=false",
            "method.mask_ratio=0.6",
        ],
    )


@pytest.mark.parametrize("make", [_nondefault_pretrain, PretrainCfg, FinetuneCfg], ids=["pretrain", "default", "ft"])
def test_dump_yaml_round_trip(tmp_path, make):
    cfg = make()
    cls = type(cfg)
    text = dump_yaml(cfg)
    data = yaml.safe_load(text)
    assert data == to_dict(cfg)
    path = _write(tmp_path, text)
    back = load_config(cls, path)
    assert back == cfg
    assert isinstance(back.optim.betas, tuple)
    assert isinstance(back.data.rrc_ratio, tuple)


def test_dump_yaml_with_derived():
    cfg = _nondefault_pretrain()
    r = resolve(cfg.optim, cfg.train, 4)
    data = yaml.safe_load(dump_yaml(cfg, r))
    assert data["derived"] == {"world_size": 4, "eff_batch": r.eff_batch, "lr": r.lr, "min_lr": r.min_lr}
    assert data["optim"]["betas"] == [0.8, 0.9]


def test_to_dict_is_plain():
    d = to_dict(_nondefault_pretrain())
    assert d["optim"]["betas"] == [0.8, 0.9] and isinstance(d["optim"]["betas"], list)
    assert d["model"]["encoder_kwargs"] == {"embed_dim": 64, "depth": 2, "num_heads": 2}


SHIPPED = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    """configs/*.yaml stay in step with the dataclasses and the pre-launch checks (files not required)."""
    from fastmim_ds.checks import check_finetune, check_pretrain
    from fastmim_ds.config import LinprobeCfg
    from fastmim_ds.linprobe import check_linprobe

    kind = "linprobe" if "linprobe" in path.name else "finetune" if "finetune" in path.name else "pretrain"
    cls, check = {"pretrain": (PretrainCfg, check_pretrain), "finetune": (FinetuneCfg, check_finetune),
                  "linprobe": (LinprobeCfg, check_linprobe)}[kind]
    cfg = load_config(cls, path)  # unknown keys or wrong types raise here
    if kind == "linprobe" or (kind == "finetune" and not cfg.model.name):  # they take --pretrained <run>
        with pytest.raises(ConfigError, match="pretrained"):
            check(cfg, 1, check_files=False)
        return
    derived = check(cfg, 1, check_files=False)
    assert derived.world_size == 1
    assert derived.eff_batch == cfg.train.micro_batch * cfg.train.grad_accum
    assert derived.lr > 0


@pytest.mark.parametrize("kind, overrides, message", [
    ("pretrain", ["model.encoder_kwargs={depth: 2, patchsize: 8}"],
     "model.encoder_kwargs: VisionTransformer (vit_base_patch16_224) takes no argument 'patchsize' "
     "(did you mean 'patch_size'?)"),
    ("pretrain", ["model.encoder=swin_tiny_patch4_window7_224", "model.encoder_kwargs={depth: 2}"],
     "model.encoder_kwargs: SwinTransformer (swin_tiny_patch4_window7_224) takes no argument 'depth' "
     "(did you mean 'depths'?)"),
    ("pretrain", ["method.name=mixmim", "model.encoder=mixmim_tiny_test", "model.encoder_kwargs={foo: 1}"],
     "model.encoder_kwargs: MixMIMTransformer (mixmim_tiny_test) takes no argument 'foo'"),
    ("finetune", ["model.name=vit_tiny_patch16_224", "model.kwargs={dept: 6}"],
     "model.kwargs: VisionTransformer (vit_tiny_patch16_224) takes no argument 'dept' (did you mean 'depth'?)"),
    ("finetune", ["model.name=pvt_v2_b0", "model.kwargs={depths: [1, 1, 1, 1], embed_dims: [8, 16, 32, 64], x: 1}"],
     "model.kwargs: PyramidVisionTransformerV2 (pvt_v2_b0) takes no argument 'x'"),
])
def test_unknown_model_kwarg_is_rejected_before_launch(kind, overrides, message):
    from fastmim_ds.checks import check_finetune, check_pretrain

    cls, check = (PretrainCfg, check_pretrain) if kind == "pretrain" else (FinetuneCfg, check_finetune)
    with pytest.raises(ConfigError) as ei:
        check(load_config(cls, None, overrides), 1, check_files=False)
    assert str(ei.value) == message


@pytest.mark.parametrize("overrides, message", [
    # each value is reported under the key the raising model / method / adapter names (SettingError.key)
    (["data.img_size=120"], "data.img_size: image size 120 is not divisible by the mask block size 16"),
    (["model.encoder_kwargs={depth: 2, patch_size: 16}", "method.block_size=24"],
     "method.block_size: mask block size 24 must be a multiple of the encoder stride 16 (e.g. 16 or 32)"),
    (["method.name=mae", "method.mask_ratio=1.0"], "method.mask_ratio: must be in (0, 1) for mae, got 1.0"),
    (["method.name=simmim", "model.encoder=swin_tiny_patch4_window7_224", "model.encoder_kwargs={depths: [1, 1, 1, 1]}",
      "data.img_size=96", "method.block_size=32"],
     "model.encoder_kwargs: Swin window 7 does not divide the stage grids [24, 12, 6, 3] at 96 px (windows that do: "
     "1, 3); set model.encoder_kwargs.window_size"),
    (["method.name=mae", "model.encoder=pvt_v2_b0"], "model.encoder: method mae needs a ViT encoder"),
    (["model.encoder=resnet18"], "model.encoder: no MIM adapter for 'resnet18' (a ResNet)"),
    (["model.encoder_kwargs={depth: 2}", "model.encoder_blocks=3"],
     "model.encoder_blocks: must be in [1, 2] (the encoder has 2 blocks), got 3"),
])
def test_model_errors_are_reported_under_the_key_they_name(overrides, message):
    from fastmim_ds.checks import check_pretrain

    with pytest.raises(ConfigError) as ei:
        check_pretrain(load_config(PretrainCfg, None, overrides), 1, check_files=False)
    assert str(ei.value).startswith(message)


def test_setting_error_carries_its_key_and_other_errors_are_model_errors(monkeypatch):
    """The key comes from the raising code, never from the wording of its message."""
    from fastmim_ds import methods
    from fastmim_ds.checks import check_pretrain
    from fastmim_ds.config import SettingError

    err = SettingError("method.decoder_depth", "the window of this image size mask ratio")
    assert isinstance(err, ValueError) and err.key == "method.decoder_depth"
    for raised, expected in ((err, "method.decoder_depth: the window of this image size mask ratio"),
                             (ValueError("image size window"), "model: image size window")):
        def build(*_, **__):
            raise raised
        monkeypatch.setattr(methods, "create_mim_model", build)
        with pytest.raises(ConfigError) as ei:
            check_pretrain(load_config(PretrainCfg, None, []), 1, check_files=False)
        assert str(ei.value) == expected


def test_known_model_kwargs_pass_the_signature_check():
    from fastmim_ds.checks import check_model_kwargs

    # class arguments, entrypoint/builder arguments (timm pops out_indices before the class sees it)
    check_model_kwargs("vit_tiny_patch16_224", {"depth": 2, "patch_size": 8, "class_token": False}, "k")
    check_model_kwargs("swin_tiny_patch4_window7_224", {"window_size": 4, "out_indices": [1]}, "k")
    check_model_kwargs("mixmim_tiny_test", {"window_size": [8, 8, 4, 2], "embed_dim": 64}, "k")


def test_linprobe_classifier_kwargs_checked_against_the_pretrained_encoder(tmp_path, monkeypatch):
    from fastmim_ds import checks
    from fastmim_ds.config import LinprobeCfg
    from fastmim_ds.linprobe import check_linprobe

    # kwargs without a name: the pre-trained encoder's architecture (read from its checkpoint) decides
    monkeypatch.setattr(checks, "pretrain_config_of", lambda p: {"model": {"encoder": "vit_tiny_patch16_224"}})
    monkeypatch.setattr("fastmim_ds.linprobe.resolve_tag_dir", lambda p: p)
    cfg = load_config(LinprobeCfg, None, [f"model.pretrained={tmp_path}", "model.kwargs={deth: 6}"])
    with pytest.raises(ConfigError, match="^model.kwargs: VisionTransformer .* 'deth' .*'depth'"):
        check_linprobe(cfg, 1, check_files=False)


def test_progressive_resolution_with_zero3_is_rejected_before_launch():
    from fastmim_ds.checks import check_pretrain

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(PretrainCfg, repo / "configs" / "imagenette_swin_fastmim_p.yaml",
                      [f"train.ds_config={repo / 'ds_configs' / 'zero3_bf16.json'}"])
    with pytest.raises(ConfigError, match="progressive: .*ZeRO-3"):
        check_pretrain(cfg, 2, check_files=False)
    cfg.train.ds_config = str(repo / "ds_configs" / "zero2_bf16.json")
    assert check_pretrain(cfg, 2, check_files=False).world_size == 2
