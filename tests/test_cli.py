"""Command line: bad configs stop before launch with one clear line and exit status 2."""
from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.timeout(120)


def _check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastmim_ds", "check", "pretrain", *args], cwd=REPO,
                          capture_output=True, text=True)


@pytest.mark.parametrize("override, message", [
    ("model.decoder_dimm=128", "config error: unknown key 'model.decoder_dimm'"),
    ("data.img_size=120", "config error: data.img_size: image size 120 is not divisible by the mask block size 16"),
    ("train.epochs=ten", "config error: train.epochs: expected an integer, got 'ten'"),
    ("method=mae", "config error: method: unknown 'mae' (choices: fastmim"),
    ("mask.block_size=24",
     "config error: mask.block_size: mask block size 24 must be a multiple of the encoder stride 16"),
    # issue 17: YAML flow syntax without spaces used to merge {"depth:6": None, ...}, which timm dropped
    ("model.encoder_kwargs={depth:6,patch_size:8}",
     "config error: model.encoder_kwargs: key 'depth:6' contains ':' (YAML reads 'name:value' without a space as "
     "one key with no value); write --set \"model.encoder_kwargs={depth: 6, patch_size: 8}\""),
    ("model.encoder_kwargs={patch_sise: 8}",
     "config error: model.encoder_kwargs: VisionTransformer (vit_tiny_patch16_224) takes no argument 'patch_sise' "
     "(did you mean 'patch_size'?)"),
])
def test_bad_config_is_one_line_and_exit_2(override, message):
    proc = _check("--config", "configs/demo_pretrain.yaml", "--set", override)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr


def test_missing_beton_is_reported(tmp_path):
    proc = _check("--config", "configs/demo_pretrain.yaml", "--set", f"data.train={tmp_path}/none.beton")
    assert proc.returncode == 2 and "data.train:" in proc.stderr and "make prepare-data" in proc.stderr


def test_batch_arithmetic_for_hostfile(small_beton, tmp_path):
    hosts = tmp_path / "hostfile"
    hosts.write_text("worker-1 slots=8\nworker-2 slots=8\n")
    data = ("--set", f"data.train={small_beton / 'train.beton'}", "--hostfile", str(hosts))
    proc = _check(*data, "--set", "train.micro_batch=4", "--set", "train.grad_accum=2")
    assert proc.returncode == 0, proc.stderr
    assert "world size 16, effective batch 128, lr 7.5e-05" in proc.stdout  # 1.5e-4 * 128 / 256
    # one optimizer step would need more images than the 240 in the beton
    proc = _check(*data, "--set", "train.micro_batch=256", "--set", "train.grad_accum=2")
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("config error: train.micro_batch: 256 x 2 accumulation x 16 ranks = 8192 images "
                                   f"per step, but {small_beton / 'train.beton'} holds 240; lower it")
