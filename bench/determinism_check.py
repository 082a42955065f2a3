"""GPU check: the fused paths give the same bits on every run.

No kernel uses atomics, so two runs on the same inputs must agree bit for
bit. Each case runs ``--runs`` times on fresh output buffers (the allocator
is emptied between runs, so a kernel that reads memory it did not write
shows up as a difference) and is compared with the first run:

1. ``vit_step``: ``ops.token_fusion_step`` at ViT-B/16 shapes (N = 197,
   C = 768, 12 heads of 64), B = 8, fp16, modes mlerp / mean / prune, the
   step's outputs and the gradient of x (its backward is the merge backward).
2. ``sd_step``: the Stable Diffusion step on a 64 x 64 latent (C = 320,
   B = 2, fp16, ratio 0.5): random partition, match, MLERP merge, unmerge
   with the residual.
3. ``vit_model`` / ``unet_model``: a patched ViT-B/16 (random weights,
   B = 8, fp16, r = 16) and the SD 1.5 UNet (random weights, 512 px, B = 2,
   fp16, ratio 0.5, random destinations), whole forwards.

``--small`` shrinks every case (ViT-S-sized step, 16 x 16 latent, the tiny
model presets) so the CPU can run the script in Triton's interpreter
(TRITON_INTERPRET=1) as a smoke test; there it checks the script, not the
card.

    python bench/determinism_check.py --out bench/results/gpu   # ~30 s on an H100-class card
"""
import argparse
import json
import os
import sys
import time

import torch

from tofu_triton import ops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import refuse_without_gpu  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _same(first, again) -> bool:
    return all(torch.equal(a, b) for a, b in zip(first, again))


def _tensors(fields) -> list:
    return [t for t in fields if isinstance(t, torch.Tensor)]


def repeated(name: str, fn, runs: int) -> dict:
    """Run ``fn`` (-> list of tensors) ``runs`` times; the row says whether every run equals the first."""
    first = [t.clone() for t in fn()]
    differing = 0
    for _ in range(runs - 1):
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        differing += not _same(first, fn())
    return dict(check=name, runs=runs, differing_runs=differing, ok=differing == 0)


def vit_step(small: bool, mode: str, gen: torch.Generator):
    batch, heads, n, d = (2, 2, 33, 16) if small else (8, 12, 197, 64)
    x = torch.randn(batch, n, heads * d, generator=gen, device=DEVICE).to(torch.float16).requires_grad_()
    keys = torch.randn(batch, heads, n, d, generator=gen, device=DEVICE).to(torch.float16)
    size = torch.rand(batch, n, 1, generator=gen, device=DEVICE) + 1
    r = 4 if small else 16
    grad = torch.randn(batch, n - r, heads * d, generator=gen, device=DEVICE).to(torch.float16)

    def run():
        x.grad = None
        step = ops.token_fusion_step(x, keys, r, size, mode, protected=1, bias_dtype=torch.float16,
                                     backend="triton")
        step.x.backward(grad)
        return [step.x, step.size, step.bias, *_tensors(step.match), x.grad]
    return run


def sd_step(small: bool, gen: torch.Generator):
    side, c = (16, 32) if small else (64, 320)
    x = torch.randn(2, side * side, c, generator=gen, device=DEVICE).to(torch.float16)
    residual = torch.randn(2, side * side, c, generator=gen, device=DEVICE).to(torch.float16)
    step = torch.tensor(421, device=DEVICE)

    def run():
        part = ops.spatial_partition(side, side, 2, 2, seed=7, step=step, device=DEVICE, backend="triton")
        match = ops.spatial_match(x, part, side * side // 2, backend="triton")
        y = ops.spatial_merge(x, match, part, "mlerp", backend="triton")
        return [*part, *_tensors(match), y, ops.spatial_unmerge(y, match, part, residual, backend="triton")]
    return run


def vit_model(small: bool):
    import tofu_triton.patch as tp
    from tofu_triton.models import create_vit

    model = create_vit("tiny" if small else "vit_base_patch16_224").to(DEVICE, torch.float16).eval()
    tp.timm(model, r=4 if small else 16, mode="tofu", backend="triton")
    side = model.patch_embed.img_size[0]
    images = torch.randn(2 if small else 8, 3, side, side, generator=torch.Generator().manual_seed(1))
    images = images.to(DEVICE, torch.float16)

    def run():
        with torch.no_grad():
            return [model(images)]
    return run


def unet_model(small: bool):
    import tofu_triton.patch as tp
    from tofu_triton.models import create_unet, unet_inputs, unet_step

    dtype = torch.float32 if small else torch.float16  # the interpreter's CPU convolutions want fp32
    model = create_unet("tiny" if small else "sd15", device=DEVICE, dtype=dtype)
    tp.diffusers(model, ratio=0.5, mode="tofu", use_rand=True, backend="triton")
    inputs = unet_inputs(model, 2, 16 if small else 64, device=DEVICE, dtype=dtype)

    def run():
        with torch.no_grad():
            return [unet_step(model, inputs)]
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/gpu")
    ap.add_argument("--runs", type=int, default=3, help="runs of each case (each compared with the first)")
    ap.add_argument("--small", action="store_true", help="small shapes (the CPU smoke run in the interpreter)")
    ap.add_argument("--cases", help="comma-separated case names (default: all)")
    args = ap.parse_args(argv)
    if args.runs < 2:
        ap.error("--runs must be at least 2 (each run is compared with the first)")
    refused = refuse_without_gpu("determinism_check", args.small)
    if refused:
        return refused
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    cases = [(f"vit_step_{mode}", lambda m=mode: vit_step(args.small, m, gen)) for mode in ("mlerp", "mean", "prune")]
    cases += [("sd_step", lambda: sd_step(args.small, gen)), ("vit_model", lambda: vit_model(args.small)),
              ("unet_model", lambda: unet_model(args.small))]
    if args.cases:
        wanted = args.cases.split(",")
        unknown = sorted(set(wanted) - {name for name, _ in cases})
        if unknown:
            ap.error(f"--cases: unknown {', '.join(unknown)}; the cases are {', '.join(n for n, _ in cases)}")
        cases = [case for case in cases if case[0] in wanted]
    rows, t0 = [], time.time()
    for name, build in cases:
        try:
            row = repeated(name, build(), args.runs)
        except Exception as e:  # one broken case must not hide the others' answers
            row = dict(check=name, ok=False, error=f"{type(e).__name__}: {e}")
        rows.append(row)
        print("determinism", json.dumps(row), flush=True)
    ok = all(row["ok"] for row in rows)
    print(f"determinism {'PASSED' if ok else 'FAILED'} in {time.time() - t0:.0f} s")
    if not args.small:
        from measure import environment

        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "determinism.json"), "w") as f:
            json.dump(dict(environment=environment(), command="python " + " ".join(sys.argv), ok=ok, rows=rows),
                      f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
