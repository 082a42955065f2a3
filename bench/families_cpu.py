"""CPU images/s of the newer ViT families with ToFu / ToMe (the PyTorch reference path).

    python bench/families_cpu.py                  # ~4 minutes on 2 cores; writes bench/results/families_cpu.{json,md}
    python bench/families_cpu.py --repeats 3 --batch 2 --families siglip_timm

Families (random weights from each family's real config, 224 px): timm SigLIP
(attention pooling), timm EVA-02 small (rotary positions), timm ViT-S with
rotary positions, Hugging Face SiglipVisionModel (base config). For each,
r = 0 (the unreduced model), 8 and 16 in ``tofu`` and ``tome`` modes.

Timing: one warm-up forward per configuration, then ``--repeats`` rounds in
which every configuration of a family runs one batch in turn (interleaved, so
a slow moment of the machine hits all of them alike); images/s is the batch
over the median time. These are CPU figures through the PyTorch reference:
they show whether fewer tokens pay off for the family, not GPU speed.
"""
import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch

from arguments import choice_list
from measure import environment

FAMILIES = ("siglip_timm", "eva02_timm", "rope_vit_timm", "siglip_hf")
CONFIGS = [("none", 0), ("tome", 8), ("tofu", 8), ("tome", 16), ("tofu", 16)]


def build(family: str) -> Tuple[torch.nn.Module, Callable, Callable]:
    """(model, patch(model, r, mode), forward(model, images))."""
    import tofu_triton.patch as tp

    torch.manual_seed(0)
    if family == "siglip_hf":
        from transformers import SiglipVisionConfig, SiglipVisionModel

        model = SiglipVisionModel(SiglipVisionConfig(attn_implementation="sdpa")).eval()
        return model, tp.transformers, lambda m, x: m(pixel_values=x).pooler_output
    import timm

    name = {"siglip_timm": "vit_base_patch16_siglip_224", "eva02_timm": "eva02_small_patch14_224",
            "rope_vit_timm": "vit_small_patch16_rope_224"}[family]
    return timm.create_model(name, pretrained=False).eval(), tp.timm, lambda m, x: m(x)


def measure_family(family: str, batch: int, repeats: int) -> List[Dict]:
    model, patch, forward = build(family)
    patch(model, r=0)
    images = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    times: Dict[Tuple[str, int], List[float]] = {c: [] for c in CONFIGS}
    tokens = {}

    def run(cfg):
        mode, r = cfg
        model_r = patch(model, r=r, mode="tofu" if mode == "none" else mode)
        t0 = time.perf_counter()
        with torch.inference_mode():
            forward(model_r, images)
        return time.perf_counter() - t0

    import tofu_triton.patch as tp
    from tofu_triton.schedule import token_counts

    n_tokens = {"siglip_hf": 196}.get(family)
    for cfg in CONFIGS:  # warm-up, untimed
        run(cfg)
        tokens[cfg] = token_counts(tp.plan(model, n_tokens))
    for _ in range(repeats):
        for cfg in CONFIGS:
            times[cfg].append(run(cfg))
    base = statistics.median(times[("none", 0)])
    rows = []
    for (mode, r), ts in times.items():
        med = statistics.median(ts)
        rows.append(dict(family=family, mode="unreduced" if mode == "none" else mode, r=r, tokens=tokens[(mode, r)],
                         median_s=med, images_per_s=batch / med, vs_unreduced=base / med,
                         spread=(max(ts) - min(ts)) / med))
        print(f"{family:14s} {rows[-1]['mode']:9s} r={r:<3d} {rows[-1]['images_per_s']:7.2f} img/s "
              f"x{rows[-1]['vs_unreduced']:.2f}  tokens {tokens[(mode, r)][0]}->{tokens[(mode, r)][-1]}", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    families = choice_list(p, "--families", args.families, FAMILIES)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [row for family in families for row in measure_family(family, args.batch, args.repeats)]
    report = dict(environment=environment(), threads=torch.get_num_threads(), batch=args.batch,
                  repeats=args.repeats, rows=rows,
                  command=" ".join(["python bench/families_cpu.py", *(shlex.quote(a) for a in (argv or sys.argv[1:]))]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "families_cpu.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    env = report["environment"]
    lines = ["# CPU throughput of the SigLIP / EVA-02 / rotary-ViT families with ToFu and ToMe (CPU figures)", "",
             f"- {env['date']}; {env['device']}, {report['threads']} torch threads; torch {env['torch']}, "
             f"timm {env.get('timm', '?')}; random weights from each family's config; batch {args.batch} at 224 px",
             f"- images/s = batch / median of {args.repeats} interleaved rounds (one warm-up each); "
             "the PyTorch reference path (the fused kernels need CUDA)",
             f"- command: `{report['command']}`", "",
             "| family | mode | r | tokens in → out | images/s | vs unreduced | spread of rounds |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['mode']} | {r['r']} | {r['tokens'][0]} → {r['tokens'][-1]} | "
                     f"{r['images_per_s']:.2f} | {r['vs_unreduced']:.2f}x | {100 * r['spread']:.0f} % |")
    (out / "families_cpu.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
