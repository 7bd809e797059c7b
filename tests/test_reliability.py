"""Fault handling of the training loop and checkpoints, on a real 1-rank DeepSpeed engine (CPU, gloo, in-process).

Non-finite losses are skipped and counted, then stop the run; ZeRO stage 0 stops before applying NaN; a stop
request checkpoints the exact position; partial checkpoints are ignored on resume; bad output dirs fail early.
"""
from __future__ import annotations

import logging

import pytest
import torch
from conftest import FunctionLoop

from fastmim_ds.checkpoint import COMPLETE, complete_tags, find_resume, load, save
from fastmim_ds.config import OptimCfg, Resolved, TrainCfg
from fastmim_ds.loop import LoopState, TrainingDiverged, train_one_epoch
from fastmim_ds.metrics import MetricsWriter
from fastmim_ds.optim import build_scheduler
from fastmim_ds.runtime import check_output_dir

pytestmark = [pytest.mark.usefixtures("one_rank_group"), pytest.mark.timeout(300)]


def _engine(stage: int, accum: int = 1):
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": accum, "gradient_clipping": 0.0,
           "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    sched = build_scheduler(opt, OptimCfg(warmup_epochs=0), Resolved(1, 4, 1e-2, 0.0), epochs=2)
    return engine, sched


class Batches:
    """A list of (x, y) micro-batches with the training loader's ``set_epoch(epoch, start_batch)``."""

    def __init__(self, n: int):
        g = torch.Generator().manual_seed(1)
        self.data = [(torch.randn(4, 8, generator=g), torch.randn(4, 1, generator=g)) for _ in range(n)]
        self.start = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.start = start_batch

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self):
        return iter(self.data[self.start:])


def _step_fn(nan_at: set[int], state: LoopState):
    """MSE regression; the loss is NaN while ``state.global_step`` (steps done) is in ``nan_at``."""

    def step(eng, x, y):
        loss = torch.nn.functional.mse_loss(eng(x), y)
        return {"loss": loss * float("nan") if state.global_step in nan_at else loss}

    return step


def _params(engine) -> list[torch.Tensor]:
    return [p.detach().clone() for p in engine.module.parameters()]


def _run(engine, sched, state, loader, nan_at, *, max_nonfinite=3, **kw):
    return train_one_epoch(engine, loader, _step_fn(nan_at, state), state=state, scheduler=sched,
                           updates_per_epoch=len(loader) // engine.gradient_accumulation_steps(), log_every=1,
                           metrics=MetricsWriter(None, enabled=False), show_progress=False,
                           max_nonfinite=max_nonfinite, **kw)


@pytest.mark.parametrize("stage", [1, 2])
def test_nonfinite_step_is_skipped_and_counted(stage):
    engine, sched = _engine(stage)
    state = LoopState()
    loader = Batches(6)
    seen = {}

    def record(st):
        seen[st.global_step] = _params(engine)

    stats = _run(engine, sched, state, loader, nan_at={2}, on_update=record)
    assert (state.update, state.global_step, state.skipped_total, state.skipped_in_row) == (6, 6, 1, 0)
    # step 3 (loss NaN) left every weight as step 2 had it; the other steps moved them
    assert all(torch.equal(a, b) for a, b in zip(seen[2], seen[3]))
    assert not all(torch.equal(a, b) for a, b in zip(seen[3], seen[4]))
    assert all(torch.isfinite(p).all() for p in engine.module.parameters())
    assert torch.isfinite(torch.tensor(stats["loss"])) and stats["steps"] == 6 and not stats["stopped"]


def test_nonfinite_in_a_row_stops_with_step_and_lr():
    engine, sched = _engine(2)
    state = LoopState()
    with pytest.raises(TrainingDiverged, match=r"3 optimizer steps in a row skipped .*epoch 0, step 4, lr "):
        _run(engine, sched, state, Batches(6), nan_at={1, 2, 3})
    assert state.skipped_total == 3
    assert all(torch.isfinite(p).all() for p in engine.module.parameters())


def test_nonfinite_with_grad_accumulation_skips_the_whole_update():
    engine, sched = _engine(2, accum=2)
    state = LoopState()
    before = {}
    _run(engine, sched, state, Batches(8), nan_at={1},
         on_update=lambda st: before.setdefault(st.global_step, _params(engine)))
    assert (state.global_step, state.skipped_total) == (4, 1)
    assert all(torch.equal(a, b) for a, b in zip(before[1], before[2]))


def test_zero_stage0_stops_before_applying_nan():
    engine, sched = _engine(0)
    state = LoopState()
    keep = {}
    with pytest.raises(TrainingDiverged, match="ZeRO stage 0 cannot skip"):
        _run(engine, sched, state, Batches(4), nan_at={2}, on_update=lambda st: keep.update(w=_params(engine)))
    assert all(torch.equal(a, b) for a, b in zip(keep["w"], engine.module.parameters()))


def test_stop_request_checkpoints_exact_position_and_resume_restores_it(tmp_path):
    engine, sched = _engine(2)
    state = LoopState()
    loader = Batches(6)
    train = TrainCfg(epochs=2, keep_last=2, ckpt_every=1, log_every=1)
    calls = iter([False, False, False, True])
    stats = FunctionLoop(engine, loader=loader, updates=6, step_fn=_step_fn(set(), state), client={"note": "x"},
                         state=state, scheduler=sched, train=train, ckpt_dir=tmp_path,
                         metrics=MetricsWriter(None, enabled=False), show_progress=False,
                         stop_requested=lambda: next(calls, False)).run(2)
    assert stats["preempted"] and (state.epoch, state.update, state.global_step) == (0, 4, 4)
    assert [p.name for p in complete_tags(tmp_path)] == ["step00000004"]
    weights = _params(engine)
    rng_next = torch.rand(3)  # what the stopped run would have drawn next

    engine2, sched2 = _engine(2)
    torch.manual_seed(123)
    client = load(engine2, *find_resume(tmp_path, "auto"))
    assert LoopState.from_client(client) == LoopState(epoch=0, update=4, global_step=4, samples=16)  # 4 x 4 images
    assert client["note"] == "x"
    assert all(torch.equal(a, b) for a, b in zip(weights, engine2.module.parameters()))
    assert torch.equal(torch.rand(3), rng_next)  # this rank's RNG continues where it stopped

    # the resumed loop reads batches 4.. of epoch 0 and then all of epoch 1
    state2 = LoopState.from_client(client)
    seen = []
    loader2 = Batches(6)
    stats = FunctionLoop(engine2, loader=loader2, updates=6,
                         step_fn=lambda eng, x, y: seen.append(x) or {"loss": torch.nn.functional.mse_loss(eng(x), y)},
                         state=state2, scheduler=sched2, train=train, ckpt_dir=tmp_path,
                         metrics=MetricsWriter(None, enabled=False), show_progress=False).run(2)
    assert not stats["preempted"] and (state2.epoch, state2.global_step) == (2, 12)
    assert len(seen) == 2 + 6 and torch.equal(seen[0], loader.data[4][0])
    assert [p.name for p in complete_tags(tmp_path)] == ["step00000006", "step00000012"]  # keep_last=2


def test_partial_checkpoint_is_ignored_and_cleaned(tmp_path, caplog):
    engine, _ = _engine(2)
    save(engine, tmp_path, tag="step00000005", client_state={"global_step": 5}, keep_last=3)
    partial = tmp_path / "step00000009"  # a rank was killed while writing: files, no marker
    save(engine, tmp_path, tag="step00000009", client_state={"global_step": 9}, keep_last=3)
    (partial / COMPLETE).unlink()
    with caplog.at_level(logging.WARNING):
        assert find_resume(tmp_path, "auto") == (tmp_path, "step00000005")
    assert "ignoring partial checkpoint" in caplog.text and "step00000009" in caplog.text
    with pytest.raises(ValueError, match="incomplete checkpoint"):
        find_resume(tmp_path, str(partial))
    save(engine, tmp_path, tag="step00000012", client_state={"global_step": 12}, keep_last=3)
    assert not partial.exists()  # stale partial removed by the next complete save
    assert [p.name for p in complete_tags(tmp_path)] == ["step00000005", "step00000012"]
    assert (tmp_path / "latest").read_text() == "step00000012"


def test_output_dir_problems_fail_before_training(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(OSError, match="cannot write checkpoints to .*a_file/ckpt"):
        check_output_dir(tmp_path / "a_file" / "ckpt", checkpoint_bytes=1, keep_last=1)
    with pytest.raises(OSError, match=r"GiB free, one checkpoint needs"):
        check_output_dir(tmp_path / "ok", checkpoint_bytes=2**62, keep_last=1)
    check_output_dir(tmp_path / "ok", checkpoint_bytes=1, keep_last=1)
    assert list((tmp_path / "ok").iterdir()) == []  # the write probe is removed


def test_cpu_ranks_leave_no_shared_memory_behind():
    """DeepSpeed's CPU backend creates a ~69 MB /dev/shm all-reduce buffer per rank and never removes it; the
    runtime unlinks it right after start-up (every rank has mapped it), and collectives keep working."""
    from deepspeed.comm import comm as ds_comm

    from fastmim_ds.runtime import shm_buffer_path

    assert ds_comm.cdb.shm_comm_op is not None  # the shared-memory all-reduce was set up: its file existed
    assert not shm_buffer_path().exists()
    t = torch.full((3,), 2.0)
    torch.distributed.all_reduce(t)
    assert t.tolist() == [2.0, 2.0, 2.0]
