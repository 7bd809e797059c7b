"""Cluster launches on one host, CPU ranks (gloo): ``srun``-style tasks that get only SLURM_* variables, and two
``deepspeed --no_ssh --node_rank`` launches acting as two nodes of one rank each."""
from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from fastmim_ds.runtime import slurm_environment

# a 1-block, 32-d ViT at 32 px (4 tokens of 16 px): seconds per step on shared CPU cores
TINY = ["model.encoder_kwargs={embed_dim: 32, depth: 1, num_heads: 1}", "method.decoder_dim=32", "data.img_size=32",
        "method.block_size=16", "data.num_workers=1", "optim.warmup_epochs=0", "train.micro_batch=8",
        "train.log_every=1", "train.ds_config=ds_configs/zero2_fp32.json"]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "CROSS_RANK", "CROSS_SIZE")


def _sets(items: list[str]) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    return {**env, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def _slurm_vars(procid: int, *, ntasks: int, job_id: str, nodelist: str = "localhost") -> dict[str, str]:
    """What ``srun --ntasks N`` gives task ``procid`` on one node (the variables submitit reads, plus the step's)."""
    return {"SLURM_JOB_ID": job_id, "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(procid), "SLURM_NODEID": "0",
            "SLURM_NTASKS": str(ntasks), "SLURM_STEP_NUM_TASKS": str(ntasks), "SLURM_JOB_NUM_NODES": "1",
            "SLURM_STEP_NUM_NODES": "1", "SLURM_JOB_NODELIST": nodelist, "SLURM_STEP_NODELIST": nodelist,
            "SLURM_STEP_ID": "0"}


# ------------------------------------------------------------------------------------------- SLURM variables


def test_slurm_environment_from_step_variables(monkeypatch):
    for k in LAUNCH_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    for k, v in {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8",
                 "SLURM_JOB_NUM_NODES": "4", "SLURM_STEP_NUM_NODES": "4",
                 "SLURM_JOB_NODELIST": "gpu[001-004]", "SLURM_STEP_NODELIST": "gpu[002-003,007],cpu1"}.items():
        monkeypatch.setenv(k, v)
    env = slurm_environment()
    port = random.Random("4242").randint(20000, 60000)  # submitit's TorchDistributedEnvironment rule
    assert env == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_SIZE": "2", "MASTER_ADDR": "gpu002",
                   "MASTER_PORT": str(port)}
    monkeypatch.setenv("MASTER_PORT", "29999")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    assert slurm_environment()["MASTER_PORT"] == "29999" and slurm_environment()["MASTER_ADDR"] == "10.0.0.1"
    monkeypatch.setenv("SLURM_PROCID", "8")
    with pytest.raises(RuntimeError, match=r"^SLURM: SLURM_PROCID=8 is not in \[0, 8\) tasks$"):
        slurm_environment()
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu[001-")
    with pytest.raises(RuntimeError, match="^SLURM: cannot read the node list"):
        slurm_environment()


def test_launcher_variables_and_batch_shells_are_not_slurm_tasks(monkeypatch):
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    monkeypatch.setenv("RANK", "1")  # deepspeed / torchrun inside an allocation: their variables win
    assert slurm_environment() is None
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS")  # the batch script's own shell: not a task of an srun step
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert slurm_environment() is None


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_slurm_tasks_form_one_group_and_train(small_beton, tmp_path):
    """Two processes with only SLURM_* variables (as ``srun --ntasks 2 python -m fastmim_ds pretrain``) form one
    2-rank group: one run folder, a 2-rank effective batch, one checkpoint with both ranks' shards. Rank 0 also
    feeds wandb (offline) and MLflow (a temporary store)."""
    job_id = next(j for j in (str(i) for i in range(7000, 7100))
                  if _port_free(random.Random(j).randint(20000, 60000)))
    args = [sys.executable, "-m", "fastmim_ds", "pretrain", *_sets(TINY + [
        f"data.train={small_beton / 'train.beton'}", "train.epochs=1", "train.max_steps_per_epoch=3",
        f"train.output_dir={tmp_path}", "train.run_name=srun", "train.wandb=true", "train.wandb_tags=[ci]",
        "train.mlflow=true"])]
    procs = []
    for rank in range(2):
        env = _clean_env(WANDB_MODE="offline", WANDB_SILENT="true",
                         **_slurm_vars(rank, ntasks=2, job_id=job_id))
        procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = [p.communicate(timeout=500)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(o[-4000:] for o in outs)
    run = tmp_path / "srun"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["srun"]
    assert "world_size: 2" in (run / "config.yaml").read_text() and "eff_batch: 16" in (run / "config.yaml").read_text()
    steps = [r for r in _rows(run) if "step" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and all(0 < r["loss"] < 10 for r in steps)
    tag = run / "ckpt" / "step00000003"
    assert json.loads((tag / "complete").read_text())["world_size"] == 2
    assert sorted(p.name for p in tag.glob("rng_rank*.pt")) == ["rng_rank000.pt", "rng_rank001.pt"]
    assert len(list(tag.glob("*optim_states.pt"))) == 2  # one ZeRO shard per rank
    # the trackers ran on rank 0 only, at the logged steps
    from conftest import wandb_history

    _, history = wandb_history(run)
    assert sorted(history) == [1, 2, 3] and history[3]["loss"] == pytest.approx(steps[-1]["loss"])
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    hist = client.get_metric_history((run / "mlflow_run_id").read_text(), "loss")
    assert sorted(m.step for m in hist) == [1, 2, 3]
    assert len(client.search_runs([client.get_experiment_by_name("fastmim-ds").experiment_id])) == 1


# ------------------------------------------------------------------------------------- two nodes on one host


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two_nodes(args: list[str], hostfile: Path, port: int, log_dir: Path) -> list[str]:
    """``deepspeed --hostfile H --no_ssh --node_rank i --master_addr 127.0.0.1`` for i = 0, 1 (one rank each), as
    one would type on two real nodes; returns both launchers' output."""
    deepspeed = str(Path(sys.executable).with_name("deepspeed"))
    procs = []
    for node in range(2):
        cmd = [deepspeed, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node), "--master_addr",
               "127.0.0.1", "--master_port", str(port), "--module", "fastmim_ds", *args]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=_clean_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=500)[0] for p in procs]
    for node, out in enumerate(outs):
        (log_dir / f"node{node}.log").write_text(out)
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(o[-4000:] for o in outs)
    return outs


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_nodes_of_one_rank_pretrain_checkpoint_and_resume(small_beton, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    base = TINY + [f"data.train={small_beton / 'train.beton'}", "train.max_steps_per_epoch=2", "train.ckpt_every=1",
                   f"train.output_dir={tmp_path}", "train.run_name=nodes"]
    _launch_two_nodes(["pretrain", *_sets(base + ["train.epochs=2"])], hostfile, _free_port(), tmp_path)
    run = tmp_path / "nodes"
    assert "world_size: 2" in (run / "config.yaml").read_text()
    assert [r["step"] for r in _rows(run) if "step" in r] == [1, 2, 3, 4]
    marker = json.loads((run / "ckpt" / "step00000004" / "complete").read_text())
    assert marker == {"epoch": 2, "update": 0, "global_step": 4, "samples": 0, "world_size": 2}

    outs = _launch_two_nodes(["pretrain", *_sets(base + ["train.epochs=3"]), "--resume", "auto"], hostfile,
                             _free_port(), tmp_path)
    assert "resumed from" in outs[0] and "step00000004" in outs[0]
    steps = [r for r in _rows(run) if "step" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6] and all(0 < r["loss"] < 10 for r in steps)
    assert [r["epoch"] for r in steps[4:]] == [2, 2]
    assert (run / "ckpt" / "latest").read_text() == "step00000006"
