"""Diffusion transformer step on a GPU: unpatched vs tofu_triton (ToFu at two ratios, ToDo), eager and CUDA graph.

    python bench/throughput_dit.py              # Flux.1-dev, SD3-medium, PixArt-Sigma, 1024 px; B=1,2; bf16, fp16
    python bench/throughput_dit.py --models flux-dev --dtypes bf16 --batches 1 --budget-s 200
    python bench/throughput_dit.py --smoke      # tiny layouts on the CPU in fp32: checks the script end to end

One transformer forward (the work of one denoising step) per call, on
transformers built from the published configs with random weights
(``tofu_triton.models`` presets ``pixart-sigma``, ``sd3-medium``, ``flux-dev``;
nothing is downloaded), a random 1024 px latent (128x128, a 64x64 grid of
image tokens) and random text embeddings of each pipeline's length (300 /
333 / 512 tokens). Attention runs through diffusers' default processors
(PyTorch SDPA) in the unpatched model; merging blocks run SDPA themselves.
Variants, each in eager mode and replayed from a CUDA graph:

* ``unpatched`` the transformer as diffusers builds it;
* ``tofu``      ``tofu_triton.patch.diffusers(model, ratio, mode="tofu")`` at each ``--ratios``, our defaults
  otherwise (merge before attention; Flux's single-stream blocks merge their parallel attention + MLP);
* ``todo``      ``tofu_triton.patch.diffusers(model, mode="todo")``: keys and values pooled 2x2, no ratio.

Plans for ``tofu`` (``--reuse``, ``--block-mode``, every combination, as in
``bench/throughput_sd.py``): ``--reuse none`` (default) / ``step`` / k, and
``--block-mode sublayer`` (default) / ``whole`` (each block run whole on the
merged image tokens). The goal is judged on the defaults.

Flux gets its token grid as ``joint_attention_kwargs={"tofu_grid": (64, 64)}``
(a CUDA graph cannot read it from ``img_ids``). Timing as
``bench/throughput_sd.py``: CUDA events around every call, the variants of
one (model, dtype, batch) interleaved over ``--rounds``, the median of all
timed calls; CUDA graphs are captured once per variant before the rounds.
Each row also gives the relative L2 error and cosine of the output against
the unpatched one (random weights: this only shows that a step ran and stayed
finite; fp16 with random weights may overflow, see ``finite``).

Writes ``throughput_dit_<card>.json`` and ``.md`` under ``--out`` (default
``bench/results/``) with the card, date, versions and the exact command, and
judges the goal: ToFu at ratio 0.5 at least 1.3x faster than unpatched on
Flux, per dtype, batch and execution mode.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from arguments import choice_list, fill_preset, split_list  # noqa: E402
from measure import capture_graph  # noqa: E402
from throughput_sd import (  # noqa: E402
    DEFAULT_PLAN, EXECS, Timer, _failure, _fmt, _plan_of, add_plan_arguments, cannot_start, goal_lines, output_files,
    plan_kwargs, plan_label, plan_settings, versions, write_report,
)

MODELS = {"pixart-sigma": "PixArt-Sigma, 1024 px", "sd3-medium": "SD3 medium, 1024 px",
          "flux-dev": "Flux.1 dev, 1024 px", "tiny-pixart": "PixArt layout, tiny", "tiny-sd3": "SD3 layout, tiny",
          "tiny-flux": "Flux layout, tiny"}
VARIANTS = ("unpatched", "tofu", "todo")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
GOAL_MODEL, GOAL_RATIO, GOAL_SPEEDUP = "flux-dev", 0.5, 1.3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="flux-dev,sd3-medium,pixart-sigma",  # the goal's model first: budget
                   help="comma list of " + ", ".join(MODELS))
    p.add_argument("--ratios", default="0.3,0.5", help="comma list of ToFu merge ratios in (0, 1)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ", ".join(VARIANTS))
    p.add_argument("--batches", default="1,2", help="comma list of batch sizes")
    p.add_argument("--dtypes", default="bf16,fp16", help="comma list of " + ", ".join(DTYPES))
    p.add_argument("--execs", default=",".join(EXECS), help="eager and/or graph (CUDA graph replay; CUDA only)")
    p.add_argument("--size", type=int, default=128, help="latent side (image / 8; default 128: 1024 px)")
    add_plan_arguments(p)
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per case before its first round")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per case per round")
    p.add_argument("--rounds", type=int, default=2, help="rounds over the cases of a group, interleaved")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no further (model, dtype, batch) group after this many seconds (the first always runs)")
    p.add_argument("--smoke", action="store_true",
                   help="on the CPU; unless given: the tiny layouts at a 16x16 latent, fp32, B=1, ratio 0.5, eager, "
                        "1 timed call (checks the script, times nothing useful)")
    p.add_argument("--out", default=None, help="directory for throughput_dit_<card>.{json,md} (default bench/results)")
    args = p.parse_args(argv)
    if args.smoke:
        fill_preset(args, argv, dict(models="tiny-pixart,tiny-sd3,tiny-flux", dtypes="fp32", batches="1",
                                     ratios="0.5", execs="eager", size=16, warmup=0, repeats=1, rounds=1))
    for name, allowed in (("models", MODELS), ("variants", VARIANTS), ("dtypes", DTYPES), ("execs", EXECS)):
        values = choice_list(p, "--" + name, getattr(args, name), allowed)
        if not values:
            p.error(f"--{name}: empty list; choose from {', '.join(allowed)}")
        setattr(args, name, values)
    args.plans = plan_settings(p, args)
    try:
        args.ratios = [float(r) for r in split_list(args.ratios)]
        args.batches = [int(b) for b in split_list(args.batches)]
    except ValueError:
        p.error(f"--ratios must be numbers and --batches integers, got {args.ratios!r} / {args.batches!r}")
    if not args.ratios or not all(0 < r < 1 for r in args.ratios):
        p.error(f"every ratio must be in (0, 1), got {args.ratios}")
    if not args.batches or min(args.batches) < 1:
        p.error(f"every batch must be >= 1, got {args.batches}")
    for name in ("repeats", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.size < 2 or args.size % 2:
        p.error(f"--size (the latent side) must be even, got {args.size}")
    return args


def cases(args) -> List[Dict]:
    """(variant, ratio, plans, exec) of every case of one (model, dtype, batch) group; unpatched first."""
    out = []
    for variant in args.variants:
        if variant == "tofu":
            out += [dict(variant=variant, ratio=r, reuse=plan[0], block_mode=plan[1], exec=e)
                    for r in args.ratios for plan in args.plans for e in args.execs]
        else:
            out += [dict(variant=variant, ratio=None, exec=e) for e in args.execs]
    return sorted(out, key=lambda c: c["variant"] != "unpatched")


def configure(model, case: Dict) -> None:
    """Patch ``model`` in place for the case's variant (removing the previous patch)."""
    import tofu_triton.patch as tp

    tp.unpatch(model)
    if case["variant"] == "tofu":
        tp.diffusers(model, ratio=case["ratio"], mode="tofu", seed=0, **plan_kwargs(_plan_of(case) or DEFAULT_PLAN))
    elif case["variant"] == "todo":
        tp.diffusers(model, ratio=0.5, mode="todo")


def run_group(model, name: str, dtype_name: str, batch: int, args, device: str) -> List[Dict]:
    """Every case of one model at one dtype and batch, interleaved over the rounds."""
    import tofu_triton.patch as tp
    from tofu_triton.models import transformer_inputs

    cuda = device == "cuda"
    inputs = transformer_inputs(model, batch, args.size, seed=1, device=device, dtype=DTYPES[dtype_name])
    # Flux, patched: name the token grid (a CUDA graph cannot read it from img_ids). Not to the unpatched
    # model, whose attention would log a warning per block per call that it ignores the key (timed with it).
    grid = {"joint_attention_kwargs": {"tofu_grid": (args.size // 2, args.size // 2)}} if "img_ids" in inputs else {}
    common = dict(model=name, about=MODELS[name], latent=args.size, pixels=8 * args.size, tokens=(args.size // 2) ** 2,
                  batch=batch, dtype=dtype_name)
    rows = [dict(common, **case, times=[], status="ok") for case in cases(args)]
    runners: List[Optional[Callable]] = [None] * len(rows)

    def step():
        with torch.no_grad():  # as diffusers' pipelines call their transformer
            return model(**inputs, **(grid if tp.is_patched(model) else {})).sample

    base = None
    for i, row in enumerate(rows):  # outputs, warm-up, graph capture
        try:
            configure(model, row)
            out = step()  # also Triton's compile on first use
            for _ in range(max(0, args.warmup - 1)):
                step()
            runners[i] = capture_graph(step, args.warmup) if row["exec"] == "graph" else step
            if row["variant"] == "unpatched" and row["exec"] == "eager":
                base = out.float()
            row["finite"] = bool(torch.isfinite(out).all())
            if base is not None:
                o = out.float()
                row["rel_l2"] = float((o - base).norm() / base.norm().clamp_min(1e-12))
                row["cosine"] = float(torch.nn.functional.cosine_similarity(o.flatten(1), base.flatten(1)).mean())
        except Exception as e:  # one failing case must not lose the others; it is reported
            row["status"] = _failure(e)
        finally:
            out = None
    timer = Timer(cuda)
    for _ in range(args.rounds):
        for row, runner in zip(rows, runners):
            if row["status"] != "ok":
                continue
            try:
                if row["exec"] == "eager":
                    configure(model, row)  # a graph replays what it captured; eager needs the patch in place
                row["times"] += timer(runner, args.repeats)
            except Exception as e:
                row["status"] = _failure(e)
    configure(model, dict(variant="unpatched"))
    runners = None

    for row in rows:
        times = row.pop("times")
        if row["status"] == "ok" and times:
            q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
            row.update(ms=statistics.median(times), ms_p20=q[0], ms_p80=q[3], timed_calls=len(times))
    for row in rows:  # speed-up against the unpatched model in the same execution mode
        base_ms = next((r.get("ms") for r in rows if r["variant"] == "unpatched" and r["exec"] == row["exec"]), None)
        if base_ms and row.get("ms"):
            row["vs_unpatched"] = base_ms / row["ms"]
    return rows


def judge(rows: List[Dict], why_not: Optional[str]) -> List[Dict]:
    """Flux at ratio 0.5, per dtype, batch and execution mode: does ToFu reach >= 1.3x unpatched?"""
    out = []
    for row in rows:
        if row.get("variant") != "tofu" or row.get("ratio") != GOAL_RATIO or row["model"] != GOAL_MODEL:
            continue
        if _plan_of(row) not in (None, DEFAULT_PLAN):  # the goal is the defaults'; other plans help choose them
            continue
        speedup = row.get("vs_unpatched")
        if speedup is None:
            verdict = "not measured" + (f" ({row['status']})" if row["status"] != "ok" else "")
        elif why_not:
            verdict = f"not judged ({why_not})"
        else:
            verdict = "PASS" if speedup >= GOAL_SPEEDUP else "FAIL"
        out.append(dict(model=row["model"], dtype=row["dtype"], batch=row["batch"], exec=row["exec"],
                        ratio=GOAL_RATIO, tofu=speedup, verdict=verdict))
    return out


def goal_line(t: Dict) -> str:
    return (f"{t['model']} {t['dtype']} B={t['batch']} {t['exec']} ratio {t['ratio']}: ToFu {_fmt(t['tofu'])}x "
            f"unpatched: {t['verdict']} (goal >= {GOAL_SPEEDUP}x)")


def write_markdown(path: Path, report: Dict) -> None:
    env, ver = report["environment"], report["versions"]
    lines = [
        "# Diffusion transformer step: unpatched vs tofu_triton (ToFu, ToDo), eager and CUDA graph",
        "",
        f"- card: {env['device']}",
        f"- date: {env['date']}",
        f"- torch {env['torch']} (CUDA {ver['cuda']}), triton {env['triton']}, diffusers {ver['diffusers']}, "
        f"tofu_triton {ver['tofu_triton']}",
        f"- command: `{report['command']}`",
        "- one transformer forward per step, random weights (published PixArt-Sigma / SD3-medium / Flux.1-dev "
        "configs), random latent and text embeddings; ms = median of every timed call (CUDA events, cases "
        "interleaved over rounds, CUDA graphs captured once per case; see bench/throughput_dit.py)",
        "- ours: `tofu_triton.patch.diffusers(model, ratio, mode=\"tofu\")` / `mode=\"todo\"`, defaults otherwise "
        "(backend auto: the fused kernels on CUDA); speed-up against unpatched in the same execution mode",
        "- rel. L2 / cosine: the output against the unpatched eager one; random weights, so they only show that the "
        "step ran",
        "",
        "- plans (tofu): reuse (none: every block its own match; step: one per call; k: kept for k calls), block "
        "mode (sublayer: merge around each merging sub-layer; whole: once around each block)",
        "",
        "| model | tokens | dtype | B | variant | ratio | plans | exec | ms/step | p20-p80 | vs unpatched | rel. L2 "
        "| cosine | finite | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        if "variant" not in r:  # a group that did not run at all
            lines.append(f"| {r['model']} | | {r.get('dtype', '')} | {r.get('batch', '')} | | | | | | | | | | | "
                         f"{r['status']} |")
            continue
        spread = f"{_fmt(r.get('ms_p20'))}-{_fmt(r.get('ms_p80'))}" if r.get("ms") is not None else ""
        lines.append(
            f"| {r['model']} | {r['tokens']} | {r['dtype']} | {r['batch']} | {r['variant']} | {r['ratio'] or ''} | "
            f"{plan_label(_plan_of(r))} | {r['exec']} | {_fmt(r.get('ms'))} | {spread} | "
            f"{_fmt(r.get('vs_unpatched'))} | "
            f"{_fmt(r.get('rel_l2'), '.4f')} | {_fmt(r.get('cosine'), '.4f')} | {r.get('finite', '')} | "
            f"{r['status']} |")
    lines += goal_lines(f"## Goal: ToFu >= {GOAL_SPEEDUP}x unpatched on {GOAL_MODEL} at ratio {GOAL_RATIO} (SDPA)",
                        report["goal"], goal_line)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv=None) -> int:
    args = parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    if cannot_start("throughput_dit", "diffusion transformers", args.smoke):
        return 2
    if device == "cpu" and "graph" in args.execs:
        print("--execs graph needs CUDA (CUDA graphs); on the CPU use --execs eager", file=sys.stderr)
        return 2
    from tofu_triton.models import create_transformer

    env, out, stem, command = output_files("throughput_dit", args, argv)

    started = time.monotonic()
    rows: List[Dict] = []
    print(f"{len(args.models)} models on {env['device']}, dtypes {args.dtypes}, batches {args.batches}, "
          f"ratios {args.ratios}, {args.execs}" + (f", budget {args.budget_s:.0f} s" if args.budget_s else "") + ":",
          flush=True)
    for name in args.models:
        model = None
        for dtype_name in args.dtypes:
            for batch in args.batches:
                group = dict(model=name, about=MODELS[name], dtype=dtype_name, batch=batch)
                if args.budget_s is not None and rows and time.monotonic() - started > args.budget_s:
                    rows.append(dict(group, status=f"skipped: budget of {args.budget_s:.0f} s spent"))
                    print(f"{name} {dtype_name} B={batch}: skipped (budget spent)", flush=True)
                    continue
                try:
                    if model is None:  # built once per model (in fp32 on the device), cast per dtype
                        model = create_transformer(name, seed=0, device=device)
                    model = torch.nn.Module.to(model, dtype=DTYPES[dtype_name])
                    group_rows = run_group(model, name, dtype_name, batch, args, device)
                except Exception as e:  # building or casting failed (out of memory, a diffusers change)
                    group_rows = [dict(group, status=_failure(e))]
                for row in group_rows:
                    rows.append(row)
                    print(f"{name:12s} {dtype_name} B={batch} {row.get('variant', '-'):9s} "
                          f"{row.get('ratio') or '':4} {plan_label(_plan_of(row)):16s} "
                          f"{row.get('exec', ''):5s} {_fmt(row.get('ms'), '9.2f')} ms  "
                          f"{_fmt(row.get('vs_unpatched'), '5.2f')}x  {row['status']}", flush=True)
        model = None
        if device == "cuda":
            torch.cuda.empty_cache()

    if args.smoke:
        why_not = "CPU smoke run"
    elif args.size != 128:
        why_not = "not the goal's setting: a 1024 px image (--size 128)"
    else:
        why_not = None
    report = dict(environment=env, versions=versions(), command=command, device_kind=device,
                  settings=dict(batches=args.batches, dtypes=args.dtypes, ratios=args.ratios, execs=args.execs,
                                plans=args.plans,
                                warmup=args.warmup, repeats=args.repeats, rounds=args.rounds, size=args.size),
                  elapsed_s=round(time.monotonic() - started, 1), rows=rows, goal=judge(rows, why_not))
    write_report(out, stem, report, write_markdown, "target DiT ", goal_line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
