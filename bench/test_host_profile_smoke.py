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
    profile = forward["patched_profile"]  # in the interpreter its own Python dominates: only the form is checked
    assert len(profile) == 25 and all(row["self_us"] <= row["total_us"] and row["calls"] > 0 for row in profile)
    assert [row["self_us"] for row in profile] == sorted((row["self_us"] for row in profile), reverse=True)
    assert "more per block" in (tmp_path / "host_profile.md").read_text()


def test_host_bound_batches_come_from_eager_against_graph():
    import host_profile

    def row(b, ex, ms, variant="tofu"):
        return dict(batch=b, exec=ex, ms_per_batch=ms, variant=variant)

    # The H200's ViT-B r=16 of run 4: eager 9.96 / 7.92 / 8.36 / 15.17 ms against graph 0.86 / 1.11 / 4.08 / 14.88.
    rows = [row(1, "eager", 9.96), row(1, "graph", 0.86), row(8, "eager", 7.92), row(8, "graph", 1.11),
            row(64, "eager", 8.36), row(64, "graph", 4.08), row(256, "eager", 15.17), row(256, "graph", 14.88),
            row(512, "eager", 99.0, "unpatched"), row(512, "graph", 1.0, "unpatched")]
    assert host_profile.host_bound_batch({"rows": rows}) == 64
    assert host_profile.host_bound_batch({"rows": rows[6:]}) == 0


def test_tables_need_the_throughput_run(tmp_path):
    done = run_script("host_profile.py", "--tables-from", str(tmp_path / "host_profile.json"))
    assert done.returncode == 2 and "need --throughput" in done.stderr
