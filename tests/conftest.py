"""Shared fixtures for the unit tests (keep this file small: other test modules may add their own here)."""
from __future__ import annotations

import pytest

from fastmim_ds.config import PretrainCfg, load_config

# A 2-block, 64-d ViT/16 at 64 px: a 4x4 token grid, fast enough for CPU unit tests in fp32.
TINY_VIT_OVERRIDES = ["model.encoder_kwargs={embed_dim: 64, depth: 2, num_heads: 2}", "data.img_size=64"]


@pytest.fixture(scope="module")
def tiny_vit_cfg() -> PretrainCfg:
    """Pre-training config of a tiny ViT (64 px, patch 16, mask block 16, ratio 0.75, HOG target)."""
    return load_config(PretrainCfg, None, TINY_VIT_OVERRIDES)
