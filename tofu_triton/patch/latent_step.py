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

Plans (docs/design.md §5.5): the partition and the match of a merge (its
"plan") can be computed once and reused by the later merging blocks of the
same resolution (``reuse="step"``: a :class:`PlanBook` made for the call) and
over the next calls (``reuse=k``: a book over the calling thread's
:class:`PlanStore`). Whole-block mode (``whole_block``) merges the image
tokens once before a block and unmerges once after it (:class:`WholeBlock`).

Nothing here is stored on a module: a LatentStep lives for one block call, a
PlanBook for one denoiser call, a PlanStore for one thread's calls.
"""
import math
from typing import Callable, Dict, NamedTuple, Optional, Tuple, Union

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
    plans: Optional["PlanBook"] = None  # None: every merging block computes its own plan (reuse="none")
    whole_block: bool = False  # merge once before each merging block, unmerge once after it


class Plan(NamedTuple):
    """What a merge needs besides the tokens: the partition and the match (src -> dst) computed from one
    block's input."""

    partition: "ops.Partition"
    match: "ops.SpatialMatch"


class PlanStore:
    """One thread's plans kept across denoiser calls (``reuse=k``): the calls it has made and, per key, the
    call that computed a plan and the plan. Only its own thread touches it (see ``diffusers_models``)."""

    def __init__(self):
        self.calls = 0
        self.kept: Dict[tuple, Tuple[int, Plan]] = {}

    def book(self, every: int) -> "PlanBook":
        """The PlanBook of this thread's next call: plans younger than ``every`` calls are reused."""
        now, self.calls = self.calls, self.calls + 1
        for key in [key for key, (born, _) in self.kept.items() if now - born >= every]:
            del self.kept[key]  # expired: a later call of the same key recomputes it
        return PlanBook(self.kept, now, every)


class PlanBook:
    """The plans one denoiser call reuses, by key (the token grid, the batch, the device and the settings the
    plan depends on): the first merging block of a key computes its plan, the later ones reuse it.

    ``kept`` maps key -> (call it was computed in, plan); a fresh dict per call for ``reuse="step"``, the
    thread's :class:`PlanStore` for ``reuse=k`` (then a plan lives while ``now - born < every``)."""

    def __init__(self, kept: Optional[dict] = None, now: int = 0, every: int = 1):
        self.kept = {} if kept is None else kept
        self.now, self.every = now, every

    def get(self, key: tuple, make: Callable[[], Plan]) -> Plan:
        entry = self.kept.get(key)
        if entry is not None and self.now - entry[0] < self.every:
            return entry[1]
        plan = make()
        self.kept[key] = (self.now, plan)
        return plan


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

            def make() -> Plan:
                partition = ops.spatial_partition(h, w, call.sx, call.sy, seed=call.seed if call.use_rand else None,
                                                  step=call.step, block=index, device=x.device, backend=call.backend)
                return Plan(partition, ops.spatial_match(x, partition, int(x.shape[1] * call.ratio), call.backend))

            if call.plans is None:
                self.partition, self.match = make()
            else:  # everything the plan depends on but the tokens themselves
                key = (h, w, x.shape[0], x.device, call.ratio, call.sx, call.sy, call.use_rand, call.seed,
                       call.backend)
                self.partition, self.match = call.plans.get(key, make)

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


class WholeBlock:
    """What a block sees of its :class:`LatentStep` in whole-block mode: its input image tokens are merged once
    (:meth:`enter`), every sub-layer runs on the merged tokens with the block's own residual adds (``merge``
    is the identity, ``back`` a plain add), and only the block's update is unmerged (:meth:`leave`), so each
    token keeps its own residual stream. Rotary positions and proportional attention's key sizes are the
    step's."""

    merging = True

    def __init__(self, step: LatentStep):
        self.step, self.mode = step, step.mode

    def enter(self, x: Tensor) -> Tensor:
        """The block's input image tokens [B, N, C] -> merged [B, N - r, C]."""
        return self.step.merge(x)

    def leave(self, y: Tensor, merged: Tensor, x: Tensor) -> Tensor:
        """``x + u(y - merged)``: the block's output on the merged tokens ``y`` back to all N positions."""
        return self.step.back(y - merged, True, x)

    def merge(self, x: Tensor, on: bool = True) -> Tensor:
        return x

    def back(self, y: Tensor, on: bool, residual: Tensor) -> Tensor:
        return y + residual

    def positions(self) -> Tensor:
        return self.step.positions()

    def key_bias(self) -> Optional[Tensor]:
        return self.step.key_bias()


def begin(call: Call, step: LatentStep) -> Tuple[Union[LatentStep, WholeBlock], Tuple[bool, bool, bool]]:
    """What a patched block merges with and before which sub-layers (self-attention, cross-attention, MLP):
    the step itself and the call's flags; in whole-block mode a :class:`WholeBlock` and every sub-layer (all
    run on merged tokens); ToDo (no merge) and nothing."""
    if not step.merging:
        return step, (False, False, False)
    if call.whole_block:
        return WholeBlock(step), (True, True, True)
    return step, call.merges
