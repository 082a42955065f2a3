"""bench/sd_check.py end to end on its --small case: on the CPU in Triton's interpreter (it checks the
script and the kernels' logic, not their behaviour on a GPU), on a GPU for real."""
import os
import subprocess
import sys

import pytest

from measure import run_script

HERE = os.path.dirname(os.path.abspath(__file__))


def test_sd_check_small_case_passes():
    done = run_script("sd_check.py", "--small")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "sd_check PASSED" in done.stdout
    assert '"check": "select"' in done.stdout and '"failures": 0' in done.stdout


def test_sd_check_refuses_a_full_run_without_a_gpu(tmp_path):
    if _cuda():
        pytest.skip("with a GPU the full run is the check itself (gpu_check.sh's sdcheck stage)")
    done = subprocess.run([sys.executable, os.path.join(HERE, "sd_check.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "needs a CUDA GPU" in done.stderr and not os.listdir(tmp_path)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_sd_check_report_files(tmp_path):
    sys.path.insert(0, HERE)
    import sd_check

    ms = dict(partition=0.01, scores=0.2, select=0.05, merge_mlerp=0.03, unmerge_residual=0.02,
              tomesd_like_argsort=0.04)
    rows = [dict(check="select", n=4096, runs=9, failures=0), dict(check="timing", n=4096, c=320, batch=2, ms=ms)]
    env = dict(card="card", torch="t", triton="tr", date="2026-11-26", command="python bench/sd_check.py")
    sd_check.write_report(str(tmp_path), env, True, rows)
    table = (tmp_path / "sd_check.md").read_text()
    assert "| 4096 | 0.010 | 0.200 | 0.050 | 0.030 | 0.020 | 0.040 |" in table and "all checks passed" in table
    assert '"failures": 0' in (tmp_path / "sd_check.json").read_text()
