"""Shared fixtures for the unit tests (keep this file small: other test modules may add their own here)."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmim_ds.checkpoint import save
from fastmim_ds.config import ClassifierCfg, FinetuneCfg, PretrainCfg, load_config, to_dict
from fastmim_ds.loop import Loop
from fastmim_ds.methods import create_mim_model
from fastmim_ds.models.classifier import create_classifier

# A 2-block, 64-d ViT/16 at 64 px: a 4x4 token grid, fast enough for CPU unit tests in fp32.
TINY_VIT = ["model.encoder_kwargs={embed_dim: 64, depth: 2, num_heads: 2}", "data.img_size=64"]


@pytest.fixture(scope="module")
def tiny_vit_cfg() -> PretrainCfg:
    """Pre-training config of a tiny ViT (64 px, patch 16, mask block 16, ratio 0.75, HOG target)."""
    return load_config(PretrainCfg, None, TINY_VIT)


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


class FunctionLoop(Loop):
    """A :class:`~fastmim_ds.loop.Loop` from plain functions, for tests of the loop itself: ``step_fn(engine,
    images, labels)``, the same ``loader`` and ``updates`` every epoch, an optional ``end(epoch, stats)``."""

    def __init__(self, engine, *, loader, updates: int, step_fn, client: dict | None = None, end=None, **kwargs):
        super().__init__(engine, **kwargs)
        self.loader, self.updates, self.step_fn, self.client, self.end = loader, updates, step_fn, client or {}, end

    def step(self, images, labels) -> dict:
        return self.step_fn(self.engine, images, labels)

    def begin_epoch(self, epoch: int):
        return self.loader, self.updates

    def end_epoch(self, epoch: int, stats: dict) -> None:
        if self.end is not None:
            self.end(epoch, stats)

    def client_state(self) -> dict:
        return self.client


# ------------------------------------------------------------------ tiny pre-training / classifier runs (in-process)
TINY_SWIN = ["model.encoder=swin_tiny_patch4_window7_224", "data.img_size=128", "method.block_size=32",
             "model.encoder_kwargs={embed_dim: 32, depths: [1, 1, 2, 1], num_heads: [1, 2, 2, 4], window_size: 4}",
             "method.decoder_dim=64"]
TINY_MIXMIM = ["method.name=mixmim", "model.encoder=mixmim_tiny_test", "data.img_size=64", "method.mask_ratio=0.5",
               "method.target=pixel", "method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=1"]
TINY_MAE = [*TINY_VIT, "method.name=mae", "method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=1"]
TINY_SIMMIM = [*TINY_VIT, "method.name=simmim", "method.block_size=16"]
CLASSES = ["cat", "dog", "emu"]
# ZeRO-3 keeps parameters below 1e5 elements whole on every rank by default: a tiny model would not be partitioned
ZERO3_ALL_PARTITIONED = {"stage": 3, "stage3_param_persistence_threshold": 0}


def save_with_engine(model: torch.nn.Module, ckpt_dir: Path, client: dict, *, steps: int = 1, stage: int = 2,
                     img_size: int = 64, batch: int = 2) -> object:
    """Wraps ``model`` in a 1-rank DeepSpeed engine (ZeRO ``stage``, fp32), takes ``steps`` AdamW steps on random
    images (so the saved fp32 master weights are the trained ones) and saves a complete checkpoint."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    cfg = {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
           "zero_optimization": ZERO3_ALL_PARTITIONED if stage == 3 else {"stage": stage}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(params, lr=1e-2), config=cfg)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        out = engine(torch.randn(batch, 3, img_size, img_size, generator=g))
        loss = out["loss"] if isinstance(out, dict) else out.float().pow(2).mean()
        engine.backward(loss)
        engine.step()
    save(engine, ckpt_dir, tag=f"step{steps:08d}", client_state={**client, "epoch": 1, "global_step": steps},
         keep_last=1)
    return engine


def pretrain_run(tmp_path: Path, overrides: list[str]) -> tuple[PretrainCfg, torch.nn.Module, Path]:
    """A pre-training run folder ``tmp_path/run`` with one ZeRO-2 checkpoint; returns (cfg, trained MIM model, run)."""
    cfg = load_config(PretrainCfg, None, overrides)
    torch.manual_seed(0)
    mim = create_mim_model(cfg.method, cfg.model, cfg.data.img_size)
    run = tmp_path / "run"
    engine = save_with_engine(mim, run / "ckpt", {"config": to_dict(cfg), "method": cfg.method.name},
                              img_size=cfg.data.img_size)
    return cfg, engine.module.eval(), run


def finetune_run(tmp_path: Path, *, name: str = "vit_base_patch16_224", img_size: int = 64,
                 kwargs: dict | None = None) -> tuple[torch.nn.Module, Path]:
    """A fine-tuning run folder with a 3-class classifier checkpoint (class names stored as finetune.py does)."""
    kwargs = kwargs if kwargs is not None else {"embed_dim": 64, "depth": 2, "num_heads": 2}
    cfg = load_config(FinetuneCfg, None, [f"model.name={name}", f"data.img_size={img_size}"])
    cfg.model.kwargs.update(kwargs)
    torch.manual_seed(0)
    clf, _ = create_classifier(ClassifierCfg(name=name, kwargs=kwargs), num_classes=len(CLASSES), img_size=img_size)
    torch.nn.init.normal_(clf.get_classifier().weight, std=0.5)  # a head that separates the classes
    run = tmp_path / "ft"
    client = {"config": to_dict(cfg), "classes": CLASSES, "num_classes": len(CLASSES), "model_name": name,
              "pretrain_config": {}}
    engine = save_with_engine(clf, run / "ckpt", client, img_size=img_size)
    return engine.module.eval(), run


# ------------------------------------------------------------------ offline wandb files
def wandb_history(run_dir: Path) -> tuple[dict, dict[int, dict]]:
    """(run record fields, {step: logged values}) read from the offline ``run-<id>.wandb`` files under ``run_dir``.

    The file is a LevelDB-style log (wandb's datastore: a 7-byte ``:W&B`` header, 32 KiB blocks, chunks of
    crc32 / length / type) of ``wandb_internal_pb2.Record`` protobufs.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    run, history = {}, {}
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data = path.read_bytes()
        assert data[:4] == b":W&B"
        pos, buf = 7, b""
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            if left < 7:
                pos += left
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if length == 0 and kind == 0:
                break
            chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
            buf = chunk if kind in (1, 2) else buf + chunk  # FULL/FIRST start a record, MIDDLE/LAST extend it
            if kind not in (1, 4):
                continue
            rec = pb.Record()
            rec.ParseFromString(buf)
            which = rec.WhichOneof("record_type")
            if which == "run":
                run = {"id": rec.run.run_id, "name": rec.run.display_name, "project": rec.run.project,
                       "tags": list(rec.run.tags)}
            elif which == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                history.setdefault(rec.history.step.num, {}).update(
                    {k: v for k, v in items.items() if not k.startswith("_")})
    return run, history


def loaded_state(overrides: list[str], ckpt_dir: Path, tag: str) -> tuple[dict, dict]:
    """({name: {"fp32", "exp_avg", "exp_avg_sq"} full tensors}, client state) after loading a pre-training tag on this
    process group (every rank calls it): the run's model, optimizer and engine built as ``pretrain.main`` does, the tag
    loaded with :func:`fastmim_ds.checkpoint.load` (re-partitioned when the world size differs), each trained
    parameter's full fp32 master weight and Adam moments gathered. ``tests/resume_probe.py`` runs it on N ranks."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from fastmim_ds.checkpoint import load
    from fastmim_ds.config import PretrainCfg, load_config, resolve
    from fastmim_ds.ds_engine import build_ds_config, create_engine
    from fastmim_ds.methods import create_mim_model
    from fastmim_ds.optim import build_optimizer

    world = torch.distributed.get_world_size()
    cfg = load_config(PretrainCfg, None, overrides)
    model = create_mim_model(cfg.method, cfg.model, cfg.data.img_size)
    optimizer = build_optimizer(model, cfg.optim, resolve(cfg.optim, cfg.train, world))
    engine = create_engine(model, optimizer, build_ds_config(cfg.train, clip_grad=cfg.optim.clip_grad,
                                                             world_size=world))
    client = load(engine, ckpt_dir, tag)
    state = {}
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            state[name] = {"fp32": safe_get_full_fp32_param(p).clone(),
                           **{k: safe_get_full_optimizer_state(p, k).clone() for k in ("exp_avg", "exp_avg_sq")}}
    return state, client
