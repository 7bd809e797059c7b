"""``make gpu-check``: the dry run (every stage end to end, tiny sizes, on the CPU) writes every file and renders the
report; on a CUDA machine the real stages run (marked ``gpu``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

STAGES = ("peak", "step", "ffcv", "zero", "pretrain")


def _run(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(900)
def test_dry_run_writes_every_stage_and_the_report(tmp_path):
    out = tmp_path / "results"
    proc = _run(["--device", "cpu", "--dry-run", "--out", str(out), "--data", str(tmp_path / "data"),
                 "--pretrain-seconds", "6"], timeout=880)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for stage in STAGES:
        res = json.loads((out / f"{stage}.json").read_text())
        assert "error" not in res, f"{stage}: {res.get('error')}"
    assert json.loads((out / "peak.json").read_text())["bf16_tflops"] > 0
    step = json.loads((out / "step.json").read_text())
    assert step["img_per_s"] > 0 and 0 < step["utilisation"] < 1.5
    assert json.loads((out / "ffcv.json").read_text())["img_per_s"] > 0
    zero = json.loads((out / "zero.json").read_text())
    assert zero["zero0"]["total"] > 0 and zero["zero2"]["total"] > 0
    pre = json.loads((out / "pretrain.json").read_text())
    assert pre["exit_code"] == 0 and pre["steps"] >= 1 and pre["loss_first"] > 0
    assert pre["data_wait_frac"] is not None and 0 <= pre["data_wait_frac"] <= 1
    report = (out / "REPORT.md").read_text()
    assert "dry run" in report and "failed" not in report and "not run" not in report
    for stage in STAGES:
        assert f"| {stage} |" in report
    # the renderer alone gives the same report from the files
    (out / "REPORT.md").unlink()
    assert _run(["--report-only", "--out", str(out)], timeout=120).returncode == 0
    assert (out / "REPORT.md").read_text() == report


def test_report_marks_failed_and_missing_stages(tmp_path):
    sys.path.insert(0, str(REPO))
    from benchmarks.gpu_check import render

    (tmp_path / "peak.json").write_text(json.dumps({"error": "Traceback ...\nRuntimeError: no GPU", "seconds": 1}))
    text = render(tmp_path).read_text()
    assert "| peak | **failed**: Traceback" in text and "| step | not run |" in text


def test_cpu_without_dry_run_is_refused(tmp_path):
    proc = _run(["--device", "cpu", "--out", str(tmp_path)], timeout=120)
    assert proc.returncode != 0 and "--dry-run" in proc.stderr


@pytest.mark.gpu
@pytest.mark.timeout(600)
def test_gpu_check_cuda_stages(tmp_path):
    """The real sizes of the fast stages on the GPU (``make gpu-check`` runs all five)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    out = tmp_path / "cuda"
    proc = _run(["--device", "cuda", "--out", str(out), "--stages", "peak", "step", "zero"], timeout=580)
    assert proc.returncode == 0, proc.stderr[-4000:]
    step = json.loads((out / "step.json").read_text())
    assert "error" not in step and step["dtype"] == "bf16" and step["img_per_s"] > 0
    assert 0 < step["utilisation"] < 1.0
    zero = json.loads((out / "zero.json").read_text())
    assert zero["zero0"]["cuda_peak_allocated"] > 0
