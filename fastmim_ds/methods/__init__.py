"""Masked image modeling methods: one contract, a registry, and the builder the trainer uses.

A method is an ``nn.Module`` subclass of :class:`MIMMethod` around an encoder (a timm backbone and its family's
adapter, :mod:`fastmim_ds.models.adapters`). The trainer (``pretrain.py``), the pre-launch checks
(``validate.py``), the pictures (``visualize.py``), the quality monitor (``quality.py``), k-NN, checkpoints,
resume and export only use this contract, so adding a method is one module plus one line in :data:`METHODS`
(or :func:`register_method` from outside the package):

======================  =================================================================================
``name``                 the config's ``method.name``
``config``               its dataclass (subclass of :class:`~fastmim_ds.config.MethodCfg`): the ``method:``
                         section, parsed strictly (another method's key is a one-line ConfigError)
``build(model, method,   classmethod: the model from the ``model:`` section (encoder), the method section and
img_size)``              the image size it is built for
``forward(imgs, mask)``  ``{"loss", "pred", "target", "mask"}`` (shapes below)
``draw_mask(B, (H, W),`` the masks ``forward`` takes, from a ``torch.Generator`` (pictures, quality monitor)
``generator=...)``
``set_img_size(s)``      prepares for (B, 3, s, s) inputs between epochs (FastMIM-P stages); ``check_img_size``
``check(cfg, world)``    classmethod: pre-launch checks beyond building the model (ConfigError, one line)
``reconstruct(imgs,``    what a reconstruction picture needs: the forward outputs plus ``masked`` (the input
``generator)``           as the encoder saw it)
``no_weight_decay()``    full parameter names without weight decay besides 1-D ones
``encoder``, ``adapter`` the backbone (what fine-tuning, k-NN and export take) and its family's adapter
``target``, ``stride``   the target module (:mod:`fastmim_ds.targets`: HOG or pixels) and px per token
======================  =================================================================================

Shapes: ``imgs`` (B, 3, H, W) mean/std-normalised, any float dtype; ``pred`` and ``target`` (B, N, D) with N =
(H / stride) * (W / stride) tokens row-major and D values per token (``target`` fp32, computed from the unmasked
image); ``mask`` (B, N) bool, **True = masked** (hidden from the encoder, predicted); ``loss`` scalar fp32.

Methods: :class:`~fastmim_ds.methods.fastmim.FastMIM` (arXiv 2212.06593), :class:`~fastmim_ds.methods.mixmim.MixMIM`
(arXiv 2205.13137), :class:`~fastmim_ds.methods.mae.MAE` (arXiv 2111.06377) and
:class:`~fastmim_ds.methods.simmim.SimMIM` (arXiv 2111.09886).
"""
from __future__ import annotations

import abc
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn as nn

from ..config import ConfigError, MethodCfg, MIMModelCfg, PretrainCfg, SettingError, load_config
from ..masking import BlockMaskGenerator, upsample_mask
from ..models import set_grad_checkpointing
from ..models.adapters import EncoderAdapter

__all__ = [
    "MIMMethod", "BlockMaskedMethod", "METHODS", "register_method", "method_config", "create_mim_model",
    "initial_mim_model", "FastMIM", "MixMIM", "MAE", "SimMIM",
]


class MIMMethod(nn.Module, metaclass=abc.ABCMeta):
    """Base class (and contract) of a masked image modeling method; see the module docstring.

    Subclasses set the class attributes ``name`` and ``config`` and, in ``__init__``, the attributes ``encoder``,
    ``adapter``, ``target`` and ``stride``; they implement :meth:`build`, :meth:`forward` and :meth:`draw_mask`.
    The other methods have defaults that fit a method whose encoder takes the whole image through its adapter.
    """

    name: ClassVar[str]
    config: ClassVar[type[MethodCfg]]
    encoder: nn.Module
    adapter: EncoderAdapter
    target: nn.Module
    stride: int

    @classmethod
    @abc.abstractmethod
    def build(cls, model: MIMModelCfg, method: MethodCfg, img_size: int) -> "MIMMethod":
        """The pre-training model for (B, 3, img_size, img_size) inputs.

        Raises:
            ValueError: an encoder the method cannot train, or an image size / mask geometry that does not fit.
        """

    @abc.abstractmethod
    def forward(self, imgs: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Masked reconstruction loss of a batch.

        Args:
            imgs: (B, 3, H, W) mean/std-normalised images.
            mask: a mask as :meth:`draw_mask` returns for this batch; ``None`` draws one from the global RNG.

        Returns:
            ``loss`` scalar fp32; ``pred`` (B, N, D); ``target`` (B, N, D) fp32; ``mask`` (B, N) bool, True = masked.
        """

    @abc.abstractmethod
    def draw_mask(self, batch_size: int, img_size: tuple[int, int], *, device: torch.device | str = "cpu",
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """A mask for a batch of ``batch_size`` (H, W) images, in the layout :meth:`forward` takes (first dimension
        B, True = masked); ``generator`` None uses the global torch RNG."""

    def check_img_size(self, img_size: int) -> None:
        """Raises ValueError (naming sizes or keys that work) when the model cannot take ``img_size`` px inputs."""
        self.adapter.check_img_size(self.encoder, img_size)
        self.target.check((img_size, img_size), self.stride)

    def set_img_size(self, img_size: int) -> None:
        """Prepares the model for (B, 3, img_size, img_size) inputs (FastMIM-P stages); parameters keep their
        identity, so optimizer and DeepSpeed state stay valid.

        Raises:
            ValueError: as :meth:`check_img_size`.
        """
        self.check_img_size(img_size)
        self.adapter.set_img_size(self.encoder, img_size)

    @classmethod
    def check(cls, cfg: PretrainCfg, world_size: int) -> None:
        """Pre-launch checks of a config for this method beyond building the model (the trainer builds it on the
        ``meta`` device and checks every stage's image size itself). Raises ConfigError with one line."""

    def no_weight_decay(self) -> set[str]:
        """Full parameter names without weight decay besides 1-D ones: the encoder's (position and class tokens)
        and the mask token when the method has one."""
        names = {f"encoder.{n}" for n in self.adapter.no_weight_decay(self.encoder)}
        return names | ({"mask_token"} if isinstance(getattr(self, "mask_token", None), nn.Parameter) else set())

    def picture_fill(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W): what masked pixels show in the picture's "masked input" panel; default 0 (the mean colour,
        for methods that mask in token space)."""
        return torch.zeros_like(imgs)

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The forward outputs of ``imgs`` under a mask from ``generator``, plus ``masked``: (B, 3, H, W) the input as
        the encoder saw it (masked tokens' pixels from :meth:`picture_fill`). Mode (train/eval) is the caller's."""
        B, _, H, W = imgs.shape
        out = dict(self(imgs, self.draw_mask(B, (H, W), device=imgs.device, generator=generator)))
        token_mask = out["mask"].view(B, H // self.stride, W // self.stride)
        pixel = upsample_mask(token_mask, self.stride).unsqueeze(1)  # (B, 1, H, W)
        out["masked"] = torch.where(pixel, self.picture_fill(imgs).to(imgs.dtype), imgs)
        return out


class BlockMaskedMethod(MIMMethod):
    """A method whose masks are per-sample random square blocks (``mask_generator``, a
    :class:`~fastmim_ds.masking.BlockMaskGenerator` set in ``__init__``): FastMIM, MAE (one patch per block), SimMIM."""

    mask_generator: BlockMaskGenerator

    def check_img_size(self, img_size: int) -> None:
        """Raises ValueError when ``img_size`` does not fit the mask grid, the encoder or the target."""
        if img_size % self.mask_generator.block_size:
            raise SettingError(
                "data.img_size",
                f"image size {img_size} is not divisible by the mask block size {self.mask_generator.block_size}"
            )
        super().check_img_size(img_size)

    def draw_mask(self, batch_size: int, img_size: tuple[int, int], *, device: torch.device | str = "cpu",
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, H / block_size, W / block_size) bool per-sample block mask, True = masked."""
        return self.mask_generator(batch_size, img_size, device=device, generator=generator)


# method name -> class; a new method = one module + one line here (or register_method from outside)
METHODS: dict[str, type[MIMMethod]] = {}


def register_method(cls: type[MIMMethod]) -> type[MIMMethod]:
    """Adds a :class:`MIMMethod` subclass under ``cls.name`` (usable as a class decorator); returns ``cls``.

    Raises:
        ValueError: ``cls`` is no MIMMethod, its ``config`` is no MethodCfg dataclass whose ``name`` default is
            ``cls.name``, or the name is taken by another class.
    """
    if not (isinstance(cls, type) and issubclass(cls, MIMMethod)):
        raise ValueError(f"{cls!r} is not a MIMMethod subclass")
    cfg = getattr(cls, "config", None)
    if not (isinstance(cfg, type) and issubclass(cfg, MethodCfg)) or cfg().name != cls.name:
        raise ValueError(f"{cls.__name__}.config must be a MethodCfg dataclass with name '{cls.name}' by default")
    if METHODS.get(cls.name, cls) is not cls:
        raise ValueError(f"method '{cls.name}' is already registered ({METHODS[cls.name].__name__})")
    METHODS[cls.name] = cls
    return cls


def method_config(name: str) -> type[MethodCfg]:
    """The config dataclass of method ``name``.

    Raises:
        ConfigError: unknown method (lists the registered ones).
    """
    if name not in METHODS:
        raise ConfigError(f"method.name: unknown '{name}' (choices: {', '.join(METHODS)})")
    return METHODS[name].config


def create_mim_model(method: MethodCfg, model: MIMModelCfg, img_size: int) -> MIMMethod:
    """Builds the pre-training model of ``method`` (its config section) around the encoder of ``model``.

    Raises:
        ConfigError: unknown method.
        ValueError: an encoder the method cannot use, or an image size the model cannot take.
        TypeError: ``method`` is not the registered method's config class.
    """
    cls = METHODS.get(method.name)
    if cls is None:
        method_config(method.name)  # raises, listing the choices
    if not isinstance(method, cls.config):
        raise TypeError(f"method config {type(method).__name__} is not {cls.config.__name__} (method {method.name})")
    mim = cls.build(model, method, img_size)
    if model.grad_checkpointing:
        set_grad_checkpointing(mim.encoder)
    return mim


def initial_mim_model(config: str | Path) -> tuple[MIMMethod, PretrainCfg]:
    """The pre-training model of a YAML config exactly as its run starts (rank 0: seeded with ``train.seed``):
    the *untrained* baseline of k-NN, linear probing and fine-tuning.

    Raises:
        ConfigError: the config does not load.
        ValueError: as :func:`create_mim_model`.
    """
    cfg = load_config(PretrainCfg, config)
    torch.manual_seed(cfg.train.seed)
    return create_mim_model(cfg.method, cfg.model, cfg.data.img_size), cfg


# the package's methods (imported last: each module subclasses MIMMethod above); one line per method
from .fastmim import FastMIM  # noqa: E402
from .mae import MAE  # noqa: E402
from .mixmim import MixMIM  # noqa: E402
from .simmim import SimMIM  # noqa: E402

for _method in (FastMIM, MixMIM, MAE, SimMIM):
    register_method(_method)
