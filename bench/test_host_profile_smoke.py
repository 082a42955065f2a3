"""bench/host_profile.py on its --small case (CPU, Triton's interpreter: it checks that the script runs every
piece and writes its report; the times mean nothing there)."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import run_script  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs at full size (gpu_check.sh)")
def test_small_run_times_every_piece_and_both_forwards(tmp_path):
    done = run_script("host_profile.py", "--small", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "host_profile.json").read_text())
    pieces = result["pieces_us"]
    for name in ("torch_add", "triton_noop", "head_mean", "select", "merge_forward", "sdpa, no bias",
                 "token_fusion_step [three_launch]", "token_fusion_step [four_launch]", "sized_attention [mask]"):
        assert pieces[name] > 0, name
    forward = result["forward"]
    assert forward["unpatched_us"] > 0 and forward["patched_us"] > 0
    assert "more per block" in (tmp_path / "host_profile.md").read_text()
