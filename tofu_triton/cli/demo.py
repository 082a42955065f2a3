"""``tofu-triton demo``: a timm ViT unpatched, with ToMe and with ToFu, side by side.

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
import statistics
from typing import List, Sequence

import torch
import torch.nn.functional as F

import tofu_triton
import tofu_triton.patch as tp

from ..visualize import save_merge_picture
from .common import check_out_folder, load_model, resolve_device, time_windows

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


def images_per_second(model: torch.nn.Module, images: torch.Tensor, iters: int, windows: int = 5) -> float:
    """Median over ``windows`` timed windows of ``iters`` batches each, after two untimed warm-up batches."""
    with torch.no_grad():
        seconds = time_windows(lambda: model(images), windows, calls=iters, warmup=2,
                               cuda=images.device.type == "cuda")
    return images.shape[0] / statistics.median(seconds)


def compact(tokens: List[int]) -> str:
    return "→".join(str(t) for t in tokens)


def clamp_note(r: int, removed: Sequence[int]) -> str:
    """What to say when a layer removes fewer than the ``r`` asked for ("" when none does).

    ``removed``: the tokens each layer really removes (``tp.plan``). With one
    ``r`` for every layer the token count only falls, so the layers that
    cannot remove ``r`` are always the last ones, or all of them.
    """
    clamped = sum(k < r for k in removed)
    if not clamped:
        return ""
    depth = len(removed)
    if clamped == depth:
        which = f"any of the {depth} layers"
    elif clamped == 1:
        which = f"the last of the {depth} layers"
    else:
        which = f"the last {clamped} of the {depth} layers"
    return (f"r={r} is more than {which} can remove (a layer removes at most half of its non-prefix tokens): "
            f"the schedule removes {list(removed)}")


def run(args: argparse.Namespace) -> int:
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
        clamped = clamp_note(r, [step.r for step in tp.plan(patched)])
        if clamped and mode == "tome":  # the same schedule for both modes: say it once
            notes.append(clamped)
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help=f"timm model name, or '{TINY}' "
                        "(default: vit_base_patch16_224 on GPU, vit_tiny_patch16_224 on CPU)")
    p.add_argument("--r", type=int, default=None, help="tokens removed per layer (default: patches // 12)")
    p.add_argument("--batch", type=int, default=None, help="images per batch (default: 64 on GPU, 8 on CPU)")
    p.add_argument("--iters", type=int, default=None, help="timed batches (default: 20 on GPU, 3 on CPU)")
    p.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights (downloads them)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seed", type=int, default=0, help="seed of the random init and the synthetic images")
    p.add_argument("--out", default="tofu_demo", help="folder for the merge pictures (created; default ./tofu_demo)")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """parser.error (one line, exit 2) for values out of range."""
    if args.r is not None and args.r < 0:
        parser.error("--r must be >= 0")
    if args.batch is not None and args.batch < 1:
        parser.error("--batch must be >= 1")
    if args.iters is not None and args.iters < 1:
        parser.error("--iters must be >= 1")
    check_out_folder(parser, "--out", args.out, "the merge pictures")
