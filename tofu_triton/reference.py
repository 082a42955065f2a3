"""The definition of one Token Fusion step, in plain PyTorch (docs/design.md §1).

Every fused kernel in ``tofu_triton.kernels`` is tested against these
functions. They favour being obviously right over being fast: they build the
full ``Na x Nb`` score matrix and use ``argsort``/``scatter`` like ToMe does.

Token layout of one step, with ``p = protected`` prefix tokens::

    x[:, :p]          prefix (class/register tokens), never touched
    x[:, p::2]        set A (Na = ceil((N - p) / 2) tokens)
    x[:, p + 1::2]    set B (Nb = floor((N - p) / 2) tokens)

Output order (``N_out = N - r``): ``[prefix, unmerged A (ascending), B]``.

Choices made here (and followed by the kernels) where ToMe/ToFu leave it open:

* A NaN score counts as ``-inf``, in the row maximum and in the ranking, so a
  NaN can never produce an invalid index. A row whose scores are all NaN or
  ``-inf`` matches B token 0 (the smallest index attaining the maximum).
* Within one destination, sources are combined in ascending A position
  (``Match.dst_src``). For ``mlerp`` the gradient of the max-norm term goes
  to the contributor that attains it (split evenly on an exact tie, which is
  what ``scatter_reduce("amax")`` does).
* Sizes are float32. The returned size is always a tensor (all ones where the
  caller passed ``None`` and nothing was merged).
* ``x`` in float64 is accepted here (for ``gradcheck``); it accumulates in
  float64. Every other dtype accumulates in float32.
"""
import functools
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

MODES = ("mean", "mlerp", "prune")
EPS = 1e-12


class Match(NamedTuple):
    """Result of :func:`bipartite_match` for a batch (all index tensors int64).

    Indices into set A / set B are positions within that set (``0..Na-1`` /
    ``0..Nb-1``), not token positions; token ``p + 2*i`` is A position ``i``
    and token ``p + 2*j + 1`` is B position ``j``.
    """

    unm_idx: Tensor  # [B, Na - r]  A positions that stay, ascending
    src_idx: Tensor  # [B, r]       A positions merged away, best score first
    dst_idx: Tensor  # [B, r]       B position that src_idx[:, k] merges into
    dst_start: Tensor  # [B, Nb + 1] CSR offsets into dst_src, per B position
    dst_src: Tensor  # [B, r]       sources grouped by destination, ascending A position
    protected: int

    @property
    def r(self) -> int:
        return self.src_idx.shape[1]


def split_sizes(n: int, protected: int) -> Tuple[int, int]:
    """(Na, Nb): the sizes of sets A and B for ``n`` tokens."""
    rest = n - protected
    return (rest + 1) // 2, rest // 2


def effective_r(n: int, r: int, protected: int) -> int:
    """``r`` clamped to what one step can remove: at most Nb tokens."""
    return max(0, min(r, split_sizes(n, protected)[1]))


def match_scores(metric: Tensor, protected: int) -> Tuple[Tensor, Tensor]:
    """Best B partner of every A token.

    metric: [B, N, D] any float dtype.
    Returns node_max [B, Na] float32 (cosine similarity, NaN read as -inf) and
    node_idx [B, Na] int64 (smallest B position attaining node_max).
    """
    m = _unit_rows(metric)
    return best_partner(m[:, protected::2], m[:, protected + 1 :: 2])


def _unit_rows(metric: Tensor) -> Tensor:
    m = metric.float()
    return m / m.norm(dim=-1, keepdim=True).clamp_min(EPS)


def best_partner(a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor]:
    """a [B, Na, D], b [B, Nb, D] with unit rows: each A row's highest cosine with a
    B row (NaN read as -inf) and the smallest B index attaining it."""
    scores = a @ b.transpose(1, 2)  # [B, Na, Nb]: the matrix the fused path never builds
    scores.nan_to_num_(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    best = scores.max(dim=-1)  # the first maximum on a tie
    return best.values, best.indices


def select(node_max: Tensor, node_idx: Tensor, r: int, nb: int, protected: int) -> Match:
    """Rank A tokens by ``node_max`` (descending, stable) and take the first ``r``.

    node_max, node_idx: [B, Na] as returned by :func:`match_scores`; ``r`` must
    already be clamped to ``[0, nb]``.
    """
    order = node_max.argsort(dim=-1, descending=True, stable=True)
    src_idx = order[:, :r]
    unm_idx = order[:, r:].sort(dim=-1).values
    dst_idx = node_idx.gather(-1, src_idx)

    # Group sources by destination (ascending A position inside a group) so a
    # merge can read "the sources of B token j" as one contiguous slice.
    na = node_max.shape[1]
    by_dst = (dst_idx * na + src_idx).argsort(dim=-1)
    dst_src = src_idx.gather(-1, by_dst)
    dst_start = torch.zeros(dst_idx.shape[0], nb + 1, dtype=torch.int64, device=dst_idx.device)
    dst_start[:, 1:].scatter_add_(1, dst_idx, torch.ones_like(dst_idx))  # counts
    dst_start = dst_start.cumsum(dim=-1)
    return Match(unm_idx, src_idx, dst_idx, dst_start, dst_src, protected)


def bipartite_match(metric: Tensor, r: int, protected: int = 1) -> Match:
    """Bipartite soft matching of ToMe: which ``r`` A tokens go into which B tokens.

    metric: [B, N, D] float; ``r`` is clamped to Nb (an ``r`` of 0 gives an
    empty match). Indices do not depend on anything but ``metric``.
    """
    batch, n, _ = metric.shape
    na, nb = split_sizes(n, protected)
    r = effective_r(n, r, protected)
    if r == 0:  # nothing to rank (and no score matrix at all when Nb = 0)
        node_idx = torch.zeros(batch, na, dtype=torch.int64, device=metric.device)
        return select(node_idx.float(), node_idx, 0, nb, protected)
    node_max, node_idx = match_scores(metric, protected)
    return select(node_max, node_idx, r, nb, protected)


def gather_rows(t: Tensor, idx: Tensor) -> Tensor:
    """Rows ``idx`` of each batch: t [B, M, C], idx [B, K] -> [B, K, C]."""
    return t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))


def merge_tokens(
    x: Tensor, match: Match, size: Optional[Tensor] = None, mode: str = "mean"
) -> Tuple[Tensor, Tensor]:
    """Apply a match to ``x``.

    x: [B, N, C] float; size: [B, N, 1] float32 or None (all ones).
    Returns x_out [B, N - r, C] in x's dtype and size_out [B, N - r, 1] float32.
    mode: "mean" (ToMe's size-weighted average), "mlerp" (ToFu: the average's
    direction with the largest contributor norm) or "prune" (drop sources).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    p = match.protected
    if size is None:
        size = torch.ones(*x.shape[:2], 1, dtype=torch.float32, device=x.device)
    if match.r == 0:
        return x, size
    out, size_out = combine(x[:, p::2], x[:, p + 1 :: 2], size[:, p::2], size[:, p + 1 :: 2], match, mode)
    return torch.cat([x[:, :p], out], dim=1), torch.cat([size[:, :p], size_out], dim=1)


def combine(a: Tensor, b: Tensor, size_a: Tensor, size_b: Tensor, match: Match, mode: str) -> Tuple[Tensor, Tensor]:
    """The merge itself, on tokens already split into sets A [B, Na, C] and B [B, Nb, C]
    (sizes [B, Na, 1], [B, Nb, 1] float32): returns ([unmerged A ascending, B], their sizes)."""
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    unm = gather_rows(a, match.unm_idx)
    size_unm = gather_rows(size_a, match.unm_idx)
    if mode == "prune":
        b_out, size_b_out = b, size_b
    else:
        src = gather_rows(a, match.src_idx).to(acc)
        size_src = gather_rows(size_a, match.src_idx)
        dst = match.dst_idx[..., None]
        size_b_out = size_b.scatter_add(1, dst, size_src)
        total = (b.to(acc) * size_b).scatter_add(1, dst.expand_as(src), src * size_src)
        merged = total / size_b_out
        if mode == "mlerp":
            norm_b = b.to(acc).norm(dim=-1, keepdim=True)
            norm_max = norm_b.scatter_reduce(1, dst, src.norm(dim=-1, keepdim=True), "amax")
            merged = merged / merged.norm(dim=-1, keepdim=True).clamp_min(EPS) * norm_max
        # A B token that received nothing is copied bitwise, not rounded through acc.
        has_src = (match.dst_start[:, 1:] > match.dst_start[:, :-1])[..., None]
        b_out = torch.where(has_src, merged.to(a.dtype), b)
    return torch.cat([unm, b_out], dim=1), torch.cat([size_unm, size_b_out], dim=1)


def token_fusion(
    x: Tensor,
    metric: Tensor,
    r: int,
    size: Optional[Tensor] = None,
    mode: str = "mlerp",
    protected: int = 1,
) -> Tuple[Tensor, Tensor]:
    """One whole step: match on ``metric``, then merge ``x`` (see merge_tokens)."""
    return merge_tokens(x, bipartite_match(metric, r, protected), size, mode)


def head_mean(keys: Tensor) -> Tensor:
    """The metric of a ViT step: keys [B, H, N, D] averaged over heads -> [B, N, D] in keys' dtype.

    Defined to the bit, so the fused step computes exactly this: the heads
    summed in fp32 in head order, times ``1/H`` (one fp32 multiply), rounded
    once to the keys' dtype.
    """
    total = functools.reduce(torch.add, keys.float().unbind(1))
    return (total * (1.0 / keys.shape[1])).to(keys.dtype)


def log_size_bias(size: Tensor, dtype: torch.dtype) -> Tensor:
    """Proportional attention's bias: size [B, N, 1] float32 -> log(size) [B, 1, 1, N] in ``dtype``,
    added to every query's logit of each key (attending to a token of size s = attending to s copies)."""
    return size.log()[:, None, None, :, 0].to(dtype)


class Step(NamedTuple):
    """Result of :func:`token_fusion_step`."""

    x: Tensor  # [B, N - r, C]  the reduced tokens, in x's dtype
    size: Tensor  # [B, N - r, 1] float32
    bias: Optional[Tensor]  # [B, 1, 1, N - r] log(size) in the requested dtype, or None
    match: Optional[Match]  # None only where the caller said it needs none (ops.token_fusion_step)


def token_fusion_step(x: Tensor, keys: Tensor, r: int, size: Optional[Tensor] = None, mode: str = "mlerp",
                      protected: int = 1, bias_dtype: Optional[torch.dtype] = None) -> Step:
    """One step of a ViT block from its attention keys, what the one-launch
    kernel computes: the metric is :func:`head_mean` of ``keys`` [B, H, N, D],
    then :func:`bipartite_match` and :func:`merge_tokens` of ``x`` [B, N, C];
    with ``bias_dtype``, also :func:`log_size_bias` of the new sizes for the
    next block's attention. ``r`` is clamped to Nb."""
    match = bipartite_match(head_mean(keys), r, protected)
    x, size = merge_tokens(x, match, size, mode)
    return Step(x, size, None if bias_dtype is None else log_size_bias(size, bias_dtype), match)


# --------------------------------------------------------------------------- the Stable Diffusion step
# docs/design.md §5: tokens are an h x w grid; each full sy x sx cell gives one
# destination (set B), every other token is a source candidate (set A). The
# step merges r of them, the sub-layer runs on N - r tokens, and the result is
# unmerged back to N rows.


class Partition(NamedTuple):
    """Which grid positions form set A and set B (int64, shared by the batch)."""

    a_pos: Tensor  # [Na] positions of the A tokens, ascending
    b_pos: Tensor  # [Nb] positions of the B tokens, ascending
    slot: Tensor  # [N]  inverse map: position a_pos[i] -> i, position b_pos[j] -> Na + j


class SpatialMatch(NamedTuple):
    """Result of :func:`spatial_match` (all int64). As :class:`Match`, indices
    into A / B are list positions (``partition.a_pos[i]`` is the grid
    position of A token ``i``). Merged output order: ``[unmerged A ascending, B]``."""

    unm_idx: Tensor  # [B, Na - r]  A tokens that stay, ascending
    dst_start: Tensor  # [B, Nb + 1] CSR offsets into dst_src, per B token
    dst_src: Tensor  # [B, r]       sources grouped by destination, ascending inside a group
    a_row: Tensor  # [B, Na]      merged-output row holding A token i: its rank among the kept,
    #                               or Na - r + its destination for a source

    @property
    def r(self) -> int:
        return self.dst_src.shape[1]


_MASK63 = (1 << 63) - 1


def _mix(z: Tensor) -> Tensor:
    """splitmix64's finalizer on int64 tensors (multiplications wrap; shifts made logical)."""
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * -4658895280553007687  # 0xBF58476D1CE4E5B9 as int64
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * -7723592293110705685  # 0x94D049BB133111EB as int64
    return z ^ ((z >> 31) & ((1 << 33) - 1))


def cell_choice(seed: int, step: Tensor, block: int, cells: Tuple[int, int], k: int) -> Tensor:
    """[hsy, wsx] int64 in [0, k): the random destination of each cell, a counter-based hash of
    (seed, step, block, cell); step is an int64 scalar tensor (the denoising step)."""
    hsy, wsx = cells
    idx = torch.arange(hsy * wsx, device=step.device, dtype=torch.int64)
    z = _mix(idx + _mix(step.to(torch.int64) * 1000003 + block * 7919 + seed))
    return ((z & _MASK63) % k).reshape(hsy, wsx)


def spatial_partition(h: int, w: int, sx: int, sy: int, choice: Optional[Tensor] = None,
                      device=None) -> Partition:
    """The partition of an ``h x w`` grid into sy x sx cells.

    choice: [h // sy, w // sx] int64 in [0, sx * sy): which token of each full
    cell is its destination (row-major inside the cell); None = the top-left.
    Tokens outside full cells are all in A.
    """
    hsy, wsx = h // sy, w // sx
    if choice is None:
        choice = torch.zeros(hsy, wsx, dtype=torch.int64, device=device)
    ys = torch.arange(hsy, device=choice.device)[:, None] * sy + choice // sx
    xs = torch.arange(wsx, device=choice.device)[None, :] * sx + choice % sx
    is_b = torch.zeros(h * w, dtype=torch.int32, device=choice.device)
    is_b[(ys * w + xs).reshape(-1)] = 1
    # A stable sort puts the A positions (0) first and the B positions (1) after,
    # each ascending; sizes known from the grid, so no data-dependent shapes.
    order = torch.sort(is_b, stable=True).indices
    na = h * w - hsy * wsx
    slot = torch.empty_like(order).scatter_(0, order, torch.arange(h * w, device=order.device))
    return Partition(order[:na], order[na:], slot)


def spatial_match(metric: Tensor, partition: Partition, r: int) -> SpatialMatch:
    """Which ``r`` A tokens merge into which B tokens.

    metric: [B, N, D] float; ``r`` is clamped to Na (and to 0 when Nb = 0).
    Scores, ranking and ties as in :func:`bipartite_match`.
    """
    na, nb = partition.a_pos.numel(), partition.b_pos.numel()
    r = max(0, min(r, na)) if nb else 0
    if r == 0:
        zeros = torch.zeros(metric.shape[0], na, dtype=torch.int64, device=metric.device)
        return to_spatial(select(zeros.float(), zeros, 0, nb, 0))
    return to_spatial(select(*spatial_scores(metric, partition), r, nb, 0))


def spatial_scores(metric: Tensor, partition: Partition) -> Tuple[Tensor, Tensor]:
    """Best B partner of every A token, as :func:`match_scores` (needs Nb >= 1):
    node_max [B, Na] float32, node_idx [B, Na] int64."""
    m = _unit_rows(metric)
    return best_partner(m[:, partition.a_pos], m[:, partition.b_pos])


def to_spatial(match: Match) -> SpatialMatch:
    """A :class:`Match` (protected = 0, from :func:`select`) as a :class:`SpatialMatch`."""
    batch, n_unm = match.unm_idx.shape
    a_row = torch.empty(batch, n_unm + match.r, dtype=torch.int64, device=match.unm_idx.device)
    a_row.scatter_(1, match.unm_idx, torch.arange(n_unm, device=a_row.device).expand(batch, -1))
    a_row.scatter_(1, match.src_idx, n_unm + match.dst_idx)
    return SpatialMatch(match.unm_idx, match.dst_start, match.dst_src, a_row)


def _as_match(match: SpatialMatch) -> Match:
    """The :class:`Match` (protected = 0) with the same sources, listed in ``dst_src`` order."""
    k = torch.arange(match.r, device=match.dst_src.device).expand_as(match.dst_src).contiguous()
    dst_idx = torch.searchsorted(match.dst_start[:, 1:].contiguous(), k, right=True)
    return Match(match.unm_idx, match.dst_src, dst_idx, match.dst_start, match.dst_src, 0)


def spatial_merge(x: Tensor, match: SpatialMatch, partition: Partition, mode: str = "mean") -> Tensor:
    """x [B, N, C] -> [B, N - r, C]: [unmerged A tokens ascending, B tokens], sizes all 1."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if match.r == 0:
        return x
    ones = torch.ones(*x.shape[:2], 1, dtype=torch.float32, device=x.device)
    a, b = x[:, partition.a_pos], x[:, partition.b_pos]
    return combine(a, b, ones[:, partition.a_pos], ones[:, partition.b_pos], _as_match(match), mode)[0]


def output_rows(match: SpatialMatch, partition: Partition) -> Tensor:
    """[B, N] int64: the merged-output row that holds each grid position (a merged
    or pruned source is held by its destination's row)."""
    n_unm = match.unm_idx.shape[1]
    b_rows = n_unm + torch.arange(partition.b_pos.numel(), device=match.a_row.device)
    rows = torch.cat([match.a_row, b_rows.expand(match.a_row.shape[0], -1)], dim=1)  # indexed by slot
    return rows[:, partition.slot]


def spatial_unmerge(y: Tensor, match: SpatialMatch, partition: Partition, residual: Optional[Tensor] = None) -> Tensor:
    """y [B, N - r, C] (the order of :func:`spatial_merge`) -> [B, N, C]: every grid
    position gets the row of the token that holds it, plus ``residual`` [B, N, C]
    if given (the block's skip connection, added in y's dtype)."""
    out = y if match.r == 0 else gather_rows(y, output_rows(match, partition))
    return out if residual is None else out + residual
