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
    ("method.name=mea", "config error: method.name: unknown 'mea' (choices: fastmim, mixmim, mae, simmim)"),
    # the demo config's method section holds FastMIM keys: another method names the first one it does not have
    ("method.name=mae", "config error: unknown key 'method.block_size' for method mae (valid keys of mae: name, "
     "mask_ratio, norm_pix_loss, decoder_dim, decoder_depth, decoder_heads)"),
    ("method.block_size=20",  # the demo encoder has 8-px patches
     "config error: method.block_size: mask block size 20 must be a multiple of the encoder stride 8"),
    # issue 17: YAML flow syntax without spaces used to merge {"depth:6": None, ...}, which timm dropped
    ("model.encoder_kwargs={depth:6,patch_size:8}",
     "config error: model.encoder_kwargs: key 'depth:6' contains ':' (YAML reads 'name:value' without a space as "
     "one key with no value); write --set \"model.encoder_kwargs={depth: 6, patch_size: 8}\""),
    ("model.encoder_kwargs={patch_sise: 8}",
     "config error: model.encoder_kwargs: VisionTransformer (vit_tiny_patch16_224) takes no argument 'patch_sise' "
     "(did you mean 'patch_size'?)"),
])
def test_bad_config_is_one_line_and_exit_2(override, message, capsys, monkeypatch):
    """``fastmim_ds.cli.main`` in this process (what ``python -m fastmim_ds`` exits with; one process for every
    case: the import costs seconds); the subprocess test below checks the exit status of the real command."""
    from fastmim_ds import cli

    monkeypatch.chdir(REPO)
    assert cli.main(["check", "pretrain", "--config", "configs/demo_pretrain.yaml", "--set", override]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), err


def test_missing_beton_is_reported(tmp_path):
    proc = _check("--config", "configs/demo_pretrain.yaml", "--set", f"data.train={tmp_path}/none.beton")
    assert proc.returncode == 2 and "data.train:" in proc.stderr and "make prepare-data" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


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


# ------------------------------------------------------------------ quiet console (issue 17)
FAKE_LAUNCHER = r"""
import sys, time
print("[2026-11-30 05:00:16,947] [WARNING] [runner.py:214:fetch_hostfile] Unable to find hostfile, will proceed")
print("[2026-11-30 05:00:16,949] [INFO] [runner.py:618:main] cmd = python -u -m deepspeed.launcher.launch")
print("[2026-11-30 05:00:21,387] [INFO] [launch.py:245:main] process 1 spawned with command: [...]", flush=True)
sys.stdout.write("[2026-11-30 05:00:2"); sys.stdout.flush(); time.sleep(0.2)  # a launcher line in two writes
print("1,400] [INFO] [launch.py:245:main] process 2 spawned with command: [...]")
print("05:00:46 [rank0] fastmim_ds.pretrain: run output/x", flush=True)
print("[2026-11-30 05:01:20,623] [ERROR] [launch.py:341:sigkill_handler] exits with return code = 1")
sys.exit(3)
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_launcher_info_lines_go_to_the_log_file(tmp_path, verbose):
    log = tmp_path / "launcher.log"
    proc = subprocess.run([sys.executable, "-m", "fastmim_ds.launch", "--log", str(log)]
                          + (["--verbose"] if verbose else []) + ["--", sys.executable, "-c", FAKE_LAUNCHER],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3  # the launcher's status
    console = proc.stdout.splitlines()
    if verbose:
        assert len(console) == 6 and not log.exists()  # every line (one was written in two parts)
        return
    assert console == ["05:00:46 [rank0] fastmim_ds.pretrain: run output/x",
                       "[2026-11-30 05:01:20,623] [ERROR] [launch.py:341:sigkill_handler] exits with return code = 1"]
    assert proc.stderr.strip() == f"launcher log: {log}"  # printed on failure only
    logged = log.read_text().splitlines()
    assert logged[0].startswith("# ") and len(logged) == 5 and "process 2 spawned" in logged[-1]


def test_each_warning_is_printed_once_per_rank(capfd):
    """A warning repeated every epoch (the warnings module forgets what it showed when a library resets its filters)
    reaches a rank's console once."""
    import logging
    import warnings

    from fastmim_ds.runtime import setup_logging

    root = logging.getLogger()
    saved = list(root.handlers), root.level
    try:
        setup_logging(1)
        for _ in range(3):
            warnings.resetwarnings()
            warnings.warn("`torch.distributed.something` is deprecated", FutureWarning, stacklevel=1)
            logging.getLogger("x").warning("same words")
        err = capfd.readouterr().err
    finally:
        logging.captureWarnings(False)
        root.handlers[:], root.level = saved
    assert err.count("FutureWarning:") == 1 and err.count("same words") == 1, err


@pytest.mark.parametrize("command", ["pretrain", "finetune", "linprobe"])
def test_process_group_closed_only_after_a_normal_end(command, monkeypatch):
    """A run that ends normally destroys its process group before the interpreter exits (without it, gloo's
    threads aborted ranks on the way out: a finished two-node run reported exit -6); a run that fails does not
    (a rank still inside a collective would hang the others)."""
    import importlib

    from fastmim_ds import cli, runtime

    monkeypatch.chdir(REPO)
    module = importlib.import_module(f"fastmim_ds.{command}")
    closed, seen = [], []
    monkeypatch.setattr(runtime, "close_distributed", lambda: closed.append(command))
    monkeypatch.setattr(module, "main", lambda cfg, resume=None: seen.append(type(cfg).__name__))
    argv = {"pretrain": ["pretrain", "--config", "configs/demo_pretrain.yaml"],
            "finetune": ["finetune", "--config", "configs/demo_finetune.yaml"],
            "linprobe": ["linprobe", "--config", "configs/linprobe_imagenette.yaml"]}[command]
    assert cli.main(argv) == 0 and closed == [command] and len(seen) == 1

    def fail(cfg, resume=None):
        raise FloatingPointError("loss is nan at step 3")

    monkeypatch.setattr(module, "main", fail)
    assert cli.main(argv) == 3 and closed == [command]
