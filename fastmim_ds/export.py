"""Export a run's weights as a plain timm model: one ``.safetensors`` file (or a timm ``local-dir`` folder).

``fastmim-ds export CKPT --out model.safetensors`` reads a DeepSpeed checkpoint (run folder, ``<run>/ckpt`` or a tag
folder), consolidates the fp32 weights from the ZeRO shards (DeepSpeed ``get_fp32_state_dict_from_zero_checkpoint``,
via :func:`fastmim_ds.weights.load_module_state`), loads them *strictly* into ``timm.create_model(name,
**model_args)`` (so every tensor has its timm name and nothing is missing), and writes that model's ``state_dict``
with safetensors. The file's metadata holds timm's own export config (``timm.models.save_config_for_hf``: the
architecture, the ``model_args`` that rebuild it, and a ``pretrained_cfg`` with input size, mean/std, crop, and the
class names of a classifier). With ``--out DIR`` (no ``.safetensors`` suffix) the same goes to ``DIR/model.safetensors``
+ ``DIR/config.json``, which timm opens as ``timm.create_model("local-dir:DIR", pretrained=True)``.

What is exported:

* a **pre-training run**: the encoder only (decoder, mask token and head absent; ``num_classes=0``). ViTs keep
  ``global_pool='avg'`` (their final LayerNorm is ``fc_norm``, as in pre-training). A truncated encoder
  (``model.encoder_blocks = k``) is exported as the depth-k model it is (ViT ``depth=k``, hierarchical ``depths``);
  fine-tuning the full architecture from it is ``make finetune``'s job, which reports the missing blocks.
* a **fine-tuning run**: the whole classifier with its head, ``label_names`` = the dataset's class folders.
* a **linear-probe run**: the classifier with the probe's BatchNorm (no affine, eval statistics) folded into the
  linear head, so the file loads into the plain timm classifier.

Loading with plain timm (``import fastmim_ds`` first for the ``mixmim_*`` models, which this package registers)::

    cfg = fastmim_ds.export.read_export_config("model.safetensors")      # or print it: `fastmim-ds export` does
    model = timm.create_model(cfg["architecture"], pretrained=True,
                              pretrained_cfg_overlay=dict(cfg["pretrained_cfg"], file="model.safetensors"),
                              **cfg["model_args"])

which is what :func:`create_model_from_export` does. The overlay must carry ``num_classes`` (it is in
``pretrained_cfg``): timm drops the head of a file whose ``num_classes`` differs from the model's. ViT weights are
exported at the grid they were trained at; creating the model with another ``img_size`` makes timm's
``checkpoint_filter_fn`` resample ``pos_embed`` bicubically (the same resampling fine-tuning applies).
"""
from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD
from timm.models._hub import save_config_for_hf  # timm exports save_for_hf only; this writes config.json alone

from .checkpoint import read_client_state, resolve_tag_dir
from .models.adapters import adapter_for
from .models.classifier import fold_probe_head
from .weights import classifier_arch, load_module_state

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointModel", "read_checkpoint_model", "build_timm_model", "export", "read_export_config",
    "create_model_from_export", "timm_call", "WEIGHTS_NAME", "METADATA_KEY",
]

WEIGHTS_NAME = "model.safetensors"  # timm's HF_SAFE_WEIGHTS_NAME: what `local-dir:` folders hold
METADATA_KEY = "timm_config"  # safetensors metadata entry holding timm's config.json as a string
# pretrained_cfg fields that describe our weights; the registered default's tag, hub id, url, license do not
_PCFG_KEYS = ("input_size", "fixed_input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std", "num_classes",
              "pool_size", "first_conv", "classifier")


@dataclass
class CheckpointModel:
    """A checkpoint's weights seen as a plain timm model.

    Attributes:
        kind: ``"encoder"`` (pre-training run, no head) or ``"classifier"`` (fine-tuning / linear-probe run).
        name: timm model name.
        model_args: ``timm.create_model`` keyword arguments that rebuild the architecture.
        state: fp32 weights under timm parameter names.
        data_config: preprocessing of the run: ``input_size`` (3, H, W), ``mean``/``std`` (ImageNet, on [0, 1]
            pixels), ``crop_pct`` (centre crop / shorter side), ``interpolation``.
        label_names: class names by output index (classifiers; ``[]`` otherwise).
        label_descriptions: human-readable name per class (ImageNet devkit, synset mapping, ``ClassLabel``), ``""``
            where unknown; ``[]`` when the dataset gave none.
        source: the checkpoint tag folder.
        notes: facts a user of the export should know (e.g. a truncated encoder).
    """

    kind: str
    name: str
    model_args: dict
    state: dict[str, torch.Tensor]
    data_config: dict
    label_names: list[str] = field(default_factory=list)
    label_descriptions: list[str] = field(default_factory=list)
    source: str = ""
    notes: list[str] = field(default_factory=list)


def _encoder_args(model_cfg: dict, img_size: int) -> tuple[dict, list[str]]:
    """model_args of a pre-training run's encoder (as ``adapter.create`` built it, minus training-only args)."""
    name, kwargs = model_cfg["encoder"], dict(model_cfg.get("encoder_kwargs", {}))
    adapter = adapter_for(name)
    k = model_cfg.get("encoder_blocks", 0)
    with torch.device("meta"):
        encoder = adapter.create(name, img_size=img_size, drop_path=0.0, **kwargs)
    if k:
        adapter.truncate(encoder, k)
    args = {**kwargs, **adapter.export_args(encoder, img_size, truncated=bool(k))}  # what create() really built
    if not k:
        return args, []
    depth = ", ".join(f"{a}={args[a]}" for a in ("depth", "depths") if a in args)
    return args, [f"truncated encoder: pre-trained with the first {k} blocks only (model.encoder_blocks); exported "
                  f"as that shallower model ({depth})"]


def read_checkpoint_model(path: str | Path) -> CheckpointModel:
    """Reads a pre-training, fine-tuning or linear-probe checkpoint as a timm model description.

    Args:
        path: run folder, ``<run>/ckpt`` or a tag folder (``<run>/ckpt/stepXXXXXXXX``).

    Raises:
        FileNotFoundError: no complete checkpoint at ``path``.
        ValueError: a checkpoint whose client state names neither a pre-training nor a classifier run.
    """
    tag_dir = resolve_tag_dir(Path(path))
    client = read_client_state(tag_dir)
    cfg = client.get("config", {})
    mean_std = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "interpolation": "bicubic"}
    if "method" in cfg:  # PretrainCfg: the MIM model's encoder
        img = cfg["data"]["img_size"]
        args, notes = _encoder_args(cfg["model"], img)
        state = load_module_state(tag_dir, "encoder.")
        data = {"input_size": (3, img, img), "crop_pct": cfg["data"].get("val_crop_ratio", 0.875), **mean_std}
        return CheckpointModel("encoder", cfg["model"]["encoder"], args, state, data, source=str(tag_dir), notes=notes)
    if "num_classes" in client:  # FinetuneCfg / LinprobeCfg: the module is the classifier itself
        model = cfg["model"]
        name, kwargs = classifier_arch(model, client.get("pretrain_config", {}), client.get("model_name", ""))
        img = cfg["data"]["img_size"]
        args = {"num_classes": client["num_classes"], "global_pool": model.get("global_pool", "avg"),
                **adapter_for(name).size_kwargs(img), **kwargs}
        state = load_module_state(tag_dir, "")
        data = {"input_size": (3, img, img), "crop_pct": cfg["data"].get("val_crop_ratio", 0.875), **mean_std}
        return CheckpointModel("classifier", name, args, state, data, label_names=list(client.get("classes", [])),
                               label_descriptions=list(client.get("class_names", [])), source=str(tag_dir))
    raise ValueError(f"{tag_dir}: not a fastmim-ds pre-training, fine-tuning or linear-probe checkpoint "
                     "(its client state has no config.method and no num_classes)")


def build_timm_model(cm: CheckpointModel) -> nn.Module:
    """``timm.create_model(cm.name, **cm.model_args)`` with ``cm.state`` loaded strictly (eval mode, fp32).

    The family's adapter maps the weights first (a ViT ``pos_embed`` saved at another FastMIM-P stage grid is
    resampled; a no-op otherwise); a linear-probe head is folded (:func:`fold_probe_head`).

    Raises:
        ValueError: the weights do not match the architecture (names the first keys).
    """
    model = timm.create_model(cm.name, pretrained=False, **cm.model_args)
    state = dict(cm.state)
    head = model.pretrained_cfg.get("classifier", "head")
    if f"{head}.0.running_mean" in state:
        state = fold_probe_head(state, head)
    state = adapter_for(cm.name).adapt_state_dict(state, model)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if k in own
             and v.shape != own[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"weights of {cm.source} do not fit timm '{cm.name}' {cm.model_args}: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}, shape {wrong[:3]}")
    model.load_state_dict(state, strict=True)
    return model.eval()


def _timm_config(model: nn.Module, cm: CheckpointModel) -> dict:
    """timm's ``config.json`` for the export (``save_config_for_hf``), with a pretrained_cfg describing our weights."""
    src = dict(model.pretrained_cfg)
    model.pretrained_cfg = {"architecture": cm.name, "tag": "fastmim_ds",
                            **{k: src[k] for k in _PCFG_KEYS if k in src}, "num_classes": model.num_classes}
    extra = {"fastmim_ds": {"kind": cm.kind, "source": cm.source, "notes": cm.notes}}
    if cm.label_names:
        extra["label_names"] = list(cm.label_names)
    if cm.label_descriptions:
        extra["label_descriptions"] = list(cm.label_descriptions)  # timm's pretrained_cfg key for readable names
    with tempfile.TemporaryDirectory() as tmp:
        save_config_for_hf(model, Path(tmp) / "config.json", model_config=extra, model_args=dict(cm.model_args),
                           data_config=dict(cm.data_config))
        return json.loads((Path(tmp) / "config.json").read_text())


def export(path: str | Path, out: str | Path) -> tuple[Path, dict]:
    """Writes the checkpoint at ``path`` as timm weights.

    Args:
        path: run folder, ``<run>/ckpt`` or tag folder of a pre-training, fine-tuning or linear-probe run.
        out: ``*.safetensors`` file (config in its metadata), or a folder (``model.safetensors`` + ``config.json``,
            timm's ``local-dir:`` layout).

    Returns:
        (the weights file written, timm's config dict).

    Raises:
        FileNotFoundError, ValueError: as :func:`read_checkpoint_model` and :func:`build_timm_model`.
    """
    cm = read_checkpoint_model(path)
    model = build_timm_model(cm)
    config = _timm_config(model, cm)
    out = Path(out)
    if out.suffix == ".safetensors":
        weights = out
        out.parent.mkdir(parents=True, exist_ok=True)
    else:
        out.mkdir(parents=True, exist_ok=True)
        weights = out / WEIGHTS_NAME
        (out / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(weights), metadata={"format": "pt", METADATA_KEY: json.dumps(config)})
    for note in cm.notes:
        logger.warning("%s", note)
    logger.info("exported %s (%s, %d tensors) from %s to %s", cm.name, cm.kind, len(tensors), cm.source, weights)
    return weights, config


def read_export_config(path: str | Path) -> dict:
    """timm config of an export: from a ``.safetensors`` file's metadata or a folder's ``config.json``.

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: a safetensors file without our metadata (not written by :func:`export`).
    """
    path = Path(path)
    if path.is_dir():
        return json.loads((path / "config.json").read_text())
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no exported weights (a .safetensors file or a folder with config.json)")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if METADATA_KEY not in meta:
        raise ValueError(f"{path}: no '{METADATA_KEY}' metadata; export it with `fastmim-ds export`")
    return json.loads(meta[METADATA_KEY])


def _weights_file(path: Path) -> Path:
    return path / WEIGHTS_NAME if path.is_dir() else path


def timm_call(path: str | Path, config: dict | None = None) -> str:
    """The plain-timm line that loads the export at ``path`` (printed by ``fastmim-ds export``)."""
    config = config or read_export_config(path)
    pcfg = {k: config["pretrained_cfg"][k] for k in ("num_classes", "input_size", "mean", "std", "crop_pct")
            if k in config["pretrained_cfg"]}
    overlay = ", ".join(f"{k}={tuple(v) if isinstance(v, list) else v!r}" for k, v in pcfg.items())
    args = ", ".join(f"{k}={tuple(v) if isinstance(v, list) else v!r}" for k, v in config.get("model_args", {}).items())
    return (f"timm.create_model({config['architecture']!r}, pretrained=True, "
            f"pretrained_cfg_overlay=dict(file={str(_weights_file(Path(path)))!r}, {overlay}), {args})")


def create_model_from_export(path: str | Path, **overrides) -> nn.Module:
    """Plain ``timm.create_model`` of an export, with its architecture args and pretrained_cfg (eval mode).

    Args:
        path: a ``.safetensors`` file written by :func:`export`, or an export folder.
        overrides: replace ``model_args`` (e.g. ``img_size=224``: timm resamples the ViT position embedding;
            ``num_classes=K``: timm drops a head of another size).

    Raises:
        FileNotFoundError, ValueError: as :func:`read_export_config`; timm's errors for weights that do not load.
    """
    config = read_export_config(path)
    overlay = dict(config["pretrained_cfg"], file=str(_weights_file(Path(path))))
    if config.get("label_names"):
        overlay["label_names"] = config["label_names"]
    args = {**config.get("model_args", {}), **overrides}
    return timm.create_model(config["architecture"], pretrained=True, pretrained_cfg_overlay=overlay, **args).eval()
