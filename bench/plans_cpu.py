"""A whole denoising loop on the CPU: how far plan reuse and whole-block merging move its final latent.

    python bench/plans_cpu.py                   # bench/results/plans_cpu.{json,md}
    python bench/plans_cpu.py --families flux --steps 10 --size 16

Denoisers as in bench/dit_cpu.py (random weights, the published layouts at 64 channels: ``tofu_triton.models``
presets ``tiny`` (SD 1.5), ``tiny-xl`` (SDXL), ``tiny-pixart``, ``tiny-sd3``, ``tiny-flux``), batch 2, each
pipeline's text length, one torch thread. The loop is a plain Euler integration from t = 1 to 0 in ``--steps``
equal steps, ``x <- x - v(x, t) / steps`` (the noise prediction used as a velocity; the first latent
channels where a model predicts more, PixArt's learned variance): not any pipeline's scheduler, but every
step feeds the next, so an error made early carries to the end as it does in a real denoise.

Rows (tofu mode, ratio ``--ratio``, random destinations with seed 0, each model's default ``prop_attn`` /
``merge_mlp``): unpatched; per block (today's default: every merging block computes its own plan);
``reuse="step"`` (one plan per resolution per call); ``reuse=2`` and ``reuse=5`` (kept for 2 / 5 calls);
``whole_block`` (merge once around each block), alone and with ``reuse="step"`` and ``reuse=5``.

Per row: relative L2 error and mean per-image cosine of the final latent against the unpatched loop's, and
the loop's CPU time (process time, one torch thread) on the PyTorch reference step: a guide to how many
tokens each row saves on a CPU, not a GPU speed (bench/throughput_sd.py / throughput_dit.py ``--reuse``,
``--whole-block`` measure that). Random weights: the errors say how much a setting perturbs a random network
of this layout over a whole loop, not image quality.
"""
import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

from arguments import choice_list
from dit_cpu import FAMILIES, agreement
from measure import environment, git_commit

ROWS = {"unpatched": None, "per block": dict(), "reuse=step": dict(reuse="step"), "reuse=2": dict(reuse=2),
        "reuse=5": dict(reuse=5), "whole block": dict(whole_block=True),
        "whole block, reuse=step": dict(whole_block=True, reuse="step"),
        "whole block, reuse=5": dict(whole_block=True, reuse=5)}


def denoise(model, inputs: Dict[str, object], steps: int) -> torch.Tensor:
    """The final latent of ``steps`` Euler steps from ``inputs``' latent at t = 1 down to t = 0."""
    from tofu_triton.models import denoiser_step

    key = "sample" if "sample" in inputs else "hidden_states"
    scale = 1.0 if "img_ids" in inputs else 1000.0  # Flux takes t in [0, 1], the others the 1000 training steps
    x, tstep = inputs[key], inputs["timestep"]
    for i in range(steps):
        t = torch.full_like(tstep, 1.0 - i / steps, dtype=torch.float32) * scale
        out = denoiser_step(model, dict(inputs, **{key: x, "timestep": t.round().to(tstep.dtype)
                                                   if not tstep.is_floating_point() else t.to(tstep.dtype)}))
        x = x - out[:, :x.shape[1]] / steps
    return x


def measure_family(family: str, size: int, steps: int, ratio: float) -> List[Dict]:
    import tofu_triton.patch as tp
    from tofu_triton.models import create_denoiser, denoiser_inputs

    model = create_denoiser(FAMILIES[family])
    inputs = denoiser_inputs(model, batch=2, size=size, seed=1)
    start = inputs["sample" if "sample" in inputs else "hidden_states"]
    rows, base = [], None
    for name, patch in ROWS.items():
        tp.unpatch(model)
        if patch is not None:
            tp.diffusers(model, ratio=ratio, mode="tofu", seed=0, **patch)
        t0 = time.process_time()  # CPU time of this process: what other jobs on a shared machine disturb least
        with torch.inference_mode():
            out = denoise(model, inputs, steps)
        seconds = time.process_time() - t0
        base = out if base is None else base
        row = dict(family=family, preset=FAMILIES[family], row=name, patch=patch, cpu_s=seconds, **agreement(out, base))
        update = agreement(out - start, base - start)  # what the loop added to the noise, without the noise itself
        row.update(update_rel_l2=update["rel_l2"], update_cosine=update["cosine"])
        rows.append(row)
        print(f"{family:6s} {name:24s} {seconds:8.2f} s  rel L2 {row['rel_l2']:.4f}  cos {row['cosine']:.5f}  "
              f"update rel L2 {row['update_rel_l2']:.4f}", flush=True)
    tp.unpatch(model)
    for row in rows:
        row["vs_unpatched"] = rows[0]["cpu_s"] / row["cpu_s"]
    return rows


def write_markdown(path: Path, report: Dict) -> None:
    env = report["environment"]
    lines = [
        "# A whole denoising loop on the CPU: plan reuse and whole-block merging (random weights)",
        "",
        f"- {env['date']}; machine: {env['device']}, {report['threads']} torch thread(s); torch {env['torch']}, "
        f"diffusers {report['diffusers']}; commit {report['commit']}",
        f"- command: `{report['command']}`",
        f"- {report['steps']} Euler steps from t = 1 to 0 at a {report['size']}x{report['size']} latent, batch 2; "
        "random weights, the published layouts at 64 channels (`tofu_triton.models` presets tiny, tiny-xl, "
        f"tiny-pixart, tiny-sd3, tiny-flux); tofu mode at ratio {report['ratio']}, random destinations (seed 0), "
        "each model's default prop_attn / merge_mlp",
        "- rel. L2 / cosine: the final latent against the unpatched loop's; update: the same for what the loop "
        "added to its starting noise (final latent - start), which the shared noise does not dilute; CPU s: the "
        "loop's process time on "
        "the PyTorch reference step, one run (a guide only: not a GPU speed, and other jobs share the machine: "
        f"load average {report['load_before']} before, {report['load_after']} after)",
        "",
        "| model | setting | CPU s (loop) | vs unpatched | rel. L2 | cosine | update rel. L2 | update cosine |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['family']} | {r['row']} | {r['cpu_s']:.2f} | {r['vs_unpatched']:.2f}x | {r['rel_l2']:.4f} | "
              f"{r['cosine']:.5f} | {r['update_rel_l2']:.4f} | {r['update_cosine']:.5f} |" for r in report["rows"]]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default=",".join(FAMILIES), help="comma list of " + ", ".join(FAMILIES))
    p.add_argument("--size", type=int, default=32, help="latent side (image side / 8); default 32 (256 px)")
    p.add_argument("--steps", type=int, default=10, help="denoising steps of the loop (default 10)")
    p.add_argument("--ratio", type=float, default=0.5, help="merge ratio (default 0.5)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: steady on a shared CPU)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    args.families = choice_list(p, "--families", args.families, FAMILIES)
    if args.size < 8 or args.size % 8:
        p.error(f"--size must be a positive multiple of 8 (the UNets halve it three times), got {args.size}")
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if not 0 < args.ratio < 1:
        p.error(f"--ratio must be in (0, 1), got {args.ratio}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from importlib.metadata import version

    load_before = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    commit = git_commit()  # what runs
    rows = [row for family in args.families for row in measure_family(family, args.size, args.steps, args.ratio)]
    given = argv if argv is not None else sys.argv[1:]
    report = dict(environment=environment(), diffusers=version("diffusers"), commit=commit,
                  threads=torch.get_num_threads(), size=args.size, steps=args.steps, ratio=args.ratio, rows=rows,
                  load_before=load_before, load_after=" / ".join(f"{v:.1f}" for v in os.getloadavg()),
                  command=" ".join(["python bench/plans_cpu.py", *(shlex.quote(a) for a in given)]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plans_cpu.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    write_markdown(out / "plans_cpu.md", report)
    print(f"wrote {out / 'plans_cpu'}.{{json,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
