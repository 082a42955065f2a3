"""Keeps bench/throughput.py from rotting: its --cpu-smoke path, end to end.

A tiny 4-block ViT at 64 px on the CPU, eager only. It times nothing worth
reading; it checks that every variant configures, runs and lands in the
JSON, Markdown and PNG files.
"""
import importlib.util
import json

import pytest

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
    for variant, row in rows.items():
        assert row["status"] == "ok" and row["images_per_s"] > 0, (variant, row)
    # 16 patches + class token, r = 2 in each of the 4 blocks.
    assert rows["unpatched"]["tokens_out"] == 17 and rows["unpatched"]["flops_ratio"] == 1.0
    for variant in ("tome", "tofu"):
        assert rows[variant]["tokens_out"] == 17 - 4 * 2
        assert 1.0 < rows[variant]["flops_ratio"] < 17 / 9  # fewer tokens in every block after the first


def test_flops_of_a_block_by_hand():
    model = throughput.create_model("smoke", "cpu", throughput.torch.float32)  # C = 192, MLP 768
    c, h, n = 192, 768, 17
    per_block = 2 * (3 * n * c * c + 2 * n * n * c + n * c * c + 2 * n * c * h)
    assert throughput.forward_flops(model, [n] * 4) == 4 * per_block


def test_throughput_refuses_without_cuda(capsys, monkeypatch):
    monkeypatch.setattr(throughput.torch.cuda, "is_available", lambda: False)
    assert throughput.main(["--quick"]) == 2
    assert "--cpu-smoke" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--variants", "tofu,fast"], "--variants: unknown fast; choose from unpatched, tome, tofu"),
    (["--exec", "eager,warp"], "--exec: unknown warp; choose from eager, graph, compile, eager-device"),
])
def test_unknown_choices_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        throughput.parse_args(argv)
    assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1].endswith(message)


def test_eager_device_runs_the_forward_choosing_as_a_graph_would():
    # The A/B of eager dispatch weighing host time: the same eager forward, kernels chosen by device time.
    from tofu_triton import dispatch

    seen = []
    runner = throughput.build_runner(lambda images: seen.append(dispatch.eager()), None, "eager-device", "cpu")
    runner()
    throughput.build_runner(lambda images: seen.append(dispatch.eager()), None, "eager", "cpu")()
    assert seen == [False, True]
    assert throughput.target_vs_unpatched("eager-device", 8) == throughput.target_vs_unpatched("eager", 8) == 0.95
