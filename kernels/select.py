"""Select: which A tokens become sources, and the sources grouped by destination
(reference.select / reference.spatial_match, docs/design.md §1.3, §3, §5.1).

Two kernels, no atomics, deterministic:

* ``_select_kernel`` (ViT): one program per image ranks by counting
  (``common.rank_select``), O(Na^2) compares: nothing at ViT sizes (Na <= 513).
* ``_spatial_select_kernel`` (Stable Diffusion, Na up to ~50k per image): one
  program per ``dst_block`` destinations, each also owning an equal slice of
  A, with no communication between programs: every program finds the same
  top-r threshold on its own by a radix select (O(Na) per pass), then builds
  its destinations' CSR lists and its slice of A. Candidate "radix64".

The spatial select has more candidates: "fused" (``_spatial_select_fused_kernel``:
one program per image, the radix threshold once, then a counting sort by
destination with cursors in scratch memory), and two without a Triton kernel:
"sort" (``spatial_select_sort``: two stable device sorts and a few elementwise
ops) and "topk" (``spatial_select_topk``: a top-k threshold instead of the
first sort). Which one runs on a card is measured by bench/tournament_sd.py
(docs/design.md §5.1); ``SPATIAL_SELECT_CANDIDATES`` names them.
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .common import cdiv, empty, next_power_of_2, on_device, order_key, plain, rank_select

SELECT_BLOCK = 64  # lanes of the ViT select's counting tiles
SELECT_WARPS = 4


class SpatialSelectSettings(NamedTuple):
    """Tile sizes of the spatial select (the defaults are what ships and what the
    ahead-of-time compile checks; tests pass small ones to exercise many programs)."""

    dst_block: int = 64  # destinations per program: 16 programs per image at N = 4096 (2x2 cells), 256 at 65536
    block: int = 2048  # A tokens per tile of the threshold and A-slice passes
    route_block: int = 64  # A tokens per tile of the routing passes (a route_block x dst_block one-hot)
    num_warps: int = 8


SPATIAL_SELECT = SpatialSelectSettings()


@triton.jit
def _select_kernel(
    node_max_ptr, node_idx_ptr,
    unm_idx_ptr, src_idx_ptr, dst_idx_ptr, dst_start_ptr, dst_src_ptr,
    NA, NB, R,
    BLOCK: tl.constexpr,
):
    batch = tl.program_id(0).to(tl.int64)
    rank_select(node_max_ptr + batch * NA, node_idx_ptr + batch * NA, unm_idx_ptr + batch * (NA - R),
                src_idx_ptr + batch * R, dst_idx_ptr + batch * R, dst_start_ptr + batch * (NB + 1),
                dst_src_ptr + batch * R, NA, NB, R, BLOCK)


@triton.jit
def _radix_threshold(node_max_ptr, NA, R, IDX_BITS: tl.constexpr, BLOCK: tl.constexpr):
    """The key of the R-th best A token (1 <= R <= NA): a most-significant-digit
    radix select, 8 bits a pass. Each pass histograms the next digit of the
    keys that share the digits found so far and picks the digit holding the
    R-th largest, so the cost is O(NA) per pass whatever the data."""
    prefix = tl.zeros([], dtype=tl.int64)
    k = R  # rank of the wanted key among the keys that share the prefix
    bins = tl.arange(0, 256)
    lanes = tl.arange(0, BLOCK)
    for d in tl.static_range((32 + IDX_BITS) // 8):
        shift = 24 + IDX_BITS - 8 * d  # of this digit (constexpr)
        hist = tl.zeros([256], dtype=tl.int32)
        for i0 in range(0, NA, BLOCK):
            offs = i0 + lanes
            mask = offs < NA
            key = order_key(node_max_ptr, offs, mask, IDX_BITS)
            same = mask & ((key >> (shift + 8)) == (prefix >> (shift + 8)))
            hist += tl.histogram(((key >> shift) & 255).to(tl.int32), 256, mask=same)
        at_least = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist  # keys with this digit or larger
        digit = tl.max(tl.where(at_least >= k, bins, -1), axis=0)
        k -= tl.sum(tl.where(bins > digit, hist, 0), axis=0)
        prefix = prefix | (digit.to(tl.int64) << shift)
    return prefix


@triton.jit
def _route_sources(node_max_ptr, node_idx_ptr, dst_src_ptr, threshold, cursor, NA, a_lo, b_lo,
                   IDX_BITS: tl.constexpr, PLACE: tl.constexpr, BLOCK: tl.constexpr, DST_BLOCK: tl.constexpr):
    """One pass over all A tokens in index order, for the sources whose
    destination is one of this program's ``DST_BLOCK`` destinations
    ``b_lo + d``: ``cursor[d]`` (registers) advances by one per source of
    ``b_lo + d``, and with PLACE each source is first written at
    ``dst_src[cursor]``, so the sources of a destination land in index order.
    Returns the cursors, how many A tokens before ``a_lo`` are kept and how
    many sources go to destinations before ``b_lo``."""
    lanes = tl.arange(0, BLOCK)
    mine = b_lo + tl.arange(0, DST_BLOCK)
    kept_before = 0
    dst_before = 0
    for i0 in range(0, NA, BLOCK):
        offs = i0 + lanes
        mask = offs < NA
        is_src = mask & (order_key(node_max_ptr, offs, mask, IDX_BITS) >= threshold)
        dst = tl.load(node_idx_ptr + offs, mask=mask, other=0)
        kept_before += tl.sum((mask & ~is_src & (offs < a_lo)).to(tl.int32), axis=0)
        dst_before += tl.sum((is_src & (dst < b_lo)).to(tl.int32), axis=0)
        # hit[i, d]: token i is a source of destination b_lo + d (a one-hot row, or all zeros)
        hit = ((dst[:, None] == mine[None, :]) & is_src[:, None]).to(tl.int32)
        if PLACE:
            # Slot of source i: its destination's cursor plus the earlier sources
            # of that destination in this tile.
            slot = tl.sum((cursor[None, :] + tl.cumsum(hit, axis=0) - hit) * hit, axis=1)
            tl.store(dst_src_ptr + slot, offs.to(tl.int64), mask=tl.sum(hit, axis=1) > 0)
        cursor += tl.sum(hit, axis=0)
    return cursor, kept_before, dst_before


@triton.jit
def _spatial_select_kernel(
    node_max_ptr, node_idx_ptr,
    unm_idx_ptr, dst_start_ptr, dst_src_ptr, a_row_ptr,
    NA, NB, R, NPROG, SLICE_A,
    IDX_BITS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_ROUTE: tl.constexpr, DST_BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    batch = (pid // NPROG).to(tl.int64)
    p = pid % NPROG
    node_max_ptr += batch * NA
    node_idx_ptr += batch * NA
    unm_idx_ptr += batch * (NA - R)
    dst_start_ptr += batch * (NB + 1)
    dst_src_ptr += batch * R
    a_row_ptr += batch * NA
    a_lo = p * SLICE_A
    a_hi = tl.minimum(a_lo + SLICE_A, NA)
    b_lo = p * DST_BLOCK

    # A token i is a source iff its key >= the R-th largest key.
    threshold = _radix_threshold(node_max_ptr, NA, R, IDX_BITS, BLOCK)

    # My destinations: count their sources, turn the counts into CSR offsets
    # (after every source of an earlier destination), then place the sources.
    counts, kept_before, before = _route_sources(
        node_max_ptr, node_idx_ptr, dst_src_ptr, threshold, tl.zeros([DST_BLOCK], dtype=tl.int32),
        NA, a_lo, b_lo, IDX_BITS, False, BLOCK_ROUTE, DST_BLOCK)
    first = before + tl.cumsum(counts, axis=0) - counts
    offs_j = b_lo + tl.arange(0, DST_BLOCK)
    tl.store(dst_start_ptr + offs_j, first.to(tl.int64), mask=offs_j < NB)
    if p == 0:
        tl.store(dst_start_ptr + NB, tl.zeros([], dtype=tl.int64) + R)
    _route_sources(node_max_ptr, node_idx_ptr, dst_src_ptr, threshold, first,
                   NA, a_lo, b_lo, IDX_BITS, True, BLOCK_ROUTE, DST_BLOCK)

    # My slice of A: kept tokens in ascending order, and every token's output row.
    n_kept = kept_before
    lanes = tl.arange(0, BLOCK)
    for i0 in range(a_lo, a_hi, BLOCK):
        offs = i0 + lanes
        mask = offs < a_hi
        keep = mask & (order_key(node_max_ptr, offs, mask, IDX_BITS) < threshold)
        pos = n_kept + tl.cumsum(keep.to(tl.int32), axis=0) - 1
        tl.store(unm_idx_ptr + pos, offs.to(tl.int64), mask=keep)
        dst = tl.load(node_idx_ptr + offs, mask=mask, other=0)
        tl.store(a_row_ptr + offs, tl.where(keep, pos.to(tl.int64), NA - R + dst), mask=mask)
        n_kept += tl.sum(keep.to(tl.int32), axis=0)


@triton.jit
def _spatial_select_fused_kernel(
    node_max_ptr, node_idx_ptr,
    unm_idx_ptr, dst_start_ptr, dst_src_ptr, a_row_ptr, cursor_ptr,
    NA, NB, R,
    IDX_BITS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_T: tl.constexpr, NB_BLOCK: tl.constexpr,
):
    """One program per image ("fused" candidate): the threshold as ``_radix_threshold``,
    then a counting sort of the sources by destination: a histogram of the
    destinations gives ``dst_start``, and a second pass in index order places
    each source at its destination's cursor (scratch memory, this program's
    only) plus its rank among the earlier sources of that destination in the
    tile. Barriers order the cursor reads and writes; no atomics."""
    batch = tl.program_id(0).to(tl.int64)
    node_max_ptr += batch * NA
    node_idx_ptr += batch * NA
    unm_idx_ptr += batch * (NA - R)
    dst_start_ptr += batch * (NB + 1)
    dst_src_ptr += batch * R
    a_row_ptr += batch * NA
    cursor_ptr += batch * NB_BLOCK
    threshold = _radix_threshold(node_max_ptr, NA, R, IDX_BITS, BLOCK)

    # Kept tokens (ascending) and every token's output row; the sources' count per destination.
    counts = tl.zeros([NB_BLOCK], dtype=tl.int32)
    n_kept = 0
    lanes = tl.arange(0, BLOCK)
    for i0 in range(0, NA, BLOCK):
        offs = i0 + lanes
        mask = offs < NA
        is_src = mask & (order_key(node_max_ptr, offs, mask, IDX_BITS) >= threshold)
        keep = mask & ~is_src
        dst = tl.load(node_idx_ptr + offs, mask=mask, other=0)
        counts += tl.histogram(dst.to(tl.int32), NB_BLOCK, mask=is_src)
        pos = n_kept + tl.cumsum(keep.to(tl.int32), axis=0) - 1
        tl.store(unm_idx_ptr + pos, offs.to(tl.int64), mask=keep)
        tl.store(a_row_ptr + offs, tl.where(keep, pos.to(tl.int64), NA - R + dst), mask=mask)
        n_kept += tl.sum(keep.to(tl.int32), axis=0)
    first = tl.cumsum(counts, axis=0) - counts
    bins = tl.arange(0, NB_BLOCK)
    tl.store(dst_start_ptr + bins, first.to(tl.int64), mask=bins < NB)
    tl.store(dst_start_ptr + NB, tl.zeros([], dtype=tl.int64) + R)
    tl.store(cursor_ptr + bins, first)
    tl.debug_barrier()  # the cursors visible to every thread of the program

    # Sources in index order, each at its destination's cursor plus its rank among the
    # earlier sources of that destination in this tile; then each destination's last
    # source in the tile advances the cursor past the tile's sources.
    t = tl.arange(0, BLOCK_T)
    for i0 in range(0, NA, BLOCK_T):
        offs = i0 + t
        mask = offs < NA
        is_src = mask & (order_key(node_max_ptr, offs, mask, IDX_BITS) >= threshold)
        dst = tl.load(node_idx_ptr + offs, mask=mask, other=0)
        same = (dst[:, None] == dst[None, :]) & is_src[None, :]
        rank = tl.sum((same & (t[None, :] < t[:, None])).to(tl.int32), axis=1)
        later = tl.sum((same & (t[None, :] > t[:, None])).to(tl.int32), axis=1)
        slot = tl.load(cursor_ptr + dst, mask=is_src, other=0) + rank
        tl.store(dst_src_ptr + slot, offs.to(tl.int64), mask=is_src)
        tl.debug_barrier()  # every cursor of this tile read before any is advanced
        tl.store(cursor_ptr + dst, slot + 1, mask=is_src & (later == 0))
        tl.debug_barrier()  # the advanced cursors visible to the next tile


def select(node_max: torch.Tensor, node_idx: torch.Tensor, r: int, nb: int, wrap=plain, out=None):
    """Launch the ViT select: node_max [B, Na] fp32 (no NaN), node_idx [B, Na] int64
    (contiguous), ``r`` in [1, nb]. Returns (unm_idx [B, Na-r], src_idx [B, r],
    dst_idx [B, r], dst_start [B, nb+1], dst_src [B, r]), int64 (reference.Match):
    new tensors, or ``out`` (five contiguous tensors of those shapes) filled."""
    batch, na = node_max.shape
    dev = node_max.device
    if out is None:
        out = [empty(batch, k, dtype=torch.int64, device=dev) for k in (na - r, r, r, nb + 1, r)]
    unm_idx, src_idx, dst_idx, dst_start, dst_src = out
    with on_device(node_max):
        wrap(_select_kernel)[(batch,)](
            node_max, node_idx, unm_idx, src_idx, dst_idx, dst_start, dst_src,
            na, nb, r, BLOCK=SELECT_BLOCK, num_warps=SELECT_WARPS,
        )
    return unm_idx, src_idx, dst_idx, dst_start, dst_src


def idx_bits(na: int) -> int:
    """Bits of the spatial select key's index part: the smallest multiple of 8 that holds ``na - 1``."""
    for bits in (8, 16, 24):
        if na <= 1 << bits:
            return bits
    raise ValueError(f"the spatial select supports up to {1 << 24} A tokens per image, got {na}")


def spatial_select(node_max: torch.Tensor, node_idx: torch.Tensor, r: int, nb: int, wrap=plain,
                   settings: SpatialSelectSettings = SPATIAL_SELECT):
    """Launch the spatial select: node_max [B, Na] fp32 (no NaN), node_idx [B, Na]
    int64 in [0, nb) (contiguous), ``r`` in [1, Na]. Returns (unm_idx [B, Na-r],
    dst_start [B, nb+1], dst_src [B, r], a_row [B, Na]), int64 (reference.SpatialMatch)."""
    batch, na = node_max.shape
    dev = node_max.device
    nprog = cdiv(nb, settings.dst_block)
    unm_idx = empty(batch, na - r, dtype=torch.int64, device=dev)
    dst_start = empty(batch, nb + 1, dtype=torch.int64, device=dev)
    dst_src = empty(batch, r, dtype=torch.int64, device=dev)
    a_row = empty(batch, na, dtype=torch.int64, device=dev)
    with on_device(node_max):
        wrap(_spatial_select_kernel)[(batch * nprog,)](
            node_max, node_idx, unm_idx, dst_start, dst_src, a_row,
            na, nb, r, nprog, cdiv(na, nprog),
            IDX_BITS=idx_bits(na), BLOCK=settings.block, BLOCK_ROUTE=settings.route_block,
            DST_BLOCK=settings.dst_block, num_warps=settings.num_warps,
        )
    return unm_idx, dst_start, dst_src, a_row


def spatial_select_sort(node_max: torch.Tensor, node_idx: torch.Tensor, r: int, nb: int):
    """The spatial select from sorts ("sort" candidate): the same inputs and outputs as
    ``spatial_select``, bit for bit, for any Na (no 2^24 limit).

    One stable descending sort of the scores gives the order (the reference's
    argsort; -0.0 is first folded into +0.0 so the two tie, NaN never reaches
    here); a second stable sort of the destinations, with the kept tokens sent
    past the last one, lists the sources grouped by destination in index order.
    Binary searches replace the scatters of the reference (a scatter with
    repeated indices is not deterministic on CUDA): the kept tokens are where
    the running count of kept tokens steps up, and a destination's start is
    how many sources go to smaller destinations. Fixed shapes, no host sync
    (CUDA-graph safe), no atomics."""
    batch, na = node_max.shape
    dev = node_max.device
    order = torch.sort(node_max + 0.0, dim=-1, descending=True, stable=True).indices
    keep = torch.ones(batch, na, dtype=torch.bool, device=dev).scatter_(1, order[:, :r], False)
    kept_upto = keep.cumsum(dim=-1)  # kept tokens up to and including i
    a_row = torch.where(keep, kept_upto - 1, na - r + node_idx)
    ranks = torch.arange(1, na - r + 1, device=dev).expand(batch, -1).contiguous()
    unm_idx = torch.searchsorted(kept_upto, ranks)  # first i holding k kept tokens: the k-th kept token
    by_dst = torch.sort(torch.where(keep, nb, node_idx), dim=-1, stable=True)
    dst_src = by_dst.indices[:, :r].contiguous()
    starts = torch.arange(nb + 1, device=dev).expand(batch, -1).contiguous()
    dst_start = torch.searchsorted(by_dst.values[:, :r].contiguous(), starts)
    return unm_idx, dst_start, dst_src, a_row


def spatial_select_topk(node_max: torch.Tensor, node_idx: torch.Tensor, r: int, nb: int):
    """The "topk" candidate: ``spatial_select_sort`` with its first sort replaced by a
    threshold. The order keys of ``common.order_key`` (the score's bits made
    order-preserving, then the index reversed: unique, so the top r are one
    set whatever the implementation) go through ``torch.topk``, whose CUDA
    path is a radix select (the O(N) top-k idea of FlashInfer's and sglang's
    kernels; torch may fall back to a sort for some sizes), and the r-th best
    key is their minimum. The rest is ``spatial_select_sort``'s, with the
    destination sort on int32 keys (half the radix passes). Same outputs, bit
    for bit; Na < 2^24."""
    batch, na = node_max.shape
    dev = node_max.device
    bits = (node_max + 0.0).view(torch.int32)  # +0.0: -0.0 ties with +0.0
    score = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(torch.int64) + 2147483648  # float order, unsigned
    shift = idx_bits(na)
    key = (score << shift) | ((1 << shift) - 1 - torch.arange(na, device=dev))
    threshold = torch.topk(key, r, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
    keep = key < threshold
    kept_upto = keep.cumsum(dim=-1)
    a_row = torch.where(keep, kept_upto - 1, na - r + node_idx)
    ranks = torch.arange(1, na - r + 1, device=dev).expand(batch, -1).contiguous()
    unm_idx = torch.searchsorted(kept_upto, ranks)
    by_dst = torch.sort(torch.where(keep, nb, node_idx).to(torch.int32), dim=-1, stable=True)
    dst_src = by_dst.indices[:, :r].contiguous()
    starts = torch.arange(nb + 1, device=dev, dtype=torch.int32).expand(batch, -1).contiguous()
    dst_start = torch.searchsorted(by_dst.values[:, :r].contiguous(), starts)
    return unm_idx, dst_start, dst_src, a_row


class FusedSelectSettings(NamedTuple):
    """Tiles of the "fused" spatial select (shipped defaults; tests pass small ones)."""

    block: int = 2048  # A tokens per tile of the threshold and histogram passes
    block_t: int = 128  # A tokens per tile of the placing pass (a block_t x block_t compare)
    num_warps: int = 8


FUSED_SELECT = FusedSelectSettings()
MAX_FUSED_NB = 16384  # destinations held in one program's histogram (N = 65536 with 2x2 cells)


def spatial_select_fused(node_max: torch.Tensor, node_idx: torch.Tensor, r: int, nb: int, wrap=plain,
                         settings: FusedSelectSettings = FUSED_SELECT):
    """The "fused" candidate: one launch, one program per image; the same inputs and
    outputs as ``spatial_select`` (nb <= MAX_FUSED_NB; more falls back to it)."""
    if nb > MAX_FUSED_NB:
        return spatial_select(node_max, node_idx, r, nb, wrap)
    batch, na = node_max.shape
    dev = node_max.device
    nb_block = max(16, next_power_of_2(nb))
    unm_idx = empty(batch, na - r, dtype=torch.int64, device=dev)
    dst_start = empty(batch, nb + 1, dtype=torch.int64, device=dev)
    dst_src = empty(batch, r, dtype=torch.int64, device=dev)
    a_row = empty(batch, na, dtype=torch.int64, device=dev)
    cursor = torch.empty(batch, nb_block, dtype=torch.int32, device=dev)  # scratch, written before read
    with on_device(node_max):
        wrap(_spatial_select_fused_kernel)[(batch,)](
            node_max, node_idx, unm_idx, dst_start, dst_src, a_row, cursor, na, nb, r,
            IDX_BITS=idx_bits(na), BLOCK=settings.block, BLOCK_T=settings.block_t, NB_BLOCK=nb_block,
            num_warps=settings.num_warps,
        )
    return unm_idx, dst_start, dst_src, a_row


def _radix64(node_max, node_idx, r, nb):
    """Today's kernel ("radix64"), looked up when called (tests count its launches)."""
    return spatial_select(node_max, node_idx, r, nb)


# The spatial select's candidates for dispatch (tofu_triton.dispatch, op "spatial_select"),
# each (node_max, node_idx, r, nb) -> (unm_idx, dst_start, dst_src, a_row).
SPATIAL_SELECT_CANDIDATES = {"radix64": _radix64, "sort": spatial_select_sort, "topk": spatial_select_topk,
                             "fused": spatial_select_fused}
