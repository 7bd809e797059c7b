"""Per-family encoder adapters: a timm backbone, seen by the MIM methods as image -> tokens.

The MIM logic (masking, mask token, decoder, target, loss) lives once per method in :mod:`fastmim_ds.methods`.
An adapter only knows how one timm model family is built for pre-training, turns a (masked) image into its
final-stage tokens, follows an image-size change between epochs (FastMIM-P), drops trailing blocks
(FastMIM finding ii), maps pre-trained weights into the same family's classifier and says how timm rebuilds the
pre-trained encoder (export). Adding a backbone family means one adapter class and one :func:`register_adapter`
call with the family's model class (this replaces FastMIM's one copied 500-780-line script per backbone and
SimMIM's ``*ForSimMIM`` subclasses). Adapters are found by model class, so every timm name that builds a subclass of
a registered class is covered (``deit_*`` and ``vit_*`` alike build a ``VisionTransformer``):

* :class:`ViTAdapter`: timm ``VisionTransformer`` (FastMIM ``mim_vit_pretrain.py``), stride = patch size.
* :class:`SwinAdapter`: timm ``SwinTransformer`` (FastMIM ``mim_swin_pretrain.py``), NHWC stages, stride 32.
* :class:`PVTv2Adapter`: timm ``PyramidVisionTransformerV2`` (FastMIM ``mim_pvtv2_pretrain.py``), NCHW stages,
  stride 32.

Adapters are stateless: the pre-trained encoder *is* the timm classifier without its head, so its
``state_dict`` loads into ``timm.create_model(name, num_classes=K)`` with only the head missing.
"""
from __future__ import annotations

import functools
import logging
import math
import re
from functools import partial
from typing import Callable, Protocol, Sequence

import timm
import torch
import torch.nn as nn
from timm.layers import build_sincos2d_pos_embed, ndgrid, resample_abs_pos_embed
from timm.models import checkpoint_seq
from timm.models import pvt_v2 as timm_pvt_v2
from timm.models import swin_transformer as timm_swin
from timm.models.vision_transformer import VisionTransformer

from ..config import SettingError

logger = logging.getLogger(__name__)

__all__ = [
    "EncoderAdapter", "ViTAdapter", "SwinAdapter", "PVTv2Adapter", "ADAPTERS", "adapter_for", "register_adapter",
    "model_class", "truncate_blocks", "sizes_that_work",
]


class EncoderAdapter(Protocol):
    """What the MIM wrapper and the fine-tuning loader need from a backbone family."""

    family: str

    def create(self, name: str, *, img_size: int, drop_path: float, **kwargs) -> nn.Module:
        """Builds the encoder for pre-training (timm model, no head, set up for ``img_size`` px)."""

    def stride(self, encoder: nn.Module) -> int:
        """Output stride in pixels: the token grid is (H / stride, W / stride)."""

    def num_features(self, encoder: nn.Module) -> int:
        """Channels C of the returned tokens."""

    def check_img_size(self, encoder: nn.Module, img_size: int) -> None:
        """Raises ValueError, naming sizes that would work, when ``img_size`` is not valid."""

    def set_img_size(self, encoder: nn.Module, img_size: int) -> None:
        """Prepares ``encoder`` for (B, 3, img_size, img_size) inputs between epochs (FastMIM-P).

        Parameters keep their identity and shape, so optimizer and DeepSpeed state stay valid.
        Raises ValueError as :meth:`check_img_size`.
        """

    def truncate(self, encoder: nn.Module, num_blocks: int) -> list[str]:
        """Keeps the first ``num_blocks`` transformer blocks (counted across stages), removes the rest.

        Stems and downsampling layers stay, so the stride and the token grid do not change. Returns the
        parameter-name prefixes removed (``"blocks.7."``), i.e. what a fine-tuning load reports as not pre-trained.
        """

    def forward_tokens(self, encoder: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(B, 3, H, W) -> ((B, P + N, C) tokens, P prefix tokens); N row-major on the stride grid."""

    def embed(self, encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, H / p, W / p, C0) patch embeddings of the stem (patch side p), before any position
        embedding or prefix token. ``forward_embedded(encoder, embed(encoder, x)) == forward_tokens(encoder, x)``;
        a method that masks in token space (SimMIM) replaces embeddings in between."""

    def forward_embedded(self, encoder: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The rest of :meth:`forward_tokens` after :meth:`embed`: (B, h, w, C0) -> ((B, P + N, C), P)."""

    def no_weight_decay(self, encoder: nn.Module) -> set[str]:
        """Parameter names (relative to the encoder) excluded from weight decay besides 1-D params."""

    def create_classifier(
        self, name: str, *, img_size: int, num_classes: int, drop_path: float, global_pool: str, **kwargs
    ) -> nn.Module:
        """Builds the fine-tuning classifier of the same family."""

    def adapt_state_dict(self, state: dict[str, torch.Tensor], classifier: nn.Module) -> dict[str, torch.Tensor]:
        """Maps pre-trained encoder weights onto ``classifier`` (resampling position tables)."""

    def size_kwargs(self, img_size: int) -> dict:
        """``timm.create_model`` kwargs that set the input size (``{}`` for families that take any size)."""

    def export_args(self, encoder: nn.Module, img_size: int, *, truncated: bool) -> dict:
        """``timm.create_model`` kwargs (besides the user's ``encoder_kwargs``) that rebuild the pre-trained
        ``encoder`` as a plain headless timm model: ``num_classes=0``, the size, the pooling whose final norm the
        encoder trained and, when ``truncated`` (:meth:`truncate` ran), the depth(s) it kept."""


# ----------------------------------------------------------------------------------------------- shared helpers


def sizes_that_work(fits: Callable[[int], bool], step: int, upto: int) -> str:
    """Comma-separated multiples of ``step`` up to ``upto`` px for which ``fits`` holds (for error messages)."""
    sizes = [s for s in range(step, max(upto, step) + 1, step) if fits(s)]
    return ", ".join(map(str, sizes)) if sizes else f"none up to {upto}"


def truncate_blocks(block_lists: Sequence[tuple[str, nn.Module]], num_blocks: int) -> list[str]:
    """Deletes every block after the first ``num_blocks`` of ``[(prefix, nn.Sequential | nn.ModuleList)]``.

    Returns the removed blocks' name prefixes (``f"{prefix}{index}."``) in order.

    Raises:
        ValueError: ``num_blocks`` outside [1, total blocks].
    """
    total = sum(len(blocks) for _, blocks in block_lists)
    if not 1 <= num_blocks <= total:
        raise SettingError("model.encoder_blocks", f"must be in [1, {total}] (the encoder has {total} blocks), "
                           f"got {num_blocks}")
    removed, seen = [], 0
    for prefix, blocks in block_lists:
        keep = min(len(blocks), max(0, num_blocks - seen))
        seen += len(blocks)
        removed += [f"{prefix}{i}." for i in range(keep, len(blocks))]
        del blocks[keep:]  # a stage may keep 0 blocks: its downsampling layer still runs
    return removed


class _TimmAdapter:
    """What every timm family shares: classifier construction, ``num_features``, the model's no-decay list."""

    family: str

    def size_kwargs(self, img_size: int) -> dict:
        return {"img_size": img_size}

    def num_features(self, encoder: nn.Module) -> int:
        return encoder.num_features

    def no_weight_decay(self, encoder: nn.Module) -> set[str]:
        return set(encoder.no_weight_decay())

    def set_img_size(self, encoder: nn.Module, img_size: int) -> None:
        self.check_img_size(encoder, img_size)

    def embed(self, encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return encoder.patch_embed(x)  # NHWC in every family here (ViT: built with dynamic_img_size)

    def create_classifier(
        self, name: str, *, img_size: int, num_classes: int, drop_path: float, global_pool: str, **kwargs
    ) -> nn.Module:
        return timm.create_model(
            name, pretrained=False, num_classes=num_classes, global_pool=global_pool, drop_path_rate=drop_path,
            **self.size_kwargs(img_size), **kwargs,
        )


# ----------------------------------------------------------------------------------------------- ViT


def _sincos_pos_embed(encoder: nn.Module) -> torch.Tensor:
    """(1, P + gh * gw, C) fixed 2-D sin-cos table of the current patch grid, prefix rows zero (MAE/FastMIM)."""
    gh, gw = encoder.patch_embed.grid_size
    sincos = build_sincos2d_pos_embed([gh, gw], dim=encoder.embed_dim)  # (gh * gw, C)
    prefix = torch.zeros(0 if encoder.no_embed_class else encoder.num_prefix_tokens, encoder.embed_dim)
    return torch.cat([prefix, sincos]).unsqueeze(0)


def _sincos_for_own_grid(encoder: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Load pre-hook: a ``pos_embed`` saved at another grid (a FastMIM-P stage) becomes this encoder's table.

    The frozen table is a function of the grid only, so regenerating it is exact; resuming at any stage works.
    """
    key = prefix + "pos_embed"
    if key in state_dict and encoder.pos_embed is not None and state_dict[key].shape != encoder.pos_embed.shape:
        state_dict[key] = _sincos_pos_embed(encoder).to(encoder.pos_embed)


class ViTAdapter(_TimmAdapter):
    """timm ``VisionTransformer`` (FastMIM ``mim_vit_pretrain.py``).

    Pre-training uses a fixed 2-D sin-cos position embedding (frozen, as FastMIM/MAE). :meth:`set_img_size`
    *regenerates* that table for the new patch grid (integer grid positions, exactly what a model built at that
    size has), rather than letting timm resample the old table bicubically at every forward
    (``dynamic_img_size=True``, still the fallback for an input of another size): bicubic resampling of a
    sin-cos table is not a sin-cos table, and regenerating keeps the encoding of a one-token offset the same at
    every resolution. The table's shape follows the grid; a checkpoint written at another size loads all the
    same (a load pre-hook regenerates the table for the receiving encoder's grid). The encoder is built with
    ``global_pool='avg'``: its final LayerNorm is ``fc_norm``,
    applied per token here and after pooling in the classifier, so every encoder weight is transferred.
    Fine-tuning bicubically resamples the position embedding to the new grid and trains it (FastMIM
    ``interpolate_pos_embed``).
    """

    family = "vit"

    def create(self, name: str, *, img_size: int, drop_path: float, **kwargs) -> nn.Module:
        model = timm.create_model(
            name, pretrained=False, num_classes=0, global_pool="avg", img_size=img_size,
            dynamic_img_size=True, drop_path_rate=drop_path, **kwargs,
        )
        if model.pos_embed is not None:
            with torch.no_grad():
                model.pos_embed.copy_(_sincos_pos_embed(model))
            model.pos_embed.requires_grad_(False)
            model.register_load_state_dict_pre_hook(_sincos_for_own_grid)
        return model

    def stride(self, encoder: nn.Module) -> int:
        return encoder.patch_embed.patch_size[0]

    def check_img_size(self, encoder: nn.Module, img_size: int) -> None:
        p = self.stride(encoder)
        if img_size % p:
            raise SettingError("data.img_size", f"image size {img_size} is not divisible by the ViT patch size {p}")

    def set_img_size(self, encoder: nn.Module, img_size: int) -> None:
        self.check_img_size(encoder, img_size)
        encoder.patch_embed.set_input_size(img_size=(img_size, img_size))  # grid_size: what timm resamples from
        if encoder.pos_embed is not None:
            # frozen, in no optimizer group: a new shape under the same Parameter object is safe
            encoder.pos_embed.data = _sincos_pos_embed(encoder).to(encoder.pos_embed)

    def truncate(self, encoder: nn.Module, num_blocks: int) -> list[str]:
        return truncate_blocks([("blocks.", encoder.blocks)], num_blocks)

    def export_args(self, encoder: nn.Module, img_size: int, *, truncated: bool) -> dict:
        # global_pool='avg': the final norm is fc_norm, as :meth:`create` built it
        args = {"num_classes": 0, "img_size": img_size, "global_pool": "avg"}
        return {**args, "depth": len(encoder.blocks)} if truncated else args

    def forward_tokens(self, encoder: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        tokens = encoder.forward_features(x)  # (B, P + N, C), final norm is Identity with global_pool='avg'
        return encoder.fc_norm(tokens), encoder.num_prefix_tokens

    def forward_embedded(self, encoder: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        # timm VisionTransformer.forward_features after its patch_embed
        x = encoder.norm_pre(encoder.patch_drop(encoder._pos_embed(x)))
        if encoder.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(encoder.blocks, x)
        else:
            x = encoder.blocks(x)
        return encoder.fc_norm(encoder.norm(x)), encoder.num_prefix_tokens

    def adapt_state_dict(self, state: dict[str, torch.Tensor], classifier: nn.Module) -> dict[str, torch.Tensor]:
        state = dict(state)
        if "pos_embed" in state and classifier.pos_embed is not None:
            old = state["pos_embed"]
            prefix = 0 if classifier.no_embed_class else classifier.num_prefix_tokens
            n_old = old.shape[1] - prefix
            side = int(n_old**0.5)
            new_grid = classifier.patch_embed.grid_size
            if (side, side) != tuple(new_grid):
                logger.info("resampling pos_embed %dx%d -> %dx%d (bicubic)", side, side, *new_grid)
                state["pos_embed"] = resample_abs_pos_embed(
                    old.float(), new_size=list(new_grid), old_size=[side, side], num_prefix_tokens=prefix
                )
        return state


# ----------------------------------------------------------------------------------------------- hierarchical


def fastmim_layer_id(name: str, *, stages: str, depths: Sequence[int]) -> int:
    """Layer-decay id of a hierarchical classifier parameter, as FastMIM ``util/lr_decay.py`` (BEiT style).

    With L = sum(depths): the stem is 0; block j of stage i is sum(depths[:i]) + j + 1; a stage's downsampling
    layer joins the last block before it (sum(depths[:i])) and a non-final stage norm (PVTv2) the stage's last
    block; the final norm and the head are L + 1 (lr scale 1). For Swin-B (2, 2, 18, 2) and decay 0.8 this gives
    the stem 0.8^25 = 0.0038 and ``layers.3.blocks.1`` 0.8 (docs/methods.md §2). timm's own Swin
    ``group_matcher`` agrees on the stem and the blocks but puts the final norm with the last block (lr scale
    0.8, not 1) and a downsampling layer with the *next* block (one step more lr); PVTv2's is per stage only.

    Args:
        name: parameter name in the classifier (timm layout: downsampling at the start of stage i > 0).
        stages: attribute holding the stages (``"layers"`` for Swin, ``"stages"`` for PVTv2).
        depths: blocks per stage of the classifier.
    """
    if name.startswith("patch_embed"):
        return 0
    m = re.match(rf"{stages}\.(\d+)\.(blocks\.(\d+)|downsample|norm)\.", name)
    if m:
        i = int(m[1])
        first = sum(depths[:i])
        if m[3] is not None:
            return first + int(m[3]) + 1
        if m[2] == "downsample":
            return first
        if i < len(depths) - 1:  # stage-end norm of PVTv2
            return first + depths[i]
    return sum(depths) + 1


def _fastmim_group_matcher(coarse: bool = False, *, stages: str, depths: tuple[int, ...]) -> Callable[[str], int]:
    # same call signature as timm's ``model.group_matcher(coarse)``; timm accepts a callable name -> ordinal
    return partial(fastmim_layer_id, stages=stages, depths=depths)


class _HierarchicalAdapter(_TimmAdapter):
    """Shared by the 4-stage timm families: tokens are the last stage's (B, h * w, C) grid, no prefix tokens.

    Subclasses set ``family``, ``stages_attr`` (attribute holding the stages), ``channels_last`` (stage output
    NHWC or NCHW) and ``checkpoint_filter`` (timm's key/shape remapping for the family).
    """

    family: str
    stages_attr: str
    channels_last: bool
    final_norm: bool  # forward_features ends with encoder.norm (Swin) or with the stages (PVTv2)
    checkpoint_filter: Callable[[dict, nn.Module], dict]

    def _stages(self, model: nn.Module) -> nn.Sequential:
        return getattr(model, self.stages_attr)

    def export_args(self, encoder: nn.Module, img_size: int, *, truncated: bool) -> dict:
        args = {"num_classes": 0, **self.size_kwargs(img_size)}
        if truncated:
            args["depths"] = [len(s.blocks) for s in self._stages(encoder)]
        return args

    def create(self, name: str, *, img_size: int, drop_path: float, **kwargs) -> nn.Module:
        return timm.create_model(
            name, pretrained=False, num_classes=0, drop_path_rate=drop_path, **self.size_kwargs(img_size), **kwargs
        )

    def stride(self, encoder: nn.Module) -> int:
        return encoder.feature_info[-1]["reduction"]

    def check_img_size(self, encoder: nn.Module, img_size: int) -> None:
        s = self.stride(encoder)
        if img_size < s or img_size % s:
            raise SettingError(
                "data.img_size", f"image size {img_size} is not divisible by the {self.family} output stride {s} px "
                f"(sizes that work: {sizes_that_work(lambda n: True, s, max(2 * img_size, 8 * s))})"
            )

    def truncate(self, encoder: nn.Module, num_blocks: int) -> list[str]:
        stages = self._stages(encoder)
        return truncate_blocks([(f"{self.stages_attr}.{i}.blocks.", s.blocks) for i, s in enumerate(stages)],
                                num_blocks)

    def forward_tokens(self, encoder: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        return self._tokens(encoder.forward_features(x)), 0  # (B, N, C)

    def _tokens(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, h, w, C) or (B, C, h, w) last-stage features -> (B, N, C)."""
        return feats.flatten(1, 2) if self.channels_last else feats.flatten(2).transpose(1, 2)

    def forward_embedded(self, encoder: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        # timm SwinTransformer / PyramidVisionTransformerV2.forward_features after the patch_embed
        feats = self._stages(encoder)(x)
        return self._tokens(encoder.norm(feats) if self.final_norm else feats), 0

    def _check_classifier(self, model: nn.Module, img_size: int) -> None:
        """Raises ValueError when the classifier cannot take ``img_size`` (PVTv2 takes any size)."""

    def create_classifier(
        self, name: str, *, img_size: int, num_classes: int, drop_path: float, global_pool: str, **kwargs
    ) -> nn.Module:
        """timm classifier with FastMIM's layer-decay ids (:func:`fastmim_layer_id`) as its ``group_matcher``.

        The final norm (per token, before average pooling: the role of FastMIM's Swin ``fc_norm``) is
        *transferred* from the pre-trained encoder, like every other encoder weight and like MixMIM and the ViT
        adapter here. FastMIM re-initialises it only because its key ``norm`` does not match ``fc_norm``
        (docs/methods.md §5.10); it keeps FastMIM's lr scale 1 for it.
        """
        model = super().create_classifier(
            name, img_size=img_size, num_classes=num_classes, drop_path=drop_path, global_pool=global_pool, **kwargs
        )
        self._check_classifier(model, img_size)
        depths = tuple(len(s.blocks) for s in self._stages(model))
        # instance attribute: timm.optim.param_groups_layer_decay (fastmim_ds.optim) calls model.group_matcher()
        model.group_matcher = partial(_fastmim_group_matcher, stages=self.stages_attr, depths=depths)
        return model

    def adapt_state_dict(self, state: dict[str, torch.Tensor], classifier: nn.Module) -> dict[str, torch.Tensor]:
        return self.checkpoint_filter(dict(state), classifier)


def _window_attentions(encoder: nn.Module) -> list[tuple[str, timm_swin.WindowAttention]]:
    return [(n, m) for n, m in encoder.named_modules() if isinstance(m, timm_swin.WindowAttention)]


def _table_window(table: torch.Tensor) -> int:
    """Window side W of a square (2W - 1)^2-row relative-position bias table."""
    side = math.isqrt(table.shape[0])
    if side * side != table.shape[0]:
        raise ValueError(f"relative position table of {table.shape[0]} rows is not square")
    return (side + 1) // 2


def clipped_relative_position_index(window: int, table_window: int) -> torch.Tensor:
    """(w^2, w^2) long: pair (p, q) of a w x w window -> row of a (2W - 1)^2 table for offset p - q.

    Offsets beyond +-(W - 1) use the edge row (clipped relative positions, Shaw et al. 2018). For w = W this is
    timm's ``get_relative_position_index``; for w < W it reads the exact centre (2w - 1)^2 sub-table.
    """
    coords = torch.stack(ndgrid(torch.arange(window), torch.arange(window))).flatten(1)  # (2, w^2) as (y, x)
    lim = table_window - 1
    rel = (coords[:, :, None] - coords[:, None, :]).clamp(-lim, lim) + lim  # (2, w^2, w^2) in [0, 2W - 2]
    return rel[0] * (2 * table_window - 1) + rel[1]


class SwinAdapter(_HierarchicalAdapter):
    """timm ``SwinTransformer`` (FastMIM ``mim_swin_pretrain.py``; Swin-B: window 4 at 128 px, stride 32).

    Window rule: the window scales with the image, i.e. each stage keeps its number of windows per side (4 at
    128 px -> 3 at 96, 2 at 64, 5 at 160 for Swin-B). A size is valid when that window is an integer dividing
    every stage grid; otherwise a ValueError names the sizes that work. :meth:`set_img_size` applies it with
    timm's ``set_input_size`` (patch grid, windows, shifts, attention masks) but keeps every
    ``relative_position_bias_table`` Parameter as it is (timm would replace it with a resampled copy, which
    the optimizer and DeepSpeed do not hold) and re-indexes it: a smaller window reads the exact centre of the
    table, so 128 -> 64 -> 128 px is lossless; a window larger than the table's (the encoder grew beyond the
    size it was built at) clips offsets to the table's edge (logged). Build the encoder at the largest size of
    a FastMIM-P schedule (``data.img_size``) to stay exact.

    Fine-tuning (:meth:`adapt_state_dict`) uses timm ``swin_transformer.checkpoint_filter_fn``: it drops the
    ``relative_position_index`` / ``attn_mask`` buffers of reference checkpoints (rebuilt by the model), remaps
    the original downsample layout, and resizes each bias table to the classifier's window with
    ``resize_rel_pos_bias_table``: BEiT's geometric resampling, with timm's linear ``RegularGridInterpolator``
    instead of scipy's removed ``interp2d``. Offsets 0 and +-1 keep their pre-trained values exactly; for 4 -> 7
    timm caps the progression ratio at 1.5 (FastMIM's remap solves q = 1.79), so source offsets +-3 land at
    +-4.75 and offsets +-5, +-6 take the edge values, consistent with the clipping above.
    """

    family = "swin"
    stages_attr = "layers"
    channels_last = True
    final_norm = True
    checkpoint_filter = staticmethod(timm_swin.checkpoint_filter_fn)

    def _windows_at(self, encoder: nn.Module, img_size: int) -> tuple[list[int], str]:
        """Window per stage at ``img_size`` under the rule, and the problem ("" when valid)."""
        patch = encoder.patch_embed.patch_size[0]
        now = encoder.patch_embed.img_size[0]
        windows = []
        for i, stage in enumerate(self._stages(encoder)):
            grid, new_grid = stage.output_resolution[0], img_size / (patch * 2**i)
            if not len(stage.blocks):  # truncated stage: nothing to window
                windows.append(1)
                continue
            w = stage.blocks[0].window_size[0]
            if grid % w:
                grids = [s.output_resolution[0] for s in self._stages(encoder)]
                divisors = [d for d in range(1, min(grids) + 1) if all(g % d == 0 for g in grids)]
                return windows, (f"Swin window {w} does not divide the stage grids {grids} at {now} px "
                                 f"(windows that do: {', '.join(map(str, divisors))})")
            new_w = new_grid * w / grid  # grid // w windows per side, kept at every size
            if new_w != int(new_w) or new_grid % new_w:
                return windows, (f"image size {img_size}: the Swin window scales with the image (stage {i + 1}: "
                                 f"{w} at {now} px -> {new_w:g} at {img_size} px) and must be an integer dividing "
                                 f"the stage grid {new_grid:g}")
            windows.append(int(new_w))
        return windows, ""

    def check_img_size(self, encoder: nn.Module, img_size: int) -> None:
        super().check_img_size(encoder, img_size)
        _, problem = self._windows_at(encoder, encoder.patch_embed.img_size[0])
        if problem:  # the configured window itself does not tile the grids: no image size helps
            raise SettingError("model.encoder_kwargs", f"{problem}; set model.encoder_kwargs.window_size")
        _, problem = self._windows_at(encoder, img_size)
        if problem:
            stride = self.stride(encoder)
            ok = sizes_that_work(lambda s: not self._windows_at(encoder, s)[1], stride, max(2 * img_size, 8 * stride))
            raise SettingError("data.img_size", f"{problem}; image sizes that work: {ok}")

    def set_img_size(self, encoder: nn.Module, img_size: int) -> None:
        self.check_img_size(encoder, img_size)
        windows, _ = self._windows_at(encoder, img_size)
        for stage, w in zip(self._stages(encoder), windows):
            for block in stage.blocks:
                # timm's WindowAttention.set_window_size replaces the table by a resampled copy only when the window
                # changes; announcing the new window first keeps the trained Parameter (held by the optimizer)
                block.attn.window_size = (w, w)
        encoder.set_input_size(img_size=(img_size, img_size), window_size=tuple((w, w) for w in windows))
        clipped = set()
        for _, attn in _window_attentions(encoder):
            table = attn.relative_position_bias_table
            table_w, w = _table_window(table), attn.window_size[0]
            if w > table_w:
                clipped.add((w, table_w))
            attn.window_area = w * w
            attn.relative_position_index = clipped_relative_position_index(w, table_w).to(table.device)
        for w, table_w in sorted(clipped):
            logger.warning("Swin window %d at %d px exceeds its %d-window bias table: offsets beyond +-%d use the "
                           "table edge (build the encoder at the largest image size)",
                           w, img_size, table_w, table_w - 1)

    def _check_input(self, encoder: nn.Module, x: torch.Tensor) -> None:
        if tuple(x.shape[-2:]) != tuple(encoder.patch_embed.img_size):
            raise ValueError(f"input {tuple(x.shape[-2:])} px but the Swin encoder is set up for "
                             f"{tuple(encoder.patch_embed.img_size)}: call set_img_size({x.shape[-1]}) first")

    def forward_tokens(self, encoder: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        self._check_input(encoder, x)
        return super().forward_tokens(encoder, x)

    def embed(self, encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
        self._check_input(encoder, x)
        return super().embed(encoder, x)

    def _check_classifier(self, model: nn.Module, img_size: int) -> None:
        _, problem = self._windows_at(model, img_size)
        if problem:
            raise SettingError("model.kwargs", f"{problem}; set model.kwargs.window_size (7 at 224 px, as in "
                             f"swin_base_patch4_window7_224)")

    def adapt_state_dict(self, state: dict[str, torch.Tensor], classifier: nn.Module) -> dict[str, torch.Tensor]:
        out = super().adapt_state_dict(state, classifier)
        resized = [k for k in out if k.endswith("relative_position_bias_table") and k in state
                   and out[k].shape != state[k].shape]
        if resized:
            logger.info("resampled %d relative position tables (e.g. %s: %d -> %d rows, timm geometric)",
                        len(resized), resized[0], state[resized[0]].shape[0], out[resized[0]].shape[0])
        return out


class PVTv2Adapter(_HierarchicalAdapter):
    """timm ``PyramidVisionTransformerV2`` (FastMIM ``mim_pvtv2_pretrain.py``; stride 32).

    Overlapping conv stem and downsampling, spatial-reduction attention, no position table: any multiple of 32
    px works at any time, so :meth:`set_img_size` only validates. Weights load as they are (timm
    ``pvt_v2.checkpoint_filter_fn`` also maps the original PVT layout).
    """

    family = "pvt_v2"
    stages_attr = "stages"
    channels_last = False
    final_norm = False
    checkpoint_filter = staticmethod(timm_pvt_v2.checkpoint_filter_fn)

    def size_kwargs(self, img_size: int) -> dict:
        return {}  # timm PVTv2 takes no img_size


# model class -> adapter (subclasses included); a new family = one adapter + one register_adapter call.
ADAPTERS: dict[type, EncoderAdapter] = {
    VisionTransformer: ViTAdapter(),
    timm_swin.SwinTransformer: SwinAdapter(),
    timm_pvt_v2.PyramidVisionTransformerV2: PVTv2Adapter(),
}


def register_adapter(model_cls: type, adapter: EncoderAdapter) -> None:
    """Makes ``adapter`` the one of ``model_cls`` and its subclasses (a backbone family's only registry line)."""
    ADAPTERS[model_cls] = adapter


@functools.lru_cache(maxsize=None)
def model_class(name: str) -> type:
    """The class ``timm.create_model(name)`` builds, found by building it on the meta device (no memory, no init
    cost).

    Raises:
        ValueError: ``name`` is not a timm model.
    """
    if not timm.is_model(name):
        raise SettingError("model.encoder", f"'{name}' is not a timm model (see timm.list_models())")
    with torch.device("meta"):
        return type(timm.create_model(name, pretrained=False))


def adapter_for(model: str | nn.Module) -> EncoderAdapter:
    """Adapter of a timm model name or model instance: the one registered for its class or the nearest base class.

    Raises:
        ValueError: unknown timm model, or a model class without an adapter (names it and the supported classes).
    """
    cls = model_class(model) if isinstance(model, str) else type(model)
    for base in cls.__mro__:
        if base in ADAPTERS:
            return ADAPTERS[base]
    what = f"'{model}' (a {cls.__name__})" if isinstance(model, str) else cls.__name__
    raise SettingError("model.encoder", f"no MIM adapter for {what}; supported model classes: "
                     f"{', '.join(c.__name__ for c in ADAPTERS)} and their subclasses")
