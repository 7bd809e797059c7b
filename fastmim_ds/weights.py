"""Checkpoint -> weights: the one place that turns anything a user points at into fp32 tensors, and names the
classifier built from them.

Every consumer of trained weights goes through here: fine-tuning and the linear probe
(:func:`load_pretrained_encoder`), export to timm, inference and reconstruction pictures (:func:`load_module_state`),
and the run naming / pre-launch checks of classifier runs (:func:`classifier_arch`, :func:`pretrain_config_of`).

Where the weights of a DeepSpeed tag live depends on its ZeRO stage, read from the ``ds_config`` that DeepSpeed
stores in the tag's model-states file (one rule, :func:`~fastmim_ds.checkpoint.zero_stage`):

* stage 0 (the linear probe's engine): the module states file holds the full weights;
* stages 1-3: the fp32 master weights are partitioned over ``*optim_states.pt`` shards and are consolidated with
  DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` (the module states of a bf16 run hold bf16 copies only).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from .checkpoint import model_states_file, read_client_state, resolve_tag_dir, zero_stage
from .runtime import stdout_to_log

logger = logging.getLogger(__name__)

__all__ = ["load_module_state", "load_pretrained_encoder", "pretrain_config_of", "classifier_arch"]


def _tag_state(tag_dir: Path) -> dict[str, torch.Tensor]:
    """All module weights of a tag in fp32, full names (as the module's ``state_dict``)."""
    if zero_stage(tag_dir) == 0:
        state = torch.load(model_states_file(tag_dir), map_location="cpu", weights_only=False)["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with stdout_to_log(logger, stderr=True):  # "Reconstructed fp32 state dict ...", progress bars, per rank
            state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    return {k: v.float() for k, v in state.items()}


def _strip(state: dict[str, torch.Tensor], prefix: str, *, required: bool) -> dict[str, torch.Tensor]:
    if not prefix:
        return dict(state)
    if any(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return {} if required else dict(state)  # a plain file of the encoder alone


def load_module_state(path: str | Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """fp32 weights of the module under ``prefix`` (stripped) in a DeepSpeed checkpoint, at any ZeRO stage.

    Args:
        path: run folder, ``<run>/ckpt`` or tag folder.
        prefix: ``""`` for the whole module (a MIM model with its decoder, a classifier), ``"encoder."`` for the
            encoder of a MIM model.

    Raises:
        FileNotFoundError: no complete checkpoint at ``path``.
    """
    return _strip(_tag_state(resolve_tag_dir(Path(path))), prefix, required=True)


def load_pretrained_encoder(path: str | Path, prefix: str = "encoder.") -> tuple[dict[str, torch.Tensor], dict]:
    """The fp32 encoder weights of a pre-training run, from whatever form it takes.

    Args:
        path: run folder, ``<run>/ckpt``, a tag folder, a ``.pth``/``.safetensors`` state dict (keys with or
            without ``prefix``), or a pre-training YAML config: its model as the run would start (untrained, seeded
            with ``train.seed``), the baseline that shows what pre-training added.
        prefix: module prefix of the encoder inside the MIM model.

    Returns:
        (state dict with ``prefix`` stripped, pre-training config dict or {} for plain files).

    Raises:
        FileNotFoundError: nothing loadable at ``path``.
    """
    path = Path(path)
    if path.is_file() and path.suffix in (".yaml", ".yml"):  # the untrained baseline: the run's initialisation
        from .config import to_dict
        from .methods import initial_mim_model

        model, pre_cfg = initial_mim_model(path)
        state, cfg = model.state_dict(), to_dict(pre_cfg)
    elif path.is_file():
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state, cfg = load_file(str(path)), {}
        else:
            obj = torch.load(path, map_location="cpu", weights_only=False)
            state = obj.get("model", obj.get("module", obj)) if isinstance(obj, dict) else obj
            cfg = obj.get("config", {}) if isinstance(obj, dict) else {}
    else:
        tag_dir = resolve_tag_dir(path)
        state, cfg = _tag_state(tag_dir), read_client_state(tag_dir).get("config", {})
    return {k: v.float() for k, v in _strip(state, prefix, required=False).items()}, cfg


def pretrain_config_of(pretrained: str | Path) -> dict:
    """The pre-training config of what ``model.pretrained`` points at, read without any weights: a checkpoint's
    (run folder, ``<run>/ckpt`` or tag) or a pre-training YAML's; ``{}`` for plain weight files, an empty path or
    an unreadable checkpoint.

    Raises:
        ConfigError: a YAML config that does not load.
    """
    p = Path(pretrained) if pretrained else None
    if p is not None and p.is_file() and p.suffix in (".yaml", ".yml"):
        from .config import PretrainCfg, load_config, to_dict

        return to_dict(load_config(PretrainCfg, p))
    if p is None or p.is_file():
        return {}
    try:
        return read_client_state(resolve_tag_dir(p)).get("config", {})
    except (FileNotFoundError, OSError, RuntimeError):
        return {}


def classifier_arch(model: dict, pretrain_config: dict, default_name: str = "") -> tuple[str, dict]:
    """The timm name and ``create_model`` kwargs of a classifier run: the one rule fine-tuning, the linear probe,
    export and the pre-launch checks share.

    ``model.name``/``model.kwargs`` when a name is given; otherwise the pre-trained encoder's
    (``pretrain_config['model']['encoder'/'encoder_kwargs']``), so ``make finetune PRETRAINED=<run>`` needs no name.

    Args:
        model: a classifier config's ``model`` section as a dict (``name``, ``kwargs``).
        pretrain_config: the pre-training run's config dict (``{}`` when none).
        default_name: used when neither names a model (e.g. the ``model_name`` a checkpoint recorded).

    Returns:
        (name, kwargs); the name is ``""`` when nothing names one.
    """
    pre = pretrain_config.get("model", {})
    name = model.get("name") or pre.get("encoder") or default_name
    kwargs = model.get("kwargs") if (model.get("kwargs") or model.get("name")) else pre.get("encoder_kwargs", {})
    return name, dict(kwargs or {})
