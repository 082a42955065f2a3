"""Keeps bench/plans_cpu.py from rotting: two Euler steps of the PixArt layout at an 8x8 latent, every row."""
import json

import pytest

pytest.importorskip("diffusers", reason="diffusers is not installed (pip install -e \".[test]\")")

import plans_cpu  # noqa: E402

from tofu_triton.testing import one_thread  # noqa: E402


def test_plans_cpu_smoke(tmp_path):
    with one_thread():
        argv = ["--families", "pixart", "--size", "8", "--steps", "2", "--out", str(tmp_path)]
        assert plans_cpu.main(argv) == 0
    report = json.loads((tmp_path / "plans_cpu.json").read_text())
    rows = {r["row"]: r for r in report["rows"]}
    assert list(rows) == list(plans_cpu.ROWS)
    assert rows["unpatched"]["rel_l2"] == 0 and rows["unpatched"]["update_rel_l2"] == 0
    for name, row in rows.items():
        if name != "unpatched":  # every setting merged something, and the loop stayed near the unpatched one
            assert 0 < row["rel_l2"] < row["update_rel_l2"] < 1 and row["cosine"] > 0.9, (name, row)
    assert rows["whole block"]["rel_l2"] != rows["per block"]["rel_l2"]
    assert report["command"].startswith("python bench/plans_cpu.py --families pixart")
    assert "| pixart | reuse=5 |" in (tmp_path / "plans_cpu.md").read_text()


@pytest.mark.parametrize("argv", [["--families", "dit"], ["--steps", "0"], ["--size", "12"], ["--ratio", "1"]])
def test_bad_arguments(argv):
    with pytest.raises(SystemExit) as e:
        plans_cpu.parse_args(argv)
    assert e.value.code == 2
