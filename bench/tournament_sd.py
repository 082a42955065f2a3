"""The Stable Diffusion step's tournament: every candidate of the select and of the
scores, and the whole step with each pair, timed against one torch.argsort of the
same scores (docs/design.md §5.1).

Candidates (tofu_triton.kernels): select ``SPATIAL_SELECT_CANDIDATES`` ("radix64":
the radix-select kernel; "sort": two stable device sorts and binary searches;
"topk": torch.topk of unique order keys as the threshold, then one sort;
"fused": one program per image, radix threshold and a counting sort),
scores ``SPATIAL_SCORES_CANDIDATES`` ("match": the match kernel on position arrays;
"dot": inverse norms first, then larger tl.dot tiles). Each candidate's output is
checked before it is timed (a wrong candidate is recorded as failed and never
wins): the select exactly against reference.select on the same scores, the
scores within a near-tie of the reference (every chosen partner's exact cosine
within ``SCORE_ATOL`` of the best).

Shapes: N = 1024, 4096, 16384, 65536 (2x2 cells, ratio 0.5: r = N / 2), B = 1
and 2, fp16 and bf16; the scores also at C = 640 and 1280 where the SD UNets
run those widths (N <= 16384). Order: fp16 before bf16, B = 2 before 1, N =
4096, 16384, 1024, and every N = 65536 case last. Parts are timed with
``triton.testing.do_bench`` (median, L2 flushed), the whole step (partition,
scores, select, merge mlerp, unmerge + residual) by CUDA-graph replay. Results
are written after every shape (a run cut short keeps what it measured); cases
left when ``--budget-s`` is spent are skipped and listed.

    python bench/tournament_sd.py --out bench/results/gpu [--budget-s 90] [--write-table]

``--write-table`` (GPU only) replaces this card's rows of the same dtype and shape
in tofu_triton/tables/spatial_select.json and spatial_scores.json, after every case. ``--small``
runs tiny shapes on the CPU in Triton's interpreter (TRITON_INTERPRET=1): it
checks the script and the candidates, its times mean nothing.
"""
import argparse
import functools
import json
import os
import sys
import time

import torch

from tofu_triton import dispatch, ops, reference
from tofu_triton import kernels

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import command_line, refuse_without_gpu  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RATIO = 0.5
SCORE_ATOL = 1e-4  # fp16/bf16 products are exact in fp32; only the sums' order differs from the reference
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# (side, channel widths of the scores): SD 1.5 / SDXL run 640 and 1280 at the
# coarser levels only; the select does not depend on C (it is timed at the first width).
GPU_SHAPES = [(32, (320, 640, 1280)), (64, (320, 640, 1280)), (128, (320, 640)), (256, (320,))]
SMALL_SHAPES = [(8, (24,))]  # --small: B = 2, the first dtype only (the interpreter takes ~1 s a launch)
TABLES = ops.SPATIAL_TABLE_KEYS  # the shape keys ops.spatial_match looks rows up by


def _timer(graph: bool, warm_l2: bool = False):
    """ms of one call: do_bench (or CUDA-graph replay, ``warm_l2``: replays back to back, see
    measure.time_cuda_graph) on a GPU, a few host-timed calls in the interpreter."""
    if DEVICE == "cuda":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from measure import time_cuda, time_cuda_graph

        if graph:
            return lambda fn: time_cuda_graph(fn, warmup_ms=5, rep_ms=20, warm_l2=warm_l2)
        return lambda fn: time_cuda(fn, warmup_ms=5, rep_ms=20)["median_ms"]

    def host(fn):
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return host


def select_ok(fn, node_max, node_idx, r, nb) -> bool:
    """The select candidate ``fn``'s SpatialMatch fields equal the reference select's on the same scores."""
    got = fn(node_max, node_idx, r, nb)
    want = reference.to_spatial(reference.select(node_max, node_idx, r, nb, 0))
    return all(torch.equal(a, b) for a, b in zip(got, want))


def scores_ok(fn, metric, part) -> bool:
    """The scores candidate ``fn`` gives the reference's best scores, each chosen partner within a near-tie."""
    node_max, node_idx = fn(metric, part.a_pos, part.b_pos)
    unit = metric.float() / metric.float().norm(dim=-1, keepdim=True).clamp_min(reference.EPS)
    want_max, _ = reference.spatial_scores(metric, part)
    chosen = (unit[:, part.a_pos] * unit[:, part.b_pos][torch.arange(metric.shape[0])[:, None], node_idx]).sum(-1)
    finite = torch.isfinite(want_max)
    return bool(((node_max - want_max).abs()[finite] <= SCORE_ATOL).all()
                and ((chosen - want_max).abs()[finite] <= SCORE_ATOL).all()
                and torch.equal(node_max[~finite], want_max[~finite]))


def _runs_right(check, *args) -> bool:
    """``check(*args)``, with a candidate that raises (e.g. fails to compile on this card) counted as wrong."""
    try:
        return bool(check(*args))
    except Exception as exc:  # reported, then the tournament goes on without it
        print(f"tournament_sd: a candidate raised {type(exc).__name__}: {str(exc)[:300]}", file=sys.stderr)
        return False


def _winner(us: dict, candidates) -> str:
    timed = {k: v for k, v in us.items() if k in candidates and v is not None}
    return min(sorted(timed), key=timed.__getitem__) if timed else None


def run_shape(side: int, widths, batch: int, dtype: torch.dtype, gen: torch.Generator) -> list:
    """Rows (op, shape, us, winner, failed) of one (side, B, dtype): select, scores at each width, step."""
    dname = str(dtype).replace("torch.", "")
    part = reference.spatial_partition(side, side, 2, 2, device=DEVICE)
    n, na, nb = side * side, part.a_pos.numel(), part.b_pos.numel()
    r = min(int(n * RATIO), na)
    timer, graph_timer = _timer(False), _timer(True)
    rows = []
    sel_cands, score_cands = kernels.select.SPATIAL_SELECT_CANDIDATES, kernels.match.SPATIAL_SCORES_CANDIDATES
    for c in widths:
        x = torch.randn(batch, n, c, generator=gen, device=DEVICE).to(dtype)
        us, failed = {}, []
        for name, fn in score_cands.items():
            if _runs_right(scores_ok, fn, x, part):
                us[name] = 1e3 * timer(functools.partial(fn, x, part.a_pos, part.b_pos))
            else:
                us[name] = None
                failed.append(name)
        rows.append(dict(op="spatial_scores", dtype=dname, shape=dict(B=batch, N=n, C=c), us=us,
                         winner=_winner(us, score_cands), failed=failed))
        if c != widths[0]:
            continue
        # The select on real scores of this metric, and on heavily tied ones (checked only).
        node_max, node_idx = kernels.match.match_scores(x, positions=(part.a_pos, part.b_pos))
        tied = node_max.mul(20).round().div(20)
        us, failed = {}, []
        for name, fn in sel_cands.items():
            if all(_runs_right(select_ok, fn, m, node_idx, rr, nb) for m in (node_max, tied)
                   for rr in sorted({1, r, na})):
                us[name] = 1e3 * timer(functools.partial(fn, node_max, node_idx, r, nb))
            else:
                us[name] = None
                failed.append(name)
        us["argsort"] = 1e3 * timer(functools.partial(torch.argsort, node_max, dim=-1, descending=True))  # tomesd
        rows.append(dict(op="spatial_select", dtype=dname, shape=dict(B=batch, N=n), us=us,
                         winner=_winner(us, sel_cands), failed=failed))
        rows.extend(step_rows(x, part, r, batch, dname, graph_timer))
    return rows


def whole_step(step, side, x, res, r, nb, scores_fn, select_fn):
    """The SD step as a merging block runs it: partition (random destinations), scores,
    select, merge (mlerp), unmerge + residual; kernels only, no checks."""
    k = kernels
    a_pos, b_pos, slot = k.partition.spatial_partition(step, side, side, 2, 2, 7, 2, True)
    unm, start, src, a_row = select_fn(*scores_fn(x, a_pos, b_pos), r, nb)
    y, _ = k.merge.merge_forward(x, None, unm, start, src, 0, "mlerp", positions=(a_pos, b_pos), with_size=False)
    return k.unmerge.spatial_unmerge(y, res, slot, a_row)


def step_rows(x, part, r, batch, dname, graph_timer) -> list:
    """The whole step with each (scores, select) pair: one row, us per pair ("scores+select")."""
    side = int(round(part.slot.numel() ** 0.5))
    step = torch.tensor(421, device=DEVICE)
    res = torch.randn_like(x)
    nb = part.b_pos.numel()
    k = kernels
    us = {}
    for s_name, s_fn in k.match.SPATIAL_SCORES_CANDIDATES.items():
        for m_name, m_fn in k.select.SPATIAL_SELECT_CANDIDATES.items():
            ms = graph_timer(functools.partial(whole_step, step, side, x, res, r, nb, s_fn, m_fn))
            us[f"{s_name}+{m_name}"] = None if ms is None else 1e3 * ms
    return [dict(op="sd_step", dtype=dname, shape=dict(B=batch, N=x.shape[1], C=x.shape[2]), us=us,
                 winner=_winner(us, us), failed=[name for name, v in us.items() if v is None])]


def provenance(command: str) -> dict:
    import triton

    from measure import git_commit

    card = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (interpreter)"
    return dict(card=card, date=time.strftime("%Y-%m-%d"), commit=git_commit(), torch=torch.__version__,
                triton=triton.__version__, command=command)


def write_report(out: str, prov: dict, rows: list, skipped: list) -> None:
    """tournament_sd.json (everything) and tournament_sd.md (one table per op) under ``out``."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "tournament_sd.json"), "w") as f:
        json.dump(dict(provenance=prov, rows=rows, skipped=skipped), f, indent=1)
    lines = [f"# SD step tournament on {prov['card']} ({prov['date']}, commit {prov['commit']}, torch {prov['torch']}, "
             f"triton {prov['triton']})", "", f"`{prov['command']}`", "",
             "Times in us (median; parts by do_bench, the whole step by CUDA-graph replay); "
             "'failed' = wrong output, never timed.", ""]
    for op in ("spatial_select", "spatial_scores", "sd_step"):
        mine = [row for row in rows if row["op"] == op]
        if not mine:
            continue
        names = list(dict.fromkeys(name for row in mine for name in row["us"]))
        lines += [f"## {op}", "", "| dtype | shape | " + " | ".join(names) + " | winner |",
                  "|---" * (len(names) + 3) + "|"]
        for row in mine:
            cells = ["failed" if row["us"].get(name) is None and name in row["failed"]
                     else "-" if row["us"].get(name) is None else f"{row['us'][name]:.1f}" for name in names]
            shape = " ".join(f"{k}={v}" for k, v in row["shape"].items())
            lines.append(f"| {row['dtype']} | {shape} | " + " | ".join(cells) + f" | {row['winner']} |")
        lines.append("")
    if skipped:
        lines += ["Skipped (budget spent): " + ", ".join(skipped), ""]
    with open(os.path.join(out, "tournament_sd.md"), "w") as f:
        f.write("\n".join(lines))


def write_tables(prov: dict, rows: list, table_dir=None) -> None:
    """Replace this card's rows (same dtype and shape) in each op's dispatch table, keep the rest."""
    for op, keys in TABLES.items():
        dispatch.update_table(op, prov, [dict(card=prov["card"], dtype=row["dtype"],
                                              shape={k: row["shape"][k] for k in keys}, winner=row["winner"],
                                              us=row["us"]) for row in rows if row["op"] == op and row["winner"]],
                              table_dir)


def tournament_args(argv, doc: str, tables: str) -> argparse.Namespace:
    """The command line both tournaments take (bench/tournament_vit.py too); ``tables``: what
    ``--write-table`` updates. ``args.dtypes`` comes back as a list of torch dtypes."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/gpu")
    ap.add_argument("--budget-s", type=float, default=90.0, help="skip the cases left once this much time is spent")
    ap.add_argument("--small", action="store_true", help="tiny shapes in the interpreter (CPU smoke run)")
    ap.add_argument("--write-table", action="store_true", help=f"update {tables} (GPU only)")
    ap.add_argument("--dtypes", default="fp16,bf16", help="comma-separated, of fp16, bf16")
    args = ap.parse_args(argv)
    args.dtypes = [DTYPES[name] for name in args.dtypes.split(",")]
    return args


def main(argv=None) -> int:
    args = tournament_args(argv, __doc__, "tofu_triton/tables/spatial_*.json")
    refused = refuse_without_gpu("tournament_sd", args.small, args.write_table)
    if refused:
        return refused
    dtypes = args.dtypes
    prov = provenance(command_line(argv))
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    if args.small:
        cases = [(side, widths, 2, dtypes[0]) for side, widths in SMALL_SHAPES]
    else:
        # Most wanted first, so a short budget still measures them: fp16 before bf16, B = 2 (classifier-free
        # guidance) before 1, SD 1.5's and SDXL's sizes before 1024; N = 65536 (the slowest) last.
        order = {32: 2, 64: 0, 128: 1, 256: 3}
        cases = sorted(((side, widths, batch, dtype) for side, widths in GPU_SHAPES for dtype in dtypes
                        for batch in (2, 1)),
                       key=lambda c: (c[0] == 256, dtypes.index(c[3]), -c[2], order[c[0]]))
    rows, skipped, t0 = [], [], time.time()
    for side, widths, batch, dtype in cases:
        if time.time() - t0 > args.budget_s:
            skipped.append(f"N={side * side} B={batch} {dtype}".replace("torch.", ""))
            continue
        case_rows = run_shape(side, widths, batch, dtype, gen)
        for row in case_rows:
            print("tournament_sd", json.dumps(row), flush=True)
        rows += case_rows
        write_report(args.out, prov, rows, skipped)
        if args.write_table:  # after every case too: a run stopped by its stage's time limit keeps its rows
            write_tables(prov, case_rows)
    write_report(args.out, prov, rows, skipped)
    failed = [row for row in rows if row["failed"]]
    print(f"tournament_sd {'PASSED' if not failed else 'FAILED'}: {len(rows)} rows, {len(failed)} with a failed "
          f"candidate, {len(skipped)} skipped, {time.time() - t0:.0f} s")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
