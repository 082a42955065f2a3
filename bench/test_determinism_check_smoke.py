"""bench/determinism_check.py on its --small shapes: on the CPU in Triton's interpreter (the script, not the
card; two cases, to keep CI short), on a GPU every case."""
import os

import torch

from measure import run_script

HERE = os.path.dirname(os.path.abspath(__file__))


def test_determinism_check_small_runs_agree():
    on_gpu = torch.cuda.is_available()
    cases = [] if on_gpu else ["--cases", "vit_step_mlerp,vit_model"]
    done = run_script("determinism_check.py", "--small", "--runs", "2", *cases, cwd=HERE)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert '"check": "vit_model", "runs": 2, "differing_runs": 0, "ok": true' in done.stdout
    assert "determinism PASSED" in done.stdout
