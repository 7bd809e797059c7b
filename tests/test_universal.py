"""Resume on another world size, the parts that exist: a checkpoint of another size is refused in one line before
the engine is built, and our checkpoints convert with DeepSpeed's ds_to_universal and load back with load_universal
(1-rank engine, in-process, CPU; model and Adam state equal the saved ones)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from fastmim_ds.checkpoint import read_client_state, save
from fastmim_ds.checks import check_resume_compatible
from fastmim_ds.config import ConfigError, PretrainCfg

pytestmark = [pytest.mark.usefixtures("one_rank_group"), pytest.mark.timeout(300)]


def test_other_world_size_is_one_config_line(tmp_path):
    tag = tmp_path / "step00000004"
    tag.mkdir()
    (tag / "complete").write_text(json.dumps({"epoch": 2, "update": 0, "global_step": 4, "world_size": 2}))
    cfg = PretrainCfg()
    with pytest.raises(ConfigError, match=rf"^{tag} was written by 2 ranks, this run has 1: resume on 2 ranks \("):
        check_resume_compatible(cfg, {}, tag, world_size=1)
    check_resume_compatible(cfg, {}, tag, world_size=2)
    check_resume_compatible(cfg, {}, tag)  # no world size given: not checked


def _engine(universal: bool):
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.GELU(), torch.nn.Linear(4, 1))
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
           "zero_optimization": {"stage": 2}, "steps_per_print": 10**9, "checkpoint": {"load_universal": universal}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                      config=cfg)
    return engine


def _adam_state(engine) -> list[dict]:
    return [{k: v.clone() for k, v in s.items() if torch.is_tensor(v) and v.dim()}
            for s in engine.optimizer.optimizer.state.values()]


def test_checkpoint_converts_to_universal_and_loads_back(tmp_path):
    engine = _engine(False)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        loss = engine(torch.randn(4, 8, generator=g)).pow(2).mean()
        engine.backward(loss)
        engine.step()
    save(engine, tmp_path, tag="step00000003", client_state={"epoch": 0, "update": 3, "global_step": 3},
         keep_last=2)
    assert read_client_state(tmp_path / "step00000003")["global_step"] == 3  # the universal info is left out
    out = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                          str(tmp_path / "step00000003"), "--output_folder", str(tmp_path / "step00000003_universal"),
                          "--num_extract_workers", "1", "--num_merge_workers", "1"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]

    fresh = _engine(True)
    path, client = fresh.load_checkpoint(str(tmp_path), tag="step00000003_universal")
    assert path is not None and client["global_step"] == 3
    for a, b in zip(engine.module.parameters(), fresh.module.parameters()):
        assert torch.equal(a.detach(), b.detach())
    saved, loaded = _adam_state(engine), _adam_state(fresh)
    assert len(saved) == len(loaded) > 0
    for s, t in zip(saved, loaded):
        assert s.keys() == t.keys() == {"exp_avg", "exp_avg_sq"}
        for k in s:
            assert torch.equal(s[k], t[k]), k
    x = torch.randn(4, 8, generator=g)
    assert torch.equal(engine(x), fresh(x))
