"""GPU probes behind the end-to-end numbers (CUDA only): the attention tournament, host syncs, launches.

    python bench/probe.py --out bench/results [--budget-s 120] [--write-table]

1. ``attention``: the tournament of proportional attention's paths
   (:mod:`tofu_triton.attention`: ``mask``, ``cudnn``, ``vsize``, ``vsize_v``
   and the Triton kernel at each of its block-size configs ``triton_<config>``)
   at B = 1, 8, 64, 256, N = 25 .. 1025 (the token counts of a ToFu ViT), head
   dims 64, 80, 128, fp16 and bf16, each timed (CUDA-graph replay,
   ``triton.testing.do_bench``, median) against SDPA without a bias at the same
   shape: ratio = path / no-bias SDPA, target <= 1.15. Every candidate's output
   is checked against the float mask first; a wrong one is recorded and never
   wins. Cases run most important first (D = 64 fp16 N = 197 at every B) until
   ``--budget-s`` is spent; ``probe.json`` is rewritten after every case, so a
   cut run still reports. ``--write-table`` rewrites this card's rows of
   ``tofu_triton/tables/attention.json`` (what ``attention.choose`` reads).
2. ``sync``: one forward of a patched ViT-B (ToFu, Triton kernels) under
   ``torch.cuda.set_sync_debug_mode("error")``: any host sync (``.item()``,
   a data-dependent shape) raises, which would also break CUDA graphs.
3. ``launches``: kernels per forward of the unpatched, ToMe-style and ToFu
   models (torch.profiler), per block, and the host time to enqueue one
   forward at batch 1 (what bounds eager small-batch throughput).

Writes ``probe.json`` and ``probe.md`` under ``--out`` with the card, date,
versions and command.
"""
import argparse
import functools
import json
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from measure import count_launches, environment, git_commit, time_cuda_graph  # noqa: E402

BATCHES = (1, 8, 64, 256)
TOKENS = (197, 101, 50, 25, 401, 577, 1025)
HEAD_DIMS = (64, 80, 128)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
HEADS = {64: 12, 80: 16, 128: 16}  # ViT-B (12 x 64), ViT-H/14 (16 x 80), 16 x 128 (ViT-G-like widths)
TARGET = 1.15  # a path within 15 % of SDPA without a bias is "at flash speed"
# Preference among candidates that time within TIE of the fastest: the float mask first
# (differentiable, no cuDNN version dependence), cuDNN last.
PREFERENCE = ("mask", "vsize", "vsize_v", "triton", "cudnn")
TIE = 0.05
# Relative error (RMS) against the float mask above which a candidate is wrong.
CHECK_RTOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2}


def attention_cases(batches=BATCHES, tokens=TOKENS, head_dims=HEAD_DIMS, dtypes=tuple(DTYPES)):
    """(dtype name, D, N, B) most important first: fp16 D=64 N=197 at every B, then
    the other token counts, then bf16, then the other head dims."""
    cases = [(dt, d, n, b) for dt in dtypes for d in head_dims for n in tokens for b in batches]
    return sorted(cases, key=lambda c: (c[1] != head_dims[0], c[0] != dtypes[0], c[2] != tokens[0],
                                        cases.index(c)))


def _preference(name: str) -> int:
    return PREFERENCE.index(name.split("_")[0] if name.startswith("triton_") else name)


def pick_winner(us: dict) -> str:
    """The fastest candidate of ``us`` ({name: median us}); one within TIE of it that
    comes earlier in PREFERENCE wins instead (noise must not flip the choice)."""
    best = min(us.values())
    near = [name for name, t in us.items() if t <= best * (1 + TIE)]
    return min(near, key=lambda name: (_preference(name), us[name]))


def attention_case(dtype, d, n, batch):
    from tofu_triton import attention
    from tofu_triton.testing import rel_error

    heads = HEADS[d]
    q, k, v = (torch.randn(batch, heads, n, d, device="cuda", dtype=dtype) for _ in range(3))
    bias = (1 + 3 * torch.rand(batch, n, device="cuda")).log()[:, None, None, :].to(dtype)
    row = dict(dtype=str(dtype).replace("torch.", ""), B=batch, N=n, D=d, heads=heads,
               auto=attention.choose(q, bias=bias))
    row["no_bias_ms"] = time_cuda_graph(functools.partial(F.scaled_dot_product_attention, q, k, v), 5, 25)
    want = attention.sized_attention(q, k, v, bias, path="mask")
    row["ms"], row["errors"] = {}, {}
    for name in attention.runnable(attention.capabilities(q.device), q, k, v, bias):
        fn = functools.partial(attention.sized_attention, q, k, v, bias, path=name)
        try:
            err = rel_error(fn(), want)
            if not err <= CHECK_RTOL[dtype]:
                row["errors"][name] = f"wrong: relative error {err:.3g} against the float mask"
                continue
            ms = time_cuda_graph(fn, 5, 25)
            if ms is None:
                row["errors"][name] = "cannot be captured in a CUDA graph"
                continue
            row["ms"][name] = ms
        except Exception as e:  # one path failing must not lose the others
            row["errors"][name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    if row["ms"]:
        row["winner"] = pick_winner(row["ms"])
    return row


def attention_rows(cases, budget_s, on_row=lambda rows: None):
    rows = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for dt, d, n, batch in cases:
            if time.perf_counter() - t0 > budget_s:
                print(f"attention: budget of {budget_s:.0f} s spent; {len(cases) - len(rows)} cases not run",
                      flush=True)
                break
            row = attention_case(DTYPES[dt], d, n, batch)
            rows.append(row)
            on_row(rows)
            none = row["no_bias_ms"]
            print(f"attention {dt} D={d:<3d} B={batch:<4d} N={n:<4d} no bias {none * 1e3:.1f} us  " + "  ".join(
                f"{p} {ms / none:.2f}x" for p, ms in sorted(row["ms"].items(), key=lambda i: i[1]))
                + f"  auto={row['auto']} winner={row.get('winner')}"
                + (f"  errors: {row['errors']}" if row["errors"] else ""), flush=True)
    return rows


def table_rows(rows, env) -> list:
    """This run's attention cases as dispatch-table rows (tofu_triton/dispatch.py's format)."""
    return [dict(card=env["device"], dtype=r["dtype"], shape=dict(B=r["B"], N=r["N"], D=r["D"]), winner=r["winner"],
                 us={name: round(ms * 1e3, 2) for name, ms in r["ms"].items()},
                 no_bias_us=round(r["no_bias_ms"] * 1e3, 2))
            for r in rows if r.get("winner")]


def make_model(variant, dtype):
    import tofu_triton.patch as tp
    from tofu_triton.models import create_vit

    model = create_vit("vit_base_patch16_224").to("cuda", dtype)
    if variant == "tome":
        tp.timm(model, r=16, mode="tome", backend="reference")
    elif variant == "tofu":
        tp.timm(model, r=16, mode="tofu", backend="triton")  # attention="auto"
    return model


def sync_check(dtype):
    model = make_model("tofu", dtype)
    images = torch.randn(8, 3, 224, 224, device="cuda", dtype=dtype)
    with torch.inference_mode():
        model(images)  # compile and warm up outside the check
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(images)
            result = "no host sync in a ToFu (Triton) ViT-B forward"
        except RuntimeError as e:
            result = f"HOST SYNC: {str(e).splitlines()[0][:200]}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
    print(f"sync: {result}", flush=True)
    return result


def launch_rows(dtype):
    rows = []
    for variant in ("unpatched", "tome", "tofu"):
        model = make_model(variant, dtype)
        images = torch.randn(1, 3, 224, 224, device="cuda", dtype=dtype)
        with torch.inference_mode():
            counts = count_launches(functools.partial(model, images))
            for _ in range(5):
                model(images)
            torch.cuda.synchronize()
            host = []
            for _ in range(20):  # enqueue time only: the GPU runs behind
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                model(images)
                host.append((time.perf_counter() - t0) * 1e3)
                torch.cuda.synchronize()
        host.sort()
        row = dict(variant=variant, launches=counts["launches"], memops=counts["memops"],
                   launches_per_block=counts["launches"] / len(model.blocks), host_ms_b1=host[len(host) // 2])
        rows.append(row)
        print(f"launches {variant:9s} {row['launches']:4d} per forward ({row['launches_per_block']:.1f} per block), "
              f"memops {row['memops']}, host enqueue {row['host_ms_b1']:.2f} ms at B=1", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--dtype", default="fp16", choices=tuple(DTYPES), help="of the sync and launch probes")
    p.add_argument("--budget-s", type=float, default=120.0,
                   help="seconds for the attention tournament (~120 s on an H200 for every case)")
    p.add_argument("--write-table", action="store_true",
                   help="rewrite this card's rows of tofu_triton/tables/attention.json from the tournament")
    p.add_argument("--skip", default="", help="comma-separated probes not to run: attention, sync, launches")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("probe.py needs CUDA; nothing was measured", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = dict(environment=environment(), dtype=args.dtype, target=TARGET,
                  command="python bench/probe.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])))

    def save(rows=None):
        if rows is not None:
            report["attention"] = rows
        (out / "probe.json").write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
        (out / "probe.md").write_text(markdown(report), encoding="utf-8")

    skip = set(filter(None, args.skip.split(",")))
    probes = (("attention", lambda: attention_rows(attention_cases(), args.budget_s, save)),
              ("sync", lambda: sync_check(dtype)), ("launches", lambda: launch_rows(dtype)))
    for name, fn in probes:
        if name in skip:
            continue
        try:
            report[name] = fn()
        except Exception as e:  # one probe failing must not lose the others
            report[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            print(f"{name}: {report[name]}", flush=True)
        save()
    if args.write_table and isinstance(report.get("attention"), list):
        from tofu_triton import dispatch

        env = report["environment"]
        rows = table_rows(report["attention"], env)
        prov = dict(card=env["device"], date=env["date"][:10], commit=git_commit(), torch=env["torch"],
                    triton=env["triton"], command=report["command"])
        path = dispatch.update_table("attention", prov, rows)
        print(f"wrote {path} ({len(rows)} rows of this run)", flush=True)
    return 0


def markdown(report) -> str:
    env = report["environment"]
    lines = ["# GPU probes: the attention tournament, host syncs, launches", "",
             f"- card: {env['device']}; date: {env['date']}; torch {env['torch']}, triton {env['triton']}",
             f"- command: `{report['command']}`", ""]
    att = report.get("attention")
    if isinstance(att, list):
        lines += [f"Proportional attention: each path's time over SDPA without a bias at the same shape (target "
                  f"<= {report.get('target', TARGET)}x); `auto`: what tofu_triton.attention.choose took before "
                  "this run; winner: the fastest (within 5 % the float mask is preferred, cuDNN last).", "",
                  "| dtype | D | B | N | SDPA, no bias us | best path | its ratio | mask | cudnn | vsize | "
                  "vsize_v | best triton | auto | errors |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in att:
            none = r["no_bias_ms"]
            ms = r["ms"]
            cells = {name: f"{ms[name] / none:.2f}x" if name in ms else "-" for name in ("mask", "cudnn", "vsize",
                                                                                       "vsize_v")}
            tri = sorted((t, n) for n, t in ms.items() if n.startswith("triton_"))
            win = r.get("winner")
            lines.append(f"| {r['dtype']} | {r['D']} | {r['B']} | {r['N']} | {none * 1e3:.1f} | {win} | "
                         + (f"{ms[win] / none:.2f}x" if win else "-") + " | "
                         + " | ".join(cells.values()) + " | "
                         + (f"{tri[0][1][7:]} {tri[0][0] / none:.2f}x" if tri else "-")
                         + f" | {r['auto']} | {'; '.join(f'{k}: {v}' for k, v in r['errors'].items())} |")
    else:
        lines.append(f"attention: {att}")
    lines += ["", f"sync check: {report.get('sync')}", ""]
    launches = report.get("launches")
    if isinstance(launches, list):
        lines += ["| ViT-B/16, B=1 | kernels per forward | per block | memcpy/memset | host enqueue ms |",
                  "|---|---|---|---|---|"]
        for r in launches:
            lines.append(f"| {r['variant']} | {r['launches']} | {r['launches_per_block']:.1f} | {r['memops']} | "
                         f"{r['host_ms_b1']:.2f} |")
    else:
        lines.append(f"launches: {launches}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
