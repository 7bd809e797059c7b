"""Typed experiment configuration: the only home of defaults.

Precedence: dataclass defaults < ``configs/*.yaml`` < dotted CLI overrides (``--set optim.blr=1.5e-4``).
Loading is strict (nanoGPT ``configurator.py``): unknown keys and values of the wrong type raise
:class:`ConfigError` naming the key. Derived values (world size, effective batch, scaled lr) are computed
once by :func:`resolve` and saved next to the config; nothing mutates a config after loading.

Hyper-parameter defaults follow the released FastMIM ViT-B recipe (arXiv 2212.06593, ggjy/FastMIM.pytorch
README) for pre-training and the FastMIM/MAE ViT-B fine-tuning recipe for fine-tuning.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml

logger = logging.getLogger(__name__)

__all__ = [
    "ConfigError", "SettingError", "DataCfg", "MethodCfg", "MIMModelCfg", "OptimCfg", "TrainCfg", "PretrainCfg",
    "Stage", "ClassifierCfg", "AugCfg", "FinetuneCfg", "Resolved", "load_config", "resolve", "to_dict", "dump_yaml",
    "VisCfg", "LinprobeOptimCfg", "LinprobeCfg", "PretrainEvalCfg", "check_mapping", "upgrade_pretrain_layout",
]


class ConfigError(ValueError):
    """A configuration problem, reported as one line that names the key and the fix."""


class SettingError(ValueError):
    """A value that does not fit, raised where the value is used (a model, a method, an adapter) and carrying the
    config key it comes from: the message reads ``key: message``, and the pre-launch checks report it as one
    :class:`ConfigError` line.

    Args:
        key: dotted config key, e.g. ``data.img_size``, ``method.block_size``, ``model.encoder``.
        message: what is wrong and what would fit.
    """

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


@dataclass
class DataCfg:
    train: str = "data/imagenet/train.beton"
    val: str = "data/imagenet/val.beton"
    img_size: int = 128  # px; FastMIM pre-trains at 128, fine-tuning at 224
    rrc_scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop area range (MAE/FastMIM pre-training)
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    val_crop_ratio: float = 224 / 256  # centre crop side / shorter image side at evaluation
    num_workers: int = 8  # FFCV decoding threads per rank
    os_cache: bool = True  # page-cache the .beton, shared by the ranks of a node (FFCV docs)
    batches_ahead: int = 3
    # Label-efficient fine-tuning / linear probing: a seeded, class-balanced subset of data.train (the same subset for
    # every run with the same values; see fastmim_ds.data.labeled_indices). Pre-training ignores them.
    labels_fraction: float = 1.0  # keep round(fraction x class size) images per class; 1.0 = all
    labels_per_class: int = 0  # >0: keep this many images per class instead (overrides labels_fraction)
    labels_seed: int = 0


@dataclass
class MethodCfg:
    """The ``method:`` section of a pre-training config: ``name`` picks the MIM method, and the method's own
    dataclass (a subclass of this one, ``fastmim_ds.methods.METHODS[name].config``) holds its keys, strictly: a key
    of another method is an error naming the method and its valid keys. ``method.name=mae`` on the command line
    switches to that method's defaults (plus any other ``method.*`` keys given)."""

    name: str = ""


def _default_method() -> MethodCfg:
    from .methods import method_config  # the registry imports torch: only when a pre-training config is built

    return method_config("fastmim")()


@dataclass
class MIMModelCfg:
    """The encoder of a pre-training run: what any encoder has, whichever method trains it."""

    encoder: str = "vit_base_patch16_224"  # any timm backbone with an adapter (fastmim_ds.models.adapters)
    encoder_kwargs: dict = field(default_factory=dict)  # passed to timm.create_model (embed_dim, depth, ...)
    drop_path: float = 0.0
    encoder_blocks: int = 0  # >0: pre-train only the first k encoder blocks (FastMIM finding ii); 0 = all
    # activation checkpointing of the encoder blocks (timm set_grad_checkpointing): recomputes each block's forward
    # in backward, so activations of one block at a time are held; less memory, ~1/3 more compute per step
    grad_checkpointing: bool = False


@dataclass
class OptimCfg:
    blr: float = 1.5e-4  # base lr; lr = blr * effective_batch / 256 (MAE/FastMIM scaling rule)
    min_lr: float = 0.0  # absolute lr at the end of the cosine
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_epochs: float = 20.0
    layer_decay: float = 1.0  # 1.0 = off; fine-tuning ViT-B uses 0.7 (lr scale 0.7^(L - layer))
    clip_grad: float = 0.0  # written into the DeepSpeed config; 0 = off (MAE/FastMIM use none)


@dataclass
class TrainCfg:
    epochs: int = 800
    micro_batch: int = 512  # images per rank per forward/backward
    grad_accum: int = 1
    seed: int = 0
    output_dir: str = "output"
    run_name: str = ""  # empty: "<timestamp>-<method>-<model>-<img_size>"
    ds_config: str = "ds_configs/zero2_bf16.json"  # engine knobs only; batch fields are filled in from here
    log_every: int = 20  # optimizer steps between metrics.jsonl rows
    ckpt_every: int = 10  # epochs between checkpoints (the last epoch is always saved)
    ckpt_every_steps: int = 0  # >0: also checkpoint every N optimizer steps, mid-epoch (resume lands there)
    keep_last: int = 2  # complete checkpoints kept on disk (older tags are deleted)
    max_nonfinite: int = 10  # optimizer steps in a row skipped for a non-finite loss before the run stops
    eval_every: int = 1  # epochs between evaluations (fine-tuning)
    max_steps_per_epoch: int = 0  # >0 caps an epoch's optimizer steps (smoke tests, quick budgets)
    # DeepSpeed monitors next to metrics.jsonl (<run>/tensorboard/, <run>/csv/): DeepSpeed's own lr events plus every
    # numeric metrics.jsonl field as Train/<key>. TensorBoard needs `pip install tensorboard` (extra "monitor").
    tensorboard: bool = False
    csv_monitor: bool = False
    # Experiment trackers (rank 0; fastmim_ds/trackers.py): every numeric metrics.jsonl field except `step`, logged at
    # the row's optimizer step. Packages: the project's [track] extra. A resumed run continues the same tracker run.
    wandb: bool = False  # offline: WANDB_MODE=offline (files in <run>/wandb/, `wandb sync` later)
    wandb_project: str = "fastmim-ds"
    wandb_run_name: str = ""  # empty: the run folder's name
    wandb_tags: tuple[str, ...] = ()
    wandb_entity: str = ""  # empty: the logged-in user's default entity
    mlflow: bool = False
    mlflow_uri: str = ""  # empty: sqlite:///<output_dir>/mlflow.db (a local file, no server); or http://host:5000
    mlflow_experiment: str = "fastmim-ds"
    mlflow_run_name: str = ""  # empty: the run folder's name
    # torch.compile the model through DeepSpeed's engine.compile() (nn.Module.compile: in place, the state_dict keeps
    # its names). The first steps compile (minutes for a ViT-B); a new input size (FastMIM-P stage) recompiles once.
    compile: bool = False
    compile_backend: str = ""  # empty: the accelerator's default (inductor); "aot_eager", "eager" to debug


@dataclass
class VisCfg:
    """Reconstruction pictures written during pre-training (``<run>/vis/epochXXXX.png``, rank 0)."""

    every: int = 0  # epochs between pictures; 0 = off
    images: str = ""  # folder of images; empty: the first ``num_images`` of data.train (centre crops)
    num_images: int = 4
    seed: int = 0  # mask seed: the same blocks are masked in every picture of a run


@dataclass
class PretrainEvalCfg:
    """Quality signals measured during pre-training on ``data.val`` (``fastmim_ds.quality``)."""

    skill_every: int = 1  # epochs between reconstruction-skill measurements (masked MSE vs the mean predictor); 0 = off
    skill_images: int = 256  # fixed val images with fixed masks (seed below)
    skill_mean_images: int = 1024  # train images whose per-position mean target is the reference predictor
    knn_every: int = 0  # epochs between weighted k-NN top-1 measurements of the encoder; 0 = off
    knn_k: int = 20  # neighbours (DINO, solo-learn)
    knn_temperature: float = 0.07
    knn_bank_images: int = 0  # train images in the k-NN bank, spread over the set; 0 = all
    batch_size: int = 256  # images per forward during these measurements (per rank)
    seed: int = 0  # mask seed of the skill images


@dataclass
class PretrainCfg:
    # {name: fastmim, <that method's keys>}; see MethodCfg and fastmim_ds.methods (one dataclass per method)
    method: MethodCfg = field(default_factory=_default_method)
    model: MIMModelCfg = field(default_factory=MIMModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    # FastMIM-P: [[start_epoch, img_size, micro_batch, grad_accum], ...] from epoch 0 on; empty = one stage of
    # (data.img_size, train.micro_batch, train.grad_accum). The model is built at data.img_size (the size that
    # encoder_kwargs such as a Swin window refer to); each stage's lr follows its effective batch.
    progressive: list[tuple[int, int, int, int]] = field(default_factory=list)
    vis: VisCfg = field(default_factory=VisCfg)
    eval: PretrainEvalCfg = field(default_factory=PretrainEvalCfg)

    def stages(self) -> list["Stage"]:
        """The resolution stages in order (one when ``progressive`` is empty)."""
        if not self.progressive:
            return [Stage(0, self.data.img_size, self.train.micro_batch, self.train.grad_accum)]
        return [Stage(*s) for s in self.progressive]


@dataclass(frozen=True)
class Stage:
    """One FastMIM-P stage: from ``start_epoch`` on, train at ``img_size`` px with this batch arithmetic."""

    start_epoch: int
    img_size: int
    micro_batch: int
    grad_accum: int

    @staticmethod
    def at(stages: list["Stage"], epoch: int) -> "Stage":
        """The stage that epoch ``epoch`` belongs to (``stages`` sorted, the first starting at 0)."""
        return [s for s in stages if s.start_epoch <= epoch][-1]


@dataclass
class ClassifierCfg:
    name: str = ""  # timm model name; empty: the pre-trained encoder's (read from the checkpoint)
    kwargs: dict = field(default_factory=dict)  # empty with name empty: the pre-trained encoder's kwargs
    pretrained: str = ""  # run dir, DeepSpeed checkpoint dir or .pth/.safetensors; empty: from scratch
    num_classes: int = 0  # 0: read from the dataset's classes.json
    drop_path: float = 0.1
    global_pool: str = "avg"  # mean of patch tokens, then fc_norm (FastMIM/MAE fine-tuning)
    grad_checkpointing: bool = False  # activation checkpointing of the blocks (timm set_grad_checkpointing)


@dataclass
class AugCfg:
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    switch_prob: float = 0.5
    smoothing: float = 0.1
    reprob: float = 0.25  # RandomErasing probability (pixel mode)


@dataclass
class FinetuneCfg:
    model: ClassifierCfg = field(default_factory=ClassifierCfg)
    aug: AugCfg = field(default_factory=AugCfg)
    data: DataCfg = field(default_factory=lambda: DataCfg(img_size=224, rrc_scale=(0.08, 1.0)))
    optim: OptimCfg = field(
        default_factory=lambda: OptimCfg(blr=6e-4, min_lr=1e-6, betas=(0.9, 0.999), warmup_epochs=5, layer_decay=0.7)
    )
    train: TrainCfg = field(default_factory=lambda: TrainCfg(epochs=100, micro_batch=128, ckpt_every=10))


@dataclass
class LinprobeOptimCfg:
    """Linear-probe optimizer (MAE ``main_linprobe.py``: LARS, blr 0.1, no weight decay, 10 warmup epochs)."""

    name: str = "lars"  # "lars" (timm Lars, MAE's trust-ratio rule) or "sgd"
    blr: float = 0.1  # lr = blr * effective_batch / 256
    min_lr: float = 0.0
    weight_decay: float = 0.0
    momentum: float = 0.9
    warmup_epochs: float = 10.0
    clip_grad: float = 0.0  # written into the DeepSpeed config; 0 = off


@dataclass
class LinprobeCfg:
    """Linear probing of a frozen pre-trained encoder: BatchNorm (no affine) + linear head (MAE recipe)."""

    model: ClassifierCfg = field(default_factory=lambda: ClassifierCfg(drop_path=0.0))
    data: DataCfg = field(default_factory=lambda: DataCfg(img_size=224, rrc_scale=(0.08, 1.0)))
    optim: LinprobeOptimCfg = field(default_factory=LinprobeOptimCfg)
    # MAE: 90 epochs at an effective batch of 16384 (here per rank: micro_batch x grad_accum)
    train: TrainCfg = field(default_factory=lambda: TrainCfg(epochs=90, micro_batch=512, ckpt_every=10))


# ----------------------------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks ``value`` against the annotation ``tp``; returns it converted (int->float, list->tuple)."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if origin is tuple or tp is tuple:
        args = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)} ({value!r})")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        return tuple(_coerce(v, args[0], f"{key}[{i}]") if args else v for i, v in enumerate(value))
    if origin is list or tp is list:
        args = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") if args else v for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        check_mapping(value, key)
        return dict(value)
    raise ConfigError(f"{key}: unsupported annotation {tp}")


def _flow(value: Any) -> str:
    """``value`` in YAML flow style on one line (``6``, ``[1, 2]``, ``{a: 1}``)."""
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**9).strip()
    return text[:-3].strip() if text.endswith("\n...") else text


def check_mapping(value: dict, key: str, *, override: bool = False) -> None:
    """Rejects a mapping that YAML flow syntax without spaces produced: keys holding no value (``None``) or keys
    containing ``:``. ``{depth:6,patch_size:8}`` parses to ``{"depth:6": None, "patch_size:8": None}``, and
    ``timm.create_model`` drops None-valued kwargs, so such a value would otherwise be lost without a word.

    Raises:
        ConfigError: names the key and the correct spelling (``{depth: 6, patch_size: 8}``, quoted on a command
            line).
    """
    bad = [k for k, v in value.items() if v is None or (isinstance(k, str) and ":" in k)]
    if not bad:
        for k, v in value.items():
            if isinstance(v, dict):
                check_mapping(v, f"{key}.{k}", override=override)
        return
    items = []
    for k, v in value.items():
        if isinstance(k, str) and ":" in k and v is None:
            name, text = k.split(":", 1)
            items.append(f"{name.strip()}: {text.strip()}")
        elif v is None:
            items.append(f"{k}: <value>")
        else:
            items.append(f"{k}: {_flow(v)}")
    spelling = "{" + ", ".join(items) + "}"
    first = bad[0]
    if isinstance(first, str) and ":" in first:
        problem = f"key '{first}' contains ':' (YAML reads 'name:value' without a space as one key with no value)"
    else:
        problem = f"key '{first}' has no value (timm drops None-valued arguments without a word)"
    fix = f'--set "{key}={spelling}"' if override else f"{key}: {spelling}"
    raise ConfigError(f"{key}: {problem}; write {fix} (a space after each ':')")


def _merge(obj: Any, updates: dict, prefix: str = "") -> Any:
    """Returns a copy of dataclass ``obj`` with ``updates`` applied; unknown keys raise."""
    if not isinstance(updates, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {updates!r}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    changes = {}
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown key '{full}' (valid keys here: {', '.join(names)})")
        current = getattr(obj, key)
        if isinstance(current, MethodCfg):
            changes[key] = _merge_method(current, value, f"{full}.")
        elif dataclasses.is_dataclass(current):
            changes[key] = _merge(current, value, f"{full}.")
        else:
            changes[key] = _coerce(value, hints[key], full)
    return dataclasses.replace(obj, **changes)


def _merge_method(current: MethodCfg, updates: Any, prefix: str) -> MethodCfg:
    """The ``method:`` section: ``name`` picks the method's dataclass (its defaults when the name changes), whose
    keys are the only ones accepted."""
    from .methods import method_config

    where = prefix.rstrip(".")
    if not isinstance(updates, dict):
        raise ConfigError(f"{where}: expected a mapping {{name: <method>, <its keys>}}, got {updates!r}")
    name = _coerce(updates.get("name", current.name), str, f"{prefix}name")
    cls = method_config(name)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in updates if k not in valid]
    if unknown:
        raise ConfigError(f"unknown key '{prefix}{unknown[0]}' for method {name} (valid keys of {name}: "
                          f"{', '.join(valid)})")
    return _merge(current if type(current) is cls else cls(), updates, prefix)


# keys of the layout before the ``method:`` section (model.<key> and mask.<key> -> method.<new key>)
_OLD_MODEL_KEYS = ("target", "norm_pix_loss", "hog_bins", "hog_cell", "decoder_dim", "decoder_depth", "decoder_heads")
_OLD_MASK_KEYS = {"ratio": "mask_ratio", "block_size": "block_size"}


def upgrade_pretrain_layout(data: dict) -> tuple[dict, list[str]]:
    """Moves the keys of a pre-training config (or a checkpoint's saved config) written in the old layout into the
    ``method:`` section.

    Old: ``method: fastmim``, ``mask: {ratio, block_size}``, ``model.{target, norm_pix_loss, hog_bins, hog_cell,
    decoder_dim, decoder_depth, decoder_heads}``. New: ``method: {name: fastmim, mask_ratio, block_size, target,
    ...}``. A moved key that the chosen method does not have is dropped (and listed): in the old layout every
    method took every key (MixMIM's ``mask.block_size`` had to equal the encoder stride; its mask lives on the
    last-stage grid now). A key given in both layouts keeps its ``method:`` value.

    Returns:
        (the dict in the new layout (a copy), the moves made as ``"mask.ratio -> method.mask_ratio"``; empty when the
        dict was in the new layout already).
    """
    out = copy.deepcopy(data)
    moves: list[str] = []
    method = out.get("method")
    if isinstance(method, str):
        out["method"] = {"name": method}
        moves.append(f"method: {method} -> method.name: {method}")
    model, mask = out.get("model"), out.get("mask")
    moved = {}
    if isinstance(model, dict):
        for k in _OLD_MODEL_KEYS:
            if k in model:
                moved[k] = model.pop(k)
                moves.append(f"model.{k} -> method.{k}")
    if isinstance(mask, dict):
        del out["mask"]
        for k, v in mask.items():
            new = _OLD_MASK_KEYS.get(k, k)
            moved[new] = v
            moves.append(f"mask.{k} -> method.{new}")
    if moved:
        section = out.setdefault("method", {})
        if not isinstance(section, dict):
            return out, moves  # loading names the problem
        from .methods import method_config

        name = section.get("name", _default_method().name)
        try:
            valid = {f.name for f in dataclasses.fields(method_config(name))}
        except ConfigError:
            return out, moves  # loading names the unknown method
        for k in [k for k in moved if k not in valid]:
            moves.append(f"{k} dropped (method {name} has no such key)")
            del moved[k]
        section.update({k: v for k, v in moved.items() if k not in section})
    return out, moves


def _parse_override(item: str) -> dict:
    """``"optim.blr=1e-4"`` -> ``{"optim": {"blr": 1e-4}}`` (the value is parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form section.key=value")
    dotted, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{item}': the value is not valid YAML ({str(e).splitlines()[0]})") from None
    if isinstance(value, dict):
        check_mapping(value, dotted.strip(), override=True)
    nested: dict = {}
    node = nested
    parts = dotted.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return nested


def _deep_update(base: dict, new: dict) -> dict:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v
    return base


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None):
    """Builds a ``cls`` config from defaults, an optional YAML file and dotted overrides.

    Args:
        cls: :class:`PretrainCfg` or :class:`FinetuneCfg`.
        path: YAML file holding only what differs from the defaults (``None``: defaults only).
        overrides: ``["optim.blr=1.5e-4", "train.epochs=10"]``; values are parsed as YAML.

    Raises:
        ConfigError: unknown key, wrong type, unreadable file.
    """
    updates: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping")
        updates = loaded
    for item in overrides or []:
        _deep_update(updates, _parse_override(item))
    if cls is PretrainCfg:
        updates, moves = upgrade_pretrain_layout(updates)
        if moves:
            logger.warning("config in the old layout (before the method: section), read as the new one: %s; write "
                           "it that way (method: {name: <method>, <its keys>})", "; ".join(moves))
    return _merge(cls(), updates)


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples as lists) for YAML/JSON/checkpoints."""

    def conv(v):
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, list):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(dataclasses.asdict(cfg))


def dump_yaml(cfg: Any, derived: "Resolved | None" = None) -> str:
    data = to_dict(cfg)
    if derived is not None:
        data["derived"] = dataclasses.asdict(derived)
    return yaml.safe_dump(data, sort_keys=False)


# ----------------------------------------------------------------------------------------------- derived


@dataclass(frozen=True)
class Resolved:
    """Values derived once from a config and the world size; logged and saved with the run."""

    world_size: int
    eff_batch: int  # images per optimizer step = micro_batch * grad_accum * world_size
    lr: float  # peak lr = blr * eff_batch / 256
    min_lr: float


def resolve(optim: OptimCfg, train: TrainCfg, world_size: int) -> Resolved:
    """Computes the batch arithmetic and lr scaling rule (MAE ``main_pretrain.py``).

    Raises:
        ConfigError: non-positive batch sizes or world size.
    """
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    if train.micro_batch < 1:
        raise ConfigError(f"train.micro_batch must be >= 1, got {train.micro_batch}")
    if train.grad_accum < 1:
        raise ConfigError(f"train.grad_accum must be >= 1, got {train.grad_accum}")
    eff = train.micro_batch * train.grad_accum * world_size
    lr = optim.blr * eff / 256
    if not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"optim.blr must be > 0, got {optim.blr}")
    return Resolved(world_size=world_size, eff_batch=eff, lr=lr, min_lr=optim.min_lr)
