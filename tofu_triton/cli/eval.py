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
An image that cannot be read is skipped with a warning naming it, and
counted. images/s counts the model forward only (synchronised on CUDA), not
loading; its spread is that of the full batches' rates, and with fewer than
:data:`MIN_TIMED_BATCHES` full batches the table says the figure is not a
speed measurement (``bench/throughput.py`` measures speed).
"""
import itertools
import os
import statistics
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import patch as tp
from ..models import load_weights
from ..schedule import MODEL_MODES, token_counts
from .common import check_out_file, load_model, resolve_device, timed

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Fewer full batches than this per row, and images/s is not reported as a speed: one or two forwards
# carry one-off costs (first-touch allocation, caches) and no spread can be seen.
MIN_TIMED_BATCHES = 5
TOP_K = 5  # the "top-5" column; a model with this many classes or fewer has every class in its top k


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def check_layout(root: str) -> None:
    """ValueError in one line unless ``root`` is an ImageFolder tree: class folders, each with images
    (torchvision's ImageFolder refuses a class folder without images too)."""
    layout = f"one sub-folder per class with the images inside: {os.path.join(root, '<class>', '<image>')}"
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        loose = sum(_is_image(e.name) for e in os.scandir(root) if e.is_file())
        found = f"{loose} images but no class folders" if loose else "no class folders"
        raise ValueError(f"{root} has {found}; it needs {layout}")

    def has_image(folder: str) -> bool:
        return any(_is_image(f) for _, _, files in os.walk(folder, followlinks=True) for f in files)

    empty = [c for c in classes if not has_image(os.path.join(root, c))]
    if empty:
        names = ", ".join(empty[:3]) + (f" and {len(empty) - 3} more" if len(empty) > 3 else "")
        raise ValueError(f"{root}: {len(empty)} of {len(classes)} class folders hold no images "
                         f"({', '.join(IMG_EXTENSIONS)}): {names}; it needs {layout}")


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
                    if _is_image(f):
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


class SkipUnreadable(torch.utils.data.Dataset):
    """An ImageFolder ``dataset`` whose unreadable images (corrupt, truncated, not an image) come out as
    None, with a warning naming the file on stderr unless ``quiet``. :func:`collate_readable` drops and
    counts them, so one bad file out of 50 000 does not end the run."""

    def __init__(self, dataset, quiet: bool = False):
        self.dataset, self.quiet = dataset, quiet

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        from PIL import Image

        try:
            return self.dataset[i]
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # what PIL raises
            if not self.quiet:
                print(f"warning: skipped {self.dataset.samples[i][0]}: cannot read it as an image "
                      f"({type(e).__name__}: {e})", file=sys.stderr, flush=True)
            return None


def collate_readable(samples: List) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], int]:
    """(images [B', 3, H, W], targets [B'] int64, skipped) of a batch of :class:`SkipUnreadable` samples:
    the readable ones stacked (None, None when there is none), and how many were not."""
    kept = [sample for sample in samples if sample is not None]
    if not kept:
        return None, None, len(samples)
    images, targets = torch.utils.data.default_collate(kept)
    return images, targets, len(samples) - len(kept)


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

    ``loader`` yields (images [B, 3, H, W], targets [B]) or, with
    :func:`collate_readable`, (images, targets, skipped). ``model`` is
    patched in place (and left patched with the last config). Returns one
    dict per config (:func:`summary_row`); their top-5 is None when the model
    has :data:`TOP_K` classes or fewer (every class is in its top 5). With ``warmup`` each config first
    runs the first batch once untimed, so images/s excludes Triton
    compilation. ``progress`` shows a tqdm bar on stderr (images, images/s,
    the first config's running top-1).
    """
    from tqdm import tqdm

    tp.timm(model, r=0, backend=backend)
    model.to(device)
    cuda = str(device).startswith("cuda")
    full = getattr(loader, "batch_size", None)  # only batches of this size give a per-batch rate
    stats = {c: dict(correct1=0, correct5=0, seconds=0.0, batch_rates=[]) for c in configs}
    seen, skipped, warm, classes = 0, 0, not warmup, None
    total = len(loader.dataset) if limit is None else min(limit, len(loader.dataset))
    bar = tqdm(total=total, unit="img", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for batch in loader:
        if limit is not None and seen >= limit:
            break
        images, target = batch[0], batch[1]
        unreadable = batch[2] if len(batch) > 2 else 0
        skipped += unreadable
        bar.update(unreadable)
        if images is None:  # no image of this batch could be read
            continue
        if limit is not None:
            images, target = images[: limit - seen], target[: limit - seen]
        images, target = images.to(device), target.to(device)
        for mode, r in configs:
            model.r, model.tofu_mode = r, mode
            if not warm:
                model(images)  # untimed: kernel compilation / autotuning and allocator warm-up
            logits, seconds = timed(model, images, cuda=cuda)
            s = stats[(mode, r)]
            s["seconds"] += seconds
            if full is None or len(target) == full:
                s["batch_rates"].append(len(target) / seconds)
            classes = logits.shape[-1]
            top = logits.topk(min(TOP_K, classes), dim=-1).indices
            s["correct1"] += (top[:, 0] == target).sum().item()
            s["correct5"] += (top == target[:, None]).any(dim=-1).sum().item()
        warm = True
        seen += len(target)
        bar.update(len(target))
        first = stats[configs[0]]
        bar.set_postfix_str(f"{configs[0][0]} r={configs[0][1]} top-1 {100 * first['correct1'] / seen:.2f}%")
    bar.close()
    rows = []
    for mode, r in configs:
        s = stats[(mode, r)]
        model.r, model.tofu_mode = r, mode
        correct5 = s["correct5"] if classes is None or classes > TOP_K else None
        rows.append(summary_row(mode, r, token_counts(tp.plan(model)), seen, s["correct1"], correct5,
                                s["seconds"], s["batch_rates"], skipped))
    return rows


def summary_row(mode: str, r: int, tokens: List[int], images: int, correct1: int, correct5: Optional[int],
                seconds: float, batch_rates: Sequence[float] = (), skipped: int = 0) -> Dict:
    """One result row: the raw counts, and the percentages and images/s made from them.

    ``correct5`` None (a model of :data:`TOP_K` classes or fewer) gives top5 None.

    ``images`` were evaluated, ``skipped`` could not be read; ``seconds`` is
    the model time of all batches, ``batch_rates`` the images/s of each full
    batch (for the spread).
    """
    return dict(mode=mode, r=r, tokens=tokens, images=images, skipped=skipped, correct1=correct1,
                correct5=correct5, seconds=seconds, batch_rates=list(batch_rates),
                top1=100.0 * correct1 / max(images, 1),
                top5=None if correct5 is None else 100.0 * correct5 / max(images, 1),
                images_per_s=images / seconds if seconds > 0 else float("nan"))


def combine_rows(per_process: Sequence[Sequence[Dict]]) -> List[Dict]:
    """Rows of several processes that each evaluated a disjoint shard, as one set of rows.

    Counts add up; the processes ran side by side, so images/s is all images
    over the slowest process's model time. The per-batch rates (each one
    process's) are pooled for the spread.
    """
    out = []
    for rows in zip(*per_process):
        first = rows[0]
        correct5 = None if first["correct5"] is None else sum(r["correct5"] for r in rows)
        out.append(summary_row(first["mode"], first["r"], first["tokens"], sum(r["images"] for r in rows),
                               sum(r["correct1"] for r in rows), correct5,
                               max(r["seconds"] for r in rows), [v for r in rows for v in r["batch_rates"]],
                               sum(r["skipped"] for r in rows)))
    return out


def rate_spread(row: Dict) -> Optional[float]:
    """Half the range of a row's per-batch images/s over their median (0.04 reads ±4 %), or None
    with fewer than :data:`MIN_TIMED_BATCHES` full batches."""
    rates = row["batch_rates"]
    if len(rates) < MIN_TIMED_BATCHES:
        return None
    return (max(rates) - min(rates)) / (2 * statistics.median(rates))


def format_rows(rows: Sequence[Dict]) -> str:
    lines = [f"{'mode':<6} {'r':>4} {'tokens':>13} {'images':>7} {'top-1 %':>8} {'top-5 %':>8} {'images/s':>9} "
             f"{'spread':>7}"]
    for row in rows:
        tok = f"{row['tokens'][0]}→{row['tokens'][-1]}"
        spread = rate_spread(row)
        top5 = "-" if row["top5"] is None else f"{row['top5']:.2f}"
        lines.append(f"{row['mode']:<6} {row['r']:>4} {tok:>13} {row['images']:>7} {row['top1']:>8.2f} "
                     f"{top5:>8} {row['images_per_s']:>9.1f} "
                     f"{'-' if spread is None else f'±{100 * spread:.0f}%':>7}")
    return "\n".join(lines)


def notes(rows: Sequence[Dict], batch: int) -> List[str]:
    """What to say under the table: images that were skipped, a top-5 left out, and images/s that is no speed
    measurement."""
    out = []
    if rows and rows[0]["top5"] is None:
        out.append(f"note: no top-5: the model has {TOP_K} classes or fewer, so every class is in its top {TOP_K}")
    if rows and rows[0]["skipped"]:
        out.append(f"warning: {rows[0]['skipped']} unreadable images were skipped (each named above); "
                   f"the counts are over the {rows[0]['images']} images read")
    if any(rate_spread(row) is None for row in rows):
        timed = min(len(row["batch_rates"]) for row in rows)
        out.append(f"note: images/s is not a speed measurement here: {timed} full batch{'es' if timed != 1 else ''} "
                   f"of {batch} timed per row, fewer than {MIN_TIMED_BATCHES} (give at least "
                   f"{MIN_TIMED_BATCHES * batch} images or a smaller --batch; bench/throughput.py measures speed)")
    return out


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
    try:
        check_layout(args.data)
    except ValueError as e:
        raise SystemExit(f"--data {e}") from None
    if args.limit is not None and args.limit < 1:
        raise SystemExit("--limit must be >= 1")
    device = resolve_device(args.device)
    if args.backend == "triton" and device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--backend triton runs the Triton kernels, which need a CUDA GPU, and this run is on the "
                         "CPU: use --backend auto or reference (or set TRITON_INTERPRET=1 for Triton's slow CPU "
                         "interpreter)")

    dist = _Distributed(device)
    quiet = args.quiet or dist.rank != 0
    log = (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    try:
        # Every process builds the same model: seeded random init, or the same weights.
        model = load_model(args.model, args.pretrained, args.seed, img_size=args.img_size,
                           num_classes=args.num_classes)
        if args.checkpoint:
            load_checkpoint(model, args.checkpoint)
        # Every process names the unreadable images of its own shard.
        dataset = SkipUnreadable(image_folder(args.data, eval_transform(model)), quiet=args.quiet)
        classes = len(dataset.dataset.classes)
        if classes != model.num_classes:
            never = (f"; the images of the last {classes - model.num_classes} folders can never be classified right"
                     if classes > model.num_classes else "")
            hint = f" (--num-classes {classes} builds a classifier for them)" if args.num_classes is None else ""
            log(f"warning: the model has {model.num_classes} classes and {args.data} has {classes} class folders; "
                "top-1/top-5 compare the model's class index with the folder's position in sorted order, which "
                f"is only right if the folders are the model's classes in its order{never}{hint}")
        total = len(dataset) if args.limit is None else min(args.limit, len(dataset))
        shard = torch.utils.data.Subset(dataset, dist.shard(total))
        loader = torch.utils.data.DataLoader(shard, batch_size=args.batch, shuffle=False, num_workers=args.workers,
                                             pin_memory=dist.device.startswith("cuda"), collate_fn=collate_readable)
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
    for note in notes(rows, args.batch):
        log(note)
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
    if args.json:
        check_out_file(parser, "--json", args.json)


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
