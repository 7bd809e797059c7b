"""End-to-end: 2 DeepSpeed ranks (CPU, gloo) + FFCV on a small beton written from real JPEGs.

Pre-training loss must decrease, a checkpoint must resume at the next epoch, bf16 ZeRO-2 must run, and
fine-tuning must load the pre-trained encoder and report a top-1.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, run_deepspeed

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TINY = ["model.encoder_kwargs={embed_dim: 64, depth: 2, num_heads: 2}", "model.decoder_dim: 64"]


def _sets(items: list[str]) -> list[str]:
    return [a for s in items for a in ("--set", s.replace(": ", "="))]


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _check(proc) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def pretrain_run(small_beton, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    args = ["pretrain", *_sets(TINY + [
        f"data.train={small_beton / 'train.beton'}", "data.img_size=64", "data.num_workers=1",
        "optim.blr=2e-3", "optim.warmup_epochs=1", "train.epochs=4", "train.micro_batch=16", "train.log_every=1",
        "train.ckpt_every=2", "train.keep_last=1", f"train.output_dir={out}", "train.run_name=pre",
        "train.ds_config=ds_configs/zero2_fp32.json",
    ])]
    _check(run_deepspeed(args, cwd=REPO, port=29711))
    return out / "pre"


def test_pretrain_two_ranks_loss_decreases(pretrain_run):
    rows = _rows(pretrain_run)
    steps = [r for r in rows if "step" in r]
    epochs = [r for r in rows if "epoch_end" in r]
    assert [r["epoch_end"] for r in epochs] == [0, 1, 2, 3]
    assert all(r["loss"] == r["loss"] and r["loss"] > 0 for r in steps)  # finite, positive
    assert epochs[-1]["train_loss"] < 0.8 * epochs[0]["train_loss"], [r["train_loss"] for r in epochs]
    # 240 images / (16 per rank x 2 ranks) = 7 optimizer steps per epoch, logged every step, lr warmup from 0
    assert [r["step"] for r in steps[:7]] == list(range(1, 8))
    assert steps[0]["lr"] < steps[6]["lr"]
    # checkpoints every 2 epochs, keep_last=1: only the newest tag stays; config saved with the run
    ckpt = pretrain_run / "ckpt"
    assert (ckpt / "latest").read_text().strip() == "epoch0003"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["epoch0003"]
    assert "effective batch" not in (pretrain_run / "config.yaml").read_text()
    assert "eff_batch: 32" in (pretrain_run / "config.yaml").read_text()


def test_pretrain_resume_continues_at_next_epoch(pretrain_run, small_beton):
    args = ["pretrain", "--resume", "auto", *_sets(TINY + [
        f"data.train={small_beton / 'train.beton'}", "data.img_size=64", "data.num_workers=1",
        "optim.blr=2e-3", "optim.warmup_epochs=1", "train.epochs=5", "train.micro_batch=16", "train.log_every=1",
        "train.ckpt_every=2", "train.keep_last=1", f"train.output_dir={pretrain_run.parent}", "train.run_name=pre",
        "train.ds_config=ds_configs/zero2_fp32.json",
    ])]
    proc = run_deepspeed(args, cwd=REPO, port=29712)
    _check(proc)
    assert "resumed from" in proc.stderr
    epochs = [r["epoch_end"] for r in _rows(pretrain_run) if "epoch_end" in r]
    assert epochs == [0, 1, 2, 3, 4]  # epoch 4 appended, nothing re-run
    steps = [r["step"] for r in _rows(pretrain_run) if "step" in r]
    assert steps[-1] == 35 and steps[-7] == 29  # global step continues from 28


def test_finetune_loads_pretrained_and_reports_top1(pretrain_run, small_beton, tmp_path):
    args = ["finetune", "--pretrained", str(pretrain_run), *_sets([
        f"data.train={small_beton / 'train.beton'}", f"data.val={small_beton / 'val.beton'}", "data.img_size=64",
        "data.num_workers=1", "optim.warmup_epochs=1", "train.epochs=2", "train.micro_batch=16",
        f"train.output_dir={tmp_path}", "train.run_name=ft", "train.ds_config=ds_configs/zero2_fp32.json",
    ])]
    proc = run_deepspeed(args, cwd=REPO, port=29713)
    _check(proc)
    assert "not pre-trained: none" in proc.stderr
    assert "fine-tuned top-1:" in proc.stdout
    ev = [r for r in _rows(tmp_path / "ft") if "val_top1" in r]
    assert len(ev) == 2 and 0.0 <= ev[-1]["val_top1"] <= 100.0
    assert all(r["val_top1"] <= r["val_top5"] for r in ev)


def test_bf16_zero2_two_ranks(small_beton, tmp_path):
    args = ["pretrain", *_sets([
        "model.encoder_kwargs={embed_dim: 32, depth: 1, num_heads: 1}", "model.decoder_dim=32",
        f"data.train={small_beton / 'train.beton'}", "data.img_size=32", "data.num_workers=1", "mask.block_size=16",
        "optim.warmup_epochs=0", "train.epochs=1", "train.micro_batch=8", "train.max_steps_per_epoch=3",
        "train.log_every=1", f"train.output_dir={tmp_path}", "train.run_name=bf16",
        "train.ds_config=ds_configs/zero2_bf16.json",
    ])]
    _check(run_deepspeed(args, cwd=REPO, port=29714))
    steps = [r for r in _rows(tmp_path / "bf16") if "step" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(0 < r["loss"] < 10 for r in steps)
