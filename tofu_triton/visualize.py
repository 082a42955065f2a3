"""Pictures of which patches ended up in which token (like the ToMe paper's figure).

Uses matplotlib's Agg canvas directly, so it never changes the user's
matplotlib backend and needs no display.
"""
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor


def merge_picture(image: Tensor, source: Tensor, grid: Tuple[int, int]) -> np.ndarray:
    """The merge picture of one image, as an [H, W, 3] float array in [0, 1].

    image: [3, H, W] float in [0, 1]; source: [N_out, N_patches] 0/1 (one
    image's rows of :func:`tofu_triton.patch.trace`; prefix rows, all 0, may
    stay in); grid: (rows, cols) of patches, rows * cols = N_patches.
    Each final token's patches are painted in the mean colour of the image
    over them, with a white line where two tokens meet; patches that a
    ``prune`` step dropped (held by no token) are shown dark grey (their
    mean brightness times 0.3), which :func:`save_merge_picture` labels.
    """
    rows, cols = grid
    source = source.detach().float().cpu()
    if source.shape[1] != rows * cols:
        raise ValueError(f"source has {source.shape[1]} patch columns, grid {grid} has {rows * cols}")
    img = image.detach().float().cpu().clamp(0, 1)
    _, height, width = img.shape
    ph, pw = height // rows, width // cols
    img = img[:, : rows * ph, : cols * pw]

    held = source.sum(0) > 0
    owner = torch.where(held, source.argmax(0), torch.full_like(held, -1, dtype=torch.long))  # [P]
    patch_colour = img.reshape(3, rows, ph, cols, pw).mean(dim=(2, 4)).reshape(3, -1)  # [3, P]
    counts = source.sum(1).clamp_min(1)
    token_colour = (source @ patch_colour.T) / counts[:, None]  # [N_out, 3]

    out = torch.where(held[:, None], token_colour[owner.clamp_min(0)], 0.3 * patch_colour.T.mean(1, keepdim=True))
    owner_grid = owner.reshape(rows, cols)
    picture = out.reshape(rows, cols, 3).repeat_interleave(ph, 0).repeat_interleave(pw, 1)
    owner_px = owner_grid.repeat_interleave(ph, 0).repeat_interleave(pw, 1)
    edge = torch.zeros_like(owner_px, dtype=torch.bool)
    edge[1:] |= owner_px[1:] != owner_px[:-1]
    edge[:, 1:] |= owner_px[:, 1:] != owner_px[:, :-1]
    picture[edge] = 1.0
    return picture.numpy()


def merge_figure(image: Tensor, source: Tensor, grid: Tuple[int, int], title: Optional[str] = None):
    """A matplotlib Figure of ``[input | merge picture]`` (arguments as in :func:`merge_picture`),
    with a legend for pruned patches when there are any."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    picture = merge_picture(image, source, grid)
    tokens = int((source.sum(1) > 0).sum())
    fig = Figure(figsize=(6.4, 3.4))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    left.imshow(image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy())
    left.set_title("input")
    right.imshow(picture)
    right.set_title(f"{tokens} tokens hold patches")
    if bool((source.sum(0) == 0).any()):  # some patches were pruned: say what the dark grey means
        from matplotlib.patches import Patch

        right.legend(handles=[Patch(facecolor=(0.3, 0.3, 0.3), edgecolor="white", label="pruned (held by no token)")],
                     loc="upper center", bbox_to_anchor=(0.5, -0.02), fontsize=8, frameon=False)
    for ax in (left, right):
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def save_merge_picture(
    path: str, image: Tensor, source: Tensor, grid: Tuple[int, int], title: Optional[str] = None
) -> str:
    """Write :func:`merge_figure` to a PNG at ``path``; returns ``path``."""
    merge_figure(image, source, grid, title).savefig(path, dpi=100)
    return path
