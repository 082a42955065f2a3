"""What more than one kernel file shares: merge-mode ids, the interpreter
switch, output allocation, the device guard, and the ``@triton.jit`` helpers
used by several kernels (token positions, sizes, the selection order key, the
best-partner search of the match, the selections, the merge of tiles of rows).

Every kernel implements an op defined in ``tofu_triton/reference.py``
(docs/design.md); read that first.
"""
import contextlib
import os

import torch
import triton
import triton.language as tl

from tofu_triton.reference import EPS as _EPS

EPS = tl.constexpr(_EPS)

# Merge modes, as the kernels' MODE argument.
MODE_MEAN = tl.constexpr(0)  # size-weighted mean (ToMe)
MODE_MLERP = tl.constexpr(1)  # mean's direction, largest contributor's norm (ToFu)
MODE_PRUNE = tl.constexpr(2)  # sources dropped
MODE_SUM = tl.constexpr(3)  # B row plus its sources, unweighted: the gradient of the spatial unmerge
MODE_IDS = {"mean": 0, "mlerp": 1, "prune": 2, "sum": 3}


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Whether the match's dot products run on fp32 inputs (exact IEEE, no TF32):
    for fp32 metrics, and for bf16 in the interpreter, which has no bf16
    arithmetic (fp32 products of bf16 values are exact anyway)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting())


# Tests set this to fill every output with NaN (floats) or -1 (indices)
# before a kernel runs, so an element a kernel forgets to write fails them.
POISON_OUTPUTS = False


def empty(*shape, dtype, device) -> torch.Tensor:
    """An output buffer (poisoned when ``POISON_OUTPUTS``)."""
    if not POISON_OUTPUTS:
        return torch.empty(*shape, dtype=dtype, device=device)
    return torch.full(shape, float("nan") if dtype.is_floating_point else -1, dtype=dtype, device=device)


def on_device(t: torch.Tensor):
    """Context for launching on ``t``'s GPU.

    Triton launches on the *current* CUDA device and its current stream, not
    on the device of the tensors it is given: a model on ``cuda:1`` while
    ``cuda:0`` is current would run its kernels on the wrong GPU. Switching
    costs a driver call, so it happens only when the devices differ.
    """
    if t.device.type == "cuda" and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def plain(kernel):
    """Default ``wrap`` of the launchers: launch the kernel as it is. Inside a
    ``torch.library.triton_op`` they get ``torch.library.wrap_triton`` instead,
    so torch.export and AOTInductor see the kernels."""
    return kernel


# --------------------------------------------------------------------------- device helpers


@triton.jit
def a_position(a_pos_ptr, i, mask, P, POS: tl.constexpr):
    """Token position (int64) of A token ``i``: ``P + 2i`` in the alternating
    partition, ``a_pos[i]`` when the partition is given as arrays (POS)."""
    if POS:
        return tl.load(a_pos_ptr + i, mask=mask, other=0)
    else:
        return (P + 2 * i).to(tl.int64)


@triton.jit
def b_position(b_pos_ptr, j, mask, P, POS: tl.constexpr):
    """Token position (int64) of B token ``j``: ``P + 2j + 1``, or ``b_pos[j]`` (POS)."""
    if POS:
        return tl.load(b_pos_ptr + j, mask=mask, other=0)
    else:
        return (P + 2 * j + 1).to(tl.int64)


@triton.jit
def load_size(size_ptr, row, mask, HAS_SIZE: tl.constexpr):
    """Size (fp32) of the token at ``row``; 1 without sizes."""
    if HAS_SIZE:
        return tl.load(size_ptr + row, mask=mask, other=1.0)
    else:
        return tl.full(row.shape, 1.0, tl.float32)


@triton.jit
def order_key(node_max_ptr, offs, mask, IDX_BITS: tl.constexpr):
    """One non-negative int64 per A token, unique, whose order is the selection
    order: larger node_max first, then smaller index (the score's bits made
    unsigned order-preserving, then the index reversed in the low IDX_BITS
    bits; IDX_BITS <= 31 and 2^IDX_BITS > the largest index). NaN never
    reaches here (the match wrote -inf for it); -0.0 is folded into +0.0 so
    they tie, as they do in torch's sort."""
    return order_key_of(tl.load(node_max_ptr + offs, mask=mask, other=float("-inf")), offs, IDX_BITS)


@triton.jit
def order_key_of(node_max, offs, IDX_BITS: tl.constexpr):
    """:func:`order_key` of scores already in registers (fp32, no NaN)."""
    v = node_max + 0.0
    bits = v.to(tl.int32, bitcast=True)
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # float order as signed-int order
    score = bits.to(tl.int64) + 2147483648  # ... as unsigned order, in [0, 2^32)
    return (score << IDX_BITS) | ((1 << IDX_BITS) - 1 - offs.to(tl.int64))


@triton.jit
def load_rows(ptrs, mask, stride_h, H, inv_h, HEADS: tl.constexpr):
    """A tile of metric rows at ``ptrs`` in the metric's dtype: as stored, or with
    HEADS the rows of ViT keys [H, N, D] averaged over heads exactly as
    reference.head_mean: the H heads (``stride_h`` apart) summed in fp32 in head
    order, times ``inv_h``, rounded once to the keys' dtype."""
    if HEADS:
        acc = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        for h in range(1, H):
            acc += tl.load(ptrs + h * stride_h, mask=mask, other=0.0).to(tl.float32)
        return (acc * inv_h).to(ptrs.dtype.element_ty)
    else:
        return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def best_partners(base, rows_a, mask_a, b_pos_ptr, NB, D, P, stride_n, stride_d,
                  BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
                  DOT_FP32: tl.constexpr, SINGLE_D: tl.constexpr, POS: tl.constexpr,
                  stride_h=0, H=1, inv_h=1.0, HEADS: tl.constexpr = False):
    """Each A row's best B partner by cosine similarity (docs/design.md §1.2).

    base: the image's metric, or with HEADS its keys [H, N, D] (heads ``stride_h``
    apart), averaged over heads on the fly by :func:`load_rows` so the metric
    never reaches memory; rows_a [BLOCK_A]: token positions of the A rows
    (masked by mask_a); B token j sits at ``b_position(j)``. Streams the B rows
    in tiles of BLOCK_B with ``tl.dot`` in fp32 accumulation, scales by the
    inverse norms and keeps a running max/argmax, so no score matrix reaches
    memory. Returns (node_max [BLOCK_A] fp32, NaN read as -inf; node_idx
    [BLOCK_A] int32, the smallest index attaining it).
    """
    a_ptrs = base + rows_a[:, None] * stride_n
    sq_a = tl.zeros([BLOCK_A], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        a = load_rows(a_ptrs + offs_d[None, :] * stride_d, mask_a[:, None] & (offs_d < D)[None, :],
                      stride_h, H, inv_h, HEADS).to(tl.float32)
        sq_a += tl.sum(a * a, axis=1)
    inv_a = 1.0 / tl.maximum(tl.sqrt(sq_a), EPS)
    if SINGLE_D:  # the usual case (D = head_dim <= BLOCK_D): keep the A tile in registers
        offs_d = tl.arange(0, BLOCK_D)
        a_tile = load_rows(a_ptrs + offs_d[None, :] * stride_d, mask_a[:, None] & (offs_d < D)[None, :],
                           stride_h, H, inv_h, HEADS)

    best = tl.full([BLOCK_A], float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_A], dtype=tl.int32)
    for b0 in range(0, NB, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        mask_b = offs_b < NB
        b_ptrs = base + b_position(b_pos_ptr, offs_b, mask_b, P, POS)[None, :] * stride_n
        dot = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
        sq_b = tl.zeros([BLOCK_B], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            if SINGLE_D:
                a = a_tile
            else:
                a = load_rows(a_ptrs + offs_d[None, :] * stride_d, mask_a[:, None] & mask_d[None, :],
                              stride_h, H, inv_h, HEADS)
            bt = load_rows(b_ptrs + offs_d[:, None] * stride_d, mask_d[:, None] & mask_b[None, :],
                           stride_h, H, inv_h, HEADS)
            bt_f = bt.to(tl.float32)
            sq_b += tl.sum(bt_f * bt_f, axis=0)
            if DOT_FP32:
                # fp32 inputs must not round through TF32: near-ties would flip.
                dot = tl.dot(a.to(tl.float32), bt_f, dot, input_precision="ieee")
            else:
                # fp16/bf16 products are exact in the fp32 accumulator.
                dot = tl.dot(a, bt, dot)
        inv_b = 1.0 / tl.maximum(tl.sqrt(sq_b), EPS)
        best, best_idx = keep_best(dot * inv_a[:, None] * inv_b[None, :], mask_b, b0, best, best_idx)
    return best, best_idx


@triton.jit
def keep_best(score, mask_b, b0, best, best_idx):
    """The running max/argmax of ``best_partners`` after one tile of B columns
    ``b0 + j`` (score [BLOCK_A, BLOCK_B] fp32, mask_b the real columns)."""
    # NaN counts as -inf (reference.py); padding columns can never win
    # because ties go to the smaller index and they sit after real ones.
    score = tl.where((score != score) | ~mask_b[None, :], float("-inf"), score)
    tile_max = tl.max(score, axis=1)
    tile_idx = tl.argmax(score, axis=1, tie_break_left=True).to(tl.int32)
    better = tile_max > best  # strict: an earlier tile keeps a tie
    best_idx = tl.where(better, b0 + tile_idx, best_idx)
    best = tl.where(better, tile_max, best)
    return best, best_idx


@triton.jit
def rank_select(node_max_ptr, node_idx_ptr, unm_idx_ptr, src_idx_ptr, dst_idx_ptr, dst_start_ptr, dst_src_ptr,
                NA, NB, R, BLOCK: tl.constexpr):
    """The selection of one image (reference.select) by counting, in one program.

    Reads node_max [NA] (fp32, no NaN) and node_idx [NA] (int64); writes
    unm_idx [NA-R], src_idx [R], dst_idx [R], dst_start [NB+1], dst_src [R]
    (int64; see reference.Match). O(NA^2) compares: nothing at ViT sizes
    (NA <= 513). No pass reads what another thread wrote here: "is a source"
    is recomputed from a threshold on the order key wherever it is needed.
    """
    lanes = tl.arange(0, BLOCK)

    # 1. Stable descending rank by counting: rank of i = how many keys beat
    #    it. Sources are the R best; their rank is their slot. Also keep the
    #    smallest source key: "is a source" is then "key >= threshold".
    threshold = tl.full([], 9223372036854775807, tl.int64)
    for i0 in range(0, NA, BLOCK):
        offs_i = i0 + lanes
        mask_i = offs_i < NA
        key_i = order_key(node_max_ptr, offs_i, mask_i, 31)
        rank = tl.zeros([BLOCK], dtype=tl.int32)
        for k0 in range(0, NA, BLOCK):
            offs_k = k0 + lanes
            mask_k = offs_k < NA
            key_k = order_key(node_max_ptr, offs_k, mask_k, 31)
            beats = (key_k[None, :] > key_i[:, None]) & mask_k[None, :]
            rank += tl.sum(beats.to(tl.int32), axis=1)
        is_src = mask_i & (rank < R)
        tl.store(src_idx_ptr + rank, offs_i.to(tl.int64), mask=is_src)
        dst = tl.load(node_idx_ptr + offs_i, mask=mask_i, other=0)
        tl.store(dst_idx_ptr + rank, dst, mask=is_src)
        threshold = tl.minimum(threshold, tl.min(tl.where(is_src, key_i, 9223372036854775807), axis=0))

    # 2. Unmerged A positions in ascending order (running prefix count), and
    #    each source's slot in the CSR list, ordered by (destination, position).
    n_unm = 0
    for i0 in range(0, NA, BLOCK):
        offs_i = i0 + lanes
        mask_i = offs_i < NA
        is_src = mask_i & (order_key(node_max_ptr, offs_i, mask_i, 31) >= threshold)
        keep = mask_i & ~is_src
        pos = n_unm + tl.cumsum(keep.to(tl.int32), axis=0) - 1
        tl.store(unm_idx_ptr + pos, offs_i.to(tl.int64), mask=keep)
        n_unm += tl.sum(keep.to(tl.int32), axis=0)

        dst_i = tl.load(node_idx_ptr + offs_i, mask=mask_i, other=0)
        slot = tl.zeros([BLOCK], dtype=tl.int32)
        for k0 in range(0, NA, BLOCK):
            offs_k = k0 + lanes
            mask_k = offs_k < NA
            src_k = mask_k & (order_key(node_max_ptr, offs_k, mask_k, 31) >= threshold)
            dst_k = tl.load(node_idx_ptr + offs_k, mask=mask_k, other=0)
            before = (dst_k[None, :] < dst_i[:, None]) | (
                (dst_k[None, :] == dst_i[:, None]) & (offs_k[None, :] < offs_i[:, None]))
            slot += tl.sum((before & src_k[None, :]).to(tl.int32), axis=1)
        tl.store(dst_src_ptr + slot, offs_i.to(tl.int64), mask=is_src)

    # 3. CSR offsets: the sources of B position j start after every source
    #    whose destination is smaller than j (j = NB gives R).
    for j0 in range(0, NB + 1, BLOCK):
        offs_j = j0 + lanes
        start = tl.zeros([BLOCK], dtype=tl.int32)
        for k0 in range(0, NA, BLOCK):
            offs_k = k0 + lanes
            mask_k = offs_k < NA
            src_k = mask_k & (order_key(node_max_ptr, offs_k, mask_k, 31) >= threshold)
            dst_k = tl.load(node_idx_ptr + offs_k, mask=mask_k, other=0)
            start += tl.sum(((dst_k[None, :] < offs_j[:, None]) & src_k[None, :]).to(tl.int32), axis=1)
        tl.store(dst_start_ptr + offs_j, start.to(tl.int64), mask=offs_j <= NB)


@triton.jit
def sort_select(node_max_ptr, node_idx_ptr, unm_idx_ptr, src_idx_ptr, dst_idx_ptr, dst_start_ptr, dst_src_ptr,
                NA, NB, R, BLOCK: tl.constexpr, BLOCK_NB: tl.constexpr):
    """The selection of one image (reference.select) by sorting in registers, in
    one program: the same outputs as :func:`rank_select` in O(NA log^2 NA) work
    instead of O(NA^2) compares. BLOCK >= NA and BLOCK_NB > NB (powers of two).

    The order keys (score, then reversed index: unique) sorted descending give
    the sources in score order; the sources' (destination, index) pairs sorted
    ascending give the CSR list; a histogram of the destinations gives its offsets.
    """
    offs = tl.arange(0, BLOCK)
    mask = offs < NA
    sort_select_values(tl.load(node_max_ptr + offs, mask=mask, other=float("-inf")),
                       tl.load(node_idx_ptr + offs, mask=mask, other=0), unm_idx_ptr, src_idx_ptr, dst_idx_ptr,
                       dst_start_ptr, dst_src_ptr, NA, NB, R, BLOCK, BLOCK_NB)


@triton.jit
def sort_select_values(node_max, node_idx, unm_idx_ptr, src_idx_ptr, dst_idx_ptr, dst_start_ptr, dst_src_ptr,
                       NA, NB, R, BLOCK: tl.constexpr, BLOCK_NB: tl.constexpr):
    """:func:`sort_select` on the scores and partners in registers: node_max [BLOCK] fp32 (no NaN) and
    node_idx [BLOCK] int64 of A tokens 0..BLOCK-1 (lanes >= NA ignored), as the plan's match leaves them
    when one tile holds every A token, so they never go through memory."""
    offs = tl.arange(0, BLOCK)
    mask = offs < NA
    key = tl.where(mask, order_key_of(node_max, offs, 31), -1)  # real keys are >= 0
    ranked = tl.sort(key, descending=True)
    threshold = tl.min(tl.where(offs < R, ranked, 9223372036854775807), axis=0)  # the R-th best key
    src = 2147483647 - (ranked & 2147483647)  # the index part, un-reversed
    is_first = offs < R
    tl.store(src_idx_ptr + offs, src, mask=is_first)
    dst = tl.where(mask, node_idx.to(tl.int64), 0)
    # The partner of each of the first R in score order (the other lanes gather lane 0: masked off).
    tl.store(dst_idx_ptr + offs, tl.gather(dst, tl.where(is_first, src, 0).to(tl.int32), 0), mask=is_first)

    is_src = mask & (key >= threshold)
    keep = mask & ~is_src
    pos = tl.cumsum(keep.to(tl.int32), axis=0) - 1
    tl.store(unm_idx_ptr + pos, offs.to(tl.int64), mask=keep)

    grouped = tl.sort(tl.where(is_src, (dst << 31) | offs.to(tl.int64), 9223372036854775807))
    tl.store(dst_src_ptr + offs, grouped & 2147483647, mask=is_first)
    counts = tl.histogram(dst.to(tl.int32), BLOCK_NB, mask=is_src)
    offs_j = tl.arange(0, BLOCK_NB)
    tl.store(dst_start_ptr + offs_j, (tl.cumsum(counts, axis=0) - counts).to(tl.int64), mask=offs_j <= NB)


@triton.jit
def merged_rows(x, size, dst_src, start, count, most, b_row, active, stride_xn, stride_xc, C, P,
                MODE: tl.constexpr, HAS_SIZE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """What a tile of B rows with sources needs before its channels are merged: (s_b, the rows' own sizes;
    s_total, with their sources'; scale, MLERP's factor per row, 1 in mean mode), each [BLOCK_R] fp32."""
    s_b = load_size(size, b_row, active, HAS_SIZE)
    s_total = s_b
    for k in range(0, most):
        has = k < count
        src = P + 2 * tl.load(dst_src + start + k, mask=has, other=0)
        s_total += tl.where(has, load_size(size, src, has, HAS_SIZE), 0.0)
    scale = tl.full([BLOCK_R], 1.0, tl.float32)
    if MODE == MODE_MLERP:
        scale = mlerp_scale(x, size, dst_src, start, count, most, b_row, s_b, s_total, active, stride_xn, stride_xc,
                            C, P, HAS_SIZE, BLOCK_R, BLOCK_C)
    return s_b, s_total, scale


@triton.jit
def weighted_sum(x, size, dst_src, start, count, most, b_row, s_b, active, offs_c, stride_xn, stride_xc, C, P,
                 HAS_SIZE: tl.constexpr):
    """sum of size * row over each B row ``b_row`` and its sources (``count`` of them from ``dst_src[start]``,
    A positions ``P + 2i``), channels ``offs_c`` of the image's tokens ``x``: [BLOCK_R, BLOCK_C] fp32."""
    mask_c = (offs_c < C)[None, :]
    total = s_b[:, None] * tl.load(x + b_row[:, None] * stride_xn + offs_c[None, :] * stride_xc,
                                   mask=active[:, None] & mask_c, other=0.0).to(tl.float32)
    for k in range(0, most):
        has = k < count
        src = P + 2 * tl.load(dst_src + start + k, mask=has, other=0)
        a = tl.load(x + src[:, None] * stride_xn + offs_c[None, :] * stride_xc, mask=has[:, None] & mask_c,
                    other=0.0).to(tl.float32)
        total += load_size(size, src, has, HAS_SIZE)[:, None] * a
    return total


@triton.jit
def row_norms(x, rows, mask, stride_xn, stride_xc, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """The L2 norm over all C channels (fp32, summed in BLOCK_C chunks) of each of the rows ``rows``
    [BLOCK_R] of the tokens ``x``; 0 where ``mask`` is off."""
    lanes_c = tl.arange(0, BLOCK_C)
    sq = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + lanes_c
        v = tl.load(x + rows[:, None] * stride_xn + offs_c[None, :] * stride_xc,
                    mask=mask[:, None] & (offs_c < C)[None, :], other=0.0).to(tl.float32)
        sq += tl.sum(v * v, axis=1)
    return tl.sqrt(sq)


@triton.jit
def mlerp_scale(x, size, dst_src, start, count, most, b_row, s_b, s_total, active, stride_xn, stride_xc, C, P,
                HAS_SIZE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """MLERP's factor per merged row: the largest contributor norm over the
    merged mean's norm (both over all C channels, fp32): [BLOCK_R]."""
    lanes_c = tl.arange(0, BLOCK_C)
    norm_max = row_norms(x, b_row, active, stride_xn, stride_xc, C, BLOCK_R, BLOCK_C)
    for k in range(0, most):
        has = k < count
        src = P + 2 * tl.load(dst_src + start + k, mask=has, other=0)
        norm_max = tl.maximum(norm_max, row_norms(x, src, has, stride_xn, stride_xc, C, BLOCK_R, BLOCK_C))
    sq = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + lanes_c
        merged = weighted_sum(x, size, dst_src, start, count, most, b_row, s_b, active, offs_c, stride_xn,
                              stride_xc, C, P, HAS_SIZE) / s_total[:, None]
        sq += tl.sum(merged * merged, axis=1)
    # NaN propagates (as in the reference): a NaN contributor makes the whole merged row NaN.
    return norm_max / tl.maximum(tl.sqrt(sq), EPS, propagate_nan=tl.PropagateNan.ALL)


# --------------------------------------------------------------------------- host helpers
# Plain-Python twins of triton.cdiv / triton.next_power_of_2, which are
# constexpr functions and cost microseconds per call on the host.


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


# Kernels that hold a whole row (C channels) in registers support up to this many channels.
MAX_ROW_C = 4096


def row_block(c: int) -> int:
    """BLOCK_C of a kernel that holds a whole row of ``c`` channels."""
    if c > MAX_ROW_C:
        raise ValueError(f"the Triton kernels support C <= {MAX_ROW_C} channels, got C = {c}")
    return next_power_of_2(c)
