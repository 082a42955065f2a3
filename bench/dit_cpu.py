"""One denoiser step on the CPU: how far each merge mode moves it, and what it costs, UNets and transformers.

    python bench/dit_cpu.py                     # ~45 minutes on 2 shared cores; bench/results/dit_cpu.{json,md}
    python bench/dit_cpu.py --families flux --repeats 2 --size 32

Denoisers (random weights, the published layouts at 64 channels: ``tofu_triton.models`` presets ``tiny``
(SD 1.5), ``tiny-xl`` (SDXL), ``tiny-pixart``, ``tiny-sd3``, ``tiny-flux``), one step at a ``--size`` latent
(default 64: 512 px) with batch 2 (classifier-free guidance) and each pipeline's text length, one torch
thread. Two tables:

* **modes**: unpatched, ``tome`` / ``tofu`` / ``mlerp`` / ``prune`` at ratios 0.3, 0.5, 0.7 and ``todo``
  (2x2 pooling of self-attention's keys and values), each with the model's default settings;
* **settings** (transformers): at ratio 0.5 in ``tome``, ``mlerp`` and ``tofu`` every combination of ``prop_attn``
  and ``merge_mlp``, and ``todo`` with and without ``prop_attn``: what the transformers' defaults are
  chosen from (docs/design.md §5.3).

Per row: relative L2 error and mean per-image cosine of the noise prediction against the unpatched
one, and the step's CPU time (this process's, with one torch thread: other jobs on a shared machine
change it far less than the wall clock): ``--repeats`` rounds over a family's rows, interleaved,
median and min-max. Random weights: the errors show how much a
setting perturbs a random network of this layout, not image quality, which needs the real weights.
The CPU runs the PyTorch reference step, so times say whether fewer tokens pay off on a CPU, not on a GPU.
"""
import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn.functional as F

from arguments import choice_list
from measure import environment

FAMILIES = {"sd15": "tiny", "sdxl": "tiny-xl", "pixart": "tiny-pixart", "sd3": "tiny-sd3", "flux": "tiny-flux"}
RATIOS = (0.3, 0.5, 0.7)
MERGE_MODES = ("tome", "tofu", "mlerp", "prune")


def configurations(family: str) -> List[Dict]:
    """Every row of one family: {table, mode, ratio, patch} (patch: the keyword arguments of tp.diffusers)."""
    rows = [dict(table="modes", mode="unpatched", ratio=None, patch=None)]
    rows += [dict(table="modes", mode=m, ratio=r, patch=dict(mode=m, ratio=r)) for m in MERGE_MODES for r in RATIOS]
    rows.append(dict(table="modes", mode="todo", ratio=None, patch=dict(mode="todo", ratio=0.5)))
    if family in ("sd15", "sdxl"):
        return rows
    for mode in ("tome", "mlerp", "tofu"):
        rows += [dict(table="settings", mode=mode, ratio=0.5, patch=dict(mode=mode, ratio=0.5, prop_attn=prop,
                                                                         merge_mlp=mlp))
                 for prop in (False, True) for mlp in (False, True)]
    rows += [dict(table="settings", mode="todo", ratio=None, patch=dict(mode="todo", ratio=0.5, prop_attn=prop))
             for prop in (False, True)]
    return rows


def agreement(out: torch.Tensor, base: torch.Tensor) -> Dict[str, float]:
    out, base = out.float().flatten(1), base.float().flatten(1)
    return dict(rel_l2=float((out - base).norm() / base.norm()), cosine=float(F.cosine_similarity(out, base).mean()))


def measure_family(family: str, size: int, repeats: int) -> List[Dict]:
    import tofu_triton.patch as tp
    from tofu_triton.models import create_denoiser, denoiser_inputs, denoiser_step

    model = create_denoiser(FAMILIES[family])
    inputs = denoiser_inputs(model, batch=2, size=size, seed=1)
    grid = (size, size) if family in ("sd15", "sdxl") else (size // 2, size // 2)  # the transformers' 2x2 patches
    rows = configurations(family)

    def step(patch):
        tp.unpatch(model)
        if patch is not None:
            tp.diffusers(model, use_rand=False, **patch)
        t0 = time.process_time()  # CPU time of this process: what other jobs on a shared machine disturb least
        with torch.inference_mode():
            out = denoiser_step(model, inputs)
        return out, time.process_time() - t0

    base = None
    for row in rows:  # the compared output, and a warm-up
        out, _ = step(row["patch"])
        base = out if base is None else base
        row.update(agreement(out, base), family=family, preset=FAMILIES[family], times=[])
        if row["patch"] is not None:  # the settings as the patch resolved them (the model's defaults)
            settings, plan = tp.settings(model), tp.plan(model, grid)
            row.update(prop_attn=settings["prop_attn"], merge_mlp=settings["merge_mlp"],
                       merging_blocks=f"{sum(p.mode is not None for p in plan)}/{len(plan)}")
    for _ in range(repeats):
        for row in rows:
            row["times"].append(step(row["patch"])[1])
    tp.unpatch(model)
    base_s = statistics.median(rows[0]["times"])
    for row in rows:
        times = row.pop("times")
        row.update(median_s=statistics.median(times), min_s=min(times), max_s=max(times),
                   vs_unpatched=base_s / statistics.median(times))
        print(f"{family:6s} {row['table']:8s} {row['mode']:9s} {row['ratio']!s:4s} {_flags(row):11s} "
              f"{row['median_s']:7.3f} s  x{row['vs_unpatched']:.2f}  rel L2 {row['rel_l2']:.4f}  "
              f"cos {row['cosine']:.4f}", flush=True)
    return rows


def _flags(row: Dict) -> str:
    """prop_attn / merge_mlp of a patched row ("on / off"), "" for the unpatched one."""
    if "prop_attn" not in row:
        return ""
    return f"{'on' if row['prop_attn'] else 'off'} / {'on' if row['merge_mlp'] else 'off'}"


def write_markdown(path: Path, report: Dict) -> None:
    env = report["environment"]
    lines = [
        "# One denoiser step on the CPU: merge modes, ToDo and the transformers' settings (random weights)",
        "",
        f"- {env['date']}; {env['device']}, {report['threads']} torch thread(s); torch {env['torch']}, "
        f"diffusers {report['diffusers']}, tofu_triton {report['tofu_triton']}",
        f"- command: `{report['command']}`",
        f"- one step at a {report['size']}x{report['size']} latent ({8 * report['size']} px), batch 2, random "
        "weights, the published layouts at 64 channels (`tofu_triton.models` presets tiny, tiny-xl, tiny-pixart, "
        "tiny-sd3, tiny-flux); each pipeline's text length; `use_rand=False`",
        f"- time: the step's CPU time (process time, one thread), median (min-max) of {report['repeats']} "
        "interleaved rounds, on the PyTorch reference step; load average of the machine "
        f"{report['load_before']} before, {report['load_after']} after (other jobs share it); rel. L2 / cosine: "
        "the noise prediction against the unpatched one",
        "- **random weights**: the errors say how much a setting perturbs a random network of this layout; "
        "image quality needs the real weights",
        "",
        "## Modes (each model's default settings)",
        "",
        "| model | mode | ratio | merging blocks | prop_attn / merge_mlp | CPU s/step (min-max) | vs unpatched "
        "| rel. L2 | cosine |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row(r) for r in report["rows"] if r["table"] == "modes"]
    lines += ["", "## Transformers' settings at ratio 0.5", "",
              "| model | mode | ratio | merging blocks | prop_attn / merge_mlp | CPU s/step (min-max) | vs unpatched "
              "| rel. L2 | cosine |",
              "|---|---|---|---|---|---|---|---|---|"]
    lines += [_row(r) for r in report["rows"] if r["table"] == "settings"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _row(r: Dict) -> str:
    ratio = "" if r["ratio"] is None else r["ratio"]
    return (f"| {r['family']} | {r['mode']} | {ratio} | {r.get('merging_blocks', '')} | {_flags(r)} | "
            f"{r['median_s']:.3f} ({r['min_s']:.3f}-{r['max_s']:.3f}) | {r['vs_unpatched']:.2f}x | "
            f"{r['rel_l2']:.4f} | {r['cosine']:.4f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default=",".join(FAMILIES), help="comma list of " + ", ".join(FAMILIES))
    p.add_argument("--size", type=int, default=64, help="latent side (image side / 8); default 64 (512 px)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds over each family's rows")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: steady on a shared CPU)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    families = choice_list(p, "--families", args.families, FAMILIES)
    if args.size < 8 or args.size % 8:
        p.error(f"--size must be a positive multiple of 8 (the UNets halve it three times), got {args.size}")
    torch.set_num_threads(args.threads)
    from importlib.metadata import version

    import tofu_triton

    load_before = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    rows = [row for family in families for row in measure_family(family, args.size, args.repeats)]
    given = argv if argv is not None else sys.argv[1:]
    report = dict(environment=environment(), diffusers=version("diffusers"), tofu_triton=tofu_triton.__version__,
                  threads=torch.get_num_threads(), size=args.size, repeats=args.repeats, rows=rows,
                  load_before=load_before, load_after=" / ".join(f"{v:.1f}" for v in os.getloadavg()),
                  command=" ".join(["python bench/dit_cpu.py", *(shlex.quote(a) for a in given)]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dit_cpu.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    write_markdown(out / "dit_cpu.md", report)
    print(f"wrote {out / 'dit_cpu'}.{{json,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
