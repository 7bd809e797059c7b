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


@pytest.fixture(scope="module")
def one_thread():
    """One torch intra-op thread for a module's tests (restored after): tiny models gain nothing from more, and on
    shared cores OpenMP spinning made a test file 10x slower. Use with ``pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ real images (imagenette in ../shared)
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
IMAGENETTE = Path(os.environ.get("FASTMIM_IMAGENETTE", REPO.parent / "shared" / "datasets" / "imagenette2-224"))


def _link_subset(src: Path, dst: Path, per_class: int) -> None:
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        (dst / cls.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(cls.iterdir())[:per_class]:
            (dst / cls.name / f.name).symlink_to(f)


@pytest.fixture(scope="session")
def imagenette_subset(tmp_path_factory) -> Path:
    """ImageFolder of symlinks to 24 train / 8 val images per class of ../shared/datasets/imagenette2-224."""
    if not (IMAGENETTE / "train").is_dir():
        pytest.skip(f"real images not found at {IMAGENETTE} (set FASTMIM_IMAGENETTE to the imagenette2-224 folder)")
    root = tmp_path_factory.mktemp("imagenette_subset")
    _link_subset(IMAGENETTE / "train", root / "train", 24)
    _link_subset(IMAGENETTE / "val", root / "val", 8)
    return root


@pytest.fixture(scope="session")
def small_beton(imagenette_subset, tmp_path_factory) -> Path:
    """``train.beton`` (240 images), ``val.beton`` (80) and ``classes.json`` written from real JPEGs at <= 96 px."""
    from fastmim_ds.data.convert import convert_image_folder

    out = tmp_path_factory.mktemp("beton")
    convert_image_folder(imagenette_subset, out, max_res=96, num_workers=2, progress=False)
    return out


def run_deepspeed(args: list[str], *, cwd: Path, timeout: int = 600, port: int = 29700) -> subprocess.CompletedProcess:
    """Runs ``deepspeed --num_gpus 2 --module fastmim_ds ARGS`` on CPU ranks; returns the finished process."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    deepspeed = Path(sys.executable).with_name("deepspeed")
    cmd = [str(deepspeed), "--num_gpus", "2", "--master_port", str(port), "--module", "fastmim_ds", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------ a 1-rank process group for in-process engines
@pytest.fixture(scope="module")
def one_rank_group():
    """A 1-rank torch.distributed group (gloo), as ``init_distributed`` makes for a plain process; torch runs one
    intra-op thread meanwhile (tiny models on shared cores: more threads only add overhead)."""
    import torch

    from fastmim_ds.runtime import init_distributed

    if not torch.distributed.is_initialized():
        for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"):
            os.environ.pop(k, None)
        init_distributed()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
