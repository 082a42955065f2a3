"""``tofu-triton eval``: ImageNet-style evaluation of a timm ViT with ToFu / ToMe: top-1, top-5, images/s.

    python -m tofu_triton eval --model vit_base_patch16_224 --pretrained --data /path/to/val --tokens 16 --mode tofu
    python -m tofu_triton eval ... --tokens 0,8,16 --mode tome,tofu      # one row per (mode, r)
    torchrun --standalone --nproc_per_node=4 --no-python tofu-triton eval ... --tokens 0,8,16

Under torchrun (or anything that sets ``WORLD_SIZE``, ``RANK`` and the
rendezvous variables) every process evaluates every ``world``-th image (no
image twice, none left out, so the counts are exact), the rows are gathered
to rank 0, and rank 0 alone prints the table and writes ``--json``; on
several nodes use torchrun's usual ``--nnodes`` / ``--rdzv-endpoint``.
``--tokens`` is the per-layer r: torchrun refuses options that start with
``--r`` (it reads them as abbreviations of its own). Each process builds the
same model: a seeded random init (``--seed``), pretrained weights, or
``--checkpoint``. NCCL on CUDA (one GPU per process, ``LOCAL_RANK``), gloo on
the CPU.

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
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import patch as tp
from ..models import load_weights
from ..schedule import MODEL_MODES, token_counts
from .common import load_model, resolve_device, timed

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


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
    Returns one dict per config (:func:`summary_row`): mode, r, tokens (per
    layer), images, correct1, correct5, seconds, top1, top5 (percent),
    images_per_s. With ``warmup`` each config first runs the
    first batch once untimed, so images/s excludes Triton compilation.
    ``progress`` shows a tqdm bar on stderr (images, images/s, the first
    config's running top-1).
    """
    from tqdm import tqdm

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
            logits, seconds = timed(model, images, cuda=cuda)
            s = stats[(mode, r)]
            s["seconds"] += seconds
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
        rows.append(summary_row(mode, r, token_counts(tp.plan(model)), seen, s["correct1"], s["correct5"],
                                s["seconds"]))
    return rows


def summary_row(mode: str, r: int, tokens: List[int], images: int, correct1: int, correct5: int,
                seconds: float) -> Dict:
    """One result row: the raw counts and the percentages and images/s made from them."""
    return dict(mode=mode, r=r, tokens=tokens, images=images, correct1=correct1, correct5=correct5,
                seconds=seconds, top1=100.0 * correct1 / max(images, 1), top5=100.0 * correct5 / max(images, 1),
                images_per_s=images / seconds if seconds > 0 else float("nan"))


def combine_rows(per_process: Sequence[Sequence[Dict]]) -> List[Dict]:
    """Rows of several processes that each evaluated a disjoint shard, as one set of rows.

    Counts add up; the processes ran side by side, so images/s is all images
    over the slowest process's model time.
    """
    out = []
    for rows in zip(*per_process):
        first = rows[0]
        out.append(summary_row(first["mode"], first["r"], first["tokens"], sum(r["images"] for r in rows),
                               sum(r["correct1"] for r in rows), sum(r["correct5"] for r in rows),
                               max(r["seconds"] for r in rows)))
    return out


def format_rows(rows: Sequence[Dict]) -> str:
    lines = [f"{'mode':<6} {'r':>4} {'tokens':>13} {'images':>7} {'top-1 %':>8} {'top-5 %':>8} {'images/s':>9}"]
    for row in rows:
        tok = f"{row['tokens'][0]}→{row['tokens'][-1]}"
        lines.append(f"{row['mode']:<6} {row['r']:>4} {tok:>13} {row['images']:>7} {row['top1']:>8.2f} "
                     f"{row['top5']:>8.2f} {row['images_per_s']:>9.1f}")
    return "\n".join(lines)


class _Distributed:
    """Rank, world size and device of this process; one process unless started by torchrun."""

    def __init__(self, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank, self.device = 0, device
        if self.world > 1:
            import torch.distributed as dist

            if device == "cuda":
                local = int(os.environ.get("LOCAL_RANK", "0"))
                torch.cuda.set_device(local)
                self.device = f"cuda:{local}"
            dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
            self.rank = dist.get_rank()

    def shard(self, n: int) -> List[int]:
        """This process's indices of ``range(n)``: every ``world``-th, so no sample runs twice."""
        return list(range(self.rank, n, self.world))

    def gather(self, rows: List[Dict]) -> Optional[List[Dict]]:
        """Every process's rows combined, on rank 0; None elsewhere."""
        if self.world == 1:
            return rows
        import torch.distributed as dist

        everyone = [None] * self.world if self.rank == 0 else None
        dist.gather_object(rows, everyone, dst=0)
        return combine_rows(everyone) if self.rank == 0 else None

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def load_checkpoint(model: torch.nn.Module, path: str) -> None:
    """:func:`tofu_triton.models.load_weights`, as a one-line SystemExit for the CLI."""
    try:
        load_weights(model, path)
    except ValueError as e:
        raise SystemExit(f"--checkpoint {e}") from None


def run(args) -> int:
    """The ``eval`` subcommand (args from :func:`add_arguments`); also one process of a torchrun job."""
    import json

    modes = parse_list(args.mode)
    for m in modes:
        if m not in MODEL_MODES:
            raise SystemExit(f"--mode: unknown mode {m!r}; choose from {MODEL_MODES}")
    try:
        rs = parse_list(args.r, int)
    except ValueError:
        raise SystemExit(f"--tokens must be an int or a comma list of ints, got {args.r!r}") from None
    if not rs or any(r < 0 for r in rs):
        raise SystemExit("--tokens values must be >= 0")
    if not os.path.isdir(args.data):
        raise SystemExit(f"--data {args.data!r} is not a folder")
    if args.limit is not None and args.limit < 1:
        raise SystemExit("--limit must be >= 1")

    dist = _Distributed(resolve_device(args.device))
    try:
        # Every process builds the same model: seeded random init, or the same weights.
        model = load_model(args.model, args.pretrained, args.seed, img_size=args.img_size,
                           num_classes=args.num_classes)
        if args.checkpoint:
            load_checkpoint(model, args.checkpoint)
        dataset = image_folder(args.data, eval_transform(model))
        classes = len(getattr(dataset, "classes", []))
        quiet = args.quiet or dist.rank != 0
        log = (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
        if args.num_classes is None and classes != model.num_classes:
            log(f"warning: the model has {model.num_classes} classes and {args.data} has {classes} class folders; "
                "top-1/top-5 compare the model's class index with the folder's position in sorted order, which "
                "is only right if the folders are the model's classes in its order "
                "(pass --num-classes to say you mean it)")
        total = len(dataset) if args.limit is None else min(args.limit, len(dataset))
        shard = torch.utils.data.Subset(dataset, dist.shard(total))
        loader = torch.utils.data.DataLoader(shard, batch_size=args.batch, shuffle=False, num_workers=args.workers,
                                             pin_memory=dist.device.startswith("cuda"))
        configs = list(itertools.product(modes, rs))
        log(f"eval {args.model} ({'pretrained' if args.pretrained else f'random init, seed {args.seed}'}"
            f"{', ' + args.checkpoint if args.checkpoint else ''}) on {args.data}: {total} images, {classes} classes, "
            f"device {dist.device}" + (f", {dist.world} processes" if dist.world > 1 else "")
            + f", configs {', '.join(f'{m} r={r}' for m, r in configs)}")
        progress = not quiet and sys.stderr.isatty()
        rows = dist.gather(evaluate(model, loader, configs, dist.device, args.backend, progress=progress))
    finally:
        dist.close()
    if rows is None:  # not rank 0: rank 0 prints and writes
        return 0
    print(format_rows(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=args.model, pretrained=args.pretrained, checkpoint=args.checkpoint,
                           data=os.path.abspath(args.data), device=dist.device, processes=dist.world, rows=rows),
                      f, indent=1)
    return 0


def default_workers() -> int:
    """DataLoader workers: the CPUs this process may use, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return min(8, cpus)


def check_arguments(parser, args) -> None:
    """parser.error (one line, exit 2) for values out of range; the rest is checked in :func:`run`."""
    if args.batch < 1:
        parser.error("--batch must be >= 1")


def add_arguments(p) -> None:
    p.add_argument("--model", default="vit_base_patch16_224", help="timm model name")
    p.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights (may download them)")
    p.add_argument("--data", required=True, help="ImageFolder root (one sub-folder per class, sorted = class index)")
    # --tokens, not --r: torchrun takes any option starting with --r anywhere on its command
    # line for an abbreviation of its own (--rdzv-..., --role) and refuses to start.
    p.add_argument("--tokens", "--r", dest="r", default="16",
                   help="tokens removed per layer (r); a comma list gives one row each. --r is an alias, "
                        "but not under torchrun")
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
    p.add_argument("--checkpoint", default=None, help="a state dict (torch.save) to load into the model")
    p.add_argument("--quiet", action="store_true", help="no progress bar or messages on stderr, only the table")
