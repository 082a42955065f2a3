"""The parts of bench/probe.py and bench/export_check.py that run without a GPU."""
import torch

import export_check
import probe


def test_probe_refuses_without_cuda(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert probe.main([]) == 2
    assert "needs CUDA" in capsys.readouterr().err


def test_export_check_refuses_without_cuda(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert export_check.main([]) == 2
    assert "needs CUDA" in capsys.readouterr().err


def test_probe_times_the_most_important_cases_first():
    cases = probe.attention_cases()
    assert cases[:4] == [("fp16", 64, 197, b) for b in probe.BATCHES]
    assert len(cases) == len(set(cases)) == 4 * 7 * 3 * 2
    first_other_head_dim = next(i for i, c in enumerate(cases) if c[1] != 64)
    assert all(c[1] == 64 for c in cases[:first_other_head_dim])


def test_the_winner_is_the_fastest_unless_the_mask_ties_it():
    assert probe.pick_winner({"mask": 28.4, "cudnn": 28.3}) == "mask"  # the H200's B=8 N=197: a tie
    assert probe.pick_winner({"mask": 28.4, "cudnn": 20.0, "triton_m64n64w4": 17.0}) == "triton_m64n64w4"
    assert probe.pick_winner({"cudnn": 10.0, "triton_m64n32w4": 10.2}) == "triton_m64n32w4"


def test_the_table_keeps_other_rows_and_replaces_the_ones_measured_again(tmp_path):
    import json

    from tofu_triton import dispatch

    shape = lambda b: dict(B=b, N=197, D=64)  # noqa: E731
    old = [dict(card="NVIDIA H200", dtype="float16", shape=shape(8), winner="mask", us={}),
           dict(card="NVIDIA H200", dtype="float16", shape=shape(64), winner="mask", us={}),  # not reached: stays
           dict(card="NVIDIA A100", dtype="float16", shape=shape(8), winner="cudnn", us={})]
    (tmp_path / "attention.json").write_text(json.dumps(dict(op="attention", note="seed", rows=old)))
    env = dict(device="NVIDIA H200", date="2026-12-05 10:00:00 UTC", torch="2.11.0", triton="3.6.0")
    rows = [dict(dtype="float16", B=8, N=197, D=64, winner="vsize", ms={"vsize": 0.02, "mask": 0.03},
                 no_bias_ms=0.015),
            dict(dtype="float16", B=1, N=25, D=64, ms={}, no_bias_ms=0.01)]  # every path failed: no row
    prov = dict(card="NVIDIA H200", date="2026-12-05", commit="abc", torch="2.11.0", triton="3.6.0", command="x")
    try:
        dispatch.update_table("attention", prov, probe.table_rows(rows, env), tmp_path)
    finally:
        dispatch.clear_cache()
    new = json.loads((tmp_path / "attention.json").read_text())
    assert new["op"] == "attention" and new["provenance"] == prov and "note" not in new
    assert new["rows"][:2] == old[1:]
    assert new["rows"][2:] == [dict(card="NVIDIA H200", dtype="float16", shape=shape(8), winner="vsize",
                                    us={"vsize": 20.0, "mask": 30.0}, no_bias_us=15.0)]
