"""Keeps bench/throughput.py from rotting: its --cpu-smoke path, end to end.

A tiny 4-block ViT at 64 px on the CPU, eager only. It times nothing worth
reading; it checks that every variant configures, runs and lands in the
JSON, Markdown and PNG files.
"""
import importlib.util
import json

import throughput


def test_throughput_cpu_smoke(tmp_path):
    assert throughput.main(["--cpu-smoke", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "throughput.json").read_text())
    assert (tmp_path / "throughput.md").read_text().startswith("# End-to-end throughput")
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "throughput.png").stat().st_size > 0
    assert report["command"].startswith("python bench/throughput.py --cpu-smoke")
    rows = {row["variant"]: row for row in report["rows"]}
    assert set(rows) == {"unpatched", "tome", "tofu"}
    assert rows["unpatched"]["status"] == "ok" and rows["unpatched"]["images_per_s"] > 0
    for variant in ("tome", "tofu"):
        status = rows[variant]["status"]
        # Until tofu_triton.patch lands the patched variants skip, and say why.
        assert status == "ok" or status.startswith("skipped: tofu_triton.patch"), status
        if status == "ok":
            assert rows[variant]["tokens_out"] == 17 - 4 * 2


def test_throughput_refuses_without_cuda(capsys, monkeypatch):
    monkeypatch.setattr(throughput.torch.cuda, "is_available", lambda: False)
    assert throughput.main(["--quick"]) == 2
    assert "--cpu-smoke" in capsys.readouterr().err
