"""The ViT step's tournament: every candidate of ``tofu_triton.kernels.step.STEP_PATHS``
at ViT shapes, each checked against the reference before it is timed, and the
winner per shape written to the dispatch table "vit_step" (docs/design.md §3.1-3.2).

Candidates (kernels/step.py): "one_launch" (the fused step: every program of an
image redoes its match and selection, T programs per image; also timed at T = 1
as "one_launch[T=1]", information only: dispatch picks paths, the launcher picks
T), "two_launch" (one program per image matches and selects by sorting, then the
merge), "three_launch" (match with the keys in,
select, merge), "four_launch" (the head mean first, in its own launch, then the
three), "mean_plan" (the head mean, then the plan on it, then the merge). Before
them, the merge variants (kernels.merge.MERGE_VARIANTS), each alone on the
reference's match: the fastest is the merge every path but one_launch runs here,
and its row goes to the table "vit_merge" (tofu_triton.ops._merge_variant). A
candidate whose match is not the reference's (up to near-ties of
the scores) or whose tokens, sizes or bias differ from the reference merge on its
own match beyond rounding is recorded as failed and never wins.

Shapes: ViT-S/B/L at 224 px (N = 197, C = 384 / 768 / 1024, 6 / 12 / 16 heads of
64) and ViT-B at 384 px (N = 577); B = 1, 8, 64, 256; fp16 and bf16; r = 16,
mlerp, one class token, sizes in [1, 2), the next attention's bias in x's dtype,
keys a strided view of a qkv projection (as a patched block passes them). Times
(``us``, which decide): CUDA-graph replays of the launcher back to back, L2 warm
as in a model (no launch overhead: what a graph-captured model pays); beside them
(``us_cold``) ``triton.testing.do_bench``'s median, L2 flushed before every call. Beside each row: the bytes
the step must move and that time at the measured copy bandwidth (the ceiling).
Results are written after every case; cases left when ``--budget-s`` is spent
are skipped and listed.

    python bench/tournament_vit.py --out bench/results/gpu [--budget-s 90] [--write-table]

``--write-table`` (GPU only) replaces this card's rows of the same dtype and shape
in tofu_triton/tables/vit_step.json and vit_merge.json. ``--small`` runs tiny shapes on the CPU in
Triton's interpreter (TRITON_INTERPRET=1): it checks the script and the
candidates, its times mean nothing.
"""
import functools
import json
import os
import sys
import time

import torch

from tofu_triton import dispatch, reference
from tofu_triton import kernels
from tofu_triton.testing import SCORE_TIE, assert_close, check_match_against_scores, check_match_structure

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import command_line, refuse_without_gpu  # noqa: E402
from tournament_sd import _timer, provenance, tournament_args  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OP = "vit_step"
R, PROTECTED, MODE = 16, 1, "mlerp"
# (model, N, C, heads): head dim 64 throughout.
GPU_SHAPES = [("ViT-B/16", 197, 768, 12), ("ViT-S/16", 197, 384, 6), ("ViT-L/16", 197, 1024, 16),
              ("ViT-B/16@384", 577, 768, 12)]
GPU_BATCHES = (1, 8, 64, 256)
SMALL_SHAPES = [("tiny", 17, 32, 2)]  # --small: head dim 16, B = 2, the first dtype (the interpreter is slow)
SMALL_BATCHES = (2,)
VARIANTS = {"one_launch[T=1]": 1}  # one_launch at fixed programs per image


def candidates(small: bool = False) -> dict:
    """name -> (path, StepSettings): the dispatchable paths, then one_launch's T variants (--small: T = 1 only)."""
    step = kernels.step
    out = {path: (path, step.STEP) for path in step.STEP_PATHS}
    out.update({name: ("one_launch", step.STEP._replace(programs_per_image=t)) for name, t in VARIANTS.items()
                if t == 1 or not small})
    return out


def make_inputs(batch: int, n: int, c: int, heads: int, dtype: torch.dtype, gen: torch.Generator):
    """x [B, N, C], keys [B, H, N, D] (a view into a qkv projection), size [B, N, 1] in [1, 2)."""
    d = c // heads
    qkv = torch.randn(batch, n, 3 * heads * d, generator=gen, device=DEVICE).to(dtype)
    keys = qkv.view(batch, n, 3, heads, d).permute(2, 0, 3, 1, 4)[1]
    x = torch.randn(batch, n, c, generator=gen, device=DEVICE).to(dtype)
    size = 1 + torch.rand(batch, n, 1, generator=gen, device=DEVICE)
    return x, keys, size


def check(outputs, x, keys, size, r: int) -> bool:
    """The candidate's step equals the reference: the match up to near-ties of the scores, the tokens,
    sizes and bias as the reference merge computes them on the candidate's own match."""
    batch, n, _ = x.shape
    out, size_out, bias, index = outputs
    match = reference.Match(*kernels.step.split_index(index, batch, n, PROTECTED, r), PROTECTED)
    metric = reference.head_mean(keys)
    try:
        check_match_structure(match, n, r)
        want = reference.bipartite_match(metric, r, PROTECTED)
        if not all(torch.equal(a, b) for a, b in zip(match[:5], want[:5])):
            check_match_against_scores(match, metric, SCORE_TIE[metric.dtype])
        values, sizes = reference.merge_tokens(x, match, size, MODE)
        assert_close(out, values, name="x")
        assert_close(size_out, sizes, name="size")
        assert_close(bias[:, : n - r], reference.log_size_bias(sizes, bias.dtype)[:, 0, 0], name="bias")
    except AssertionError as err:
        print(f"tournament_vit: wrong output: {err}", file=sys.stderr)
        return False
    return True


def step_bytes(batch: int, n: int, c: int, heads: int, r: int, dtype: torch.dtype) -> int:
    """Fewest bytes the step moves: the keys (all heads) read once, x and sizes read, tokens, sizes and
    bias written (the index buffer, under 1 % of it, left out)."""
    es = torch.empty((), dtype=dtype).element_size()
    d, n_out = c // heads, n - r
    return batch * (heads * n * d * es + n * (c * es + 4) + n_out * (c * es + 4 + es))


def parts(x, keys, size, r: int, timer) -> dict:
    """Each launch of the multi-launch paths timed alone (L2 warm), information only: where their time goes
    (the merge's variants are timed by :func:`merge_round`)."""
    k = kernels
    batch, n, _ = x.shape
    nb = reference.split_sizes(n, PROTECTED)[1]
    metric = k.match.head_mean(keys)
    node_max, node_idx = k.match.match_scores(metric, PROTECTED)
    index = torch.empty(batch * sum(k.step.index_fields(n, PROTECTED, r)), dtype=torch.int64, device=x.device)
    launches = {
        "head_mean": lambda: k.match.head_mean(keys),
        "match": lambda: k.match.match_scores(metric, PROTECTED),
        "select": lambda: k.select.select(node_max, node_idx, r, nb),
        "plan (metric)": lambda: k.step.plan(metric, PROTECTED, r, index),
        "plan (keys)": lambda: k.step.plan(keys, PROTECTED, r, index),
    }
    return {name: None if ms is None else round(1e3 * ms, 2) for name, fn in launches.items()
            for ms in [timer(fn)]}


def merge_checks(variant: str, x, size, match, dtype) -> None:
    """AssertionError unless the merge ``variant`` on ``match`` equals the reference merge in every mode a
    model runs (mlerp with sizes and bias, as timed; mean without sizes, a model's first step; prune):
    copied rows bitwise, merged rows, sizes and bias up to rounding."""
    k = kernels
    batch, n, _ = x.shape
    r = match.r
    for mode, sized in ((MODE, size), ("mean", None), ("prune", size)):
        want, want_size = reference.merge_tokens(x, match, sized, mode)
        bias = torch.empty(batch, k.step.bias_row(n - r), dtype=dtype, device=x.device)
        out, size_out = k.merge.merge_forward(x, sized, match.unm_idx, match.dst_start, match.dst_src, PROTECTED,
                                              mode, bias=bias, variant=variant)
        copied = torch.ones(batch, n - r, dtype=torch.bool, device=x.device)
        if mode != "prune":
            copied[:, n - r - match.dst_start.shape[1] + 1:] = match.dst_start.diff(dim=1) == 0
        assert torch.equal(out[copied], want[copied]), f"{mode}: copied rows are not bitwise the input's"
        assert_close(out, want, name=f"{mode} x")
        assert_close(size_out, want_size, name=f"{mode} size")
        assert_close(bias[:, : n - r], reference.log_size_bias(want_size, dtype)[:, 0, 0], name=f"{mode} bias")


def merge_round(x, keys, size, r: int, dtype, timer) -> dict:
    """Every merge variant (kernels.merge.MERGE_VARIANTS) on the reference's match, checked against the
    reference merge (:func:`merge_checks`), then timed alone (L2 warm) in mlerp with sizes and bias:
    {"us": {variant: us or None}, "failed": [...], "winner"}."""
    k = kernels
    batch, n, c = x.shape
    match = reference.bipartite_match(reference.head_mean(keys), r, PROTECTED)
    us, failed = {}, []
    for variant in k.merge.MERGE_VARIANTS:
        bias = torch.empty(batch, k.step.bias_row(n - r), dtype=dtype, device=x.device)
        launch = functools.partial(k.merge.merge_forward, x, size, match.unm_idx, match.dst_start, match.dst_src,
                                   PROTECTED, MODE, bias=bias, variant=variant)
        try:
            merge_checks(variant, x, size, match, dtype)
        except AssertionError as err:
            print(f"tournament_vit: merge {variant}: wrong output: {err}", file=sys.stderr)
            us[variant] = None
            failed.append(variant)
            continue
        ms = timer(launch)
        us[variant] = None if ms is None else round(1e3 * ms, 2)
    timed = {name: t for name, t in us.items() if t is not None}
    return dict(us=us, failed=failed, winner=min(timed, key=timed.__getitem__) if timed else None)


def run_case(model: str, n: int, c: int, heads: int, batch: int, dtype: torch.dtype, gen, copy_gbps,
             small: bool = False) -> dict:
    x, keys, size = make_inputs(batch, n, c, heads, dtype, gen)
    r = reference.effective_r(n, R, PROTECTED)  # the launchers take r in [1, Nb] (--small's N has Nb < R)
    # The deciding times as a model sees them: replays with L2 warm. do_bench flushes L2 before every call: at
    # B = 1 that made the H200's step-alone times latency-bound loads from HBM (bench/results/h200-2026-12-04-run3:
    # 55 us for the three launches at B = 1, where the whole patched block cost ~22 us more than timm's).
    timer, cold_timer = _timer(graph=True, warm_l2=True), _timer(graph=True)
    # The merge variant first: every path but one_launch ends in it, so they are timed with the fastest one.
    merges = merge_round(x, keys, size, r, dtype, timer)
    merge = merges["winner"] or "rows"
    us, us_cold, failed = {}, {}, []
    for name, (path, settings) in candidates(small).items():
        if path not in kernels.step.paths_for(n, c, c // heads, PROTECTED, dtype, x.device.type):
            continue
        launch = functools.partial(kernels.step.token_fusion_step, x, keys, size, r, PROTECTED, MODE, dtype,
                                   settings, path=path, merge=merge)
        if not check(launch(), x, keys, size, r):
            us[name] = None
            failed.append(name)
            continue
        ms = timer(launch)
        us[name] = None if ms is None else round(1e3 * ms, 2)
        if DEVICE == "cuda":
            ms = cold_timer(launch)
            us_cold[name] = None if ms is None else round(1e3 * ms, 2)
    paths = {k: v for k, v in us.items() if k in kernels.step.STEP_PATHS and v is not None}
    nbytes = step_bytes(batch, n, c, heads, r, dtype)
    parted = parts(x, keys, size, r, timer) if "mean_plan" in paths else {}
    return dict(op=OP, model=model, dtype=str(dtype).replace("torch.", ""),
                shape=dict(B=batch, N=n, C=c, D=c // heads), r=r, us=us, us_cold=us_cold, parts_us=parted,
                merge=merges, failed=failed + [f"merge {name}" for name in merges["failed"]],
                winner=min(sorted(paths), key=paths.__getitem__) if paths else None, bytes=nbytes,
                ceiling_us=round(nbytes / copy_gbps / 1e3, 2) if copy_gbps else None)


def write_report(out: str, prov: dict, rows: list, skipped: list, copy_gbps) -> None:
    """tournament_vit.json (everything) and tournament_vit.md (one table) under ``out``."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "tournament_vit.json"), "w") as f:
        json.dump(dict(provenance=prov, copy_gbps=copy_gbps, rows=rows, skipped=skipped), f, indent=1)
    names = list(dict.fromkeys(name for row in rows for name in row["us"]))
    lines = [f"# ViT step tournament on {prov['card']} ({prov['date']}, commit {prov['commit']}, "
             f"torch {prov['torch']}, triton {prov['triton']})", "", f"`{prov['command']}`", "",
             f"r = {R}, {MODE}, sizes and bias. Times in us: CUDA-graph replays back to back (L2 warm; do_bench's "
             "L2-flushed medians are in the json as us_cold); 'failed' = wrong "
             "output, never timed; '-' = the path does not take the shape. Ceiling: the step's bytes at the copy "
             f"bandwidth ({copy_gbps:.0f} GB/s)." if copy_gbps else "Times: host clock in the interpreter "
             "(they mean nothing).", "",
             "| model | dtype | B | " + " | ".join(names) + " | winner | ceiling |", "|---" * (len(names) + 5) + "|"]
    for row in rows:
        cells = ["failed" if name in row["failed"] else "-" if row["us"].get(name) is None
                 else f"{row['us'][name]:.1f}" for name in names]
        lines.append(f"| {row['model']} | {row['dtype']} | {row['shape']['B']} | " + " | ".join(cells)
                     + f" | {row['winner']} | {row['ceiling_us'] if row['ceiling_us'] is not None else '-'} |")
    merged = [row for row in rows if row.get("merge")]
    if merged:
        names = list(merged[0]["merge"]["us"])
        lines += ["", "The merge variants (kernels.merge.MERGE_VARIANTS; table vit_merge), each alone on the "
                  "reference's match (us, L2 warm); the paths above ran with the winner:", "",
                  "| model | dtype | B | " + " | ".join(names) + " | winner |", "|---" * (len(names) + 4) + "|"]
        lines += [f"| {row['model']} | {row['dtype']} | {row['shape']['B']} | "
                  + " | ".join("failed" if n in row["merge"]["failed"] else "-" if row["merge"]["us"].get(n) is None
                               else f"{row['merge']['us'][n]:.1f}" for n in names)
                  + f" | {row['merge']['winner']} |" for row in merged]
    parted = [row for row in rows if row.get("parts_us")]
    if parted:
        names = list(parted[0]["parts_us"])
        lines += ["", "The other paths' launches before the merge, each timed alone (us, L2 warm):", "",
                  "| model | dtype | B | " + " | ".join(names) + " |", "|---" * (len(names) + 3) + "|"]
        lines += [f"| {row['model']} | {row['dtype']} | {row['shape']['B']} | "
                  + " | ".join("-" if row["parts_us"][n] is None else f"{row['parts_us'][n]:.1f}" for n in names)
                  + " |" for row in parted]
    if skipped:
        lines += ["", "Skipped (budget spent): " + ", ".join(skipped)]
    with open(os.path.join(out, "tournament_vit.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def write_table(prov: dict, rows: list, table_dir=None) -> None:
    """Replace this card's rows (same dtype and shape) in tables/vit_step.json and tables/vit_merge.json
    (shape B, N, C); keep every other row."""
    dispatch.update_table(OP, prov, [dict(card=prov["card"], dtype=row["dtype"], shape=row["shape"],
                                          winner=row["winner"],
                                          us={k: v for k, v in row["us"].items() if k in kernels.step.STEP_PATHS})
                                     for row in rows if row["winner"]], table_dir)
    dispatch.update_table("vit_merge", prov, [
        dict(card=prov["card"], dtype=row["dtype"], shape={key: row["shape"][key] for key in "BNC"},
             winner=row["merge"]["winner"], us=row["merge"]["us"])
        for row in rows if row.get("merge", {}).get("winner")], table_dir)


def main(argv=None) -> int:
    args = tournament_args(argv, __doc__, "tofu_triton/tables/vit_step.json and vit_merge.json")
    refused = refuse_without_gpu("tournament_vit", args.small, args.write_table)
    if refused:
        return refused
    dtypes = args.dtypes
    prov = provenance(command_line(argv))
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    if args.small:
        cases = [(*shape, batch, dtypes[0]) for shape in SMALL_SHAPES for batch in SMALL_BATCHES]
        copy_gbps = None
    else:
        from measure import copy_bandwidth

        # ViT-B/16 at 224 px first: the table's most used rows are measured whatever the budget.
        cases = [(*shape, batch, dtype) for shape in GPU_SHAPES for dtype in dtypes for batch in GPU_BATCHES]
        copy_gbps = copy_bandwidth("cuda")["copy_gbps"]
    rows, skipped, t0 = [], [], time.time()
    for model, n, c, heads, batch, dtype in cases:
        if time.time() - t0 > args.budget_s:
            skipped.append(f"{model} B={batch} {dtype}".replace("torch.", ""))
            continue
        row = run_case(model, n, c, heads, batch, dtype, gen, copy_gbps, args.small)
        rows.append(row)
        print("tournament_vit", json.dumps(row), flush=True)
        write_report(args.out, prov, rows, skipped, copy_gbps)
    write_report(args.out, prov, rows, skipped, copy_gbps)
    if args.write_table:
        write_table(prov, rows)
    failed = [row for row in rows if row["failed"]]
    print(f"tournament_vit {'PASSED' if not failed else 'FAILED'}: {len(rows)} rows, {len(failed)} with a failed "
          f"candidate, {len(skipped)} skipped, {time.time() - t0:.0f} s")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
