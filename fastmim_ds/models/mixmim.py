"""MixMIM / MixMAE (arXiv 2205.13137) backbones, registered in timm, and their encoder adapter.

Follows the official code (Sense-X/MixMIM ``models_mixmim.py`` / ``models_mixmim_ft.py``; docs/methods.md §3):
:class:`MixMIMTransformer` ("Swin-B/W14"): 4x4 patch embedding + LayerNorm, a *fixed* 2-D sin-cos absolute
position embedding (frozen in pre-training and fine-tuning), four stages of window attention with a relative position
bias and **no shifted windows**, timm ``PatchMerging`` between stages, a final LayerNorm that is kept (and
transferred to the classifier), average pooling, linear head. Parameter names equal the official ones, so official
checkpoints load after :func:`checkpoint_filter_fn`. Registered in timm as ``mixmim_base`` / ``mixmim_large`` /
``mixmim_huge`` and the CPU test preset ``mixmim_tiny_test`` (``import fastmim_ds`` registers them).

``forward_features(x, mask)`` also runs the *mixed* forward of pre-training: after the patch embedding, sample ``i``
takes the masked positions from sample ``B - 1 - i`` (the batch flipped), and window attention never lets a token
attend to a token of the other image. The pre-training method itself (mask drawing, dual decoder, loss) is
:class:`fastmim_ds.methods.mixmim.MixMIM`.

Attention masking uses ``F.scaled_dot_product_attention`` with an additive mask holding the relative position
bias and ``-inf`` between tokens of different images (docs/methods.md §5.13): no large finite constant is subtracted
from low-precision logits, so cross-image probabilities are exactly 0 in fp32 and bf16 (both tested) and fp16.
Every token attends at least to itself, so no softmax row is empty.

Mask convention: ``mask`` is bool, **True = the token of mixed input i comes from image B - 1 - i** (masked, i.e.
hidden, for image i).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    DropPath,
    Mlp,
    PatchEmbed,
    gen_relative_position_index,
    resample_abs_pos_embed,
    resize_rel_pos_bias_table_simple,
    to_2tuple,
    trunc_normal_,
)
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.swin_transformer import PatchMerging, window_partition, window_reverse
from torch.utils.checkpoint import checkpoint

from ..config import SettingError
from .adapters import register_adapter, truncate_blocks
from .layers import init_xavier, sincos_pos_embed

logger = logging.getLogger(__name__)

__all__ = [
    "MixMIMTransformer", "MixMIMAdapter", "checkpoint_filter_fn", "sincos_pos_embed", "mix_tokens", "stage_windows",
]


# ----------------------------------------------------------------------------------------------- helpers


def stage_windows(
    img_size: int | tuple[int, int], *, patch_size: int, window_size: Sequence[int]
) -> list[int]:
    """Effective window side per stage for an input of ``img_size`` px.

    A window at least as large as the stage grid covers the whole grid (official ``MixMIMBlock``). Stage ``s``
    has a grid of (H / patch / 2^s, W / patch / 2^s).

    Raises:
        ValueError: H or W not a multiple of the output stride ``patch * 2^(stages - 1)``, or a stage grid not
            divisible by its window; the message lists image sizes that fit.
    """
    h, w = to_2tuple(img_size)
    stages = len(window_size)
    stride = patch_size * 2 ** (stages - 1)

    def effective(side_h: int, side_w: int) -> list[int] | None:
        if side_h % stride or side_w % stride:
            return None
        out = []
        for s, win in enumerate(window_size):
            gh, gw = side_h // patch_size // 2**s, side_w // patch_size // 2**s
            win = min(win, gh, gw)
            if gh % win or gw % win:
                return None
            out.append(win)
        return out

    wins = effective(h, w)
    if wins is None:
        fits = [s for s in range(stride, 4 * max(h, w) + stride, stride) if effective(s, s) is not None]
        near = sorted(fits, key=lambda s: (abs(s - max(h, w)), s))[:4]
        raise SettingError(
            "data.img_size",
            f"image size {h}x{w} does not fit MixMIM with patch {patch_size} and windows {tuple(window_size)}: "
            f"sides must be multiples of the output stride {stride} and every stage grid divisible by its window "
            f"(square sizes that fit: {', '.join(map(str, sorted(near))) or 'none'}; or change window_size)"
        )
    return wins


def mix_tokens(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mixed input: ``out[i] = x[i]`` where ``mask`` is False, ``x[B - 1 - i]`` where True.

    Args:
        x: (B, H, W, C) patch tokens, B even.
        mask: (H, W) bool at the token grid, True = take the partner's token.

    Returns:
        (B, H, W, C).

    Raises:
        ValueError: odd B (the middle sample would be mixed with itself).
    """
    if x.shape[0] % 2:
        raise ValueError(f"MixMIM mixing needs an even batch (sample i pairs with B-1-i), got B={x.shape[0]}")
    return torch.where(mask[None, :, :, None], x.flip(0), x)


def _upsample_grid_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """Nearest upsampling of an (h, w) mask -> (h * factor, w * factor); each 2x2 merge group stays uniform."""
    return mask.repeat_interleave(factor, dim=0).repeat_interleave(factor, dim=1)


# ----------------------------------------------------------------------------------------------- backbone


class WindowAttention(nn.Module):
    """Window multi-head self-attention with a relative position bias and optional same-image masking.

    Args:
        dim: channels C.
        num_heads: heads nH (head dim C / nH).
        window_size: window side w; N = w * w tokens per window.
        qkv_bias: bias on the qkv projection.
        attn_drop: dropout on the attention probabilities (training only).
        proj_drop: dropout after the output projection.
    """

    def __init__(
        self, dim: int, *, num_heads: int, window_size: int, qkv_bias: bool = True, attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        # (N * N,) index into the table; rebuilt from the window size, never loaded (official deletes it too)
        index = gen_relative_position_index((window_size, window_size)).view(-1)
        self.register_buffer("relative_position_index", index, persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def attn_bias(self, same: torch.Tensor | None, num_windows: int) -> torch.Tensor:
        """Additive attention mask for ``F.scaled_dot_product_attention``.

        Args:
            same: (nW, N, N) bool, True where query and key come from the same image; ``None`` = all True.
            num_windows: nW.

        Returns:
            (1, nW * nH, N, N): relative position bias, ``-inf`` where ``same`` is False.
        """
        n = self.window_size**2
        bias = self.relative_position_bias_table[self.relative_position_index].view(n, n, -1).permute(2, 0, 1)
        bias = bias.unsqueeze(0).expand(num_windows, -1, -1, -1)  # (nW, nH, N, N)
        if same is not None:
            bias = bias.masked_fill(~same.unsqueeze(1), float("-inf"))
        return bias.reshape(1, num_windows * self.num_heads, n, n)

    def forward(self, x: torch.Tensor, same: torch.Tensor | None = None) -> torch.Tensor:
        """(B, nW, N, C) window tokens -> (B, nW, N, C); ``same``: (nW, N, N) bool or ``None``."""
        B, nW, N, C = x.shape
        qkv = self.qkv(x).view(B, nW, N, 3, self.num_heads, self.head_dim).permute(3, 0, 1, 4, 2, 5)
        # windows x heads as one 4-D head axis, so the mask broadcasts over the batch (no B-sized mask copy)
        q, k, v = qkv.reshape(3, B, nW * self.num_heads, N, self.head_dim).unbind(0)  # (B, nW * nH, N, hd)
        bias = self.attn_bias(same, nW).to(q.dtype)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.attn_drop if self.training else 0.0
        )
        x = x.view(B, nW, self.num_heads, N, self.head_dim).transpose(2, 3).reshape(B, nW, N, C)
        return self.proj_drop(self.proj(x))


class MixMIMBlock(nn.Module):
    """Pre-norm transformer block on non-overlapping windows (no shift): W-MSA + MLP, both residual.

    Args:
        dim: channels C.
        num_heads: attention heads.
        window_size: effective window side (already clamped to the stage grid).
        mlp_ratio: MLP hidden width / C.
        qkv_bias: bias on the qkv projection.
        proj_drop, attn_drop: dropout rates.
        drop_path: stochastic depth rate of this block.
        norm_layer: LayerNorm factory.
    """

    def __init__(
        self, dim: int, *, num_heads: int, window_size: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
        proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ):
        super().__init__()
        self.window_size = window_size
        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(
            dim, num_heads=num_heads, window_size=window_size, qkv_bias=qkv_bias, attn_drop=attn_drop,
            proj_drop=proj_drop,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)

    def forward(self, x: torch.Tensor, same: torch.Tensor | None = None) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C); ``same``: (nW, N, N) bool from :meth:`MixMIMStage.same_image` or ``None``."""
        B, H, W, C = x.shape
        w = self.window_size
        windows = window_partition(self.norm1(x), (w, w)).view(B, -1, w * w, C)  # (B, nW, N, C), b-major
        windows = self.attn(windows, same)
        x = x + self.drop_path(window_reverse(windows.view(-1, w, w, C), (w, w), H, W))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class MixMIMStage(nn.Module):
    """``depth`` blocks at one resolution, then (except in the last stage) timm ``PatchMerging`` to 2C channels.

    The official layout puts the merge at the *end* of a stage (``layers.i.downsample``), unlike timm's Swin.
    timm's NHWC ``PatchMerging`` concatenates x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2], the
    order of the timm 0.4 class the official code uses, so official weights load unchanged.
    """

    def __init__(
        self, dim: int, *, grid: tuple[int, int], depth: int, num_heads: int, window_size: int, mlp_ratio: float,
        qkv_bias: bool, proj_drop: float, attn_drop: float, drop_path: Sequence[float],
        norm_layer: Callable[[int], nn.Module], downsample: bool,
    ):
        super().__init__()
        self.grid = grid
        self.window_size = window_size
        self.grad_checkpointing = False
        self.blocks = nn.ModuleList([
            MixMIMBlock(
                dim, num_heads=num_heads, window_size=window_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                proj_drop=proj_drop, attn_drop=attn_drop, drop_path=drop_path[j], norm_layer=norm_layer,
            )
            for j in range(depth)
        ])
        self.downsample = PatchMerging(dim, 2 * dim, norm_layer=norm_layer) if downsample else nn.Identity()

    def same_image(self, mask: torch.Tensor) -> torch.Tensor:
        """(H, W) bool stage mask -> (nW, N, N) bool, True where two tokens of a window belong to the same image."""
        w = self.window_size
        g = window_partition(mask[None, :, :, None], (w, w)).flatten(1)  # (nW, N) window order as the features
        return g[:, :, None] == g[:, None, :]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, H, W, C) -> (B, H/2, W/2, 2C) (last stage: unchanged); ``mask``: (H, W) bool or ``None``."""
        same = None if mask is None else self.same_image(mask)
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, same, use_reentrant=False)
            else:
                x = blk(x, same)
        return self.downsample(x)


class MixMIMTransformer(nn.Module):
    """MixMIM hierarchical encoder and classifier (official ``models_mixmim_ft.MixMIM``), timm-style.

    ``forward_features(x, mask=None)`` serves both pre-training (with a mixing mask) and fine-tuning (without).

    Args:
        img_size: input side(s) in px; fixed at construction (window layout and position table depend on it).
        patch_size: patch embedding stride P (4).
        in_chans: input channels.
        num_classes: head outputs; 0 = no head (``forward`` returns pooled features).
        global_pool: ``"avg"`` (mean of final tokens) or ``""`` (``forward_head`` returns tokens unpooled).
        embed_dim: stage-1 channels C; stage ``s`` has C * 2^s.
        depths: blocks per stage.
        num_heads: heads per stage.
        window_size: window side per stage (clamped to the stage grid when larger, as official).
        mlp_ratio: MLP hidden width / channels.
        qkv_bias: bias on qkv projections.
        drop_rate: dropout after the position embedding and before the head.
        proj_drop_rate, attn_drop_rate: dropout in blocks.
        drop_path_rate: stochastic depth, linearly increasing from 0 to this value over all blocks.
        norm_layer: LayerNorm factory (eps 1e-5 as official).

    Raises:
        ValueError: inconsistent stage lists, or an ``img_size`` that the windows do not tile.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 128,
        depths: Sequence[int] = (2, 2, 18, 2),
        num_heads: Sequence[int] = (4, 8, 16, 32),
        window_size: Sequence[int] = (14, 14, 14, 7),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ):
        super().__init__()
        if not len(depths) == len(num_heads) == len(window_size):
            raise ValueError(f"depths {depths}, num_heads {num_heads} and window_size {window_size} differ in length")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        self.img_size = to_2tuple(img_size)
        self.patch_size = patch_size
        self.num_stages = len(depths)
        self.windows = stage_windows(self.img_size, patch_size=patch_size, window_size=window_size)
        self.stride = patch_size * 2 ** (self.num_stages - 1)  # px per last-stage token (32)
        self.out_grid = (self.img_size[0] // self.stride, self.img_size[1] // self.stride)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dim = embed_dim
        self.num_features = self.head_hidden_size = embed_dim * 2 ** (self.num_stages - 1)

        self.patch_embed = PatchEmbed(
            img_size=self.img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            norm_layer=norm_layer, output_fmt="NHWC",
        )
        self.grid = self.patch_embed.grid_size
        # fixed, never trained (official: requires_grad=False in pre-training and fine-tuning)
        pos = sincos_pos_embed(self.grid, embed_dim).unsqueeze(0)  # (1, H/P * W/P, C)
        self.absolute_pos_embed = nn.Parameter(pos, requires_grad=False)
        self.pos_drop = nn.Dropout(drop_rate)

        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.layers = nn.ModuleList()
        self.feature_info = []
        for s in range(self.num_stages):
            dim = embed_dim * 2**s
            start = sum(depths[:s])
            self.layers.append(MixMIMStage(
                dim, grid=(self.grid[0] // 2**s, self.grid[1] // 2**s), depth=depths[s], num_heads=num_heads[s],
                window_size=self.windows[s], mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate, drop_path=dpr[start:start + depths[s]], norm_layer=norm_layer,
                downsample=s < self.num_stages - 1,
            ))
            self.feature_info.append(dict(num_chs=dim, reduction=patch_size * 2**s, module=f"layers.{s}"))
        self.norm = norm_layer(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        # official MixMIM: xavier_uniform for every Linear (JAX ViT), LayerNorm (1, 0); the patch conv keeps its
        # PyTorch default; relative position tables keep their trunc_normal(0.02)
        self.apply(init_xavier)

    # ------------------------------------------------------------------ timm classifier API

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Names excluded from weight decay besides 1-D params: the (frozen) absolute position table.

        Relative position bias tables *are* decayed, as in official and mmpretrain fine-tuning (docs/methods.md §3.8).
        """
        return {"absolute_pos_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Layer groups for timm ``param_groups_layer_decay`` (mmpretrain's MixMIM layer ids, docs/methods.md §2).

        Group 0 = patch embedding; block ``j`` of stage ``s`` = sum(depths[:s]) + j + 1; a stage's PatchMerging
        and the final norm join the group of the block before them; the head (unmatched) is the last group, so
        it trains at the full lr. With 24 blocks: 26 groups, scale 0.7^(25 - id), head 1.0, final norm 0.7.
        Official MixMIM instead puts head and final norm at 0.7 and PatchMerging with the next stage's block.
        """
        return dict(
            stem=r"^absolute_pos_embed|^patch_embed",
            blocks=r"^layers\.(\d+)" if coarse else [
                (r"^layers\.(\d+)\.downsample", (99999,)),  # 99999 = timm MATCH_PREV_GROUP
                (r"^layers\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for layer in self.layers:
            layer.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def check_img_size(self, img_size: int | tuple[int, int]) -> None:
        """Raises ValueError unless ``img_size`` is the size this model was built for (and one its windows tile)."""
        stage_windows(img_size, patch_size=self.patch_size, window_size=self.windows)
        if to_2tuple(img_size) != self.img_size:
            raise SettingError(
                "data.img_size",
                f"image size {img_size} differs from the size this MixMIM model was built for {self.img_size} "
                "(create it with img_size=...)"
            )

    # ------------------------------------------------------------------ forward

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encodes images, mixing pairs of them when ``mask`` is given.

        Args:
            x: (B, 3, H, W) normalised images at the built ``img_size``.
            mask: optional (H / stride, W / stride) bool on the last-stage grid, True = token of image B - 1 - i
                (shared by the batch); ``None`` = no mixing (fine-tuning / inference).

        Returns:
            (B, H / stride, W / stride, C_out) final-stage tokens after the final LayerNorm (NHWC).

        Raises:
            ValueError: wrong input size, wrong mask shape, or odd B with a mask.
        """
        x = self.embed(x)  # (B, H/P, W/P, C)
        if mask is not None:
            if tuple(mask.shape) != self.out_grid or mask.dtype != torch.bool:
                raise ValueError(f"mix mask must be bool {self.out_grid}, got {mask.dtype} {tuple(mask.shape)}")
            x = mix_tokens(x, _upsample_grid_mask(mask, 2 ** (self.num_stages - 1)))
        return self.forward_embedded(x, mask)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) at the built ``img_size`` -> (B, H / P, W / P, C) patch embeddings (before the position table).

        Raises:
            ValueError: wrong input size.
        """
        H, W = x.shape[-2:]
        if (H, W) != self.img_size:
            raise ValueError(f"input {H}x{W} does not match the model's img_size {self.img_size}")
        return self.patch_embed(x)

    def forward_embedded(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder after :meth:`embed`: position table, stages, final norm.

        Args:
            x: (B, H / P, W / P, C) patch embeddings (mixed already when ``mask`` is given).
            mask: optional (H / stride, W / stride) bool mixing mask, as :meth:`forward_features`.

        Returns:
            (B, H / stride, W / stride, C_out) final-stage tokens after the final LayerNorm (NHWC).
        """
        x = self.pos_drop(x + self.absolute_pos_embed.view(1, *self.grid, -1))
        for s, layer in enumerate(self.layers):
            stage_mask = None if mask is None else _upsample_grid_mask(mask, 2 ** (self.num_stages - 1 - s))
            x = layer(x, stage_mask)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, h, w, C) -> (B, num_classes) logits (or (B, C) with ``pre_logits``; tokens if global_pool='')."""
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, num_classes)."""
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: MixMIMTransformer) -> dict[str, torch.Tensor]:
    """Maps MixMIM weights (ours or official ``checkpoint.pth``) onto ``model`` (official ``interpolate_pos_embed``).

    * unwraps ``{"model": ...}``; drops ``relative_position_index`` / ``attn_mask`` buffers and the pre-training
      decoder (``decoder*``, ``mask_token``), which the official fine-tuning drops through ``strict=False``;
    * resamples ``absolute_pos_embed`` bicubically when the token grid differs (it stays frozen);
    * resamples each ``relative_position_bias_table`` bicubically per head when the window differs
      (e.g. 224 px W14 -> 384 px W16/W24/W12).

    Returns:
        A new dict; the final ``norm`` and all encoder weights are kept (the head only if it fits).
    """
    state = state_dict.get("model", state_dict)
    own = model.state_dict()
    out = {}
    for k, v in state.items():
        if "relative_position_index" in k or "attn_mask" in k or k.startswith(("decoder", "mask_token")):
            continue
        if k == "absolute_pos_embed" and v.shape != own[k].shape:
            old = int(v.shape[1] ** 0.5)
            logger.info("resampling absolute_pos_embed %dx%d -> %dx%d (bicubic)", old, old, *model.grid)
            v = resample_abs_pos_embed(
                v.float(), new_size=list(model.grid), old_size=[old, old], num_prefix_tokens=0, antialias=False
            )
        elif k.endswith("relative_position_bias_table") and k in own and v.shape != own[k].shape:
            new_w = int((own[k].shape[0] ** 0.5 + 1) // 2)
            logger.info("resampling %s %s -> %s (bicubic)", k, tuple(v.shape), tuple(own[k].shape))
            v = resize_rel_pos_bias_table_simple(v.float(), (new_w, new_w), tuple(own[k].shape))
        elif k.startswith("head.") and (k not in own or v.shape != own[k].shape):
            continue
        out[k] = v
    return out


# ----------------------------------------------------------------------------------------------- registry


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875,
        "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head", "paper_ids": "arXiv:2205.13137", **kwargs,
    }


# read by timm's @register_model below (no released weights are hosted in timm's format)
default_cfgs = generate_default_cfgs({
    "mixmim_base": _cfg(),
    "mixmim_large": _cfg(),
    "mixmim_huge": _cfg(),
    "mixmim_tiny_test": _cfg(input_size=(3, 64, 64), pool_size=(2, 2)),
})


def _create_mixmim(variant: str, pretrained: bool = False, **kwargs: Any) -> MixMIMTransformer:
    return build_model_with_cfg(
        MixMIMTransformer, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs
    )


@register_model
def mixmim_base(pretrained: bool = False, **kwargs: Any) -> MixMIMTransformer:
    """MixMIM-B (Swin-B/W14): C 128, depths (2, 2, 18, 2), heads (4, 8, 16, 32), windows (14, 14, 14, 7)."""
    args = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=(14, 14, 14, 7))
    return _create_mixmim("mixmim_base", pretrained, **dict(args, **kwargs))


@register_model
def mixmim_large(pretrained: bool = False, **kwargs: Any) -> MixMIMTransformer:
    """MixMIM-L: C 192, depths (2, 2, 18, 2), heads (6, 12, 24, 48), windows (14, 14, 14, 7)."""
    args = dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=(14, 14, 14, 7))
    return _create_mixmim("mixmim_large", pretrained, **dict(args, **kwargs))


@register_model
def mixmim_huge(pretrained: bool = False, **kwargs: Any) -> MixMIMTransformer:
    """MixMIM-H: C 352, depths (2, 2, 18, 2), heads (11, 22, 44, 88), windows (14, 14, 14, 7)."""
    args = dict(embed_dim=352, depths=(2, 2, 18, 2), num_heads=(11, 22, 44, 88), window_size=(14, 14, 14, 7))
    return _create_mixmim("mixmim_huge", pretrained, **dict(args, **kwargs))


@register_model
def mixmim_tiny_test(pretrained: bool = False, **kwargs: Any) -> MixMIMTransformer:
    """CPU test preset: 64 px, C 16, depths (1, 1, 2, 1), heads (1, 2, 4, 8), windows (8, 4, 4, 2)."""
    args = dict(
        img_size=64, embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=(8, 4, 4, 2)
    )
    return _create_mixmim("mixmim_tiny_test", pretrained, **dict(args, **kwargs))


# ----------------------------------------------------------------------------------------------- adapter


class MixMIMAdapter:
    """:class:`~fastmim_ds.models.adapters.EncoderAdapter` of the MixMIM family (this module's timm models).

    The model is built for one image size (windows and the absolute position table depend on it). Fine-tuning
    keeps the absolute position embedding frozen (official) and resamples it and the relative position tables
    when the grid or the windows change (:func:`checkpoint_filter_fn`).
    """

    family = "mixmim"

    def create(self, name: str, *, img_size: int, drop_path: float, **kwargs: Any) -> MixMIMTransformer:
        return timm.create_model(
            name, pretrained=False, num_classes=0, img_size=img_size, drop_path_rate=drop_path, **kwargs
        )

    def stride(self, encoder: nn.Module) -> int:
        return encoder.stride

    def num_features(self, encoder: nn.Module) -> int:
        return encoder.num_features

    def check_img_size(self, encoder: nn.Module, img_size: int) -> None:
        encoder.check_img_size(img_size)

    def set_img_size(self, encoder: nn.Module, img_size: int) -> None:
        encoder.check_img_size(img_size)  # fixed-size model: only the built size passes (ValueError otherwise)

    def truncate(self, encoder: nn.Module, num_blocks: int) -> list[str]:
        return truncate_blocks([(f"layers.{i}.blocks.", s.blocks) for i, s in enumerate(encoder.layers)], num_blocks)

    def forward_tokens(self, encoder: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        return encoder.forward_features(x).flatten(1, 2), 0  # (B, N, C), no prefix tokens

    def embed(self, encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return encoder.embed(x)  # (B, H / 4, W / 4, C)

    def forward_embedded(self, encoder: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        return encoder.forward_embedded(x).flatten(1, 2), 0

    def no_weight_decay(self, encoder: nn.Module) -> set[str]:
        return set(encoder.no_weight_decay())

    def create_classifier(
        self, name: str, *, img_size: int, num_classes: int, drop_path: float, global_pool: str, **kwargs: Any
    ) -> MixMIMTransformer:
        return timm.create_model(
            name, pretrained=False, num_classes=num_classes, global_pool=global_pool, img_size=img_size,
            drop_path_rate=drop_path, **kwargs,
        )

    def adapt_state_dict(self, state: dict[str, torch.Tensor], classifier: nn.Module) -> dict[str, torch.Tensor]:
        return checkpoint_filter_fn(state, classifier)

    def size_kwargs(self, img_size: int) -> dict:
        return {"img_size": img_size}

    def export_args(self, encoder: nn.Module, img_size: int, *, truncated: bool) -> dict:
        args = {"num_classes": 0, "img_size": img_size}
        return {**args, "depths": [len(s.blocks) for s in encoder.layers]} if truncated else args


register_adapter(MixMIMTransformer, MixMIMAdapter())
