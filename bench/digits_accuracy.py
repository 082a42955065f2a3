"""Accuracy of ToFu / ToMe / prune / mlerp on a small ViT, off the shelf, on CPU.

Trains a small timm ``VisionTransformer`` (8x8 digits upsampled to 16x16,
2x2 patches: 64 patch tokens + class token) on scikit-learn's bundled handwritten digits
(no download), then evaluates the held-out accuracy of the trained model
patched with each mode over a range of ``r``, without retraining, as the
ToFu paper does for ImageNet. Several seeds, because one test image is
0.19 % of the test set.

    python bench/digits_accuracy.py            # writes bench/results/digits_accuracy.{json,md,png}

This is a small-scale sanity check of the ordering of the modes, not a
reproduction of the ToFu paper's ImageNet numbers
(ViT-B/16 r=16: ToMe 78.88 %, ToFu 80.70 % top-1).
"""
import argparse
import datetime
import json
import os
import platform
import sys
import time

import numpy as np
import timm
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from timm.models.vision_transformer import VisionTransformer
from tqdm import tqdm

import tofu_triton
import tofu_triton.patch

MODES = ("tofu", "tome", "prune", "mlerp")
BATCH = 32
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def load_data(seed: int):
    """Digits as float images [N, 1, 16, 16] in [0, 1] (8x8 upsampled bilinearly);
    a stratified 70/30 split."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(images, size=16, mode="bilinear")
    labels = torch.tensor(digits.target)
    train, test = train_test_split(np.arange(len(labels)), test_size=0.3, random_state=seed, stratify=digits.target)
    return images[train], labels[train], images[test], labels[test]


def make_model(depth: int) -> VisionTransformer:
    model = VisionTransformer(
        img_size=16, patch_size=2, in_chans=1, num_classes=10, embed_dim=64, depth=depth,
        num_heads=4, mlp_ratio=2.0, global_pool="token",
    )
    # Tokens of 8x8 digits carry little content (a 1-pixel token is a scaled
    # copy of one vector, nearly a sign after LayerNorm); with timm's position
    # embedding std (0.02) the model barely sees where a token is and does not
    # start learning for hundreds of steps on this CPU budget. Upsampling to
    # 16x16 with 2x2 patches (still 64 tokens) and a larger init fix that.
    with torch.no_grad():
        model.pos_embed.normal_(0.0, 0.5)
    return model


def shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to two pixels of 16 (one original pixel), zero padding, per image."""
    padded = F.pad(images, (2, 2, 2, 2))
    dy, dx = torch.randint(0, 5, (2, len(images)), generator=generator)
    return torch.stack([p[:, y : y + 16, x : x + 16] for p, y, x in zip(padded, dy.tolist(), dx.tolist())])


def train(model, images, labels, epochs: int, seed: int, quiet: bool = False) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    steps = epochs * ((len(images) + BATCH - 1) // BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    model.train()
    # A bar on a terminal (tqdm hides itself when stderr is not one), none with --quiet.
    for _ in tqdm(range(epochs), desc=f"seed {seed}: training", unit="epoch", disable=True if quiet else None):
        order = torch.randperm(len(images), generator=g)
        for start in range(0, len(images), BATCH):
            idx = order[start : start + BATCH]
            loss = F.cross_entropy(model(shift(images[idx], g)), labels[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


@torch.no_grad()
def accuracy(model, images, labels) -> float:
    return (model(images).argmax(-1) == labels).float().mean().item()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--r", type=int, nargs="+", default=[0, 2, 4, 6, 8, 10, 12])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: the small model gains nothing from more)")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    acc = {mode: {r: [] for r in args.r} for mode in MODES}
    tokens = {}
    train_seconds = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        x_train, y_train, x_test, y_test = load_data(seed)
        model = make_model(args.depth)
        start = time.perf_counter()
        train(model, x_train, y_train, args.epochs, seed, args.quiet)
        train_seconds.append(time.perf_counter() - start)
        tofu_triton.patch.timm(model, r=0)
        for mode in MODES:
            for r in args.r:
                model.r, model.tofu_mode = r, mode
                acc[mode][r].append(accuracy(model, x_test, y_test))
                tokens[r] = tofu_triton.patch.plan(model)[-1].n_out
        print(f"seed {seed}: trained in {train_seconds[-1]:.0f} s; "
              f"r=0 accuracy {acc['tofu'][args.r[0]][-1]:.4f}", flush=True)

    command = "python bench/digits_accuracy.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    result = {
        "date": datetime.date.today().isoformat(),
        "command": command,
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "tofu_triton": tofu_triton.__version__,
                     "python": platform.python_version()},
        "model": f"VisionTransformer(img_size=16, patch_size=2, in_chans=1, embed_dim=64, depth={args.depth}, "
                 "num_heads=4, mlp_ratio=2, global_pool='token'): 65 tokens",
        "data": f"sklearn load_digits, stratified 70/30 split per seed, {len(y_test)} test images",
        "test_images": len(y_test), "epochs": args.epochs, "seeds": args.seeds, "train_seconds": train_seconds,
        "final_tokens": {str(r): tokens[r] for r in args.r},
        "accuracy": {mode: {str(r): v for r, v in by_r.items()} for mode, by_r in acc.items()},
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "digits_accuracy.json"), "w") as f:
        json.dump(result, f, indent=2)
    write_markdown(result, args, acc, tokens, os.path.join(args.out, "digits_accuracy.md"))
    plot(args, acc, tokens, os.path.join(args.out, "digits_accuracy.png"))


def write_markdown(result, args, acc, tokens, path) -> None:
    mean = lambda v: 100 * float(np.mean(v))  # noqa: E731
    lines = [
        "# Off-the-shelf token reduction on a small ViT (sklearn digits)",
        "",
        f"Date: {result['date']}; torch {torch.__version__}, timm {timm.__version__}, CPU.",
        f"Command: `{result['command']}`",
        "",
        f"Model: {result['model']}. Data: {result['data']}. Trained {args.epochs} epochs "
        "(AdamW lr 3e-3 one-cycle, batch 32, ±1 original-pixel shifts, position embedding init std 0.5) "
        f"per seed, seeds {args.seeds}; then patched with each mode, no retraining. "
        f"`tofu` prunes in the first {args.depth // 2} of {args.depth} blocks, then mlerp.",
        "",
        "Held-out top-1 accuracy (%), mean over seeds (min–max in brackets):",
        "",
        "| r per layer | final tokens | " + " | ".join(MODES) + " |",
        "|---|---|" + "---|" * len(MODES),
    ]
    for r in args.r:
        cells = []
        best = max(mean(acc[m][r]) for m in MODES)
        for m in MODES:
            v = acc[m][r]
            cell = f"{mean(v):.2f} ({100 * min(v):.1f}–{100 * max(v):.1f})"
            cells.append(f"**{cell}**" if mean(v) == best and r else cell)
        lines.append(f"| {r} | {tokens[r]} | " + " | ".join(cells) + " |")
    reduced = [r for r in args.r if r > 0]
    if reduced:
        overall = {m: np.mean([mean(acc[m][r]) for r in reduced]) for m in MODES}
        lines.append("| mean over r > 0 | | " + " | ".join(f"{overall[m]:.2f}" for m in MODES) + " |")
    lines += [
        "",
        "Bold: best mode at that r (ties all bold). One test image is "
        f"{100 / result['test_images']:.2f} points; "
        "differences between modes smaller than the seed-to-seed spread are noise.",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(args, acc, tokens, path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for m in MODES:
        ys = [100 * np.mean(acc[m][r]) for r in args.r]
        ax.plot(args.r, ys, marker="o", label=m)
    ax.set_xlabel("r (tokens removed per layer)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(f"Digits ViT ({args.depth} blocks, 65 tokens), mean of {len(args.seeds)} seeds")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
