"""Turn ``pytest bench/`` results into ``microbench.md`` + ``microbench.png`` and check the targets.

    python bench/summarize.py --jsonl bench/results/microbench.jsonl
    python bench/summarize.py --benchmark-json bench/results/benchmark.json \
        --throughput bench/results/throughput.json --out bench/results

Reads the per-case records written by ``--tofu-jsonl`` (the last session in
the file) or, failing that, the ``extra_info`` of a pytest-benchmark JSON.
Times are device medians (see ``bench/measure.py``), never pytest-benchmark's
host timings. Prints a compact verdict on the targets (``bench/README.md``)
last; a target with no measurement says "not measured", never passes.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

RESULTS = Path(__file__).resolve().parent / "results"
IMPL_ORDER = {"triton": 0, "reference": 1, "tome": 2}
# Microbenchmark targets (H100/H200, fp16, one fused forward step; bench/README.md).
TARGET_SHAPE = dict(n=197, c=768, dtype="fp16", backward=False)
TARGET_COPY_FRAC = 0.80
TARGET_VS_TOME = {256: 5.0, 1: 10.0}
TARGET_LAUNCHES = 3


def load_records(jsonl: Optional[str], benchmark_json: Optional[str]) -> Tuple[Dict, List[Dict]]:
    """(session info, case records) from whichever file has them."""
    if jsonl and Path(jsonl).exists():
        session, cases = {}, []
        for line in Path(jsonl).read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            if rec.get("kind") == "session":
                session, cases = rec, []  # keep only the last session in the file
            else:
                cases.append(rec)
        if cases:
            return session, _with_device_ms(cases)
    if benchmark_json and Path(benchmark_json).exists():
        data = json.loads(Path(benchmark_json).read_text(encoding="utf-8"))
        tofu = data.get("machine_info", {}).get("tofu", {})
        session = dict(tofu, **(tofu.get("copy") or {}))
        session["command"] = "pytest bench/ (from " + Path(benchmark_json).name + ")"
        cases = [dict(b["extra_info"], test=b["name"]) for b in data.get("benchmarks", []) if b.get("extra_info")]
        return session, _with_device_ms(cases)
    return {}, []


def _with_device_ms(cases: List[Dict]) -> List[Dict]:
    """The step records (test_step.py's; test_sd_step.py's, ``kind_of="sd_step"``, have other fields and are
    left in the JSONL); records written before ``device_ms`` existed get it from what they have."""
    cases = [rec for rec in cases if rec.get("kind_of") is None]
    for rec in cases:
        rec.setdefault("device_ms", rec.get("graph_median_ms") or rec.get("median_ms"))
    return cases


def case_key(rec: Dict) -> Tuple:
    return (rec["backward"], rec["dtype"], rec["mode"], rec["n"], rec["c"], rec["batch"])


def add_speedups(cases: List[Dict]) -> None:
    """``vs_tome`` from device times, ``vs_tome_loop`` from eager loop times (GPU only)."""
    for field, out in (("device_ms", "vs_tome"), ("loop_ms", "vs_tome_loop")):
        tome = {case_key(r): r.get(field) for r in cases if r["impl"] == "tome"}
        for rec in cases:
            base, mine = tome.get(case_key(rec)), rec.get(field)
            rec[out] = base / mine if base and mine and rec["impl"] != "tome" else None


def check_targets(cases: List[Dict]) -> List[Tuple[str, str, str]]:
    """(target, verdict, detail) for each microbenchmark target."""
    out = []

    def fused(batch, mode):
        for r in cases:
            if (r["impl"] == "triton" and r["batch"] == batch and r["mode"] == mode and r.get("median_ms")
                    and all(r[k] == v for k, v in TARGET_SHAPE.items())):
                return r
        return None

    for mode in ("mean", "mlerp", "prune"):
        r = fused(256, mode)
        name = f"{mode}: fused step B=256 N=197 C=768 fp16 >= {TARGET_COPY_FRAC:.0%} of copy bandwidth"
        if r is None or r.get("copy_frac") is None:
            out.append((name, "not measured", ""))
        else:
            out.append((name, "PASS" if r["copy_frac"] >= TARGET_COPY_FRAC else "FAIL",
                        f"{r['copy_frac']:.0%} ({r['gbps']:.0f} of {r['copy_gbps']:.0f} GB/s, "
                        f"{r['device_ms'] * 1e3:.1f} us, "
                        + ("CUDA graph)" if r.get("graph_median_ms")
                           else "do_bench median, launch overhead included)")))
        for batch, want in TARGET_VS_TOME.items():
            r = fused(batch, mode)
            # Both the device time and the eager (launch-inclusive) time must
            # meet it: at B=1 the two can disagree, and either alone flatters.
            name = f"{mode}: fused step B={batch} N=197 C=768 fp16 >= {want:g}x ToMe-style (device and eager)"
            if r is None or r.get("vs_tome") is None or r.get("vs_tome_loop") is None:
                out.append((name, "not measured", ""))
            else:
                worst = min(r["vs_tome"], r["vs_tome_loop"])
                out.append((name, "PASS" if worst >= want else "FAIL",
                            f"{r['vs_tome']:.1f}x device, {r['vs_tome_loop']:.1f}x eager"))
    counted = [r for r in cases if r["impl"] == "triton" and not r["backward"] and r.get("launches") is not None]
    name = f"fused forward step <= {TARGET_LAUNCHES} kernel launches"
    if not counted:
        out.append((name, "not measured", ""))
    else:
        worst = max(r["launches"] for r in counted)
        out.append((name, "PASS" if worst <= TARGET_LAUNCHES else "FAIL", f"max {worst} over {len(counted)} cases"))
    return out


def _fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def _e2e(t: Dict) -> str:
    """A throughput target's two speed-ups, "not measured" where a side is missing (a failed or skipped
    variant, or a run without the ToMe-style one), then why it failed where the record says."""
    def ratio(v):
        return "not measured" if v is None else f"{v:.2f}x"
    return (f"{ratio(t.get('vs_tome'))} vs ToMe-style, {ratio(t.get('vs_unpatched'))} vs unpatched"
            + (f" ({t['detail']})" if t.get("detail") else ""))


def markdown(session: Dict, cases: List[Dict], targets, throughput: Optional[Dict]) -> str:
    lines = ["# Microbenchmarks: one token-reduction step", ""]
    if session:
        lines += [
            f"- card: {session.get('device', '?')}",
            f"- date: {session.get('date', '?')}",
            f"- torch {session.get('torch', '?')}, triton {session.get('triton', '?')}, "
            f"scope {session.get('scope', '?')}",
            f"- copy bandwidth (one {(session.get('copy_bytes') or 0) / 2**20:.0f} MiB `copy_`, read + write): "
            f"{_fmt(session.get('copy_gbps'), '.0f')} GB/s",
            f"- command: `{session.get('command', '?')}`",
        ]
    timer = sorted({c.get("timer", "?") for c in cases})
    lines += [f"- timer: {', '.join(timer)}",
              "- GB/s counts the fewest bytes a step must move (bench/measure.py `step_bytes`); "
              "launches are kernels per step (torch.profiler, B = 1 and 256 only); "
              "median ms = do_bench (about device time, L2 flushed); eager loop ms = back-to-back calls "
              "(launch overhead included); x ToMe = ToMe-style time / this time, same case", "",
              "## Targets", ""]
    lines += [f"- {verdict}: {name}" + (f" -- {detail}" if detail else "") for name, verdict, detail in targets]
    if throughput:
        for t in throughput.get("targets", []):
            need = "1.8" if t["batch"] == 256 else "1.0"
            lines.append(f"- {t['verdict']}: end-to-end ViT-B r=16 B={t['batch']} {t['exec']}: ToFu >= 1.15x "
                         f"ToMe-style and >= {need}x unpatched -- {_e2e(t)}")
    lines += ["", "## Cases", "",
              "| pass | dtype | mode | N | C | B | impl | median ms | eager loop ms | graph ms | GB/s | % copy BW "
              "| launches | peak MiB | x ToMe | x ToMe eager |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(cases, key=lambda r: (case_key(r), IMPL_ORDER.get(r["impl"], 9))):
        peak = r.get("peak_bytes")
        lines.append(
            f"| {'fwd+bwd' if r['backward'] else 'fwd'} | {r['dtype']} | {r['mode']} | {r['n']} | {r['c']} | "
            f"{r['batch']} | {r['impl']} | {_fmt(r.get('median_ms'), '.4f')} | {_fmt(r.get('loop_ms'), '.4f')} | "
            f"{_fmt(r.get('graph_median_ms'), '.4f')} | "
            f"{_fmt(r.get('gbps'), '.1f')} | {_fmt(r.get('copy_frac') and 100 * r['copy_frac'], '.1f')} | "
            f"{_fmt(r.get('launches'), 'd')} | {_fmt(peak and peak / 2**20, '.1f')} | "
            f"{_fmt(r.get('vs_tome'), '.2f')} | {_fmt(r.get('vs_tome_loop'), '.2f')} |"
        )
    return "\n".join(lines) + "\n"


def plot(path: Path, session: Dict, cases: List[Dict]) -> None:
    """Time vs B (top) and % of copy bandwidth vs B (bottom), fp16 forward mean, one column per N."""
    try:
        import matplotlib
    except ImportError:  # an optional extra ("demo"); the table still gets written
        print("matplotlib is not installed: no microbench plot", file=sys.stderr)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtype = "fp16" if any(r["dtype"] == "fp16" for r in cases) else cases[0]["dtype"]
    sel = [r for r in cases if r["dtype"] == dtype and r["mode"] == "mean" and not r["backward"] and r.get("median_ms")]
    shapes = sorted({(r["n"], r["c"]) for r in sel}) or [(0, 0)]
    fig, axes = plt.subplots(2, len(shapes), figsize=(4 * len(shapes), 6.5), squeeze=False)
    for col, (n, c) in enumerate(shapes):
        for impl in sorted({r["impl"] for r in sel}, key=lambda i: IMPL_ORDER.get(i, 9)):
            pts = sorted((r["batch"], r["device_ms"], r.get("copy_frac")) for r in sel
                         if r["impl"] == impl and r["n"] == n and r["c"] == c)
            axes[0][col].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
            axes[1][col].plot([p[0] for p in pts], [100 * (p[2] or 0) for p in pts], marker="o", label=impl)
        axes[0][col].set_title(f"N={n}, C={c}", fontsize=9)
        axes[0][col].set_yscale("log")
        axes[0][col].set_ylabel("device ms (CUDA graph where captured)")
        axes[1][col].set_ylabel("% of copy bandwidth")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch")
            ax.legend(fontsize=7)
    fig.suptitle(f"one step, {dtype} forward, mean -- {session.get('device', '?')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jsonl", default=str(RESULTS / "microbench.jsonl"))
    p.add_argument("--benchmark-json", default=None)
    p.add_argument("--throughput", default=None, help="throughput.json from bench/throughput.py, for its targets")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)

    session, cases = load_records(args.jsonl, args.benchmark_json)
    throughput = None
    if args.throughput and Path(args.throughput).exists():
        throughput = json.loads(Path(args.throughput).read_text(encoding="utf-8"))
    if not cases:
        print(f"summarize: no measured cases in {args.jsonl} or {args.benchmark_json}", file=sys.stderr)
        if throughput is None:
            return 1
    add_speedups(cases)
    targets = check_targets(cases)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "microbench.md").write_text(markdown(session, cases, targets, throughput), encoding="utf-8")
    if cases:
        plot(out / "microbench.png", session, cases)

    print(f"== summary: {session.get('device', '?')}, torch {session.get('torch', '?')}, "
          f"triton {session.get('triton', '?')}, copy {_fmt(session.get('copy_gbps'), '.0f')} GB/s, "
          f"{len(cases)} cases")
    for name, verdict, detail in targets:
        print(f"{verdict:>12s}  {name}" + (f"  [{detail}]" if detail else ""))
    for t in (throughput or {}).get("targets", []):
        print(f"{t['verdict']:>12s}  e2e ViT-B r=16 B={t['batch']} {t['exec']}: {_e2e(t)}")
    print(f"wrote {out / 'microbench.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
