"""bench/sd_check.py end to end on its --small case: on the CPU in Triton's interpreter (it checks the
script and the kernels' logic, not their behaviour on a GPU), on a GPU for real."""
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def test_sd_check_small_case_passes():
    env = dict(os.environ, TRITON_INTERPRET="1") if not _cuda() else dict(os.environ)
    done = subprocess.run([sys.executable, os.path.join(HERE, "sd_check.py"), "--small"], capture_output=True,
                          text=True, env=env, timeout=600)
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
