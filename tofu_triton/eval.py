"""ImageNet-style evaluation of a timm ViT with ToFu / ToMe: top-1, top-5, images/s.

    python -m tofu_triton eval --model vit_base_patch16_224 --pretrained --data /path/to/val --r 16 --mode tofu
    python -m tofu_triton eval ... --r 0,8,16 --mode tome,tofu      # one row per (mode, r)

``--data`` is an ImageFolder tree: one sub-folder per class; the class
index is the position of the folder name in sorted order (for ImageNet-1k
``val/n01440764/...`` this is the standard class index). Images are loaded
with ``torchvision.datasets.ImageFolder`` when torchvision imports, else with
a small PIL loader of the same layout; the transform is timm's evaluation
transform for the model (``resolve_data_config`` + ``create_transform``,
with the input size taken from the model's patch embedding).

The data are read once: every batch is run through every (mode, r)
configuration of one patched model (``r = 0`` is the unreduced model:
a patched timm ViT with r = 0 computes bitwise what the unpatched one does).
images/s counts the model forward only (synchronised on CUDA), not loading.
"""
import itertools
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MODEL_MODES = ("tofu", "tome", "prune", "mlerp")


class _FolderDataset(torch.utils.data.Dataset):
    """ImageFolder without torchvision: samples sorted by (class folder, file name)."""

    def __init__(self, root: str, transform: Optional[Callable] = None):
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not self.classes:
            raise FileNotFoundError(f"no class folders under {root!r}")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = []
        for c in self.classes:
            for dirpath, _, files in sorted(os.walk(os.path.join(root, c), followlinks=True)):
                for f in sorted(files):
                    if f.lower().endswith(IMG_EXTENSIONS):
                        self.samples.append((os.path.join(dirpath, f), self.class_to_idx[c]))
        if not self.samples:
            raise FileNotFoundError(f"no images ({', '.join(IMG_EXTENSIONS)}) under {root!r}")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from PIL import Image

        path, target = self.samples[i]
        with open(path, "rb") as f:
            img = Image.open(f).convert("RGB")
        return (self.transform(img) if self.transform is not None else img), target


def image_folder(root: str, transform: Optional[Callable] = None, use_torchvision: Optional[bool] = None):
    """An ImageFolder dataset of ``root`` (torchvision's if importable, else the PIL fallback)."""
    if use_torchvision is None:
        try:
            import torchvision  # noqa: F401

            use_torchvision = True
        except Exception:  # noqa: BLE001 - not installed, or broken against this torch
            use_torchvision = False
    if use_torchvision:
        from torchvision.datasets import ImageFolder

        return ImageFolder(root, transform=transform)
    return _FolderDataset(root, transform=transform)


def eval_transform(model: torch.nn.Module):
    from timm.data import create_transform, resolve_data_config

    args = {}
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        args["input_size"] = (3, *tuple(img_size))
    return create_transform(**resolve_data_config(args, model=model))


def parse_list(text: str, cast=str) -> List:
    return [cast(v.strip()) for v in str(text).split(",") if v.strip()]


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, configs: Sequence[Tuple[str, int]], device: str = "cpu",
             backend: str = "auto", limit: Optional[int] = None, progress: bool = False,
             warmup: bool = True) -> List[Dict]:
    """Top-1/top-5 and images/s of ``model`` patched with each (mode, r) in ``configs``.

    ``model`` is patched in place (and left patched with the last config).
    Returns one dict per config: mode, r, tokens (per layer), images, top1,
    top5 (percent), images_per_s. With ``warmup`` each config first runs the
    first batch once untimed, so images/s excludes Triton compilation.
    ``progress`` shows a tqdm bar on stderr (images, images/s, the first
    config's running top-1).
    """
    from tqdm import tqdm

    import tofu_triton.patch as tp
    from tofu_triton.schedule import token_counts

    tp.timm(model, r=0, backend=backend)
    model.to(device)
    cuda = str(device).startswith("cuda")
    stats = {c: dict(correct1=0, correct5=0, seconds=0.0) for c in configs}
    seen, total = 0, len(loader.dataset) if limit is None else min(limit, len(loader.dataset))
    bar = tqdm(total=total, unit="img", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for batch_i, (images, target) in enumerate(loader):
        if limit is not None and seen >= limit:
            break
        if limit is not None:
            images, target = images[: limit - seen], target[: limit - seen]
        images, target = images.to(device), target.to(device)
        for mode, r in configs:
            model.r, model.tofu_mode = r, mode
            if batch_i == 0 and warmup:
                model(images)  # untimed: kernel compilation / autotuning and allocator warm-up
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            logits = model(images)
            if cuda:
                torch.cuda.synchronize()
            s = stats[(mode, r)]
            s["seconds"] += time.perf_counter() - start
            top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            s["correct1"] += (top[:, 0] == target).sum().item()
            s["correct5"] += (top == target[:, None]).any(dim=-1).sum().item()
        seen += len(target)
        bar.update(len(target))
        first = stats[configs[0]]
        bar.set_postfix_str(f"{configs[0][0]} r={configs[0][1]} top-1 {100 * first['correct1'] / seen:.2f}%")
    bar.close()
    rows = []
    for mode, r in configs:
        s = stats[(mode, r)]
        model.r, model.tofu_mode = r, mode
        rows.append(dict(mode=mode, r=r, tokens=token_counts(tp.plan(model)), images=seen,
                         top1=100.0 * s["correct1"] / max(seen, 1), top5=100.0 * s["correct5"] / max(seen, 1),
                         images_per_s=seen / s["seconds"] if s["seconds"] > 0 else float("nan")))
    return rows


def format_rows(rows: Sequence[Dict]) -> str:
    lines = [f"{'mode':<6} {'r':>4} {'tokens':>13} {'images':>7} {'top-1 %':>8} {'top-5 %':>8} {'images/s':>9}"]
    for row in rows:
        tok = f"{row['tokens'][0]}→{row['tokens'][-1]}"
        lines.append(f"{row['mode']:<6} {row['r']:>4} {tok:>13} {row['images']:>7} {row['top1']:>8.2f} "
                     f"{row['top5']:>8.2f} {row['images_per_s']:>9.1f}")
    return "\n".join(lines)


def run(args) -> int:
    """The ``eval`` subcommand (args from ``tofu_triton.__main__``)."""
    import json

    from .__main__ import load_model, resolve_device

    device = resolve_device(args.device)
    modes = parse_list(args.mode)
    for m in modes:
        if m not in MODEL_MODES:
            raise SystemExit(f"--mode: unknown mode {m!r}; choose from {MODEL_MODES}")
    try:
        rs = parse_list(args.r, int)
    except ValueError:
        raise SystemExit(f"--r must be an int or a comma list of ints, got {args.r!r}") from None
    if not rs or any(r < 0 for r in rs):
        raise SystemExit("--r values must be >= 0")
    if not os.path.isdir(args.data):
        raise SystemExit(f"--data {args.data!r} is not a folder")

    model = load_model(args.model, args.pretrained, args.seed, img_size=args.img_size, num_classes=args.num_classes)
    dataset = image_folder(args.data, eval_transform(model))
    classes = len(getattr(dataset, "classes", []))
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    if args.num_classes is None and classes != model.num_classes:
        log(f"warning: the model has {model.num_classes} classes and {args.data} has {classes} class folders; "
            "top-1/top-5 compare the model's class index with the folder's position in sorted order, which is "
            "only right if the folders are the model's classes in its order (pass --num-classes to say you mean it)")
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, shuffle=False, num_workers=args.workers,
                                         pin_memory=device.startswith("cuda"))
    configs = list(itertools.product(modes, rs))
    log(f"eval {args.model} ({'pretrained' if args.pretrained else f'random init, seed {args.seed}'}) on "
        f"{args.data}: {len(dataset)} images, {classes} classes, device {device}, "
        f"configs {', '.join(f'{m} r={r}' for m, r in configs)}")
    progress = not args.quiet and sys.stderr.isatty()
    rows = evaluate(model, loader, configs, device, args.backend, args.limit, progress=progress)
    print(format_rows(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=args.model, pretrained=args.pretrained, data=os.path.abspath(args.data),
                           device=device, rows=rows), f, indent=1)
    return 0


def default_workers() -> int:
    """DataLoader workers: the CPUs this process may use, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return min(8, cpus)


def add_arguments(p) -> None:
    p.add_argument("--model", default="vit_base_patch16_224", help="timm model name")
    p.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights (may download them)")
    p.add_argument("--data", required=True, help="ImageFolder root (one sub-folder per class, sorted = class index)")
    p.add_argument("--r", default="16", help="tokens removed per layer; a comma list gives one row each")
    p.add_argument("--mode", default="tofu", help=f"one of {MODEL_MODES}, or a comma list")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="DataLoader worker processes (default: the CPUs available, at most 8)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    p.add_argument("--img-size", type=int, default=None, help="override the model's input size (random-init tests)")
    p.add_argument("--num-classes", type=int, default=None, help="override the classifier's classes")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--backend", choices=("auto", "triton", "reference"), default="auto")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--seed", type=int, default=0, help="seed of the random init (without --pretrained)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or messages on stderr, only the table")
