"""Pre-launch checks: every config problem is one line naming the key, raised before any rank starts.

``fastmim-ds check pretrain|finetune`` runs these (``make pretrain``/``make finetune`` call it before the
``deepspeed`` launcher); every rank runs them again at start-up. Models are built on the ``meta`` device, so
checking a ViT-L config takes milliseconds and no memory.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
from pathlib import Path

import torch

from .config import (
    ConfigError,
    FinetuneCfg,
    PretrainCfg,
    Resolved,
    SettingError,
    check_mapping,
    resolve,
    to_dict,
    upgrade_pretrain_layout,
)
from .data import DatasetInfo, dataset_info, labeled_indices
from .ds_engine import load_ds_config
from .trackers import check_tracker_packages
from .weights import classifier_arch, pretrain_config_of

__all__ = ["check_pretrain", "check_finetune", "check_common", "check_resume_compatible", "check_dataset",
           "check_num_classes", "check_labeled",
           "check_model_kwargs", "check_classifier_kwargs"]


def check_common(data, optim, train, world_size: int, *, need_val: bool) -> Resolved:
    """Checks shared by every training command (schedule, files, batch arithmetic, DeepSpeed JSON); returns the
    derived values.

    Raises:
        ConfigError: one line naming the key and the fix.
    """
    derived = resolve(optim, train, world_size)
    if train.epochs < 1:
        raise ConfigError(f"train.epochs must be >= 1, got {train.epochs}")
    if optim.warmup_epochs >= train.epochs:
        raise ConfigError(f"optim.warmup_epochs={optim.warmup_epochs} must be < train.epochs={train.epochs}")
    if not 0.0 < optim.layer_decay <= 1.0:
        raise ConfigError(f"optim.layer_decay must be in (0, 1], got {optim.layer_decay}")
    if optim.clip_grad < 0:
        raise ConfigError(f"optim.clip_grad must be >= 0 (0 = off), got {optim.clip_grad}")
    if not (0.0 < data.rrc_scale[0] <= data.rrc_scale[1] <= 1.0):
        raise ConfigError(f"data.rrc_scale must satisfy 0 < min <= max <= 1, got {list(data.rrc_scale)}")
    train_info = check_dataset(data, "train")
    if need_val:
        check_dataset(data, "val")
    for key, low in (("ckpt_every", 1), ("ckpt_every_steps", 0), ("keep_last", 1), ("log_every", 1),
                     ("max_nonfinite", 1), ("max_steps_per_epoch", 0)):
        if getattr(train, key) < low:
            raise ConfigError(f"train.{key} must be >= {low}, got {getattr(train, key)}")
    if not 0 < data.labels_fraction <= 1:
        raise ConfigError(f"data.labels_fraction must be in (0, 1], got {data.labels_fraction}")
    if data.labels_per_class < 0:
        raise ConfigError(f"data.labels_per_class must be >= 0, got {data.labels_per_class}")
    load_ds_config(train.ds_config)
    check_tracker_packages(train)
    subset = labeled_indices(data)
    n = train_info.num_images if subset is None else len(subset)
    per_update = train.micro_batch * train.grad_accum * world_size
    if n < per_update:
        raise ConfigError(f"train.micro_batch: {train.micro_batch} x {train.grad_accum} accumulation x {world_size} "
                          f"ranks = {per_update} images per step, but {data.train} holds {n}; lower it")
    return derived


# keyword arguments that timm's builders take out of **kwargs before the model class sees them
# (timm.models._builder.build_model_with_cfg and the families' _create_* helpers)
TIMM_BUILDER_KWARGS = {"features_only", "out_indices", "feature_cls", "pruned"}


def _accepted_kwargs(name: str) -> tuple[str, set[str]] | None:
    """(model class name, keyword arguments ``timm.create_model(name, **kwargs)`` passes on to something that uses
    them), or None when that cannot be known (a constructor taking ``**kwargs``, an entrypoint of unknown class)."""
    import timm
    from timm.models import build_model_with_cfg, model_entrypoint

    from . import models  # noqa: F401  (registers the mixmim_* entrypoints)

    if not timm.is_model(name):
        return None  # the model build names the problem
    entry = model_entrypoint(name)
    try:
        cls = inspect.signature(entry, eval_str=True).return_annotation
    except (NameError, TypeError, ValueError):
        return None
    if not inspect.isclass(cls):
        return None
    accepted: set[str] = set(TIMM_BUILDER_KWARGS)
    for fn in (cls.__init__, entry, timm.create_model, build_model_with_cfg):
        params = inspect.signature(fn).parameters.values()
        if fn is cls.__init__ and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return None  # the class takes anything: no way to tell a typo from an argument
        accepted |= {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return cls.__name__, accepted - {"self", "model_cls", "variant", "model_name", "kwargs"}


def check_model_kwargs(name: str, kwargs: dict, key: str) -> None:
    """Checks the keyword arguments ``kwargs`` of timm model ``name`` against its constructor's signature.

    The class comes from the timm registry (the entrypoint's return annotation); its ``__init__`` parameters, the
    entrypoint's and timm's builder arguments are accepted. Nothing is dropped: an argument no constructor takes
    stops the run before launch.

    Raises:
        ConfigError: one line naming ``key``, the unknown arguments and, where one is close, the likely spelling.
    """
    check_mapping(kwargs, key)
    if not kwargs:
        return
    known = _accepted_kwargs(name)
    if known is None:
        return
    cls_name, accepted = known
    unknown = [str(k) for k in kwargs if k not in accepted]
    if not unknown:
        return
    close = {k: m[0] for k in unknown if (m := difflib.get_close_matches(k, sorted(accepted), n=1))}
    if len(unknown) == 1:
        hint = f" (did you mean '{close[unknown[0]]}'?)" if close else ""
        what = f"argument '{unknown[0]}'"
    else:
        hint = f" (did you mean {', '.join(f'{v!r} for {k!r}' for k, v in close.items())}?)" if close else ""
        what = f"arguments {', '.join(repr(k) for k in unknown)}"
    raise ConfigError(f"{key}: {cls_name} ({name}) takes no {what}{hint}")


def check_classifier_kwargs(model) -> None:
    """Checks ``model.kwargs`` of a classifier config (fine-tuning, linear probe) against the constructor of
    ``model.name``, or of the pre-trained encoder when the name is empty (``create_classifier``'s rule).

    Raises:
        ConfigError: as :func:`check_model_kwargs`.
    """
    check_mapping(model.kwargs, "model.kwargs")
    if model.kwargs:
        name = classifier_arch({"name": model.name}, pretrain_config_of(model.pretrained))[0]
        if name:
            check_model_kwargs(name, model.kwargs, "model.kwargs")


def _check_stages(cfg: PretrainCfg, world_size: int) -> None:
    stages = cfg.stages()
    if cfg.progressive:
        starts = [s.start_epoch for s in stages]
        if starts[0] != 0:
            raise ConfigError(f"progressive: the first stage must start at epoch 0, got {starts[0]}")
        if any(b <= a for a, b in zip(starts, starts[1:])):
            raise ConfigError(f"progressive: start epochs must increase, got {starts}")
        if starts[-1] >= cfg.train.epochs:
            raise ConfigError(f"progressive: stage start {starts[-1]} is not before train.epochs={cfg.train.epochs}")
    if len({s.img_size for s in stages}) > 1 and Path(cfg.train.ds_config).is_file():
        if load_ds_config(cfg.train.ds_config).get("zero_optimization", {}).get("stage", 0) == 3:
            raise ConfigError("progressive: changing the image size reshapes parameters (position embeddings, window "
                              "bias tables), which ZeRO-3 keeps partitioned across ranks; use a ZeRO-1/2 config "
                              f"(ds_configs/zero2_bf16.json), not {cfg.train.ds_config}")
    for s in stages:
        where = f"progressive stage from epoch {s.start_epoch}" if cfg.progressive else "train"
        if s.micro_batch < 1 or s.grad_accum < 1 or s.img_size < 1:
            raise ConfigError(f"{where}: size, micro batch and grad accumulation must be >= 1, got {s}")


def _check_eval(cfg: PretrainCfg, *, check_files: bool) -> None:
    ev = cfg.eval
    for key in ("skill_every", "knn_every", "knn_bank_images"):
        if getattr(ev, key) < 0:
            raise ConfigError(f"eval.{key} must be >= 0, got {getattr(ev, key)}")
    for key in ("skill_images", "skill_mean_images", "knn_k", "batch_size"):
        if getattr(ev, key) < 1:
            raise ConfigError(f"eval.{key} must be >= 1, got {getattr(ev, key)}")
    if ev.knn_temperature <= 0:
        raise ConfigError(f"eval.knn_temperature must be > 0, got {ev.knn_temperature}")
    if check_files and ev.knn_every and not check_dataset(cfg.data, "train").labeled:
        raise ConfigError(f"eval.knn_every: k-NN accuracy needs labels, and {cfg.data.train} is unlabeled; "
                          "set eval.knn_every=0")
    if check_files and ev.knn_every and not Path(cfg.data.val).is_file():
        raise ConfigError(f"eval.knn_every: the k-NN queries come from data.val, and {cfg.data.val} is not found; "
                          "set data.val or eval.knn_every=0")


def check_pretrain(cfg: PretrainCfg, world_size: int, *, check_files: bool = True) -> Resolved:
    """Validates a pre-training config for ``world_size`` ranks; returns the derived values (first stage).

    Checks the model at every image size it will see (``data.img_size`` and each FastMIM-P stage: mask grid,
    patch/stride, Swin windows, HOG cells), the stage schedule, batch arithmetic, files and the DeepSpeed config.

    Raises:
        ConfigError: one line naming the key and the fix.
    """
    from .methods import METHODS, create_mim_model, method_config

    method_config(cfg.method.name)  # a known method (ConfigError listing the choices)
    _check_stages(cfg, world_size)
    METHODS[cfg.method.name].check(cfg, world_size)  # the method's own pre-launch checks
    check_model_kwargs(cfg.model.encoder, cfg.model.encoder_kwargs, "model.encoder_kwargs")
    try:
        with torch.device("meta"):
            model = create_mim_model(cfg.method, cfg.model, cfg.data.img_size)
    except SettingError as e:  # the model or method names the key of the value that does not fit
        raise ConfigError(str(e)) from None
    except (ValueError, TypeError, RuntimeError) as e:
        raise ConfigError(f"model: {e}") from None
    for s in cfg.stages():
        try:
            model.check_img_size(s.img_size)
        except ValueError as e:
            detail = e.message if isinstance(e, SettingError) else e  # the stage's size, not data.img_size
            raise ConfigError(f"progressive: stage from epoch {s.start_epoch}: {detail}") from None
    _check_eval(cfg, check_files=check_files)
    first = cfg.stages()[0]
    train = dataclasses.replace(cfg.train, micro_batch=first.micro_batch, grad_accum=first.grad_accum)
    if check_files:
        return check_common(cfg.data, cfg.optim, train, world_size, need_val=False)
    return resolve(cfg.optim, train, world_size)


# config sections that fix parameter shapes and what is learned: a resumed run must keep them (except the keys in
# RESUME_FREE, which change no shape)
ARCH_KEYS = ("method", "model")
RESUME_FREE = {"drop_path", "pretrained", "grad_checkpointing"}


def check_resume_compatible(cfg, saved: dict, tag_dir: Path, *, world_size: int | None = None,
                            zero_stage: int | None = None) -> None:
    """Refuses to resume ``tag_dir`` (trained with config ``saved``) under a config with another model, or (with
    ``world_size``) on another number of ranks than the checkpoint's (its ``complete`` marker's ``world_size``) when
    the two cannot meet: one of the checkpoint and the run (``zero_stage``, default ``train.ds_config``'s) is ZeRO-0
    and the other partitions (stage 1-3). Other world sizes are fine: :func:`~fastmim_ds.checkpoint.load`
    re-partitions (universal checkpoint).

    Raises:
        ConfigError: names the first differing key, both values and the fix; or the two world sizes, the ZeRO
            stages and what to do.
    """
    from .checkpoint import repartition_refusal, written_world_size

    if world_size is not None:
        if zero_stage is None:
            zero_stage = load_ds_config(cfg.train.ds_config).get("zero_optimization", {}).get("stage", 0)
        problem = repartition_refusal(tag_dir, world_size, zero_stage)
        if problem:
            raise ConfigError(f"train.ds_config: {problem} ({cfg.train.ds_config}): resume with the checkpoint's ZeRO "
                              f"stage (0 or 1-3), or on {written_world_size(tag_dir)} ranks")
    now = to_dict(cfg)
    if isinstance(cfg, PretrainCfg):
        saved = upgrade_pretrain_layout(saved)[0]  # a checkpoint written before the method: section
    for section in ARCH_KEYS:
        a, b = saved.get(section), now.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            a = {k: v for k, v in a.items() if k not in RESUME_FREE}
            b = {k: v for k, v in b.items() if k not in RESUME_FREE}
        if a is None or a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            key = next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
            raise ConfigError(f"{section}.{key}: the checkpoint {tag_dir} was trained with {a.get(key)!r}, the config "
                              f"says {b.get(key)!r}; resume with the same value or start a new run (train.run_name)")
        raise ConfigError(f"{section}: the checkpoint {tag_dir} was trained with {a!r}, the config says {b!r}")


def check_dataset(data, key: str) -> DatasetInfo:
    """The :func:`~fastmim_ds.data.dataset_info` of ``data.<key>`` (``train`` or ``val``).

    Raises:
        ConfigError: one line naming the key: the file is missing, or is not a prepared dataset.
    """
    path = getattr(data, key)
    try:
        return dataset_info(path)
    except FileNotFoundError:
        raise ConfigError(f"data.{key}: {path} not found (create it with `make prepare-data SRC=<imagefolder> "
                          "OUT=...`)") from None
    except ValueError as e:
        raise ConfigError(f"data.{key}: {e}") from None


def check_labeled(data, command: str) -> None:
    """Refuses an unlabeled dataset (``prepare`` of a folder without classes) for a command that needs labels.

    Raises:
        ConfigError: one line naming the key, the file and what to do (or that the file is missing).
    """
    for key in ("train", "val"):
        if not check_dataset(data, key).labeled:
            raise ConfigError(f"data.{key}: {getattr(data, key)} is unlabeled (prepared from images without "
                              f"classes); {command} needs labels: prepare a labeled set (train/<class>/, "
                              "val/<class>/) for it, and use this one for pre-training")


def check_num_classes(cfg) -> None:
    """Refuses ``model.num_classes: 0`` (take the dataset's) of a classifier config whose train set names no classes.

    Raises:
        ConfigError: one line naming the key and the fix.
    """
    if cfg.model.num_classes == 0 and not check_dataset(cfg.data, "train").classes:
        raise ConfigError(f"model.num_classes: 0 needs {Path(cfg.data.train).with_name('classes.json')}; set it")


def check_finetune(cfg: FinetuneCfg, world_size: int, *, check_files: bool = True) -> Resolved:
    """Validates a fine-tuning config (pre-trained weights, classes, classifier build).

    Raises:
        ConfigError: one line naming the key and the fix.
    """
    from .checkpoint import resolve_tag_dir

    if check_files:
        check_labeled(cfg.data, "fine-tuning")
    if cfg.model.pretrained:
        p = Path(cfg.model.pretrained)
        if not p.is_file():
            try:
                resolve_tag_dir(p)
            except FileNotFoundError as e:
                raise ConfigError(f"model.pretrained: {e}") from None
    elif not cfg.model.name:
        raise ConfigError("model.name: give a timm model name, or model.pretrained to take the pre-trained encoder's")
    check_classifier_kwargs(cfg.model)
    if check_files:
        check_num_classes(cfg)
    if not 0 <= cfg.aug.smoothing < 1:
        raise ConfigError(f"aug.smoothing must be in [0, 1), got {cfg.aug.smoothing}")
    if check_files:
        return check_common(cfg.data, cfg.optim, cfg.train, world_size, need_val=True)
    return resolve(cfg.optim, cfg.train, world_size)
