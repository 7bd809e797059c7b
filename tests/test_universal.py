"""Our checkpoints convert with DeepSpeed's ds_to_universal and load back with load_universal (1-rank engine,
in-process, CPU; model and Adam state equal the saved ones), by hand and through ``checkpoint.load``'s conversion.
Resuming real runs on another world size: ``test_resume_world_size.py``."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from fastmim_ds.checkpoint import COMPLETE, load, read_client_state, rng_seed_for, save, universal_dir
from fastmim_ds.config import ConfigError

pytestmark = [pytest.mark.usefixtures("one_rank_group"), pytest.mark.timeout(300)]


def _engine(universal: bool, stage: int = 2):
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.GELU(), torch.nn.Linear(4, 1))
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
           "zero_optimization": {"stage": stage}, "steps_per_print": 10**9,
           "checkpoint": {"load_universal": universal}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                      config=cfg)
    return engine


def _full_state(engine) -> list[tuple[torch.Tensor, ...]]:
    """Per parameter: full fp32 weight, Adam exp_avg, exp_avg_sq (gathered from the ZeRO partitions)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out = []
    for p in engine.module.parameters():
        if engine.zero_optimization_stage() == 0:  # the client optimizer itself, on whole parameters
            state = engine.optimizer.state[p]
            out.append((p.detach().clone(), state["exp_avg"].clone(), state["exp_avg_sq"].clone()))
        else:
            out.append((safe_get_full_fp32_param(p).clone(), safe_get_full_optimizer_state(p, "exp_avg").clone(),
                        safe_get_full_optimizer_state(p, "exp_avg_sq").clone()))
    return out


def _trained(tmp_path, stage: int = 2):
    """A 1-rank engine after 3 Adam steps, saved as ``tmp_path/step00000003``; (engine, generator)."""
    engine = _engine(False, stage)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        loss = engine(torch.randn(4, 8, generator=g)).pow(2).mean()
        engine.backward(loss)
        engine.step()
    save(engine, tmp_path, tag="step00000003", keep_last=2,
         client_state={"epoch": 0, "update": 3, "global_step": 3, "samples": 12, "config": {"train": {"seed": 5}}})
    return engine, g


def _assert_same(engine, fresh) -> None:
    saved, loaded = _full_state(engine), _full_state(fresh)
    assert len(saved) == len(loaded) == 4
    for s, t in zip(saved, loaded):
        assert all(torch.equal(a, b) for a, b in zip(s, t))
    assert all(s[1].abs().sum() > 0 for s in saved)  # Adam moments after 3 steps


def test_checkpoint_converts_to_universal_and_loads_back(tmp_path):
    engine, g = _trained(tmp_path)
    assert read_client_state(tmp_path / "step00000003")["global_step"] == 3  # the universal info is left out
    out = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                          str(tmp_path / "step00000003"), "--output_folder", str(tmp_path / "step00000003_universal"),
                          "--num_extract_workers", "1", "--num_merge_workers", "1"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]

    fresh = _engine(True)
    path, client = fresh.load_checkpoint(str(tmp_path), tag="step00000003_universal")
    assert path is not None and client["global_step"] == 3
    _assert_same(engine, fresh)
    x = torch.randn(4, 8, generator=g)
    assert torch.equal(engine(x), fresh(x))


def _written_by(tag_dir, world: int) -> None:
    marker = tag_dir / COMPLETE
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "world_size": world}))


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_load_converts_a_tag_of_another_world_size_once(tmp_path, stage):
    """``checkpoint.load`` on a tag whose marker says 2 ranks: ZeRO-2/3 converted into <tag>_universal by a
    subprocess and loaded through an engine built without ``load_universal``; ZeRO-0 loaded as it is; the RNG
    seeded by the rule. A second load reuses the conversion."""
    engine, _ = _trained(tmp_path, stage)
    tag = tmp_path / "step00000003"
    _written_by(tag, 2)
    fresh = _engine(False, stage)
    client = load(fresh, tmp_path, "step00000003")
    assert client["samples"] == 12 and torch.initial_seed() == rng_seed_for(5, 3, 0)
    assert not fresh.load_universal_checkpoint()  # switched on for that load only
    _assert_same(engine, fresh)
    done = universal_dir(tag) / "zero" / "optimizer_state.pt"
    assert done.is_file() == (stage > 0)
    if stage:
        stamp = done.stat().st_mtime_ns
        again = _engine(False, stage)
        load(again, tmp_path, "step00000003")
        _assert_same(engine, again)
        assert done.stat().st_mtime_ns == stamp
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / "latest_universal").exists()


def test_failed_conversion_is_one_line_with_the_command(tmp_path):
    _trained(tmp_path)
    tag = tmp_path / "step00000003"
    _written_by(tag, 2)
    (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=rf"^could not convert {tag} to a universal checkpoint \(.+\); convert it "
                                           rf"by hand with `python -m deepspeed.checkpoint.ds_to_universal "
                                           rf"--input_folder {tag} --output_folder {tag}_universal .*`, or resume on "
                                           r"2 ranks$"):
        load(_engine(False), tmp_path, "step00000003")
    assert not universal_dir(tag).exists() and not list(tmp_path.glob(".*.tmp"))


def test_conversions_go_with_their_tag(tmp_path):
    engine, _ = _trained(tmp_path)
    kept = universal_dir(tmp_path / "step00000003")
    gone = [universal_dir(tmp_path / "step00000001"), tmp_path / ".step00000003_universal.123.tmp"]  # cut short
    for d in [kept, *gone]:
        d.mkdir()
    save(engine, tmp_path, tag="step00000004", client_state={"global_step": 4}, keep_last=2)
    assert kept.is_dir() and not any(d.exists() for d in gone)
    save(engine, tmp_path, tag="step00000005", client_state={"global_step": 5}, keep_last=2)
    assert not kept.exists() and not (tmp_path / "step00000003").exists()
