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


# --------------------------------------------------------------------------- Stable Diffusion latents

KEPT, MERGED, DESTINATION = 0, 1, 2  # roles of a latent token in one merge step (merge_roles)
_ROLE_NAMES = ("kept (not merged)", "merged into a destination", "destination")
_ROLE_COLOURS = ((0.85, 0.85, 0.85), (0.93, 0.55, 0.15), (0.12, 0.30, 0.65))


def merge_roles(partition, match, image: int = 0) -> Tuple[Tensor, Tensor]:
    """Role and holder of every grid position in one spatial merge step.

    partition, match: :func:`tofu_triton.reference.spatial_partition` and
    :func:`~tofu_triton.reference.spatial_match` of the step (match for a
    batch; ``image`` picks its row). Returns ``role`` [N] int64, one of
    :data:`KEPT` (an A token left alone), :data:`MERGED` (an A token folded
    into a destination), :data:`DESTINATION` (a B token), and ``holder`` [N]
    int64: the grid position whose token carries this position after the
    merge (the destination for a merged source, the position itself
    otherwise). Positions are row-major over the block's grid.
    """
    a_pos, b_pos = partition.a_pos.cpu(), partition.b_pos.cpu()
    n = a_pos.numel() + b_pos.numel()
    role = torch.full((n,), KEPT, dtype=torch.int64)
    holder = torch.arange(n)
    role[b_pos] = DESTINATION
    if match.r:
        # Read from the CSR lists (dst_start, dst_src): entry k of dst_src merges into the B token j
        # with dst_start[j] <= k < dst_start[j + 1].
        start = match.dst_start[image].cpu()
        dst = torch.repeat_interleave(torch.arange(b_pos.numel()), start[1:] - start[:-1])
        sources = a_pos[match.dst_src[image].cpu()]
        role[sources] = MERGED
        holder[sources] = b_pos[dst]
    return role, holder


def _holder_picture(holder: Tensor, role: Tensor, grid: Tuple[int, int], cell: int) -> np.ndarray:
    """[rows*cell, cols*cell, 3]: each group (a destination and its sources) in one colour, kept tokens
    light grey, white lines between groups. Colours follow the holder's grid position through a golden-ratio
    hue walk, so neighbouring groups differ."""
    import colorsys

    rows, cols = grid
    colours = np.empty((rows * cols, 3))
    for p in range(rows * cols):
        if role[p] == KEPT:
            colours[p] = _ROLE_COLOURS[KEPT]
        else:
            h = int(holder[p])
            colours[p] = colorsys.hsv_to_rgb((h * 0.6180339887) % 1.0, 0.65, 0.55 + 0.35 * ((h // cols) % 2))
    picture = colours.reshape(rows, cols, 3).repeat(cell, 0).repeat(cell, 1)
    owner = holder.reshape(rows, cols).numpy().repeat(cell, 0).repeat(cell, 1)
    if cell >= 3:  # at smaller cells the lines would hide the tokens
        edge = np.zeros(owner.shape, dtype=bool)
        edge[1:] |= owner[1:] != owner[:-1]
        edge[:, 1:] |= owner[:, 1:] != owner[:, :-1]
        picture[edge] = 1.0
    return picture


def latent_merge_figure(partition, match, grid: Tuple[int, int], title: Optional[str] = None, image: int = 0):
    """A matplotlib Figure of one spatial merge step on a ``grid`` = (rows, cols) of latent tokens:
    ``[role of each token | groups]`` (see :func:`merge_roles`), with a legend of the roles."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    rows, cols = grid
    role, holder = merge_roles(partition, match, image)
    if role.numel() != rows * cols:
        raise ValueError(f"the partition covers {role.numel()} tokens, grid {grid} has {rows * cols}")
    cell = max(1, 256 // max(rows, cols))
    roles = np.asarray(_ROLE_COLOURS)[role.numpy()].reshape(rows, cols, 3).repeat(cell, 0).repeat(cell, 1)
    fig = Figure(figsize=(7.0, 3.9))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    counts = [int((role == k).sum()) for k in range(3)]
    left.imshow(roles, interpolation="nearest")
    left.set_title(f"{rows}x{cols} tokens: {counts[MERGED]} merged", fontsize=9)
    right.imshow(_holder_picture(holder, role, grid, cell), interpolation="nearest")
    right.set_title(f"{rows * cols - counts[MERGED]} tokens after merging", fontsize=9)
    handles = [Patch(facecolor=_ROLE_COLOURS[k], edgecolor="black", label=f"{_ROLE_NAMES[k]} ({counts[k]})")
               for k in (DESTINATION, MERGED, KEPT)]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    for ax in (left, right):
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def save_latent_merge_picture(path: str, partition, match, grid: Tuple[int, int], title: Optional[str] = None,
                              image: int = 0) -> str:
    """Write :func:`latent_merge_figure` to a PNG at ``path``; returns ``path``."""
    latent_merge_figure(partition, match, grid, title, image).savefig(path, dpi=100)
    return path
