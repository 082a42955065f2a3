"""Keeps bench/throughput_dit.py from rotting: its --smoke path, end to end, and the goal's judgement.

The PixArt, SD3 and Flux layouts at 64 channels on a 16x16 latent, on the CPU in fp32, one timed call
per case, eager only. It times nothing worth reading; it checks that every variant configures, runs,
stays finite and lands in the JSON and Markdown files with the card, versions and command.
"""
import json
import shlex

import pytest

pytest.importorskip("diffusers", reason="diffusers is not installed (pip install -e \".[test]\")")

import throughput_dit  # noqa: E402

from tofu_triton.testing import one_thread  # noqa: E402


def test_throughput_dit_smoke(tmp_path):
    with one_thread():
        assert throughput_dit.main(["--smoke", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "throughput_dit_cpu_smoke.json").read_text())
    assert (tmp_path / "throughput_dit_cpu_smoke.md").read_text().startswith("# Diffusion transformer step")
    assert report["command"] == "python bench/throughput_dit.py --smoke --out " + shlex.quote(str(tmp_path))
    assert report["versions"]["diffusers"] and {"device", "date", "torch", "triton"} <= set(report["environment"])
    rows = {(r["model"], r["variant"]): r for r in report["rows"]}
    assert set(rows) == {(m, v) for m in ("tiny-pixart", "tiny-sd3", "tiny-flux") for v in throughput_dit.VARIANTS}
    for key, row in rows.items():
        assert row["status"] == "ok" and row["ms"] > 0 and row["finite"] and row["timed_calls"] == 1, (key, row)
        assert (row["tokens"], row["batch"], row["dtype"], row["exec"]) == (64, 1, "fp32", "eager")
        if row["variant"] == "unpatched":
            assert row["rel_l2"] == 0 and row["vs_unpatched"] == 1
        else:
            assert 0 < row["rel_l2"] < 1 and row["cosine"] > 0.5
    assert rows["tiny-flux", "tofu"]["ratio"] == 0.5 and rows["tiny-flux", "todo"]["ratio"] is None
    assert report["goal"] == []  # the goal is judged on flux-dev only


def test_plan_settings_run_as_tofu_rows(tmp_path):
    argv = ["--smoke", "--models", "tiny-flux", "--variants", "unpatched,tofu", "--reuse", "step,5", "--block-mode",
            "whole", "--out", str(tmp_path)]
    with one_thread():
        assert throughput_dit.main(argv) == 0
    rows = json.loads((tmp_path / "throughput_dit_cpu_smoke.json").read_text())["rows"]
    assert [(r["variant"], r.get("reuse"), r.get("block_mode")) for r in rows] == [
        ("unpatched", None, None), ("tofu", "step", "whole"), ("tofu", "5", "whole")]
    assert all(r["status"] == "ok" and r["finite"] for r in rows)
    assert 0 < rows[1]["rel_l2"] < 1


def test_the_goal_is_judged_on_flux_at_ratio_half_in_its_setting():
    def row(variant, ratio, vs, model="flux-dev", exec="eager"):
        return dict(model=model, variant=variant, ratio=ratio, dtype="bf16", batch=1, exec=exec, vs_unpatched=vs,
                    status="ok")

    rows = [row("unpatched", None, 1.0), row("tofu", 0.3, 1.1), row("tofu", 0.5, 1.35),
            row("tofu", 0.5, 1.2, exec="graph"), row("tofu", 0.5, 2.0, model="sd3-medium"), row("todo", None, 1.5)]
    goal = throughput_dit.judge(rows, None)
    assert [(g["exec"], g["verdict"]) for g in goal] == [("eager", "PASS"), ("graph", "FAIL")]
    assert "ToFu 1.35x unpatched: PASS" in throughput_dit.goal_line(goal[0])
    assert throughput_dit.judge(rows, "CPU smoke run")[0]["verdict"] == "not judged (CPU smoke run)"


@pytest.mark.parametrize("argv", [["--ratios", "0"], ["--ratios", "half"], ["--models", "flux"], ["--batches", "0"],
                                  ["--dtypes", "fp8"], ["--execs", "compiled"], ["--size", "127"], ["--reuse", "-1"],
                                  ["--block-mode", "block"]])
def test_bad_arguments(argv):
    with pytest.raises(SystemExit) as e:
        throughput_dit.parse_args(argv)
    assert e.value.code == 2


def test_refuses_without_cuda_and_graphs_on_the_cpu(capsys, monkeypatch):
    monkeypatch.setattr(throughput_dit.torch.cuda, "is_available", lambda: False)
    assert throughput_dit.main([]) == 2
    assert "--smoke" in capsys.readouterr().err
    assert throughput_dit.main(["--smoke", "--execs", "graph"]) == 2
