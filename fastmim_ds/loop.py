"""Training and evaluation loops (MAE ``engine_pretrain.py`` / ``engine_finetune.py``, on a DeepSpeed engine).

The loop does not know which method it runs: ``step_fn(engine, images, labels)`` returns the model's output dict
with a scalar ``loss``. DeepSpeed handles gradient accumulation, clipping, ZeRO partitioning and precision; here
live the fractional-epoch lr, skipped-step accounting, preemption, mid-epoch checkpoints and exact resume:

* :class:`LoopState` (epoch, updates and images done in it, global step, skipped steps) is saved in every
  checkpoint; with the loader's ``set_epoch(epoch, start_batch)`` and the per-rank RNG states restored by
  :func:`~fastmim_ds.checkpoint.load`, a resumed run continues with the same batches, masks and lr.
* Resumed with another number of images per update (another world size, micro batch or accumulation), the loop
  continues at the epoch's global image offset (``LoopState.samples``; the loader's ``start_sample``), so the rest
  of the epoch's permutation is read once; the lr schedule's position is that offset as a fraction of the epoch.
* A non-finite loss or gradient: DeepSpeed's ZeRO optimizer (stages 1-3, fp32 and bf16) detects the inf/NaN
  gradient on every rank and skips the update (``engine.was_step_applied()``); we count skipped updates and stop
  with :class:`TrainingDiverged` after ``max_nonfinite`` in a row. ZeRO stage 0 applies NaN gradients, so there
  the first non-finite loss stops the run before its backward (weights stay clean).
* ``stop_requested()`` is asked once per update (preemption: all ranks agree); the loop then returns early and
  :meth:`Loop.run` checkpoints the exact position.

:class:`Loop` is one run's epochs as one object; pre-training (:class:`fastmim_ds.pretrain.PretrainLoop`) and
classifier runs (:class:`fastmim_ds.finetune.ClassifierLoop`) subclass it.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .checkpoint import save
from .config import TrainCfg
from .metrics import MetricsWriter, all_reduce_sum, progress

logger = logging.getLogger(__name__)

__all__ = ["LoopState", "TrainingDiverged", "train_one_epoch", "Loop", "evaluate"]

StepFn = Callable[[object, torch.Tensor, torch.Tensor], dict]


class TrainingDiverged(FloatingPointError):
    """Too many optimizer steps in a row were skipped for a non-finite loss/gradient."""


@dataclass
class LoopState:
    """Where a run is: saved in every checkpoint's client state, restored on resume."""

    epoch: int = 0  # epoch in progress (or next to start)
    update: int = 0  # optimizer steps done inside ``epoch``
    global_step: int = 0  # optimizer steps done in the run (skipped ones included)
    skipped_in_row: int = 0  # consecutive skipped steps (non-finite loss/gradient)
    skipped_total: int = 0
    # images of ``epoch`` consumed by all ranks together (its global sample offset); None: not recorded (a
    # checkpoint from before this field), i.e. ``update`` x images per update
    samples: int | None = 0

    def to_client(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_client(cls, client: dict) -> "LoopState":
        state = cls(**{f.name: client[f.name] for f in dataclasses.fields(cls) if f.name in client})
        if "samples" not in client:
            state.samples = None
        return state

    def align(self, per_update: int) -> bool:
        """Re-expresses the position for ``per_update`` images per optimizer step (all ranks); returns whether that
        differs from the checkpoint's split (resumed with another world size, micro batch or accumulation).

        ``samples`` stays the truth; ``update`` becomes the whole updates of ``per_update`` images it holds (the rest,
        less than one update, is still skipped by the loader's ``start_sample``).
        """
        if self.samples is None:
            self.samples = self.update * per_update
        if self.samples == self.update * per_update:
            return False
        self.update = self.samples // per_update
        return True


def train_one_epoch(
    engine,
    loader,
    step_fn: StepFn,
    *,
    state: LoopState,
    scheduler,
    updates_per_epoch: int,
    log_every: int,
    metrics: MetricsWriter,
    show_progress: bool,
    max_nonfinite: int = 10,
    stop_requested: Callable[[], bool] = lambda: False,
    on_update: Callable[[LoopState], None] | None = None,
) -> dict:
    """Runs epoch ``state.epoch`` from update ``state.update`` to ``updates_per_epoch``, advancing ``state``.

    Args:
        engine: DeepSpeed engine.
        loader: yields (images (B, 3, H, W), labels (B,)) on the engine's device, already positioned at
            image ``state.samples`` of the epoch (all ranks; micro-batch ``state.update * grad_accum`` when whole).
        step_fn: ``(engine, images, labels) -> {"loss": scalar, ...}``.
        scheduler: timm scheduler in epochs; ``step(epoch + samples / (updates_per_epoch * images per update))``,
            i.e. ``epoch + update / updates_per_epoch`` in an uninterrupted run, precedes every update.
        updates_per_epoch: optimizer steps in a full epoch (the loader may hold more batches: they are not read).
        log_every: optimizer steps between ``metrics.jsonl`` rows (loss averaged over ranks and the window).
        max_nonfinite: skipped updates in a row that stop the run.
        stop_requested: asked after every update (all ranks must get the same answer); True ends the epoch early.
        on_update: called after every update that did not stop the epoch (mid-epoch checkpoints).

    Returns:
        ``{"loss": mean finite loss over ranks and steps, "img_per_s", "steps", "seconds", "stopped": bool,
        "data_wait_s", "data_wait_frac"}``: the last two are the seconds the loop spent waiting for the loader's next
        batch (mean over ranks) and their share of the epoch's wall time (input stalls; ~0 when the loader keeps
        up). ``metrics.jsonl`` step rows carry ``data_wait_frac`` of their window too.

    Raises:
        TrainingDiverged: ``max_nonfinite`` skipped updates in a row (names epoch, step and lr).
    """
    engine.train()
    accum = engine.gradient_accumulation_steps()
    world = engine.world_size if hasattr(engine, "world_size") else 1
    per_update = engine.train_batch_size()  # images per optimizer step, all ranks
    state.align(per_update)
    epoch_images = updates_per_epoch * per_update
    device = engine.device
    check_before_backward = engine.zero_optimization_stage() == 0  # stage 0 would apply NaN gradients
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    n_finite = torch.zeros((), dtype=torch.float64, device=device)
    window = {"loss": 0.0, "n": 0.0, "imgs": 0, "t": time.time()}
    epoch_t, epoch_imgs, steps, stopped = time.time(), 0, 0, False
    wait = {"epoch": 0.0, "window": 0.0}  # seconds spent in next(loader): the loop stalled on input
    total_micro = (updates_per_epoch - state.update) * accum
    bar = progress(loader, total=total_micro, desc=f"epoch {state.epoch}", enabled=show_progress)
    batches = iter(bar)
    for micro in range(total_micro):
        t_wait = time.perf_counter()
        try:
            images, labels = next(batches)
        except StopIteration:
            break
        t_wait = time.perf_counter() - t_wait
        wait["epoch"] += t_wait
        wait["window"] += t_wait
        if micro % accum == 0:
            scheduler.step(state.epoch + state.samples / epoch_images)
        out = step_fn(engine, images, labels)
        loss = out["loss"]
        finite = torch.isfinite(loss.detach())
        if check_before_backward and not finite:
            raise TrainingDiverged(f"non-finite loss {loss.item()} at epoch {state.epoch}, step {state.global_step} "
                                   f"(ZeRO stage 0 cannot skip a step: use stage >= 1 to skip and continue)")
        engine.backward(loss)
        engine.step()
        loss_sum += torch.where(finite, loss.detach().double(), 0.0)
        n_finite += finite.double()
        window["imgs"] += images.shape[0]
        epoch_imgs += images.shape[0]
        if (micro + 1) % accum:
            continue
        state.update += 1
        state.samples += per_update
        state.global_step += 1
        steps += 1
        lr = engine.get_lr()[0]
        if engine.was_step_applied():
            state.skipped_in_row = 0
        else:
            state.skipped_in_row += 1
            state.skipped_total += 1
            logger.warning("skipped step %d (epoch %d, lr %.3g): non-finite loss or gradient (%d in a row)",
                           state.global_step, state.epoch, lr, state.skipped_in_row)
            if state.skipped_in_row >= max_nonfinite:
                raise TrainingDiverged(
                    f"{state.skipped_in_row} optimizer steps in a row skipped for non-finite loss/gradients "
                    f"(last: epoch {state.epoch}, step {state.global_step}, lr {lr:.3g})")
        if state.update % log_every == 0 or state.update == updates_per_epoch:
            loss_total, n_total, wait_total = all_reduce_sum(
                [loss_sum.item() - window["loss"], n_finite.item() - window["n"], wait["window"]], device)
            elapsed = time.time() - window["t"]
            row = dict(step=state.global_step, epoch=state.epoch,
                       epoch_1000x=int((state.epoch + state.samples / epoch_images) * 1000), lr=lr,
                       loss=loss_total / n_total if n_total else math.nan,
                       img_per_s=window["imgs"] * world / max(elapsed, 1e-9), skipped_steps=state.skipped_total,
                       data_wait_frac=min(1.0, wait_total / world / max(elapsed, 1e-9)))
            metrics.write(**row)
            if show_progress:
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{row['img_per_s']:.0f}",
                                wait=f"{row['data_wait_frac']:.0%}")
            window = {"loss": loss_sum.item(), "n": n_finite.item(), "imgs": 0, "t": time.time()}
            wait["window"] = 0.0
        if stop_requested():
            stopped = True
            break
        if on_update is not None:
            on_update(state)
    if hasattr(batches, "close"):  # end the epoch's iterator here, as leaving a for loop over it would
        batches.close()
    elapsed = time.time() - epoch_t
    loss_total, n_total, wait_sum = all_reduce_sum([loss_sum.item(), n_finite.item(), wait["epoch"]], device)
    return {
        "loss": loss_total / n_total if n_total else math.nan,
        "img_per_s": epoch_imgs * world / max(elapsed, 1e-9),
        "steps": steps,
        "seconds": elapsed,
        "stopped": stopped,
        "data_wait_s": wait_sum / world,
        "data_wait_frac": min(1.0, wait_sum / world / max(elapsed, 1e-9)),
    }


class Loop:
    """The epochs of one training run, in plain sight: enter the epoch, run its steps, close it, checkpoint.

    A task subclasses it and overrides what is its own: :meth:`step` (one forward, returning the loss),
    :meth:`begin_epoch` (the loader and the number of optimizer steps; pre-training switches its FastMIM-P stage
    there), :meth:`end_epoch` (evaluation, logging, pictures) and :meth:`client_state` (what checkpoints hold
    besides the loop state). :meth:`run` does the rest: the per-update steps through :func:`train_one_epoch`,
    mid-epoch checkpoints every ``train.ckpt_every_steps``, epoch checkpoints every ``train.ckpt_every`` epochs
    and after the last, and the checkpoint of the exact position when ``stop_requested`` (SIGTERM) ends the run.

    Args:
        engine: the DeepSpeed engine.
        state: where the run is (a fresh :class:`LoopState`, or the one a resumed checkpoint held).
        scheduler: timm scheduler in epochs, stepped before every update.
        train: the run's ``train`` config section (epochs, checkpoint cadence, logging, max_nonfinite).
        ckpt_dir: ``<run>/ckpt``.
        metrics: the run's ``metrics.jsonl`` writer.
        show_progress: progress bar and epoch lines (rank 0).
        stop_requested: asked after every update, the same answer on every rank (``runtime.Preemption``).
        last_checkpoint: the checkpoint resumed from (named when the run diverges).
    """

    def __init__(self, engine, *, state: LoopState, scheduler, train: TrainCfg, ckpt_dir: Path,
                 metrics: MetricsWriter, show_progress: bool, stop_requested: Callable[[], bool] = lambda: False,
                 last_checkpoint: Path | None = None):
        self.engine, self.state, self.scheduler, self.train = engine, state, scheduler, train
        self.ckpt_dir, self.metrics, self.show_progress = ckpt_dir, metrics, show_progress
        self.stop_requested, self.last_checkpoint = stop_requested, last_checkpoint

    # --------------------------------------------------------------------------------------- what a task defines

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        """Forward of one micro batch (B, 3, H, W) + labels (B,): ``{"loss": scalar, ...}``."""
        raise NotImplementedError

    def begin_epoch(self, epoch: int) -> tuple[object, int]:
        """``(loader, optimizer steps in this epoch)``; may switch resolution stage, batch sizes and lr first."""
        raise NotImplementedError

    def end_epoch(self, epoch: int, stats: dict) -> None:
        """After a finished epoch (``stats`` from :func:`train_one_epoch`): evaluation, logging."""

    def client_state(self) -> dict:
        """Checkpoint contents besides the loop state (config, classes, ...)."""
        return {}

    # --------------------------------------------------------------------------------------- the loop itself

    def checkpoint(self) -> Path:
        """Saves the exact position (every rank); returns the tag folder."""
        self.last_checkpoint = save(self.engine, self.ckpt_dir, tag=f"step{self.state.global_step:08d}",
                                    client_state={**self.client_state(), **self.state.to_client()},
                                    keep_last=self.train.keep_last)
        return self.last_checkpoint

    def run(self, epochs: int) -> dict:
        """Trains from ``self.state`` to ``epochs``.

        Returns:
            the last epoch's stats plus ``preempted`` (True when ``stop_requested`` ended the run; a checkpoint of
            the exact position was written).

        Raises:
            TrainingDiverged: with the last good checkpoint in the message.
        """
        state, train, stats = self.state, self.train, {}
        while state.epoch < epochs:
            loader, updates = self.begin_epoch(state.epoch)
            if state.align(self.engine.train_batch_size()):
                logger.info("continuing epoch %d at image %d of its permutation (%d images per step now)",
                            state.epoch, state.samples, self.engine.train_batch_size())
            # whole global micro batches: the loader protocol's start_batch; else (another world size) the image offset
            micro = self.engine.train_batch_size() // self.engine.gradient_accumulation_steps()
            start_batch, rest = divmod(state.samples, micro)
            if rest:
                loader.set_epoch(state.epoch, start_sample=state.samples)
            else:
                loader.set_epoch(state.epoch, start_batch=start_batch)

            def mid_epoch_checkpoint(st: LoopState) -> None:
                if train.ckpt_every_steps and st.global_step % train.ckpt_every_steps == 0 and st.update < updates:
                    self.checkpoint()

            try:
                stats = train_one_epoch(
                    self.engine, loader, lambda _engine, images, labels: self.step(images, labels), state=state,
                    scheduler=self.scheduler, updates_per_epoch=updates, log_every=train.log_every,
                    metrics=self.metrics, show_progress=self.show_progress, max_nonfinite=train.max_nonfinite,
                    stop_requested=self.stop_requested, on_update=mid_epoch_checkpoint,
                )
            except TrainingDiverged as e:
                raise TrainingDiverged(f"{e}; last good checkpoint: {self.last_checkpoint or 'none'}") from None
            if stats["stopped"]:
                self.checkpoint()
                logger.warning("stop requested (SIGTERM): saved %s at epoch %d, step %d; continue with --resume "
                               "auto", self.last_checkpoint, state.epoch, state.global_step)
                return {**stats, "preempted": True}
            self.end_epoch(state.epoch, stats)
            state.epoch, state.update, state.samples = state.epoch + 1, 0, 0
            steps_due = train.ckpt_every_steps and state.global_step % train.ckpt_every_steps == 0
            if state.epoch == epochs or state.epoch % train.ckpt_every == 0 or steps_due:
                self.checkpoint()
        return {**stats, "preempted": False}


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, *, dtype: torch.dtype, show_progress: bool = False) -> dict:
    """Top-1/top-5 accuracy (%) and cross-entropy over the whole val set, exact across ranks.

    Each rank must see a disjoint shard (``fastmim_ds.data.val_loader`` does this); sums are all-reduced, so every image
    counts once.
    """
    model.eval()
    device = next(model.parameters()).device
    correct1 = correct5 = loss_sum = 0.0
    count = 0
    for images, labels in progress(loader, total=len(loader), desc="eval", enabled=show_progress):
        logits = model(images.to(dtype)).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices  # (B, k)
        hit = top.eq(labels[:, None])
        correct1 += hit[:, 0].sum().item()
        correct5 += hit.any(dim=1).sum().item()
        count += labels.shape[0]
    c1, c5, ls, n = all_reduce_sum([correct1, correct5, loss_sum, float(count)], device)
    model.train()
    if n == 0:
        return {"top1": math.nan, "top5": math.nan, "loss": math.nan, "images": 0}
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": ls / n, "images": int(n)}
