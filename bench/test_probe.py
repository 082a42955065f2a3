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


def test_the_table_keeps_other_cards_and_replaces_this_ones():
    env = dict(device="NVIDIA H200", date="2026-12-05 10:00:00 UTC", torch="2.11.0", triton="3.6.0")
    old = dict(rows=[dict(card="NVIDIA H200", winner="mask"), dict(card="NVIDIA A100", winner="cudnn")])
    rows = [dict(dtype="float16", B=8, N=197, D=64, winner="vsize", ms={"vsize": 0.02, "mask": 0.03},
                 no_bias_ms=0.015),
            dict(dtype="float16", B=1, N=25, D=64, ms={}, no_bias_ms=0.01)]  # every path failed: no row
    new = probe.table(rows, env, "python bench/probe.py --write-table", old)
    assert new["op"] == "attention" and new["provenance"]["card"] == "NVIDIA H200"
    assert [r["card"] for r in new["rows"]] == ["NVIDIA A100", "NVIDIA H200"]
    assert new["rows"][1] == dict(card="NVIDIA H200", dtype="float16", shape=dict(B=8, N=197, D=64), winner="vsize",
                                  us={"vsize": 20.0, "mask": 30.0}, no_bias_us=15.0)
