"""Runs the ``deepspeed`` launcher with its own INFO lines in a log file instead of the console.

``python -m fastmim_ds.launch [--verbose] [--log FILE] -- deepspeed --num_gpus 2 --module fastmim_ds pretrain ...``
(``make pretrain/finetune/linprobe`` and ``make demo`` launch this way).

The launcher (``deepspeed/launcher/runner.py`` and ``launch.py``) logs at INFO by default: the command it runs, the
world info, one line per spawned process and per process that exits, and a warning that no hostfile was found on
a single node. DeepSpeed has no environment variable for that level, and ``--log_level`` would drop the lines
instead of keeping them, so this wrapper reads the launcher's stdout (the ranks' too: they share it) and appends
those lines to ``FILE``; everything else -- the ranks' output, the launcher's other warnings and its errors --
passes through unchanged and at once (progress bars included: a partial line is held only while it can still
become a launcher line). The ranks' stderr (logging, progress bar) is not touched. On failure the log's path is
printed. ``--verbose`` (or ``FASTMIM_VERBOSE=1``) runs the command as it is, and the ranks keep every third-party
message (see :mod:`fastmim_ds.runtime`). The exit status is the launcher's.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import selectors
import signal
import subprocess
import sys
from pathlib import Path

__all__ = ["is_launcher_line", "main"]

VERBOSE_ENV = "FASTMIM_VERBOSE"  # as fastmim_ds.runtime.VERBOSE_ENV (not imported: that would import torch)

# "[2026-11-30 05:00:16,949] [INFO] [runner.py:618:main] cmd = ..." and the single-node hostfile notice
_LAUNCHER = re.compile(rb"^\[[\d\- :,]+\] \[(?:DEBUG|INFO)\] \[(?:runner|launch)\.py:\d+:")
_NO_HOSTFILE = re.compile(rb"^\[[\d\- :,]+\] \[WARNING\] \[runner\.py:\d+:fetch_hostfile\] Unable to find hostfile")


def is_launcher_line(line: bytes) -> bool:
    """Whether ``line`` is a DeepSpeed launcher message that belongs in the log file, not the console."""
    return bool(_LAUNCHER.match(line) or _NO_HOSTFILE.match(line))


def _split(buf: bytes) -> tuple[list[bytes], bytes]:
    """Complete lines of ``buf`` and the rest; a rest that cannot become a launcher line is a line of its own
    (a progress bar redrawn with ``\\r`` shows at once); launcher lines start with ``[``."""
    *lines, rest = buf.split(b"\n")
    lines = [line + b"\n" for line in lines]
    if rest and not (rest.startswith(b"[") and b"\r" not in rest and len(rest) < 1024):
        lines.append(rest)
        rest = b""
    return lines, rest


def _filter(proc: subprocess.Popen, log, console) -> None:
    """Copies ``proc.stdout`` to ``console``, launcher lines to ``log``, until the stream ends."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    rest = b""
    fd = proc.stdout.fileno()
    while True:
        sel.select()
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        lines, rest = _split(rest + chunk)
        for line in lines:
            if is_launcher_line(line):
                log.write(line)
                log.flush()
            else:
                console.write(line)
        console.flush()
    if rest:
        (log if is_launcher_line(rest) else console).write(rest)
        console.flush()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastmim_ds.launch", description=__doc__.splitlines()[0])
    p.add_argument("--verbose", action="store_true", help="print everything (launcher INFO lines, every warning)")
    p.add_argument("--log", default="output/launcher.log", help="file the launcher's INFO lines are appended to")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- deepspeed ARGS...")
    args = p.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        p.error("give the launcher command after --")
    if args.verbose or os.environ.get(VERBOSE_ENV, "") not in ("", "0"):
        return subprocess.call(cmd, env={**os.environ, VERBOSE_ENV: "1"})
    log_path = Path(args.log)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        line = " ".join(cmd).replace("\n", "\\n")
        log.write(f"# {datetime.datetime.now():%Y-%m-%d %H:%M:%S} {line}\n".encode())
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
        # Ctrl-C reaches the launcher and its ranks directly (same process group); a SIGTERM sent to this wrapper
        # is passed on, so that the launcher can forward it to the ranks (they checkpoint and stop).
        signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _filter(proc, log, sys.stdout.buffer)
        rc = proc.wait()
    if rc != 0:
        print(f"launcher log: {log_path}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
