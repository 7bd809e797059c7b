"""Process-level setup: distributed init, device, threads, seeds, rank-0 logging, run folders.

Quiet by default (issue 17): rank 0 prints the run folder, the config summary, the progress bar and one line per
epoch; every rank prints a given warning or error once. Known third-party noise is handled where it starts:
DeepSpeed's deprecated ``all_gather_into_tensor``/``reduce_scatter_tensor`` calls are pointed at torch's current
collectives, and the notices DeepSpeed prints while setting up (a CPU run's "No CUDA runtime is found", "... built
successfully") or while consolidating ZeRO shards ("Reconstructed fp32 state dict ...", its progress bars) are
logged at DEBUG level, i.e. not shown. ``FASTMIM_VERBOSE=1`` (``make ... VERBOSE=1``,
``python -m fastmim_ds.launch --verbose``) leaves all of it as it was.
"""
from __future__ import annotations

import contextlib
import datetime
import io
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = [
    "Dist", "init_distributed", "slurm_environment", "setup_logging", "seed_everything", "git_sha", "make_run_dir",
    "Preemption", "check_output_dir", "verbose", "stdout_to_log", "VERBOSE_ENV",
]

VERBOSE_ENV = "FASTMIM_VERBOSE"  # "1": every third-party message comes back (set by fastmim_ds.launch --verbose)


def verbose() -> bool:
    """Whether the user asked for everything (``FASTMIM_VERBOSE=1``)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


@contextlib.contextmanager
def stdout_to_log(log: logging.Logger, level: int = logging.DEBUG, *, stderr: bool = False):
    """Sends what third-party code ``print``s inside the block (and, with ``stderr``, its progress bars) to ``log``
    at ``level``: DEBUG records are not shown. With ``FASTMIM_VERBOSE=1`` they go to the console as before.

    Our own log records are unaffected: the logging handlers hold the stream they were created with.
    """
    if verbose():
        yield
        return
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), (contextlib.redirect_stderr(buf) if stderr else contextlib.nullcontext()):
            yield
    finally:
        for line in buf.getvalue().splitlines():
            if line.strip():
                log.log(level, "%s", line)


def _use_current_collectives() -> None:
    """Points DeepSpeed's communication backend at torch's current collectives.

    DeepSpeed 0.19 picks ``torch.distributed.all_gather_into_tensor`` and ``reduce_scatter_tensor``, which torch
    2.14 deprecates (a FutureWarning on every rank) in favour of ``all_gather_single`` / ``reduce_scatter_single``,
    the functions the deprecated ones now forward to: same arguments, same result.
    """
    from deepspeed.comm import comm as ds_comm

    cdb = getattr(ds_comm, "cdb", None)
    td = torch.distributed
    for attr, old, new in (("all_gather_function", "all_gather_into_tensor", "all_gather_single"),
                           ("reduce_scatter_function", "reduce_scatter_tensor", "reduce_scatter_single")):
        if cdb is not None and hasattr(td, new) and getattr(cdb, attr, None) is getattr(td, old, None):
            setattr(cdb, attr, getattr(td, new))


@dataclass(frozen=True)
class Dist:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_environment() -> dict[str, str] | None:
    """The torch.distributed variables of an ``srun`` task, or None outside an srun step.

    Used when the launcher set no ``RANK`` (``srun python -m fastmim_ds ...``: one process per task) and the
    process is a task of an srun step (``SLURM_STEP_NUM_TASKS`` set; a batch script's own shell is not). Values come
    from submitit's SLURM job environment (``submitit.slurm.slurm.SlurmJobEnvironment``, which also parses node
    lists such as ``gpu[001-004,007]``), read at the step level where the step's variables exist (an srun may use a
    subset of the allocation):

    * ``RANK`` = ``SLURM_PROCID``, ``LOCAL_RANK`` = ``SLURM_LOCALID``, ``WORLD_SIZE`` = ``SLURM_STEP_NUM_TASKS``
      (``SLURM_NTASKS``), ``LOCAL_SIZE`` = tasks / nodes of the step;
    * ``MASTER_ADDR`` = the first host of ``SLURM_STEP_NODELIST`` (``SLURM_JOB_NODELIST``), unless set;
    * ``MASTER_PORT`` = as ``submitit.helpers.TorchDistributedEnvironment``: ``MASTER_PORT`` if set, else a port in
      [20000, 60000] drawn from the job id (the same on every task of the job).

    Raises:
        RuntimeError: the node list cannot be parsed, or the rank variables are inconsistent (one line).
    """
    if "RANK" in os.environ or "SLURM_STEP_NUM_TASKS" not in os.environ:
        return None
    import types

    from submitit.helpers import TorchDistributedEnvironment
    from submitit.slurm.slurm import SlurmJobEnvironment

    step = {"num_tasks": "SLURM_STEP_NUM_TASKS", "num_nodes": "SLURM_STEP_NUM_NODES", "nodes": "SLURM_STEP_NODELIST"}

    class _SlurmStepEnvironment(SlurmJobEnvironment):
        _env = {**SlurmJobEnvironment._env, **{k: v for k, v in step.items() if v in os.environ}}

    env = _SlurmStepEnvironment()
    try:
        hosts = env.hostnames
    except Exception as e:  # submitit's SlurmParseException
        raise RuntimeError(f"SLURM: cannot read the node list ({e})") from None
    rank, world, local_rank, nodes = env.global_rank, env.num_tasks, env.local_rank, max(1, env.num_nodes)
    if not 0 <= rank < world:
        raise RuntimeError(f"SLURM: SLURM_PROCID={rank} is not in [0, {world}) tasks")
    port = TorchDistributedEnvironment._get_master_port(types.SimpleNamespace(_job_env=env))
    return {"RANK": str(rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world),
            "LOCAL_SIZE": str(max(1, world // nodes)), "MASTER_ADDR": os.environ.get("MASTER_ADDR", hosts[0]),
            "MASTER_PORT": str(port)}


def init_distributed() -> Dist:
    """Initialises torch.distributed through DeepSpeed from the launcher's environment.

    Works under ``deepspeed`` and ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT), under
    ``srun`` (one process per task; the same variables from SLURM's, see :func:`slurm_environment`), and as a plain
    single process (a 1-rank group on localhost). The backend is the accelerator's: nccl on GPUs, gloo on CPUs
    (``DS_ACCELERATOR=cpu``). A task that sees fewer GPUs than its local rank (``--gpus-per-task``) uses
    ``local_rank % visible GPUs``.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    slurm = slurm_environment()
    if slurm is not None:
        os.environ.update(slurm)
        logger.info("SLURM task: rank %s of %s (local %s), master %s:%s", slurm["RANK"], slurm["WORLD_SIZE"],
                    slurm["LOCAL_RANK"], slurm["MASTER_ADDR"], slurm["MASTER_PORT"])
    elif "RANK" not in os.environ:  # plain `python -m fastmim_ds pretrain`: one rank
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    acc = get_accelerator()
    index = local_rank
    if acc.device_name() != "cpu":
        index = local_rank % max(1, acc.device_count())
        acc.set_device(index)
    elif not verbose():  # expected without a GPU: torch's C++ extension loader warns once per rank
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    with stdout_to_log(logger):  # "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully"
        deepspeed.init_distributed(dist_backend=acc.communication_backend_name())
    _use_current_collectives()
    if acc.device_name() == "cpu":
        unlink_shm_buffer()
    world = torch.distributed.get_world_size()
    local_world = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", world)))
    device = torch.device(acc.device_name(index)) if acc.device_name() != "cpu" else torch.device("cpu")
    if device.type == "cpu":  # share the node's cores between its ranks
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    return Dist(torch.distributed.get_rank(), local_rank, world, local_world, device)


def close_distributed() -> None:
    """Destroys the default process group; call it once every rank has finished its work normally.

    Without it gloo's worker threads outlive the interpreter and a rank can abort on its way out, after the run
    is complete ("terminate called without an active exception", SIGABRT; pytorch/pytorch#190489), which a
    launcher reports as a failed job. Not called after an error: a rank still inside a collective would keep
    the others waiting (the pattern torchtitan follows). A no-op when no group was started.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def shm_buffer_path(rank: int | None = None) -> Path:
    """``/dev/shm`` file of DeepSpeed's CPU shared-memory all-reduce buffer of ``rank`` (default: this process's
    global rank) for this run's MASTER_ADDR / MASTER_PORT (``shm.cpp``: ``deepspeed_allreduce_buffer_<uid>_<addr>_
    <port>_<rank>``, about 69 MB)."""
    rank = torch.distributed.get_rank() if rank is None else rank
    return Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                               f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def unlink_shm_buffer() -> None:
    """Removes this rank's DeepSpeed shared-memory all-reduce buffer file once every rank has mapped every other's.

    DeepSpeed's CPU backend never unlinks these files, so each CPU run left ~69 MB per rank in ``/dev/shm`` (RAM)
    after it ended. The mappings stay valid after the unlink (POSIX), so the collectives are unaffected; the memory
    is freed when the last rank exits, even after a SIGKILL. Collective: a barrier first (every rank opened the
    other ranks' files inside ``init_distributed``).
    """
    torch.distributed.barrier()
    shm_buffer_path().unlink(missing_ok=True)


class _Once(logging.Filter):
    """Lets each distinct warning/error through once per process (a FutureWarning raised every epoch, a
    per-step notice): the console shows it at its first occurrence only. INFO records always pass."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.levelno, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def setup_logging(rank: int, log_file: Path | None = None) -> None:
    """Rank 0 logs INFO to stderr (and ``log_file``); other ranks log warnings and errors only.

    Python warnings go through the same handlers (``logging.captureWarnings``), and each distinct warning or error
    is printed once per rank (the ``warnings`` module's own "once per location" is reset whenever a library
    changes the warning filters, which FFCV and DeepSpeed do every epoch). ``FASTMIM_VERBOSE=1`` keeps every
    repetition and DeepSpeed's INFO messages.
    """
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    level = logging.INFO if rank == 0 else logging.WARNING
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(name)s: %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None and rank == 0:
        handlers.append(logging.FileHandler(log_file))
    for h in handlers:
        h.setFormatter(fmt)
        if not verbose():
            h.addFilter(_Once())  # one per handler: a shared one would pass a warning to the console only
        root.addHandler(h)
    root.setLevel(level)
    logging.captureWarnings(True)
    for noisy in ("DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose() and rank == 0 else logging.WARNING)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def make_run_dir(output_dir: str, run_name: str, default_name: str, *, resume: str | None) -> Path:
    """``output_dir/run_name`` (or ``output_dir/<timestamp>-<default_name>``), identical on every rank.

    With ``resume=auto`` and no ``run_name``, the newest run of the same ``default_name`` is continued.
    The timestamp comes from rank 0 (broadcast), so all ranks agree.
    """
    root = Path(output_dir)
    if run_name:
        return root / run_name
    if resume == "auto" and root.is_dir():
        runs = sorted(p for p in root.iterdir() if p.is_dir() and p.name.endswith(default_name))
        if runs:
            return runs[-1]
    stamp = [datetime.datetime.now().strftime("%Y%m%d-%H%M%S")]
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(stamp, src=0)
    return root / f"{stamp[0]}-{default_name}"


class Preemption:
    """SIGTERM (preemption, ``scancel``, the ``deepspeed`` launcher stopping) -> checkpoint at the next step, exit.

    The handler only sets a flag; :meth:`requested`, asked once per optimizer step by the loop, all-reduces it
    (max) so every rank stops at the same step even when the signal reached only some of them. The
    ``deepspeed`` launcher forwards SIGTERM to the ranks and SIGKILLs them 30 s later: the current step plus the
    checkpoint must fit in that grace (SLURM: ``--signal=TERM@120`` gives more).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.flag = False
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame) -> None:
        if not self.flag:
            logger.warning("SIGTERM received: saving a checkpoint after the current step")
        self.flag = True

    def requested(self) -> bool:
        t = torch.tensor([1.0 if self.flag else 0.0], device=self.device)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())


def check_output_dir(path: Path, *, checkpoint_bytes: int, keep_last: int) -> None:
    """Fails before training when checkpoints cannot be written to ``path``; warns when space runs short.

    Args:
        checkpoint_bytes: estimated size of one checkpoint (all ranks' files).
        keep_last: checkpoints kept; ``keep_last + 1`` exist while a new one is written.

    Raises:
        OSError: ``path`` cannot be created or written, or has room for less than one checkpoint.
    """
    probe = path / f".write_test.{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise OSError(f"cannot write checkpoints to {path}: {e.strerror or e}") from None
    free = shutil.disk_usage(path).free
    gib = 2**30
    if free < checkpoint_bytes:
        raise OSError(f"{path}: {free / gib:.1f} GiB free, one checkpoint needs ~{checkpoint_bytes / gib:.1f} GiB "
                      f"(free space or set train.output_dir elsewhere)")
    if free < (keep_last + 1) * checkpoint_bytes:
        logger.warning("%s: %.1f GiB free, %d checkpoints of ~%.1f GiB need more (lower train.keep_last)", path,
                       free / gib, keep_last + 1, checkpoint_bytes / gib)
