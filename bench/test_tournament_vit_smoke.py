"""bench/tournament_vit.py on its --small case (on the CPU in Triton's interpreter: it checks the
script and every candidate's output, not their speed), and its dispatch-table writer."""
import json
import os
import sys

import pytest
import torch

from tofu_triton import dispatch
from tofu_triton.kernels import merge, step

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import tournament_vit  # noqa: E402
from measure import run_script  # noqa: E402

ON_GPU = torch.cuda.is_available()


def _run(*args):
    return run_script("tournament_vit.py", *args)


def test_small_run_checks_and_times_every_candidate(tmp_path):
    table = dispatch.TABLE_DIR / "vit_step.json"
    before = table.read_bytes()
    done = _run("--small", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "tournament_vit PASSED" in done.stdout
    result = json.loads((tmp_path / "tournament_vit.json").read_text())
    (row,) = result["rows"]
    assert set(row["us"]) == set(step.STEP_PATHS) | {"one_launch[T=1]"}
    assert row["failed"] == [] and all(v is not None for v in row["us"].values())
    assert row["winner"] in step.STEP_PATHS  # a T variant is information, never a dispatch answer
    assert row["shape"] == dict(B=2, N=17, C=32, D=16) and row["r"] == 8
    # Where the paths' time goes: each launch before the merge, and every merge variant (the paths ran the fastest).
    assert set(row["parts_us"]) == {"head_mean", "match", "select", "plan (metric)", "plan (keys)"}
    assert all(v > 0 for v in row["parts_us"].values())
    assert set(row["merge"]["us"]) == set(merge.MERGE_VARIANTS) and row["merge"]["failed"] == []
    assert all(v > 0 for v in row["merge"]["us"].values()) and row["merge"]["winner"] in merge.MERGE_VARIANTS
    assert "| tiny | float16 | 2 |" in (tmp_path / "tournament_vit.md").read_text()
    assert result["provenance"]["commit"] and result["provenance"]["command"].endswith(f"--out {tmp_path}")
    assert table.read_bytes() == before  # the committed table is never rewritten without --write-table


def test_write_table_needs_a_gpu(tmp_path, capsys):
    if ON_GPU:
        pytest.skip("with a GPU --write-table is the tournament's job (gpu_check.sh)")
    assert tournament_vit.main(["--small", "--write-table", "--out", str(tmp_path)]) == 2
    assert "--write-table needs a GPU" in capsys.readouterr().err
    assert not (tmp_path / "tournament_vit.json").exists()


def test_write_table_replaces_this_cards_rows_and_dispatch_reads_them(tmp_path, monkeypatch):
    shape = dict(B=8, N=197, C=768, D=64)
    old = dict(card="Card A", dtype="float16", shape=shape, winner="three_launch", us=dict(three_launch=30.0))
    other_card = dict(old, card="Card B")
    other_shape = dict(old, shape=dict(shape, B=1))
    (tmp_path / "vit_step.json").write_text(json.dumps(dict(op="vit_step", rows=[old, other_card, other_shape])))
    rows = [dict(op="vit_step", model="ViT-B/16", dtype="float16", shape=shape, r=16, failed=[], winner="two_launch",
                 us={"one_launch": 90.0, "two_launch": 20.0, "three_launch": 29.0, "one_launch[T=1]": 95.0},
                 merge=dict(us={"rows": 12.0, "tiles4": 7.5}, failed=[], winner="tiles4"))]
    prov = dict(card="Card A", date="d", commit="c", torch="t", triton="tr", command="cmd")
    monkeypatch.setattr(dispatch, "TABLE_DIR", tmp_path)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Card A")
    try:
        tournament_vit.write_table(prov, rows, table_dir=tmp_path)
        table = json.loads((tmp_path / "vit_step.json").read_text())
        assert [(r["card"], r["shape"]["B"], r["winner"]) for r in table["rows"]] == [
            ("Card B", 8, "three_launch"), ("Card A", 1, "three_launch"), ("Card A", 8, "two_launch")]
        assert table["provenance"] == prov and "one_launch[T=1]" not in table["rows"][-1]["us"]
        assert dispatch.winner("vit_step", "cuda:0", torch.float16, "x", B=16, N=197, C=768, D=64) == "two_launch"
        assert dispatch.winner("vit_step", "cuda:0", torch.float16, "x", allowed=("one_launch", "three_launch"),
                               B=16, N=197, C=768, D=64) == "three_launch"
        merges = json.loads((tmp_path / "vit_merge.json").read_text())
        assert [(r["shape"], r["winner"]) for r in merges["rows"]] == [(dict(B=8, N=197, C=768), "tiles4")]
        assert dispatch.winner("vit_merge", "cuda:0", torch.float16, "rows", B=8, N=197, C=768) == "tiles4"
    finally:
        dispatch.clear_cache()
