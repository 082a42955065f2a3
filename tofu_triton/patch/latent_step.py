"""The step every patched diffusers block runs on its image tokens (docs/design.md §5, §5.2-§5.4).

One :class:`Call` travels with each denoiser call (the latent's token grid,
the denoising step, the settings as they were when the call began); each
patched block builds one :class:`LatentStep` from its input image tokens and uses
it around the sub-layers it merges:

* merge modes (``mean`` / ``mlerp`` / ``prune``): partition the token grid
  into cells, match, ``merge`` before a sub-layer, ``back`` (unmerge + the
  block's residual) after it; :meth:`LatentStep.key_bias` and
  :meth:`LatentStep.positions` give proportional attention its ``log(size)`` and
  rotary embeddings the grid position of every merged token;
* ``todo``: nothing is merged; :meth:`LatentStep.pool` average-pools keys and
  values over the same cells (ToDo), and :meth:`LatentStep.key_bias` gives the
  pooled keys their sizes.

Nothing here is stored on a module: a LatentStep lives for one block call.
"""
import math
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops

CALL_KEY = "tofu_triton"  # where the Call travels in cross_attention_kwargs / joint_attention_kwargs


class Call(NamedTuple):
    """What one denoiser call tells its blocks: the image's token grid and step, and the settings."""

    height: int  # token grid of the image at full resolution: UNet latent, or DiT patch grid
    width: int
    step: Tensor  # int64 scalar: the denoising step, for the random destinations
    modes: Tuple[Optional[str], ...]  # per block in forward order: "mean" | "mlerp" | "prune" | "todo" | None
    ratio: float
    sx: int
    sy: int
    use_rand: bool
    seed: int
    merges: Tuple[bool, bool, bool]  # merge before self-attention, cross-attention, MLP
    prop_attn: bool
    backend: str


def grid_at(call: Call, factor: int, n: int) -> Tuple[int, int]:
    """The token grid (h, w) of a block at 1/``factor`` of the call's resolution; ValueError unless it has ``n``."""
    h, w = math.ceil(call.height / factor), math.ceil(call.width / factor)
    if h * w != n:
        raise ValueError(f"a transformer block at 1/{factor} resolution got {n} image tokens, but a {call.height}x"
                         f"{call.width} token grid gives {h}x{w} there: this model's layout is not supported")
    return h, w


def pooled_sizes(h: int, w: int, sy: int, sx: int, device=None) -> Tensor:
    """[ceil(h/sy) * ceil(w/sx)] float32: how many grid tokens each cell of :func:`pool_grid` averages."""
    rows = torch.full((math.ceil(h / sy),), float(sy), device=device)
    cols = torch.full((math.ceil(w / sx),), float(sx), device=device)
    if h % sy:
        rows[-1] = h % sy
    if w % sx:
        cols[-1] = w % sx
    return (rows[:, None] * cols[None, :]).reshape(-1)


def pool_grid(x: Tensor, h: int, w: int, sy: int, sx: int) -> Tensor:
    """Average-pool row-major grid tokens over ``sy x sx`` cells: [..., h*w, C] -> [..., ceil(h/sy)*ceil(w/sx), C].

    Cells cut by the grid's edge average the tokens they hold (no padding
    counted), so every token is represented. Same dtype as ``x``.
    """
    lead, c = x.shape[:-2], x.shape[-1]
    grid = x.reshape(-1, h, w, c).permute(0, 3, 1, 2)
    pooled = F.avg_pool2d(grid, (sy, sx), stride=(sy, sx), ceil_mode=True)
    return pooled.permute(0, 2, 3, 1).reshape(*lead, -1, c)


class LatentStep:
    """One block call's merge (or ToDo pooling) of its image tokens.

    x: the block's input image tokens [B, N, C] (the similarity metric, as
    tomesd: before the block's first norm), on the ``grid`` (h, w), h*w = N.
    For merge modes ``r = int(N * call.ratio)`` tokens merge, clamped as in
    :func:`tofu_triton.ops.spatial_match`.
    """

    def __init__(self, call: Call, index: int, mode: str, x: Tensor, grid: Tuple[int, int]):
        self.mode, self.grid, self.backend = mode, grid, call.backend
        self.cells = (call.sy, call.sx)
        self.prop_attn, self.batch, self.device = call.prop_attn, x.shape[0], x.device
        self.match = self.partition = None
        if mode != "todo":
            h, w = grid
            self.partition = ops.spatial_partition(h, w, call.sx, call.sy, seed=call.seed if call.use_rand else None,
                                                   step=call.step, block=index, device=x.device,
                                                   backend=call.backend)
            self.match = ops.spatial_match(x, self.partition, int(x.shape[1] * call.ratio), call.backend)

    @property
    def merging(self) -> bool:
        """True in the merge modes (False for ToDo)."""
        return self.match is not None

    def merge(self, x: Tensor, on: bool = True) -> Tensor:
        """[B, N, C] -> [B, N - r, C]: [kept sources ascending, destinations]; ``x`` itself when ``not on``."""
        if not on:
            return x
        return ops.spatial_merge(x, self.match, self.partition, self.mode, self.backend)

    def back(self, y: Tensor, on: bool, residual: Tensor) -> Tensor:
        """``residual + u(y)``: every position gets the merged row that holds it ([B, N, C]); a plain add when
        ``not on``. The add is in y's dtype, as the block's own residual add."""
        if not on:
            return y + residual
        return ops.spatial_unmerge(y, self.match, self.partition, residual, self.backend)

    def positions(self) -> Tensor:
        """[B, N - r] int64: the grid position each merged row is rotated by (its destination's for a merged
        token, its own for a kept source)."""
        batch = self.match.unm_idx.shape[0]
        kept = self.partition.a_pos[self.match.unm_idx]
        return torch.cat([kept, self.partition.b_pos.expand(batch, -1)], dim=1)

    def pool(self, x: Tensor) -> Tensor:
        """ToDo: keys or values [..., N, C] average-pooled over the cells -> [..., N', C]."""
        return pool_grid(x, *self.grid, *self.cells)

    def key_bias(self) -> Optional[Tensor]:
        """Proportional attention's ``log(size)`` of each image key, float32 [B, N_keys], or None where
        every size is 1 by construction (``prop_attn`` off, ``prune``, nothing merged): no bias at all then.

        Merge modes: a kept source stands for 1 token, a destination for 1 +
        its sources (``mean`` / ``mlerp``). ToDo: a pooled key for the tokens
        of its cell.
        """
        if not self.prop_attn:
            return None
        if self.mode == "todo":
            return pooled_sizes(*self.grid, *self.cells, device=self.device).log().expand(self.batch, -1)
        if self.mode == "prune" or self.match.r == 0:
            return None
        dst_start = self.match.dst_start
        kept = torch.ones_like(self.match.unm_idx, dtype=torch.float32)
        merged = 1 + (dst_start[:, 1:] - dst_start[:, :-1]).float()
        return torch.cat([kept, merged], dim=1).log()
