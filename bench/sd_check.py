"""GPU checks of the Stable Diffusion step's kernels that the CPU interpreter cannot make.

1. ``select``: every select candidate (kernels.select.SPATIAL_SELECT_CANDIDATES:
   the radix kernel, one program per 64 destinations, and the sorts) against
   the reference select on the same scores, at N = 4096, 16384 and 65536
   (the interpreter stops at 16384), on random and on heavily tied scores,
   and with every source sent to three destinations, repeated (each must be
   deterministic).
2. ``step``: the whole step on fp16 hidden states: partition (random
   destinations, exactly the reference's), match (select checked
   exactly on the kernel's own scores), merge and unmerge + residual values
   against the reference.
3. ``timing``: device time of each kernel (partition, scores, select, merge, unmerge) at
   those sizes, B = 2, C = 320, ratio 0.5 (``triton.testing.do_bench``); the scores and
   select are the candidates ops.spatial_match dispatches to on this card (named in
   the row). bench/tournament_sd.py times every candidate.

``--small`` runs one small case of 1 and 2 only, for compute-sanitizer
(memcheck, synccheck), e.g.
``compute-sanitizer --tool synccheck python bench/sd_check.py --small``.
Writes ``sd_check.json`` and ``sd_check.md`` under ``--out``.

    python bench/sd_check.py --out bench/results/gpu
"""
import argparse
import json
import os
import sys
import time

import torch

from tofu_triton import ops, reference
from tofu_triton import kernels

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import refuse_without_gpu  # noqa: E402

C, BATCH, RATIO = 320, 2, 0.5
# The CPU runs only ``--small`` in Triton's interpreter (TRITON_INTERPRET=1): it
# checks this script, not the kernels' behaviour on a GPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _equal(got, want) -> bool:
    return all(torch.equal(a, b) for a, b in zip(got, want))


def check_select(side: int, repeats: int, gen: torch.Generator) -> dict:
    part = reference.spatial_partition(side, side, 2, 2, device=DEVICE)
    na, nb = part.a_pos.numel(), part.b_pos.numel()
    failures, runs = 0, 0
    for kind in ("random", "ties", "few_destinations"):
        node_max = torch.rand(BATCH, na, generator=gen, device=DEVICE)
        node_idx = torch.randint(0, nb, (BATCH, na), generator=gen, device=DEVICE)
        if kind == "ties":
            node_max = node_max.mul(20).round().div(20)
        if kind == "few_destinations":
            node_idx = node_idx % 3
        for r in (1, side * side // 2, na):
            want = reference.to_spatial(reference.select(node_max, node_idx, r, nb, 0))
            for select in kernels.select.SPATIAL_SELECT_CANDIDATES.values():
                for _ in range(repeats):
                    runs += 1
                    failures += not _equal(select(node_max, node_idx, r, nb), want)
    return dict(check="select", n=side * side, runs=runs, failures=failures)


def check_step(side: int, gen: torch.Generator) -> dict:
    step = torch.tensor(421, device=DEVICE)
    part = ops.spatial_partition(side, side, 2, 2, seed=7, step=step, block=2, backend="triton")
    choice = reference.cell_choice(7, step, 2, (side // 2, side // 2), 4)
    partition_ok = _equal(part, reference.spatial_partition(side, side, 2, 2, choice))
    x = torch.randn(BATCH, side * side, C, generator=gen, device=DEVICE, dtype=torch.float16)
    res = torch.randn(BATCH, side * side, C, generator=gen, device=DEVICE, dtype=torch.float16)
    r = int(side * side * RATIO)
    match = ops.spatial_match(x, part, r, backend="triton")
    scores, _ = ops._spatial_candidates(x)  # the select is checked on the scores it was given
    node_max, node_idx = kernels.match.SPATIAL_SCORES_CANDIDATES[scores](x, part.a_pos, part.b_pos)
    select_ok = _equal(match, reference.to_spatial(reference.select(node_max, node_idx, r, part.b_pos.numel(), 0)))
    want_max, _ = reference.spatial_scores(x, part)
    score_err = (node_max - want_max).abs().max().item()
    errors = {}
    for mode in reference.MODES:
        got = ops.spatial_merge(x, match, part, mode, backend="triton")
        want = reference.spatial_merge(x, match, part, mode)
        errors[mode] = ((got.double() - want.double()).norm() / want.double().norm()).item()
    y = ops.spatial_merge(x, match, part, "mlerp", backend="triton")
    unmerge_ok = torch.equal(ops.spatial_unmerge(y, match, part, res, backend="triton"),
                             reference.spatial_unmerge(y, match, part, res))
    ok = partition_ok and select_ok and unmerge_ok and score_err < 1e-3 and all(e < 2e-3 for e in errors.values())
    return dict(check="step", n=side * side, partition_exact=partition_ok, select_exact=select_ok,
                max_score_diff=score_err, merge_rel_error=errors, unmerge_exact=unmerge_ok, ok=ok)


def timing(side: int) -> dict:
    from triton.testing import do_bench

    part = reference.spatial_partition(side, side, 2, 2, device=DEVICE)
    x = torch.randn(BATCH, side * side, C, device=DEVICE, dtype=torch.float16)
    r = int(side * side * RATIO)
    scores, select = ops._spatial_candidates(x)
    scores_fn = kernels.match.SPATIAL_SCORES_CANDIDATES[scores]
    select_fn = kernels.select.SPATIAL_SELECT_CANDIDATES[select]
    node_max, node_idx = scores_fn(x, part.a_pos, part.b_pos)
    unm, start, src, a_row = select_fn(node_max, node_idx, r, part.b_pos.numel())
    y, _ = kernels.merge.merge_forward(x, None, unm, start, src, 0, "mlerp", positions=(part.a_pos, part.b_pos),
                                    with_size=False)
    step = torch.tensor(421, device=DEVICE)
    fns = {
        "partition": lambda: kernels.partition.spatial_partition(step, side, side, 2, 2, 7, 2, True),
        "scores": lambda: scores_fn(x, part.a_pos, part.b_pos),
        "select": lambda: select_fn(node_max, node_idx, r, part.b_pos.numel()),
        "merge_mlerp": lambda: kernels.merge.merge_forward(x, None, unm, start, src, 0, "mlerp",
                                                           positions=(part.a_pos, part.b_pos), with_size=False),
        "unmerge_residual": lambda: kernels.unmerge.spatial_unmerge(y, x, part.slot, a_row),
        "tomesd_like_argsort": lambda: node_max.argsort(dim=-1, descending=True),  # one sort, for scale
    }
    return dict(check="timing", n=side * side, c=C, batch=BATCH, candidates=dict(scores=scores, select=select),
                ms={name: do_bench(fn, warmup=10, rep=40) for name, fn in fns.items()})


def write_report(out: str, env: dict, ok: bool, rows: list) -> None:
    """sd_check.json (everything) and sd_check.md (the timing table) under ``out``."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "sd_check.json"), "w") as f:
        json.dump(dict(env, ok=ok, rows=rows), f, indent=1)
    lines = [f"# SD step kernels on {env['card']} ({env['date']}, torch {env['torch']}, triton {env['triton']})",
             "", f"`{env['command']}`: **{'all checks passed' if ok else 'FAILED'}**", "",
             "| N | partition ms | scores ms | select ms | merge (mlerp) ms | unmerge + residual ms | "
             "one argsort ms |", "|---|---|---|---|---|---|---|"]
    names = ("partition", "scores", "select", "merge_mlerp", "unmerge_residual", "tomesd_like_argsort")
    for row in rows:
        if row["check"] == "timing":
            lines.append(f"| {row['n']} | " + " | ".join(f"{row['ms'][k]:.3f}" for k in names) + " |")
    with open(os.path.join(out, "sd_check.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/gpu")
    ap.add_argument("--repeats", type=int, default=5, help="runs of each select case")
    ap.add_argument("--small", action="store_true", help="one small case (for compute-sanitizer)")
    args = ap.parse_args(argv)
    refused = refuse_without_gpu("sd_check", args.small)
    if refused:
        return refused
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    sides = ([32] if DEVICE == "cuda" else [16]) if args.small else [64, 128, 256]
    rows, t0 = [], time.time()
    for side in sides:
        rows.append(check_select(side, 1 if args.small else args.repeats, gen))
        rows.append(check_step(side, gen))
        if not args.small:
            rows.append(timing(side))
        for row in rows[-3 if not args.small else -2:]:
            print("sd_check", json.dumps(row), flush=True)
    ok = all(row.get("failures", 0) == 0 and row.get("ok", True) for row in rows)
    print(f"sd_check {'PASSED' if ok else 'FAILED'} in {time.time() - t0:.0f} s")
    if not args.small:
        env = dict(card=torch.cuda.get_device_name(), torch=torch.__version__,
                   triton=__import__("triton").__version__, date=time.strftime("%Y-%m-%d"),
                   command="python " + " ".join(sys.argv))
        write_report(args.out, env, ok, rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
