"""End-to-end inference throughput of timm ViTs: unpatched vs ToMe-style vs ToFu-Triton.

    python bench/throughput.py --quick                 # ViT-B, r=16, ~1.5 min on an H100
    python bench/throughput.py                         # ViT-S/B/L x B 1..256 x r 8,16
    python bench/throughput.py --models vit_b --batches 256 --r 16 --exec eager,graph,compile
    python bench/throughput.py --cpu-smoke             # tiny model on the CPU: checks the script, times nothing useful

Variants (each model random-init, ``timm.create_model(name, pretrained=False)``,
weights and inputs in fp16 by default):

* ``unpatched`` the timm model as it is;
* ``tome``      ``tofu_triton.patch.timm(model, r, mode="tome", backend="reference")``:
                ToMe's algorithm in unfused PyTorch (score matrix, argsort, scatter);
* ``tofu``      ``tofu_triton.patch.timm(model, r, mode="tofu", backend="triton")``:
                prune then mlerp, through the fused kernels.

Execution: ``eager``; ``graph`` (the forward captured once in a CUDA graph and
replayed: no launch overhead); ``compile`` (``torch.compile`` default mode;
compile time is reported, not timed).

Timing: a few warm-up calls, then three windows of back-to-back calls, each
long enough to last ``--min-time-s``, bracketed by CUDA events; the median
window gives ms per batch and images/s. Launch overhead is in the eager
numbers, as it is for a user.

Writes ``throughput.json``, ``throughput.md`` and ``throughput.png`` under
``--out`` (default ``bench/results/``) with the card, date, versions and the
exact command. Configurations run most important first and stop at
``--budget-s``; what did not run is listed as skipped, never invented.
"""
import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

from arguments import choice_list, given_options, split_list  # noqa: E402
from measure import capture_graph, environment, time_loop  # noqa: E402
from tofu_triton.attention import PATHS as ATTENTION_PATHS  # noqa: E402

MODELS = {
    "vit_s": "vit_small_patch16_224",
    "vit_b": "vit_base_patch16_224",
    "vit_l": "vit_large_patch16_224",
}
VARIANTS = ("unpatched", "tome", "tofu")
# eager-device: eager calls with every kernel chosen by device time alone, as inside a CUDA graph
# (dispatch.for_graphs), against which "eager" (host time weighed where the card is host-bound) is judged.
EXECS = ("eager", "graph", "compile", "eager-device")
RESULTS = Path(__file__).resolve().parent / "results"
# End-to-end targets (bench/README.md), checked on ViT-B at r=16: ToFu at least this
# fast against unpatched timm (SDPA), by execution and batch ...
TARGET_MODEL, TARGET_R = "vit_base_patch16_224", 16
TARGET_VS_TOME = 1.15


def target_vs_unpatched(how: str, batch: int) -> float:
    """1.0x with CUDA graphs or compile at every batch; in eager 0.95x up to B = 8, 1.0x from B = 64."""
    return 0.95 if how.startswith("eager") and batch <= 8 else 1.0


# ... and, where the GPU is saturated (B = 256), this share of the FLOP ratio (its ceiling).
TARGET_FLOP_SHARE = 0.97


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="vit_s,vit_b,vit_l",
                   help="comma list of vit_s, vit_b, vit_l or timm model names")
    p.add_argument("--batches", default="1,8,64,256", help="comma list of batch sizes")
    p.add_argument("--r", default="8,16", help="comma list of tokens removed per layer")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ", ".join(VARIANTS))
    p.add_argument("--exec", dest="execs", default="eager,graph", help="comma list of " + ", ".join(EXECS))
    p.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"))
    p.add_argument("--attention", default="auto", choices=ATTENTION_PATHS,
                   help="proportional attention path of the tofu variant (default auto)")
    p.add_argument("--min-time-s", type=float, default=0.3, help="length of one timed window")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting new configurations after this")
    p.add_argument("--quick", action="store_true",
                   help="ViT-B, B in {1, 64, 256}, r=16, eager+graph, budget 90 s (unless given)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny 4-block ViT at 64 px on the CPU, eager only: checks the script end to end")
    p.add_argument("--out", default=None, help="directory for throughput.{json,md,png} (default bench/results)")
    args = p.parse_args(argv)
    given = given_options(argv)
    if args.quick:
        if "--models" not in given:
            args.models = "vit_b"
        if "--batches" not in given:
            args.batches = "1,64,256"
        if "--r" not in given:
            args.r = "16"
        if "--budget-s" not in given:
            args.budget_s = 90.0
    if args.cpu_smoke:
        args.models, args.batches, args.r, args.execs, args.dtype = "smoke", "2", "2", "eager", "fp32"
        args.min_time_s = min(args.min_time_s, 0.05)
    args.models = [MODELS.get(m, m) for m in split_list(args.models)]
    args.batches = [int(b) for b in split_list(args.batches)]
    args.r = [int(r) for r in split_list(args.r)]
    args.variants = choice_list(p, "--variants", args.variants, VARIANTS)
    args.execs = choice_list(p, "--exec", args.execs, EXECS)
    return args


def create_model(name: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    from tofu_triton.models import create_vit

    return create_vit(name).to(device=device, dtype=dtype)


def configure(model, variant: str, r: int, device: str, attention: str = "auto") -> None:
    """Patch (or unpatch) ``model`` in place for ``variant``."""
    import tofu_triton.patch as tp

    if variant == "unpatched":
        tp.unpatch(model)
    elif variant == "tome":
        tp.timm(model, r=r, mode="tome", backend="reference")
    else:
        # The fused kernels need CUDA; the CPU smoke run goes through the
        # reference instead so the rest of the script is still exercised.
        tp.timm(model, r=r, mode="tofu", backend="triton" if device == "cuda" else "auto", attention=attention)


def forward_flops(model, n_tokens: List[int]) -> float:
    """FLOPs (2 per multiply-add) of the transformer blocks for the tokens entering each block.

    Per block with N tokens, width C, MLP hidden H: qkv 3NC^2 + attention
    2N^2C + projection NC^2 + MLP 2NCH multiply-adds. Patch embedding and
    head are the same for every variant and left out, so the ratio of two
    variants is the ceiling of their speed ratio.
    """
    flops = 0.0
    for blk, n in zip(model.blocks, n_tokens):
        c, h = blk.attn.qkv.in_features, blk.mlp.fc1.out_features
        flops += 2 * (4 * n * c * c + 2 * n * n * c + 2 * n * c * h)
    return flops


def build_runner(model, images: torch.Tensor, how: str, device: str):
    """A no-argument callable that runs one forward the way ``how`` says."""
    if how == "eager":
        return lambda: model(images)
    if how == "eager-device":
        from tofu_triton import dispatch

        def device_chosen():
            with dispatch.for_graphs():
                return model(images)

        return device_chosen
    if how == "graph":
        if device != "cuda":
            raise RuntimeError("CUDA graphs need CUDA")
        return capture_graph(lambda: model(images))
    torch._dynamo.reset()  # patching swapped the class; start from a clean cache
    compiled = torch.compile(model)
    return lambda: compiled(images)


def run_config(model, cfg: Dict, images: torch.Tensor, args, device: str) -> Dict:
    import tofu_triton.patch as tp
    from tofu_triton.schedule import token_counts

    row = dict(cfg)
    configure(model, cfg["variant"], cfg["r"], device, args.attention)
    n_tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    tokens = token_counts(tp.plan(model)) if tp.is_patched(model) else [n_tokens] * (len(model.blocks) + 1)
    row["tokens_out"] = tokens[-1]
    row["flops_ratio"] = forward_flops(model, [n_tokens] * len(model.blocks)) / forward_flops(model, tokens[:-1])
    fn = None
    try:
        t0 = time.perf_counter()
        fn = build_runner(model, images, cfg["exec"], device)
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        row["setup_s"] = round(time.perf_counter() - t0, 2)
        ms = time_loop(fn, device, args.min_time_s)
        row.update(status="ok", ms_per_batch=ms, images_per_s=cfg["batch"] * 1e3 / ms)
        if device == "cuda":
            row["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
    except Exception as e:  # one failing configuration must not lose the others; it is reported
        row["status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    finally:
        fn = None
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    return row


def configurations(args) -> List[Dict]:
    """Every (model, batch, r, variant, exec), most important first: ViT-B at
    the largest batch and r=16 leads, so a short budget still answers the
    targets. ``unpatched`` does not depend on r: it runs once, listed as r=0."""
    r_order = sorted(args.r, key=lambda r: (r != TARGET_R, r))
    cfgs = []
    for model in sorted(args.models, key=lambda m: m != TARGET_MODEL):
        for batch in sorted(args.batches, reverse=True):
            for r in r_order:
                for how in args.execs:
                    for variant in args.variants:
                        if variant == "unpatched" and r != r_order[0]:
                            continue
                        cfgs.append(dict(model=model, batch=batch, r=0 if variant == "unpatched" else r,
                                         variant=variant, exec=how))
    return cfgs


def add_speedups(rows: List[Dict]) -> None:
    by_key = {}
    for row in rows:
        if row.get("status") == "ok":
            by_key[(row["model"], row["batch"], row["exec"], row["variant"], row["r"])] = row["images_per_s"]
    for row in rows:
        if row.get("status") != "ok":
            continue
        base = by_key.get((row["model"], row["batch"], row["exec"], "unpatched", 0))
        tome = by_key.get((row["model"], row["batch"], row["exec"], "tome", row["r"]))
        row["vs_unpatched"] = row["images_per_s"] / base if base else None
        row["vs_tome"] = row["images_per_s"] / tome if tome and row["variant"] != "tome" else None


def check_targets(rows: List[Dict]) -> List[Dict]:
    """ViT-B r=16, per batch and exec: ToFu >= 1.15x ToMe-style, >= target_vs_unpatched,
    and at B = 256 >= TARGET_FLOP_SHARE of the FLOP ratio."""
    out = []
    for row in rows:
        if row["model"] != TARGET_MODEL or row["variant"] != "tofu" or row["r"] != TARGET_R:
            continue
        if row.get("status") != "ok":
            out.append(dict(batch=row["batch"], exec=row["exec"], verdict="not measured", detail=row.get("status")))
            continue
        vs_tome, vs_base = row.get("vs_tome"), row.get("vs_unpatched")
        if vs_tome is None or vs_base is None:
            verdict = "not measured"
        else:
            need = target_vs_unpatched(row["exec"], row["batch"])
            if row["batch"] >= 256:
                need = max(need, TARGET_FLOP_SHARE * row["flops_ratio"])
            verdict = "PASS" if vs_tome >= TARGET_VS_TOME and vs_base >= need else "FAIL"
        out.append(dict(batch=row["batch"], exec=row["exec"], verdict=verdict, vs_tome=vs_tome, vs_unpatched=vs_base,
                        flop_share=vs_base / row["flops_ratio"] if vs_base else None))
    return out


def _fmt(v, spec=".2f") -> str:
    return "" if v is None else format(v, spec)


def write_markdown(path: Path, report: Dict) -> None:
    env = report["environment"]
    lines = [
        "# End-to-end throughput",
        "",
        f"- card: {env['device']}",
        f"- date: {env['date']}",
        f"- torch {env['torch']}, triton {env['triton']}, timm {env.get('timm', '?')}, dtype {report['dtype']}",
        f"- command: `{report['command']}`",
        "- random-init weights; images/s = batch / median ms per forward (CUDA events, see bench/throughput.py)",
        "",
        "- FLOP ratio: FLOPs of the unpatched blocks / FLOPs of this variant's blocks, from the tokens each block"
        " sees: the ceiling of 'vs unpatched'",
        "",
        "| model | B | r | variant | exec | ms/batch | images/s | vs unpatched | FLOP ratio | vs ToMe-style | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['model']} | {row['batch']} | {row['r']} | {row['variant']} | {row['exec']} | "
            f"{_fmt(row.get('ms_per_batch'), '.3f')} | {_fmt(row.get('images_per_s'), '.1f')} | "
            f"{_fmt(row.get('vs_unpatched'))} | {_fmt(row.get('flops_ratio'))} | {_fmt(row.get('vs_tome'))} | "
            f"{row.get('status', '')} |"
        )
    lines += ["", f"## Targets ({TARGET_MODEL}, r={TARGET_R}: ToFu >= {TARGET_VS_TOME}x ToMe-style; vs unpatched "
              f">= 1.0x with graphs or compile, >= 0.95x eager at B <= 8, >= 1.0x eager from B = 64; at B = 256 "
              f">= {TARGET_FLOP_SHARE:.0%} of the FLOP ratio)", ""]
    if not report["targets"]:
        lines.append("- not measured in this run")
    for t in report["targets"]:
        lines.append(f"- B={t['batch']} {t['exec']}: **{t['verdict']}** "
                     f"(vs ToMe-style {_fmt(t.get('vs_tome'))}x, vs unpatched {_fmt(t.get('vs_unpatched'))}x, "
                     f"{_fmt(t.get('flop_share'))} of the FLOP ratio)"
                     + (f" {t['detail']}" if t.get("detail") else ""))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_plot(path: Path, report: Dict) -> None:
    try:
        import matplotlib
    except ImportError:  # an optional extra ("demo"); the JSON and table still get written
        print("matplotlib is not installed: no throughput plot", file=sys.stderr)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r.get("status") == "ok"]
    models = sorted({r["model"] for r in report["rows"]})
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(5 * max(1, len(models)), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        lines = sorted({(r["variant"], r["exec"], r["r"]) for r in rows if r["model"] == model})
        for variant, how, r in lines:
            pts = sorted((x["batch"], x["images_per_s"]) for x in rows
                         if (x["model"], x["variant"], x["exec"], x["r"]) == (model, variant, how, r))
            label = f"{variant} {how}" + (f" r={r}" if variant != "unpatched" else "")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label,
                    linestyle="-" if how == "eager" else "--")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(model, fontsize=9)
        ax.set_xlabel("batch")
        ax.set_ylabel("images/s")
        if lines:
            ax.legend(fontsize=6)
        else:
            ax.text(0.5, 0.5, "nothing measured", ha="center", transform=ax.transAxes)
    fig.suptitle(f"{report['environment']['device']}, {report['dtype']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = "cpu" if args.cpu_smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("throughput.py measures GPU throughput and found no CUDA device; nothing was timed.\n"
              "Run it on a GPU machine, or use --cpu-smoke to check the script end to end on the CPU.",
              file=sys.stderr)
        return 2
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    out = Path(args.out) if args.out else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    stem = "throughput_cpu_smoke" if args.cpu_smoke and not args.out else "throughput"
    given = argv if argv is not None else sys.argv[1:]
    command = "python bench/throughput.py " + " ".join(shlex.quote(a) for a in given)

    started = time.monotonic()
    rows: List[Dict] = []
    cfgs = configurations(args)
    print(f"{len(cfgs)} configurations on {environment()['device']}"
          + (f", budget {args.budget_s:.0f} s" if args.budget_s is not None else "") + "; one line each:", flush=True)
    model, model_name = None, None
    for cfg in cfgs:
        if args.budget_s is not None and time.monotonic() - started > args.budget_s:
            rows.append(dict(cfg, status=f"skipped: budget of {args.budget_s:.0f} s spent"))
            continue
        if cfg["model"] != model_name:
            model = None
            if device == "cuda":
                torch.cuda.empty_cache()
            model, model_name = create_model(cfg["model"], device, dtype), cfg["model"]
        side = model.patch_embed.img_size[0]
        images = torch.randn(cfg["batch"], 3, side, side, device=device, dtype=dtype)
        with torch.inference_mode():
            row = run_config(model, cfg, images, args, device)
        rows.append(row)
        print(f"{row['model']:24s} B={row['batch']:<4d} r={row['r']:<3d} {row['variant']:9s} {row['exec']:7s} "
              f"{_fmt(row.get('images_per_s'), '10.1f')} img/s  {row['status']}", flush=True)

    add_speedups(rows)
    report = dict(environment=environment(), command=command, dtype=args.dtype, device_kind=device,
                  elapsed_s=round(time.monotonic() - started, 1), rows=rows, targets=check_targets(rows))
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    write_markdown(out / f"{stem}.md", report)
    write_plot(out / f"{stem}.png", report)
    for t in report["targets"]:
        print(f"target ViT-B r=16 B={t['batch']} {t['exec']}: {t['verdict']}")
    print(f"wrote {out / stem}.{{json,md,png}} in {report['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
