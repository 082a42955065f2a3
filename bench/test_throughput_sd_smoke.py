"""Keeps bench/throughput_sd.py from rotting: its --smoke path, end to end.

The SD 1.5 and SDXL layouts at 32-64 channels on a 16x16 latent, on the CPU in
fp32, two timed calls per variant. It times nothing worth reading; it checks
that every variant configures, runs, stays finite and lands in the JSON and
Markdown files with the card, versions and command.
"""
import json
import shlex
import sys

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is not installed (pip install -e \".[test]\")")

import throughput_sd  # noqa: E402


@pytest.fixture
def one_thread():
    """One intra-op thread: on a CPU shared with other jobs, OpenMP threads waiting on each other made the tiny
    UNets 50-100x slower; the smoke run checks the script, not the CPU's speed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_throughput_sd_smoke(tmp_path, one_thread):
    pytest.importorskip("tomesd", reason="tomesd is not installed (pip install -e \".[test]\")")
    assert throughput_sd.main(["--smoke", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "throughput_sd_cpu_smoke.json").read_text())
    assert (tmp_path / "throughput_sd_cpu_smoke.md").read_text().startswith("# Stable Diffusion UNet step")
    assert report["command"] == "python bench/throughput_sd.py --smoke --out " + shlex.quote(str(tmp_path))
    assert report["versions"]["diffusers"] and report["versions"]["tomesd"] == "0.1.3"
    assert {"device", "date", "torch", "triton"} <= set(report["environment"])
    rows = {(row["model"], row["variant"]): row for row in report["rows"]}
    assert set(rows) == {(m, v) for m in ("tiny", "tiny-xl") for v in throughput_sd.VARIANTS}
    for key, row in rows.items():
        assert row["status"] == "ok" and row["ms"] > 0 and row["vs_unpatched"] > 0, (key, row)
        assert row["finite"] and row["timed_calls"] == 2 and row["attention"] == "AttnProcessor2_0", (key, row)
        assert row["latent"] == 16 and row["batch"] == 2 and row["dtype"] == "fp32"
        if row["variant"] == "unpatched":
            assert row["ratio"] == 0 and row["rel_l2"] == 0 and row["merging_blocks"] == 0
        else:
            assert row["ratio"] == 0.5 and 0 < row["rel_l2"] < 1 and row["cosine"] > 0.5
    # SD 1.5 layout: the 5 full-resolution blocks of 16; SDXL layout: none at full resolution, so
    # max_downsample 2 (for tomesd and us alike) reaches the 10 blocks of 28 at 1/2.
    assert (rows["tiny", "tofu"]["merging_blocks"], rows["tiny", "tofu"]["blocks"]) == (5, 16)
    assert (rows["tiny-xl", "tomesd"]["max_downsample"], rows["tiny-xl", "tomesd"]["merging_blocks"]) == (2, 10)
    assert [g["verdict"] for g in report["goal"]] == ["not judged (a tiny preset)"] * 2


def test_every_plan_setting_runs_and_the_goal_takes_the_defaults(tmp_path, one_thread):
    argv = ["--smoke", "--models", "tiny", "--variants", "unpatched,tofu", "--reuse", "none,step,2",
            "--block-mode", "whole,sublayer", "--out", str(tmp_path)]
    assert throughput_sd.main(argv) == 0
    report = json.loads((tmp_path / "throughput_sd_cpu_smoke.json").read_text())
    rows = {(r["variant"], r.get("reuse"), r.get("block_mode")): r for r in report["rows"]}
    plans = {(r, m) for r in ("none", "step", "2") for m in ("sublayer", "whole")}
    assert set(rows) == {("unpatched", None, None)} | {("tofu",) + plan for plan in plans}
    assert all(r["status"] == "ok" and r["finite"] and 0 <= r["rel_l2"] < 1 for r in rows.values())
    # per sub-layer and whole-block merging are different computations
    assert rows["tofu", "none", "sublayer"]["rel_l2"] != rows["tofu", "none", "whole"]["rel_l2"]
    assert report["goal"][0]["tofu"] == rows["tofu", "none", "sublayer"]["vs_unpatched"]
    assert "| tofu | step, whole | eager |" in (tmp_path / "throughput_sd_cpu_smoke.md").read_text()


def test_without_tomesd_its_rows_are_skipped(tmp_path, one_thread, monkeypatch):
    monkeypatch.setitem(sys.modules, "tomesd", None)  # makes `import tomesd` raise ImportError
    argv = ["--smoke", "--models", "tiny", "--variants", "unpatched,tomesd", "--out", str(tmp_path)]
    assert throughput_sd.main(argv) == 0
    rows = json.loads((tmp_path / "throughput_sd_cpu_smoke.json").read_text())["rows"]
    assert [(r["variant"], r["status"].split(":")[0]) for r in rows] == [("unpatched", "ok"), ("tomesd", "skipped")]
    assert "pip install tomesd" in rows[1]["status"]


def test_the_goal_is_judged_only_in_its_setting():
    def row(model, variant, vs, ratio=0.5, exec="eager"):
        return dict(model=model, variant=variant, ratio=0.0 if variant == "unpatched" else ratio, vs_unpatched=vs,
                    exec=exec, status="ok")

    rows = [row("sd15", "unpatched", 1.0), row("sd15", "tomesd", 1.05), row("sd15", "tome", 1.2),
            row("sd15", "tofu", 1.35), row("sd15", "tofu", 1.1, ratio=0.3),
            row("sdxl", "unpatched", 1.0), row("sdxl", "tofu", 1.25), row("sdxl", "unpatched", 1.0, exec="graph"),
            row("sdxl", "tofu", 1.4, exec="graph"), dict(model="sd21", status="failed: x")]
    goal = {g["model"]: g for g in throughput_sd.judge(rows, None)}
    assert set(goal) == {"sd15", "sdxl"}
    assert goal["sd15"]["verdict"] == "PASS" and goal["sd15"]["tomesd"] == 1.05 and goal["sd15"]["tofu"] == 1.35
    # judged on the eager step; the graph replay's speed-up is shown beside it
    assert goal["sdxl"]["verdict"] == "FAIL" and goal["sdxl"]["tomesd"] is None and goal["sdxl"]["tofu_graph"] == 1.4
    assert "tomesd not run" in throughput_sd.goal_line(goal["sdxl"])
    assert "CUDA graph 1.40x" in throughput_sd.goal_line(goal["sdxl"])
    assert throughput_sd.judge(rows, "CPU smoke run")[0]["verdict"] == "not judged (CPU smoke run)"


@pytest.mark.parametrize("name, slug", [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"),
                                        ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA GeForce RTX 4090", "rtx4090"),
                                        ("Tesla V100-SXM2-16GB", "v100"), ("CPU (x86_64)", "cpu")])
def test_card_slug(name, slug):
    assert throughput_sd.card_slug(name) == slug


@pytest.mark.parametrize("argv", [["--ratios", "1.5"], ["--ratios", "half"], ["--models", "sd3"],
                                  ["--variants", "fast"], ["--batch", "0"], ["--max-downsample", "3"],
                                  ["--size", "60"], ["--smoke", "--models", "tiny-xl", "--size", "6"],
                                  ["--execs", "replay"], ["--smoke", "--execs", "eager,graph"], ["--reuse", "0"],
                                  ["--reuse", "always"], ["--block-mode", "half"]])
def test_bad_arguments(argv):
    with pytest.raises(SystemExit) as e:
        throughput_sd.parse_args(argv)
    assert e.value.code == 2


def test_refuses_without_cuda(capsys, monkeypatch):
    monkeypatch.setattr(throughput_sd.torch.cuda, "is_available", lambda: False)
    assert throughput_sd.main([]) == 2
    assert "--smoke" in capsys.readouterr().err


def test_budget_never_skips_the_first_model(tmp_path, one_thread):
    argv = ["--smoke", "--variants", "unpatched", "--budget-s", "0", "--out", str(tmp_path)]
    assert throughput_sd.main(argv) == 0
    rows = json.loads((tmp_path / "throughput_sd_cpu_smoke.json").read_text())["rows"]
    assert [(r["model"], r["status"].split(":")[0]) for r in rows] == [("tiny", "ok"), ("tiny-xl", "skipped")]
    assert "| tiny-xl |" in (tmp_path / "throughput_sd_cpu_smoke.md").read_text()
