"""Command line: ``python -m tofu_triton demo`` (or ``tofu-triton demo``),
``python -m tofu_triton demo-sd`` (one Stable Diffusion UNet step, unpatched /
tomesd / ToMe / ToFu, see :mod:`tofu_triton.sd_demo`), and
``python -m tofu_triton eval --data PATH ...`` (top-1/top-5 on an ImageFolder,
see :mod:`tofu_triton.eval`).

Builds a timm ViT, runs it unpatched, with ToMe and with ToFu on synthetic
images (no data and, unless ``--pretrained``, no weights are downloaded),
prints throughput, speed-up, agreement with the unpatched model and tokens
per layer, and saves merge pictures. With random weights the agreement
numbers only show that the machinery runs; use ``--pretrained`` for
meaningful ones.
"""
import argparse
import copy
import os
import sys
import time
from typing import List, Optional

import torch
import torch.nn.functional as F

import tofu_triton
import tofu_triton.patch as tp

from .visualize import save_merge_picture

TINY = "tiny"  # a small random ViT preset (tofu_triton.models.PRESETS) for quick CPU runs and tests


def synthetic_images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """[batch, 3, size, size] in [0, 1]: a colour gradient with a disc and a bar per image."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = []
    for _ in range(batch):
        c0, c1, c2, c3 = torch.rand(4, 3, 1, 1, generator=g)
        img = c0 * xs + c1 * (1 - xs) * ys  # smooth background
        cy, cx, rad = torch.rand(3, generator=g) * torch.tensor([0.6, 0.6, 0.2]) + torch.tensor([0.2, 0.2, 0.1])
        img = torch.where(((ys - cy) ** 2 + (xs - cx) ** 2 < rad**2), c2, img)
        top = float(torch.rand(1, generator=g)) * 0.7
        img = torch.where((ys > top) & (ys < top + 0.15) & (xs > 0.1) & (xs < 0.9), c3, img)
        out.append(img.clamp(0, 1))
    return torch.stack(out)


def resolve_device(device: str) -> str:
    """``auto`` -> cuda if available else cpu; SystemExit with one line if ``cuda`` is asked for and absent."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible to torch (torch.cuda.is_available() is False); "
                         "use --device cpu")
    return device


def load_model(name: str, pretrained: bool, seed: int, **overrides) -> torch.nn.Module:
    """:func:`tofu_triton.models.create_vit`, with a one-line SystemExit for a bad model or failed download."""
    from .models import create_vit

    try:
        return create_vit(name, pretrained=pretrained, seed=seed, **overrides)
    except ValueError as e:
        raise SystemExit(f"--model: {e}") from None
    except (OSError, RuntimeError) as e:  # pretrained weights that could not be fetched or read
        raise SystemExit(f"--model {name}: could not load pretrained weights ({type(e).__name__}: {e})") from None


def images_per_second(fn, images: torch.Tensor, iters: int, repeats: int = 5) -> float:
    """Median over ``repeats`` timed windows of ``iters`` calls each, after two untimed warm-up calls."""
    cuda = images.device.type == "cuda"
    rates = []
    with torch.no_grad():
        for _ in range(2):
            fn(images)
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(iters):
                fn(images)
            if cuda:
                torch.cuda.synchronize()
            rates.append(iters * images.shape[0] / (time.perf_counter() - start))
    return sorted(rates)[len(rates) // 2]


def compact(tokens: List[int]) -> str:
    return "→".join(str(t) for t in tokens)


def demo(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    name = args.model or ("vit_base_patch16_224" if device == "cuda" else "vit_tiny_patch16_224")
    model = load_model(name, args.pretrained, args.seed).to(device)
    batch = args.batch or (64 if device == "cuda" else 8)
    iters = args.iters or (20 if device == "cuda" else 3)
    size = model.patch_embed.img_size[0]
    grid = model.patch_embed.grid_size
    n_patches = grid[0] * grid[1]
    r = args.r if args.r is not None else max(1, n_patches // 12)  # 16 for 196 patches, as in the papers
    images = synthetic_images(batch, size, args.seed).to(device)
    mean = torch.tensor(getattr(model, "pretrained_cfg", {}).get("mean", (0.5,) * 3), device=device).view(1, 3, 1, 1)
    std = torch.tensor(getattr(model, "pretrained_cfg", {}).get("std", (0.5,) * 3), device=device).view(1, 3, 1, 1)
    inputs = (images - mean) / std

    print(f"tofu-triton {tofu_triton.__version__} demo: {name} ({'pretrained' if args.pretrained else 'random init'}), "
          f"{device}, batch {batch}, r={r}, {size}x{size} synthetic images")
    with torch.no_grad():
        base_logits = model(inputs)
        base_feats = model.forward_head(model.forward_features(inputs), pre_logits=True)
    base_speed = images_per_second(model, inputs, iters)
    rows = [("unpatched", base_speed, 1.0, 1.0, 1.0, f"{n_patches + model.num_prefix_tokens} in every layer")]

    os.makedirs(args.out, exist_ok=True)
    pictures, notes = [], []
    for label, mode in (("ToMe", "tome"), ("ToFu", "tofu")):
        patched = tp.timm(copy.deepcopy(model), r=r, mode=mode)
        clamped = [step.r for step in tp.plan(patched) if step.r < r]
        if clamped and mode == "tome":  # the same schedule for both modes: say it once
            notes.append(f"r={r} is more than the last layers can remove (at most half their non-prefix "
                         f"tokens): the schedule removes {[s.r for s in tp.plan(patched)]}")
        with torch.no_grad():
            logits, info = tp.forward_with_info(patched, inputs)
            feats, _ = tp.forward_with_info(patched, inputs, pre_logits=True)
            _, source = tp.trace(patched, inputs[:1])
        speed = images_per_second(patched, inputs, iters)
        agree = (logits.argmax(-1) == base_logits.argmax(-1)).float().mean().item()
        cos_logits = F.cosine_similarity(logits.float(), base_logits.float(), dim=-1).mean().item()
        cos_feats = F.cosine_similarity(feats.float(), base_feats.float(), dim=-1).mean().item()
        rows.append((f"{label} ({mode})", speed, agree, cos_feats, cos_logits, compact(info.tokens)))
        path = os.path.join(args.out, f"merge_{mode}.png")
        try:
            save_merge_picture(path, images[0], source[0], tuple(grid), f"{label}, r={r}: {name}")
            pictures.append(path)
        except ModuleNotFoundError as e:  # matplotlib is the [demo] extra
            missing = (e.name or "matplotlib").split(".")[0]
            note = f"no merge pictures: {missing} is not installed (pip install \"tofu-triton[demo]\")"
            if note not in notes:
                notes.append(note)

    print()
    print(f"{'model':<14} {'images/s':>9} {'speed-up':>8} {'top-1 agree':>11} {'cos feats':>9} {'cos logits':>10}"
          "  tokens per layer")
    for label, speed, agree, cf, cl, tokens in rows:
        print(f"{label:<14} {speed:>9.1f} {speed / base_speed:>7.2f}x {100 * agree:>10.1f}% {cf:>9.4f} {cl:>10.4f}"
              f"  {tokens}")
    print()
    for note in notes:
        print(note)
    if pictures:
        print("merge pictures: " + ", ".join(pictures))
    if device == "cpu":
        print(f"(CPU figures: median of 5 windows of {iters} batches; the fused kernels run on CUDA only, so this "
              "times the PyTorch reference path and says little about GPU speed)")
    if not args.pretrained:
        print("(random weights: agreement and similarity only show the machinery runs; "
              "pass --pretrained for real ones)")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="tofu-triton",
                                     description="Token Fusion (ToFu/ToMe) for timm ViTs and Stable Diffusion UNets")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="run a timm ViT unpatched, with ToMe and with ToFu; print a table")
    d.add_argument("--model", default=None,
                   help=f"timm model name, or '{TINY}' "
                        "(default: vit_base_patch16_224 on GPU, vit_tiny_patch16_224 on CPU)")
    d.add_argument("--r", type=int, default=None, help="tokens removed per layer (default: patches // 12)")
    d.add_argument("--batch", type=int, default=None, help="images per batch (default: 64 on GPU, 8 on CPU)")
    d.add_argument("--iters", type=int, default=None, help="timed batches (default: 20 on GPU, 3 on CPU)")
    d.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights (downloads them)")
    d.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    d.add_argument("--seed", type=int, default=0, help="seed of the random init and the synthetic images")
    d.add_argument("--out", default="tofu_demo", help="folder for the merge pictures (created; default ./tofu_demo)")
    from . import sd_demo

    s = sub.add_parser("demo-sd", help="one Stable Diffusion UNet step (random weights) unpatched, with tomesd, "
                                       "ToMe and ToFu; print a table, save a merge picture")
    sd_demo.add_arguments(s)
    e = sub.add_parser("eval", help="top-1/top-5 and images/s of a timm ViT on an ImageFolder, per (mode, r)")
    from .eval import add_arguments

    add_arguments(e)
    args = parser.parse_args(argv)
    if args.command == "eval":
        if args.batch < 1:
            parser.error("--batch must be >= 1")
        from .eval import run

        return run(args)
    if args.command == "demo":
        if args.r is not None and args.r < 0:
            parser.error("--r must be >= 0")
        if args.batch is not None and args.batch < 1:
            parser.error("--batch must be >= 1")
        return demo(args)
    if args.command == "demo-sd":
        sd_demo.check_arguments(s, args)
        return sd_demo.run(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
