"""Stable Diffusion UNet step on a GPU: unpatched vs tomesd vs tofu_triton (ToMe and ToFu modes).

    python bench/throughput_sd.py                      # SD 1.5 at 512 px and SDXL at 1024 px, B=2, fp16, ratio 0.5
    python bench/throughput_sd.py --models sd15 --ratios 0.3,0.5,0.7
    python bench/throughput_sd.py --models sdxl --execs eager,graph   # also replayed from CUDA graphs
    python bench/throughput_sd.py --smoke              # tiny UNets on the CPU in fp32: checks the script end to end

One UNet forward (the work of one denoising step) per call, on UNets built
from the published configs with random weights (``tofu_triton.models``
presets ``sd15`` and ``sdxl``; nothing is downloaded), a random latent, random
text embeddings (77 tokens) and, for SDXL, random ``text_time`` conditions.
Batch 2 stands for classifier-free guidance. Attention runs through diffusers'
default processor (``AttnProcessor2_0``, PyTorch SDPA). Variants:

* ``unpatched`` the UNet as diffusers builds it;
* ``tomesd``    ``tomesd.apply_patch(unet, ratio, max_downsample, use_rand=False)``, tomesd's other defaults;
* ``tome``      ``tofu_triton.patch.diffusers(unet, ratio, mode="tome", max_downsample)``, our defaults otherwise;
* ``tofu``      ``tofu_triton.patch.diffusers(unet, ratio, mode="tofu", max_downsample)``, our defaults otherwise.

Plans (``--reuse``, ``--block-mode``, comma lists; every combination runs for
our variants): ``--reuse none`` (default: every merging block computes its
own match), ``step`` (one match per resolution per call, reused by the later
blocks) or an int k (kept for k calls: the timed calls then amortise it as a
denoising loop does; a CUDA graph cannot replay it and its row says so);
``--block-mode sublayer`` (default: merge around each merging sub-layer) or
``whole`` (merge once around each whole block). The goal is judged on the
defaults (none, sublayer); the other rows are for choosing them.

``max_downsample`` is tomesd's default 1 for SD 1.5 and 2 for SDXL, whose
full-resolution level has no transformer block (at 1 neither tomesd nor we
would merge anything there); both patches always get the same value.

Timing: every call bracketed by CUDA events (host clock on the CPU); the
variants are interleaved over ``--rounds`` rounds (warm-up calls at the start
of each), so drift of clocks or temperature hits them alike; the median over
all timed calls is ms per step. Launch overhead is in the numbers, as in an
eager pipeline; ``--execs graph`` adds each case replayed from a CUDA graph
(captured once per case, after its warm-up), which leaves it out. The goal is
judged on the eager rows. Each row also gives the relative L2 error and cosine of the
noise prediction against the unpatched one (random weights: this only shows
that a step ran and stayed finite).

Writes ``throughput_sd_<card>.json`` and ``.md`` under ``--out`` (default
``bench/results/``) with the card, date, versions and the exact command, and
judges the goal: ToFu at ratio 0.5 at least 1.3x faster than unpatched, next
to what tomesd reaches (the goal's context: tomesd gives at most about 1.1x).
"""
import argparse
import json
import re
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from arguments import choice_list, fill_preset, split_list  # noqa: E402
from measure import capture_graph, environment  # noqa: E402

MODELS = {"sd15": "SD 1.5, 512 px", "sdxl": "SDXL, 1024 px", "tiny": "SD 1.5 layout, tiny",
          "tiny-xl": "SDXL layout, tiny"}
VARIANTS = ("unpatched", "tomesd", "tome", "tofu")
EXECS = ("eager", "graph")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
RESULTS = Path(__file__).resolve().parent / "results"
GOAL_RATIO, GOAL_TOFU, CONTEXT_TOMESD = 0.5, 1.3, 1.1
GOAL_MODELS = ("sd15", "sdxl")  # the published sizes; the tiny presets time nothing worth judging
BLOCK_MODES = ("sublayer", "whole")
DEFAULT_PLAN = ("none", "sublayer")  # (reuse, block mode): tofu_triton.patch.diffusers' defaults


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    """--reuse and --block-mode: the plan settings of tofu_triton.patch.diffusers to run (every combination)."""
    p.add_argument("--reuse", default="none",
                   help="comma list of plan reuse settings: none (every block its own match), step (one per "
                        "resolution per call) or an int k (kept for k calls)")
    p.add_argument("--block-mode", default="sublayer",
                   help="comma list of sublayer (merge around each merging sub-layer) and/or whole (merge once "
                        "around each block)")


def plan_settings(p: argparse.ArgumentParser, args) -> List[Tuple[str, str]]:
    """Every (reuse, block mode) of ``--reuse`` x ``--block-mode``; reuse as written ("none", "step", "2")."""
    reuses = split_list(args.reuse)
    bad = [r for r in reuses if r not in ("none", "step") and not (r.isdigit() and int(r) >= 1)]
    if bad or not reuses:
        p.error(f"--reuse: each item must be none, step or an int k >= 1, got {args.reuse!r}")
    modes = choice_list(p, "--block-mode", args.block_mode, BLOCK_MODES)
    if not modes:
        p.error(f"--block-mode: empty list; choose from {', '.join(BLOCK_MODES)}")
    return [(r, m) for m in dict.fromkeys(modes) for r in dict.fromkeys(reuses)]


def plan_kwargs(plan: Tuple[str, str]) -> Dict[str, object]:
    """tofu_triton.patch.diffusers' keyword arguments for a (reuse, block mode)."""
    reuse, mode = plan
    return dict(reuse=int(reuse) if reuse.isdigit() else reuse, whole_block=mode == "whole")


def plan_label(plan: Tuple[str, str]) -> str:
    return "" if plan is None else f"{plan[0]}, {plan[1]}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="sd15,sdxl", help="comma list of UNet presets: " + ", ".join(MODELS))
    p.add_argument("--ratios", default=str(GOAL_RATIO), help="comma list of merge ratios in [0, 1)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ", ".join(VARIANTS))
    p.add_argument("--execs", default="eager", help="eager and/or graph (CUDA graph replay; CUDA only)")
    p.add_argument("--batch", type=int, default=2, help="latents per step (2: classifier-free guidance)")
    p.add_argument("--size", type=int, default=None,
                   help="latent side for every model (default: each preset's own, 64 for SD 1.5, 128 for SDXL)")
    p.add_argument("--max-downsample", type=int, default=None, choices=(1, 2, 4, 8),
                   help="for every model (default: the highest resolution with attention, 1 SD 1.5, 2 SDXL)")
    p.add_argument("--dtype", default="fp16", choices=tuple(DTYPES))
    add_plan_arguments(p)
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed calls per variant in the first round, the compared one included (1 later)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per variant per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds over the variants, interleaved")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no further model after this many seconds (the first always runs)")
    p.add_argument("--smoke", action="store_true",
                   help="on the CPU; unless given: tiny and tiny-xl at a 16x16 latent in fp32, 2 timed calls "
                        "(checks the script, times nothing useful)")
    p.add_argument("--out", default=None, help="directory for throughput_sd_<card>.{json,md} (default bench/results)")
    args = p.parse_args(argv)
    if args.smoke:  # the CPU settings, for the options not given on the command line
        fill_preset(args, argv, dict(models="tiny,tiny-xl", dtype="fp32", size=16, warmup=1, repeats=2, rounds=1))
    args.models = choice_list(p, "--models", args.models, MODELS)
    args.variants = choice_list(p, "--variants", args.variants, VARIANTS)
    args.execs = choice_list(p, "--execs", args.execs, EXECS)
    args.plans = plan_settings(p, args)
    if args.smoke and "graph" in args.execs:
        p.error("--execs graph needs CUDA (CUDA graphs); the CPU smoke run times eager calls only")
    try:
        args.ratios = [float(r) for r in split_list(args.ratios)]
    except ValueError:
        p.error(f"--ratios must be a comma list of numbers, got {args.ratios!r}")
    if not args.ratios or not all(0 <= r < 1 for r in args.ratios):
        p.error(f"every ratio must be in [0, 1), got {args.ratios}")
    for name in ("batch", "repeats", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.size is not None:
        from tofu_triton.models import latent_multiple

        for name in args.models:
            if args.size < 1 or args.size % latent_multiple(name):
                p.error(f"--size must be a positive multiple of {latent_multiple(name)} for {name}, got {args.size}")
    return args


def card_slug(name: str) -> str:
    """A short file-name tag for a device name: 'NVIDIA H100 80GB HBM3' -> 'h100', 'NVIDIA GeForce RTX 4090' ->
    'rtx4090', 'CPU (x86_64)' -> 'cpu'. The words up to the first one with a digit, vendor words dropped."""
    if name.lower().startswith("cpu"):
        return "cpu"
    words = [w for w in re.split(r"[\s\-_]+", name.lower()) if w and w not in ("nvidia", "geforce", "tesla", "amd")]
    kept = []
    for word in words:
        kept.append(word)
        if any(c.isdigit() for c in word):
            break
    return re.sub(r"[^a-z0-9]", "", "".join(kept)) or "gpu"


def versions() -> Dict[str, str]:
    """Versions of the packages whose code runs in a step (tomesd has no __version__: ask the metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    import tofu_triton

    out = {"tofu_triton": tofu_triton.__version__, "cuda": str(torch.version.cuda)}
    for name in ("diffusers", "tomesd"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


class Timer:
    """Per-call times in ms: CUDA events around each call (device time between them, launch gaps included),
    or the host clock on the CPU, where calls are synchronous."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def __call__(self, fn, calls: int) -> List[float]:
        if not self.cuda:
            times = []
            for _ in range(calls):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return times
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(calls)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in events]


def configure(unet, variant: str, ratio: float, max_downsample: int, tomesd, plan=DEFAULT_PLAN) -> None:
    """Patch ``unet`` in place for ``variant`` (ours with ``plan``: (reuse, block mode)), removing whichever patch
    was on it."""
    import tofu_triton.patch as tp

    tp.unpatch(unet)
    if tomesd is not None:
        tomesd.remove_patch(unet)
    if variant == "tomesd":
        tomesd.apply_patch(unet, ratio=ratio, max_downsample=max_downsample, use_rand=False)
    elif variant in ("tome", "tofu"):
        tp.diffusers(unet, ratio=ratio, mode=variant, max_downsample=max_downsample, seed=0, **plan_kwargs(plan))


def merging_blocks(unet, max_downsample: int):
    """(blocks that merge, transformer blocks): the same rule for tomesd and us, read from our plan."""
    import tofu_triton.patch as tp

    try:
        plan = tp.plan(tp.diffusers(unet, ratio=0.5, max_downsample=max_downsample, seed=0))
    except (TypeError, ValueError):  # a UNet we cannot patch: its own rows will say why
        return None, None
    finally:
        tp.unpatch(unet)
    return sum(p.mode is not None for p in plan), len(plan)


def _failure(e: Exception) -> str:
    first = str(e).splitlines()[0][:200] if str(e) else ""
    return f"failed: {type(e).__name__}: {first}"


def run_model(name: str, args, device: str, tomesd) -> List[Dict]:
    """Every (variant, ratio) row of one model, interleaved over the rounds."""
    from tofu_triton.models import attention_downsample, create_unet, unet_config, unet_inputs, unet_step

    dtype = DTYPES[args.dtype]
    size = args.size or unet_config(name)["sample_size"]
    max_down = args.max_downsample or attention_downsample(name)
    cuda = device == "cuda"
    t0 = time.perf_counter()
    unet = create_unet(name, seed=0, device=device, dtype=dtype)
    inputs = unet_inputs(unet, args.batch, size, seed=1, device=device, dtype=dtype)
    build_s = time.perf_counter() - t0
    merging, blocks = merging_blocks(unet, max_down)
    processors = sorted({type(p).__name__ for p in unet.attn_processors.values()})
    common = dict(model=name, about=MODELS[name], latent=size, pixels=8 * size, batch=args.batch, dtype=args.dtype,
                  max_downsample=max_down, blocks=blocks, build_s=round(build_s, 1), attention=",".join(processors),
                  # what backend="auto" runs our variants on: the fused kernels on CUDA, else the reference
                  our_step="triton" if str(device).startswith("cuda") else "reference")

    cases = [("unpatched", 0.0, None)] if "unpatched" in args.variants else []
    cases += [(v, r, plan) for r in args.ratios for v in args.variants if v != "unpatched"
              for plan in ([None] if v == "tomesd" else args.plans)]
    cases = [(v, r, plan, e) for v, r, plan in cases for e in args.execs]
    rows = {case: dict(common, variant=case[0], ratio=case[1], exec=case[3],
                       **({} if case[2] is None else dict(reuse=case[2][0], block_mode=case[2][1])),
                       merging_blocks=0 if case[0] == "unpatched" else merging, times=[], status="ok")
            for case in cases}
    runners: Dict[tuple, Callable] = {}  # per case: the eager step, or its graph's replay
    if tomesd is None and "tomesd" in args.variants:
        for (variant, _, _, _), row in rows.items():
            if variant == "tomesd":
                row["status"] = "skipped: tomesd is not installed (pip install tomesd==0.1.3)"

    def step():
        with torch.no_grad():  # as diffusers' pipelines call their UNet
            return unet_step(unet, inputs)

    timer, base = Timer(cuda), None
    for rnd in range(args.rounds):
        for case, row in rows.items():
            if row["status"] != "ok":
                continue
            try:
                if case[3] == "eager" or rnd == 0:  # a graph replays the patch it captured
                    configure(unet, case[0], case[1], max_down, tomesd, case[2] or DEFAULT_PLAN)
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                if rnd == 0:
                    out = step()  # the output compared below, and a first warm-up call (Triton compiles on first use)
                    for _ in range(max(0, args.warmup - 1)):
                        step()
                    runners[case] = capture_graph(step, 1) if case[3] == "graph" else step
                elif case[3] == "eager":
                    step()  # one warm-up call after re-patching
                row["times"] += timer(runners[case], args.repeats)
                if cuda:
                    row["peak_mem_gib"] = max(row.get("peak_mem_gib", 0.0), torch.cuda.max_memory_allocated() / 2**30)
                if rnd == 0:
                    if case[0] == "unpatched":
                        base = out.float()
                    row["finite"] = bool(torch.isfinite(out).all())
                    if base is not None:
                        o = out.float()
                        row["rel_l2"] = float((o - base).norm() / base.norm().clamp_min(1e-12))
                        row["cosine"] = float(torch.nn.functional.cosine_similarity(o.flatten(1), base.flatten(1))
                                              .mean())
            except Exception as e:  # one failing variant must not lose the others; it is reported
                row["status"] = _failure(e)
            finally:
                out = None
    configure(unet, "unpatched", 0.0, max_down, tomesd)
    runners.clear()  # the graphs' memory pools go with them

    result = []
    for row in rows.values():
        times = row.pop("times")
        if row["status"] == "ok" and times:
            q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
            row.update(ms=statistics.median(times), ms_p20=q[0], ms_p80=q[3], timed_calls=len(times))
        result.append(row)
    for row in result:  # against the unpatched step run the same way
        base_ms = next((r.get("ms") for r in result if r["variant"] == "unpatched" and r["exec"] == row["exec"]), None)
        if base_ms and row.get("ms"):
            row["vs_unpatched"] = base_ms / row["ms"]
    return result  # the UNet goes with this frame; main empties the CUDA cache before the next one


def judge(rows: List[Dict], why_not: Optional[str]) -> List[Dict]:
    """Per model at ratio 0.5: does ToFu reach >= 1.3x unpatched, and what tomesd and our ToMe reach.

    why_not: None where this run's setting is the goal's (CUDA, fp16, B=2, the preset's latent), else why the
    numbers are not judged (they are still reported).
    """
    out = []
    for model in dict.fromkeys(r["model"] for r in rows if "variant" in r):
        at, graph = ({r["variant"]: r for r in rows if r["model"] == model and "variant" in r and r["exec"] == e
                      and (r["variant"] == "unpatched" or r["ratio"] == GOAL_RATIO)
                      and (r.get("reuse"), r.get("block_mode")) in ((None, None), DEFAULT_PLAN)} for e in EXECS)
        tofu = at.get("tofu", {}).get("vs_unpatched")
        if tofu is None:
            verdict = "not measured"
        elif model not in GOAL_MODELS:
            verdict = "not judged (a tiny preset)"
        elif why_not:
            verdict = f"not judged ({why_not})"
        else:
            verdict = "PASS" if tofu >= GOAL_TOFU else "FAIL"
        out.append(dict(model=model, ratio=GOAL_RATIO, verdict=verdict, tofu=tofu,
                        tomesd=at.get("tomesd", {}).get("vs_unpatched"), tome=at.get("tome", {}).get("vs_unpatched"),
                        tomesd_status=at.get("tomesd", {}).get("status"),
                        tofu_graph=graph.get("tofu", {}).get("vs_unpatched")))
    return out


def _plan_of(row: Dict) -> Optional[Tuple[str, str]]:
    return (row["reuse"], row["block_mode"]) if "reuse" in row else None


def _fmt(v, spec=".2f") -> str:
    return "" if v is None else format(v, spec)


def goal_line(t: Dict) -> str:
    tomesd = f"{_fmt(t['tomesd'])}x" if t["tomesd"] is not None else (t.get("tomesd_status") or "not run")
    return (f"{t['model']} ratio {t['ratio']}: ToFu {_fmt(t['tofu'])}x unpatched: {t['verdict']} "
            f"(goal >= {GOAL_TOFU}x); tomesd {tomesd} (context: <= {CONTEXT_TOMESD}x expected); "
            f"our ToMe {_fmt(t['tome'])}x"
            + (f"; ToFu from a CUDA graph {_fmt(t['tofu_graph'])}x" if t.get("tofu_graph") is not None else ""))


def write_markdown(path: Path, report: Dict) -> None:
    env, ver = report["environment"], report["versions"]
    lines = [
        "# Stable Diffusion UNet step: unpatched vs tomesd vs tofu_triton",
        "",
        f"- card: {env['device']}",
        f"- date: {env['date']}",
        f"- torch {env['torch']} (CUDA {ver['cuda']}), triton {env['triton']}, diffusers {ver['diffusers']}, "
        f"tomesd {ver['tomesd']}, tofu_triton {ver['tofu_triton']}, dtype {report['dtype']}",
        f"- command: `{report['command']}`",
        "- one UNet forward per step, random weights (published SD 1.5 / SDXL configs), random latent and text "
        "embeddings; ms = median of every timed call (CUDA events, variants interleaved over rounds, see "
        "bench/throughput_sd.py)",
        "- tomesd: `tomesd.apply_patch(unet, ratio, max_downsample, use_rand=False)`; ours: "
        "`tofu_triton.patch.diffusers(unet, ratio, mode, max_downsample)` (use_rand=True, backend auto); "
        "max_downsample 1 on SD 1.5, 2 on SDXL (no attention at its full resolution), the same for both",
        "- rel. L2 / cosine: the noise prediction against the unpatched one; random weights, so they only show "
        "that the step ran",
        "",
        "- plans (ours): reuse (none: every block its own match; step: one per resolution per call; k: kept for k "
        "calls), block mode (sublayer: merge around each merging sub-layer; whole: once around each block)",
        "",
        "| model | latent (px) | B | ratio | variant | plans | exec | merging blocks | ms/step | p20-p80 "
        "| vs unpatched | rel. L2 | cosine | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        if "variant" not in r:  # a model that did not run at all
            lines.append(f"| {r['model']} | | | | | | | | | | | | | {r['status']} |")
            continue
        spread = f"{_fmt(r.get('ms_p20'))}-{_fmt(r.get('ms_p80'))}" if r.get("ms") is not None else ""
        lines.append(
            f"| {r['model']} | {r['latent']}x{r['latent']} ({r['pixels']}) | {r['batch']} | {r['ratio']} | "
            f"{r['variant']} | {plan_label(_plan_of(r))} | {r['exec']} | "
            f"{_fmt(r['merging_blocks'], 'd') or '?'}/{_fmt(r['blocks'], 'd') or '?'} | "
            f"{_fmt(r.get('ms'))} | {spread} | "
            f"{_fmt(r.get('vs_unpatched'))} | {_fmt(r.get('rel_l2'), '.4f')} | {_fmt(r.get('cosine'), '.4f')} | "
            f"{r['status']} |")
    lines += goal_lines(f"## Goal: ToFu >= {GOAL_TOFU}x unpatched at ratio {GOAL_RATIO} (tomesd: <= "
                        f"{CONTEXT_TOMESD}x)", report["goal"], goal_line)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def cannot_start(script: str, what: str, smoke: bool, also: str = "") -> bool:
    """True, after saying why on stderr, when bench/<script>.py cannot run: no CUDA device (and no ``--smoke``),
    or no diffusers (``also``: what else to install)."""
    if not smoke and not torch.cuda.is_available():
        print(f"{script}.py times {what} on a GPU and found no CUDA device; nothing was timed.\n"
              "Run it on a GPU machine, or use --smoke to check the script end to end on the CPU.", file=sys.stderr)
        return True
    try:
        import diffusers  # noqa: F401
    except ImportError:
        print(f'{script}.py needs diffusers: pip install "tofu-triton[diffusers]"{also}, or pip install -e ".[test]"',
              file=sys.stderr)
        return True
    return False


def output_files(script: str, args, argv) -> Tuple[Dict, Path, str, str]:
    """(environment, results directory, file stem, the exact command) of a run of bench/<script>.py: files
    ``<script>_<card>[_smoke].{json,md}`` under ``--out`` (default bench/results)."""
    env = environment()
    out = Path(args.out) if args.out else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{script}_{card_slug(env['device'])}" + ("_smoke" if args.smoke else "")
    given = argv if argv is not None else sys.argv[1:]
    return env, out, stem, f"python bench/{script}.py " + " ".join(shlex.quote(a) for a in given)


def write_report(out: Path, stem: str, report: Dict, write_markdown, prefix: str, goal_line) -> None:
    """``<stem>.json`` and ``<stem>.md`` under ``out``; the goal lines printed (``prefix`` + line: what
    bench/gpu_check.sh's summary greps for)."""
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    write_markdown(out / f"{stem}.md", report)
    for t in report["goal"]:
        print(prefix + goal_line(t))
    print(f"wrote {out / stem}.{{json,md}} in {report['elapsed_s']} s")


def goal_lines(heading: str, goals: List[Dict], line) -> List[str]:
    """The Markdown goal section: the heading, then ``line(goal)`` per judged goal."""
    return ["", heading, ""] + ([f"- {line(t)}" for t in goals] or ["- not measured in this run"])


def main(argv=None) -> int:
    args = parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    if cannot_start("throughput_sd", "Stable Diffusion UNets", args.smoke, also=" (and tomesd==0.1.3 for the "
                    "tomesd rows)"):
        return 2
    try:
        import tomesd
    except ImportError:
        tomesd = None
        print("tomesd is not installed (pip install tomesd==0.1.3): its rows are skipped", file=sys.stderr)

    env, out, stem, command = output_files("throughput_sd", args, argv)

    started = time.monotonic()
    rows: List[Dict] = []
    print(f"{len(args.models)} models on {env['device']}, {args.dtype}, batch {args.batch}, ratios {args.ratios}"
          + (f", budget {args.budget_s:.0f} s" if args.budget_s is not None else "") + ":", flush=True)
    for name in args.models:
        if args.budget_s is not None and rows and time.monotonic() - started > args.budget_s:  # the first runs
            rows.append(dict(model=name, about=MODELS[name], status=f"skipped: budget of {args.budget_s:.0f} s spent"))
            print(f"{name}: skipped (budget spent)", flush=True)
            continue
        try:
            model_rows = run_model(name, args, device, tomesd)
        except Exception as e:  # building or moving the model failed (out of memory, a diffusers change)
            model_rows = [dict(model=name, about=MODELS[name], status=_failure(e))]
        if device == "cuda":
            torch.cuda.empty_cache()  # SDXL next to SD 1.5's cached blocks would waste memory
        for row in model_rows:
            rows.append(row)
            print(f"{name:8s} {row.get('variant', '-'):9s} {row.get('exec', '-'):5s} "
                  f"ratio {row.get('ratio', '-')!s:4s} {plan_label(_plan_of(row)):16s} "
                  f"{_fmt(row.get('ms'), '9.2f')} ms  {_fmt(row.get('vs_unpatched'), '5.2f')}x  {row['status']}",
                  flush=True)

    if args.smoke:
        why_not = "CPU smoke run"
    elif args.dtype != "fp16" or args.batch != 2 or args.size is not None:
        why_not = "not the goal's setting: fp16, batch 2, the preset's latent"
    else:
        why_not = None
    report = dict(environment=env, versions=versions(), command=command, dtype=args.dtype, device_kind=device,
                  settings=dict(batch=args.batch, ratios=args.ratios, execs=args.execs, warmup=args.warmup,
                                repeats=args.repeats, rounds=args.rounds, size=args.size,
                                max_downsample=args.max_downsample, plans=args.plans),
                  elapsed_s=round(time.monotonic() - started, 1), rows=rows, goal=judge(rows, why_not))
    write_report(out, stem, report, write_markdown, "target SD ", goal_line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
