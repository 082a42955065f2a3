"""bench/tournament_sd.py on its --small case (on the CPU in Triton's interpreter: it checks the
script and the candidates' outputs, not their speed), and its dispatch-table writer."""
import json
import os
import sys

import pytest
import torch

from tofu_triton import dispatch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import tournament_sd  # noqa: E402
from measure import run_script  # noqa: E402

ON_GPU = torch.cuda.is_available()


def _run(*args):
    return run_script("tournament_sd.py", *args)


def test_small_run_checks_and_times_every_candidate(tmp_path):
    tables = {op: (dispatch.TABLE_DIR / f"{op}.json") for op in tournament_sd.TABLES}
    before = {op: path.read_bytes() if path.exists() else None for op, path in tables.items()}
    done = _run("--small", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "tournament_sd PASSED" in done.stdout
    result = json.loads((tmp_path / "tournament_sd.json").read_text())
    by_op = {row["op"]: row for row in result["rows"]}
    assert set(by_op) == {"spatial_select", "spatial_scores", "sd_step"}
    assert set(by_op["spatial_select"]["us"]) == {"radix64", "sort", "topk", "fused", "argsort"}
    assert set(by_op["spatial_scores"]["us"]) == {"match", "dot"}
    assert len(by_op["sd_step"]["us"]) == 8 and all(v is not None for v in by_op["sd_step"]["us"].values())
    assert by_op["spatial_select"]["winner"] in ("radix64", "sort", "topk", "fused")  # the baseline argsort never wins
    assert "## spatial_select" in (tmp_path / "tournament_sd.md").read_text()
    assert result["provenance"]["commit"] and result["provenance"]["command"].endswith(f"--out {tmp_path}")
    # The committed tables are never rewritten without --write-table.
    assert before == {op: path.read_bytes() if path.exists() else None for op, path in tables.items()}


def test_write_table_needs_a_gpu(tmp_path):
    if ON_GPU:
        pytest.skip("with a GPU --write-table is the tournament's job (gpu_check.sh)")
    done = _run("--small", "--write-table", "--out", str(tmp_path))
    assert done.returncode == 2 and "--write-table needs a GPU" in done.stderr


def test_write_tables_replaces_this_cards_rows_and_dispatch_reads_them(tmp_path, monkeypatch):
    old_row = dict(card="Card A", dtype="float16", shape=dict(B=2, N=4096), winner="radix64",
                   us=dict(radix64=224.0, sort=None))
    other_card = dict(old_row, card="Card B")
    (tmp_path / "spatial_select.json").write_text(json.dumps(dict(op="spatial_select", rows=[old_row, other_card],
                                                                  note="no row yet", measured=[old_row])))
    rows = [dict(op="spatial_select", dtype="float16", shape=dict(B=2, N=4096), winner="sort",
                 us=dict(radix64=200.0, sort=40.0, argsort=30.0), failed=[]),
            dict(op="spatial_scores", dtype="float16", shape=dict(B=2, N=4096, C=320), winner="dot",
                 us=dict(match=100.0, dot=20.0), failed=[]),
            dict(op="sd_step", dtype="float16", shape=dict(B=2, N=4096, C=320), winner="dot+sort",
                 us={"dot+sort": 60.0}, failed=[])]
    prov = dict(card="Card A", date="d", commit="c", torch="t", triton="tr", command="cmd")
    monkeypatch.setattr(dispatch, "TABLE_DIR", tmp_path)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Card A")
    tournament_sd.write_tables(prov, rows, table_dir=tmp_path)
    select = json.loads((tmp_path / "spatial_select.json").read_text())
    assert [(r["card"], r["winner"]) for r in select["rows"]] == [("Card B", "radix64"), ("Card A", "sort")]
    assert select["provenance"] == prov and "note" not in select and select["measured"] == [old_row]
    scores = json.loads((tmp_path / "spatial_scores.json").read_text())
    assert scores["rows"][0]["shape"] == dict(B=2, N=4096, C=320)
    try:
        assert dispatch.winner("spatial_select", "cuda:0", torch.float16, "radix64", B=2, N=16384) == "sort"
        assert dispatch.winner("spatial_scores", "cuda:0", torch.float16, "match", B=1, N=4096, C=640) == "dot"
    finally:
        dispatch.clear_cache()
