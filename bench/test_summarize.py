"""bench/summarize.py on a JSONL as ``pytest bench/`` writes it: step records next to test_sd_step.py's."""
import json

import summarize


def test_sd_step_records_do_not_break_the_step_summary(tmp_path):
    step = dict(kind="case", n=197, c=768, r=16, batch=256, dtype="fp16", mode="mean", backward=False,
                median_ms=0.02, loop_ms=0.03, copy_gbps=4000.0, gbps=3500.0, copy_frac=0.875)
    records = [dict(kind="session", device="card", copy_gbps=4000.0),
               dict(step, impl="triton", test="test_step[triton]", launches=3),
               dict(step, impl="tome", test="test_step[tome]", median_ms=0.2, loop_ms=0.3),
               dict(kind="case", test="test_sd_step[64x64-triton-merge]", kind_of="sd_step", impl="triton",
                    stage="merge", h=64, w=64, c=320, batch=2, ratio=0.5, device="cuda", median_ms=0.1)]
    jsonl = tmp_path / "microbench.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    session, cases = summarize.load_records(str(jsonl), None)
    assert [c["impl"] for c in cases] == ["triton", "tome"]
    summarize.add_speedups(cases)
    verdicts = {name: verdict for name, verdict, _ in summarize.check_targets(cases)}
    assert verdicts["mean: fused step B=256 N=197 C=768 fp16 >= 80% of copy bandwidth"] == "PASS"
    assert verdicts["mean: fused step B=256 N=197 C=768 fp16 >= 5x ToMe-style (device and eager)"] == "PASS"
    assert "| fwd | fp16 | mean | 197 | 768 | 256 | triton |" in summarize.markdown(session, cases, [], None)


def test_the_committed_h200_throughput_records(tmp_path, capsys):
    """The 2026-12-04 H200 records as committed: throughput.json (ViT-B r=16 at B = 256 and 64) and the
    torch.compile one, whose B = 1 case failed. Expected values are read off throughput.md: B = 64 graph 1.47x
    ToMe-style / 1.28x unpatched (PASS), B = 256 graph 1.56x unpatched (under 97 % of the 1.83x FLOP ratio)."""
    run = summarize.RESULTS / "h200-2026-12-04"
    assert summarize.main(["--jsonl", str(tmp_path / "none.jsonl"), "--throughput", str(run / "throughput.json"),
                           "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "PASS  e2e ViT-B r=16 B=64 graph: 1.47x vs ToMe-style, 1.28x vs unpatched" in printed
    assert "FAIL  e2e ViT-B r=16 B=256 graph: 1.44x vs ToMe-style, 1.56x vs unpatched" in printed
    assert "not measured  e2e ViT-B r=16 B=1 graph" in printed
    assert summarize.main(["--jsonl", str(tmp_path / "none.jsonl"),
                           "--throughput", str(run / "extra" / "compile" / "throughput.json"),
                           "--out", str(tmp_path)]) == 0
    assert "B=1 compile: not measured vs ToMe-style, not measured vs unpatched (failed: InductorError" \
        in capsys.readouterr().out
