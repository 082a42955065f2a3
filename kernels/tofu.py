"""Fused Triton kernels for one Token Fusion step (docs/design.md §3), and their launchers.

The op they implement is defined in ``tofu_triton/reference.py``; read that
first. Three launches per forward step, none of them using atomics, so every
run is bitwise reproducible:

1. ``_match_kernel``   one program per (batch, block of A rows): streams the
   B rows in tiles, ``tl.dot`` with fp32 accumulation, scales by inverse
   norms, keeps a running max/argmax. The ``Na x Nb`` score matrix never
   reaches memory; only ``node_max``/``node_idx`` do.
2. ``_select_kernel``  one program per batch: the stable descending rank of
   ``node_max`` by counting (rank of i = how many k beat it), then the sources
   grouped by destination (CSR offsets) by counting again. O(Na^2) compares
   per batch: trivial for ViTs (Na <= 513), the slow part at N = 4096.
3. ``_merge_kernel``   one program per output row: copies prefix/unmerged rows
   and combines each B row with its sources in a fixed order.

``_merge_backward_kernel`` also runs one program per output row and writes the
gradient of every input row that fed it (each input row feeds exactly one
output row), so the backward needs no atomics either.

The Stable Diffusion step (docs/design.md §5.1) reuses the match and merge
kernels with the partition given as position arrays (``POS=True``), and adds
``_partition_kernel`` (the cell partition, one program), ``_spatial_select_kernel``
(one program per 64 destinations: a radix-select threshold, then its
destinations' sources and its slice of A) and ``_unmerge_kernel`` (a gather
back to N rows fused with the residual add).

All launchers take tensors with any strides and return contiguous outputs.
Index tensors are int64, sizes float32.
"""
import os

import torch
import triton
import triton.language as tl

MODE_IDS = {"mean": 0, "mlerp": 1, "prune": 2}
EPS = tl.constexpr(1e-12)  # as reference.EPS

# Block sizes shipped for each kernel; tests compile every one of them for
# sm_80 and sm_90 ahead of time.
# (BLOCK_A, BLOCK_B, largest BLOCK_D) of the match kernel. The fp32 path does
# an exact (non-TF32) dot on CUDA cores, which needs far more registers per
# tile: these are the largest tiles that compile without spills on sm_80/90.
MATCH_BLOCKS = {True: (32, 32, 16), False: (64, 32, 64)}  # keyed by DOT_FP32
SELECT_BLOCK = 64
# A merge program holds a whole row (C channels) in registers.
MERGE_MAX_C = 4096


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _a_position(a_pos_ptr, i, mask, P, POS: tl.constexpr):
    """Token position (int64) of A token ``i``: ``P + 2i`` in the alternating
    partition, ``a_pos[i]`` when the partition is given as arrays (POS)."""
    if POS:
        return tl.load(a_pos_ptr + i, mask=mask, other=0)
    else:
        return (P + 2 * i).to(tl.int64)


@triton.jit
def _b_position(b_pos_ptr, j, mask, P, POS: tl.constexpr):
    """Token position (int64) of B token ``j``: ``P + 2j + 1``, or ``b_pos[j]`` (POS)."""
    if POS:
        return tl.load(b_pos_ptr + j, mask=mask, other=0)
    else:
        return (P + 2 * j + 1).to(tl.int64)


@triton.jit
def _match_kernel(
    metric_ptr, a_pos_ptr, b_pos_ptr, node_max_ptr, node_idx_ptr,
    stride_b, stride_n, stride_d,
    NA, NB, D, P, num_a_blocks,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, SINGLE_D: tl.constexpr, POS: tl.constexpr,
):
    pid = tl.program_id(0)
    batch = pid // num_a_blocks
    offs_a = (pid % num_a_blocks) * BLOCK_A + tl.arange(0, BLOCK_A)
    mask_a = offs_a < NA
    base = metric_ptr + batch.to(tl.int64) * stride_b
    rows_a = base + _a_position(a_pos_ptr, offs_a, mask_a, P, POS)[:, None] * stride_n

    sq_a = tl.zeros([BLOCK_A], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        a = tl.load(rows_a + offs_d[None, :] * stride_d,
                    mask=mask_a[:, None] & (offs_d < D)[None, :], other=0.0).to(tl.float32)
        sq_a += tl.sum(a * a, axis=1)
    inv_a = 1.0 / tl.maximum(tl.sqrt(sq_a), EPS)
    if SINGLE_D:  # the usual case (D = head_dim <= 128): keep the A tile in registers
        offs_d = tl.arange(0, BLOCK_D)
        a_tile = tl.load(rows_a + offs_d[None, :] * stride_d,
                         mask=mask_a[:, None] & (offs_d < D)[None, :], other=0.0)

    best = tl.full([BLOCK_A], float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_A], dtype=tl.int32)
    for b0 in range(0, NB, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        mask_b = offs_b < NB
        rows_b = base + _b_position(b_pos_ptr, offs_b, mask_b, P, POS)[None, :] * stride_n
        dot = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
        sq_b = tl.zeros([BLOCK_B], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            if SINGLE_D:
                a = a_tile
            else:
                a = tl.load(rows_a + offs_d[None, :] * stride_d,
                            mask=mask_a[:, None] & mask_d[None, :], other=0.0)
            bt = tl.load(rows_b + offs_d[:, None] * stride_d,
                         mask=mask_d[:, None] & mask_b[None, :], other=0.0)
            bt_f = bt.to(tl.float32)
            sq_b += tl.sum(bt_f * bt_f, axis=0)
            if DOT_FP32:
                # fp32 inputs must not round through TF32: near-ties would flip.
                dot = tl.dot(a.to(tl.float32), bt_f, dot, input_precision="ieee")
            else:
                # fp16/bf16 products are exact in the fp32 accumulator.
                dot = tl.dot(a, bt, dot)
        inv_b = 1.0 / tl.maximum(tl.sqrt(sq_b), EPS)
        score = dot * inv_a[:, None] * inv_b[None, :]
        # NaN counts as -inf (reference.py); padding columns can never win
        # because ties go to the smaller index and they sit after real ones.
        score = tl.where((score != score) | ~mask_b[None, :], float("-inf"), score)
        tile_max = tl.max(score, axis=1)
        tile_idx = tl.argmax(score, axis=1, tie_break_left=True).to(tl.int32)
        better = tile_max > best  # strict: an earlier tile keeps a tie
        best_idx = tl.where(better, b0 + tile_idx, best_idx)
        best = tl.where(better, tile_max, best)

    out = batch.to(tl.int64) * NA + offs_a
    tl.store(node_max_ptr + out, best, mask=mask_a)
    tl.store(node_idx_ptr + out, best_idx.to(tl.int64), mask=mask_a)


@triton.jit
def _order_key(node_max_ptr, offs, mask, IDX_BITS: tl.constexpr):
    """One non-negative int64 per A token, unique, whose order is the selection
    order: larger node_max first, then smaller index (the score's bits made
    unsigned order-preserving, then the index reversed in the low IDX_BITS
    bits; IDX_BITS <= 31 and 2^IDX_BITS > the largest index). NaN never
    reaches here (the match kernel wrote -inf for it); -0.0 is folded into
    +0.0 so they tie, as they do in torch's sort."""
    v = tl.load(node_max_ptr + offs, mask=mask, other=float("-inf")) + 0.0
    bits = v.to(tl.int32, bitcast=True)
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # float order as signed-int order
    score = bits.to(tl.int64) + 2147483648  # ... as unsigned order, in [0, 2^32)
    return (score << IDX_BITS) | ((1 << IDX_BITS) - 1 - offs.to(tl.int64))


@triton.jit
def _select_kernel(
    node_max_ptr, node_idx_ptr,
    unm_idx_ptr, src_idx_ptr, dst_idx_ptr, dst_start_ptr, dst_src_ptr,
    NA, NB, R,
    BLOCK: tl.constexpr,
):
    batch = tl.program_id(0).to(tl.int64)
    node_max_ptr += batch * NA
    node_idx_ptr += batch * NA
    unm_idx_ptr += batch * (NA - R)
    src_idx_ptr += batch * R
    dst_idx_ptr += batch * R
    dst_start_ptr += batch * (NB + 1)
    dst_src_ptr += batch * R
    lanes = tl.arange(0, BLOCK)

    # 1. Stable descending rank by counting: rank of i = how many keys beat
    #    it. Sources are the R best; their rank is their slot. Also keep the
    #    smallest source key: "is a source" is then "key >= threshold", which
    #    every later pass can recompute from the inputs, so no thread ever
    #    reads what another one wrote in this kernel.
    threshold = tl.full([], 9223372036854775807, tl.int64)
    for i0 in range(0, NA, BLOCK):
        offs_i = i0 + lanes
        mask_i = offs_i < NA
        key_i = _order_key(node_max_ptr, offs_i, mask_i, 31)
        rank = tl.zeros([BLOCK], dtype=tl.int32)
        for k0 in range(0, NA, BLOCK):
            offs_k = k0 + lanes
            mask_k = offs_k < NA
            key_k = _order_key(node_max_ptr, offs_k, mask_k, 31)
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
        is_src = mask_i & (_order_key(node_max_ptr, offs_i, mask_i, 31) >= threshold)
        keep = mask_i & ~is_src
        pos = n_unm + tl.cumsum(keep.to(tl.int32), axis=0) - 1
        tl.store(unm_idx_ptr + pos, offs_i.to(tl.int64), mask=keep)
        n_unm += tl.sum(keep.to(tl.int32), axis=0)

        dst_i = tl.load(node_idx_ptr + offs_i, mask=mask_i, other=0)
        slot = tl.zeros([BLOCK], dtype=tl.int32)
        for k0 in range(0, NA, BLOCK):
            offs_k = k0 + lanes
            mask_k = offs_k < NA
            src_k = mask_k & (_order_key(node_max_ptr, offs_k, mask_k, 31) >= threshold)
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
            src_k = mask_k & (_order_key(node_max_ptr, offs_k, mask_k, 31) >= threshold)
            dst_k = tl.load(node_idx_ptr + offs_k, mask=mask_k, other=0)
            start += tl.sum(((dst_k[None, :] < offs_j[:, None]) & src_k[None, :]).to(tl.int32), axis=1)
        tl.store(dst_start_ptr + offs_j, start.to(tl.int64), mask=offs_j <= NB)


@triton.jit
def _locate_output_row(unm_idx_ptr, dst_start_ptr, dst_src_ptr, a_pos_ptr, b_pos_ptr, pid, N, P, NA, NB, R,
                       POS: tl.constexpr):
    """For program ``pid`` (one output row of one batch): the batch, the output
    row ``o``, the input row that feeds it, and the range of its sources in
    this batch's ``dst_src`` (empty for prefix and unmerged rows).
    Branch-free: masked scalar loads."""
    n_out = N - R
    batch = pid // n_out
    o = pid % n_out
    unm_idx_ptr += batch * (NA - R)
    dst_start_ptr += batch * (NB + 1)
    dst_src_ptr += batch * R
    n_unm = NA - R
    is_unm = (o >= P) & (o < P + n_unm)
    is_b = o >= P + n_unm
    j = o - P - n_unm
    i = tl.load(unm_idx_ptr + (o - P), mask=is_unm, other=0)
    k_start = tl.load(dst_start_ptr + j, mask=is_b, other=0)
    k_end = tl.load(dst_start_ptr + j + 1, mask=is_b, other=0)
    row_b = _b_position(b_pos_ptr, j, is_b, P, POS)
    row_a = _a_position(a_pos_ptr, i, is_unm, P, POS)
    row = tl.where(o < P, o, tl.where(is_b, row_b, row_a))
    return batch, o, row, k_start, k_end, dst_src_ptr


@triton.jit
def _load_size(size_ptr, row, HAS_SIZE: tl.constexpr):
    if HAS_SIZE:
        return tl.load(size_ptr + row)
    else:
        return tl.full([], 1.0, tl.float32)


@triton.jit
def _merge_kernel(
    x_ptr, size_ptr, a_pos_ptr, b_pos_ptr, unm_idx_ptr, dst_start_ptr, dst_src_ptr, out_ptr, size_out_ptr,
    stride_xb, stride_xn, stride_xc,
    N, C, P, NA, NB, R,
    MODE: tl.constexpr, HAS_SIZE: tl.constexpr, BLOCK_C: tl.constexpr, POS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    batch, o, row, k_start, k_end, dst_src_ptr = _locate_output_row(
        unm_idx_ptr, dst_start_ptr, dst_src_ptr, a_pos_ptr, b_pos_ptr, pid, N, P, NA, NB, R, POS)
    x_ptr += batch * stride_xb
    size_ptr += batch * N
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    v = tl.load(x_ptr + row * stride_xn + offs_c * stride_xc, mask=mask_c)
    s = _load_size(size_ptr, row, HAS_SIZE)
    out_row = out_ptr + pid * C + offs_c
    if (MODE == 2) | (k_end == k_start):
        # Prefix, unmerged and untouched B rows are copied bitwise; in prune
        # mode the sources are dropped without being read.
        tl.store(out_row, v, mask=mask_c)
        tl.store(size_out_ptr + pid, s)
    else:
        b_row = v.to(tl.float32)
        total = b_row * s
        s_total = s
        norm_max = tl.sqrt(tl.sum(b_row * b_row, axis=0))
        for k in range(k_start, k_end):
            src_row = _a_position(a_pos_ptr, tl.load(dst_src_ptr + k), k < k_end, P, POS)
            a = tl.load(x_ptr + src_row * stride_xn + offs_c * stride_xc, mask=mask_c).to(tl.float32)
            s_a = _load_size(size_ptr, src_row, HAS_SIZE)
            total += a * s_a
            s_total += s_a
            norm_max = tl.maximum(norm_max, tl.sqrt(tl.sum(a * a, axis=0)))
        if MODE == 3:
            merged = total
        else:
            merged = total / s_total
        if MODE == 1:
            merged = merged / tl.maximum(tl.sqrt(tl.sum(merged * merged, axis=0)), EPS) * norm_max
        tl.store(out_row, merged.to(out_ptr.dtype.element_ty), mask=mask_c)
        tl.store(size_out_ptr + pid, s_total)


@triton.jit
def _merge_backward_kernel(
    grad_out_ptr, x_ptr, size_ptr, a_pos_ptr, b_pos_ptr, unm_idx_ptr, dst_start_ptr, dst_src_ptr, grad_x_ptr,
    stride_gb, stride_gn, stride_gc, stride_xb, stride_xn, stride_xc,
    N, C, P, NA, NB, R,
    MODE: tl.constexpr, HAS_SIZE: tl.constexpr, BLOCK_C: tl.constexpr, POS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    batch, o, row, k_start, k_end, dst_src_ptr = _locate_output_row(
        unm_idx_ptr, dst_start_ptr, dst_src_ptr, a_pos_ptr, b_pos_ptr, pid, N, P, NA, NB, R, POS)
    x_ptr += batch * stride_xb
    size_ptr += batch * N
    grad_x_ptr += batch * N * C
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    dtype = grad_x_ptr.dtype.element_ty
    g = tl.load(grad_out_ptr + batch * stride_gb + o * stride_gn + offs_c * stride_gc, mask=mask_c)
    if (MODE == 2) | (k_end == k_start):
        tl.store(grad_x_ptr + row * C + offs_c, g.to(dtype), mask=mask_c)
        for k in range(k_start, k_end):  # prune: sources get zero
            src_row = _a_position(a_pos_ptr, tl.load(dst_src_ptr + k), k < k_end, P, POS)
            tl.store(grad_x_ptr + src_row * C + offs_c, tl.zeros([BLOCK_C], dtype), mask=mask_c)
    else:
        gf = g.to(tl.float32)
        s = _load_size(size_ptr, row, HAS_SIZE)
        s_total = s
        if MODE == 1:
            # Recompute the forward: the weighted sum, and which contributor
            # has the largest norm (the first one on a tie).
            v = tl.load(x_ptr + row * stride_xn + offs_c * stride_xc, mask=mask_c).to(tl.float32)
            total = v * s
            norm_max = tl.sqrt(tl.sum(v * v, axis=0))
            arg_row = row
            for k in range(k_start, k_end):
                src_row = _a_position(a_pos_ptr, tl.load(dst_src_ptr + k), k < k_end, P, POS)
                a = tl.load(x_ptr + src_row * stride_xn + offs_c * stride_xc, mask=mask_c).to(tl.float32)
                s_a = _load_size(size_ptr, src_row, HAS_SIZE)
                total += a * s_a
                s_total += s_a
                norm_a = tl.sqrt(tl.sum(a * a, axis=0))
                arg_row = tl.where(norm_a > norm_max, src_row, arg_row)
                norm_max = tl.maximum(norm_max, norm_a)
            merged = total / s_total
            norm_m = tl.sqrt(tl.sum(merged * merged, axis=0))
            # out = merged / max(|merged|, eps) * norm_max
            d_norm_max = tl.sum(gf * merged, axis=0) / tl.maximum(norm_m, EPS)
            # d|v|/dv = v/|v| for the largest contributor (0 at |v| = 0, as torch).
            arg_scale = tl.where(norm_max > 0, d_norm_max / norm_max, 0.0)
            if norm_m > EPS:
                u = merged / norm_m
                gf = (gf - u * tl.sum(u * gf, axis=0)) * (norm_max / norm_m)
            else:
                gf = gf * (norm_max / EPS)
        else:
            for k in range(k_start, k_end):
                s_total += _load_size(
                    size_ptr, _a_position(a_pos_ptr, tl.load(dst_src_ptr + k), k < k_end, P, POS), HAS_SIZE)
        # gf is now the gradient of the weighted mean (of the sum, MODE 3);
        # every contributor gets its share, and in mlerp the largest one also
        # gets the norm's.
        if MODE != 3:
            gf = gf / s_total
        grad = gf * s
        if MODE == 1:
            if arg_row == row:
                grad += arg_scale * v
        tl.store(grad_x_ptr + row * C + offs_c, grad.to(dtype), mask=mask_c)
        for k in range(k_start, k_end):
            src_row = _a_position(a_pos_ptr, tl.load(dst_src_ptr + k), k < k_end, P, POS)
            s_a = _load_size(size_ptr, src_row, HAS_SIZE)
            grad = gf * s_a
            if MODE == 1:
                if arg_row == src_row:
                    a = tl.load(x_ptr + src_row * stride_xn + offs_c * stride_xc, mask=mask_c).to(tl.float32)
                    grad += arg_scale * a
            tl.store(grad_x_ptr + src_row * C + offs_c, grad.to(dtype), mask=mask_c)


# --------------------------------------------------------------------------- the Stable Diffusion step
# docs/design.md §5.1. The partition comes as position arrays (a_pos, b_pos);
# the match kernel above reads rows through them (POS). Selection has to scale
# to Na ~ 50k tokens per image, so it runs NPROG programs per image, each
# doing O(Na) work, with no communication between programs: every program
# finds the same threshold on its own, then handles its slice of A and its
# slice of B.


@triton.jit
def _mix(z):
    """splitmix64's finalizer on int64 (reference._mix, bit for bit: wrapping
    multiplications, shifts made logical by masking)."""
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * -4658895280553007687
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * -7723592293110705685
    return z ^ ((z >> 31) & ((1 << 33) - 1))


@triton.jit
def _partition_kernel(
    step_ptr, a_pos_ptr, b_pos_ptr, slot_ptr,
    N, W, HSY, WSX, SX, SY, NA, seed, block,
    RAND: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program builds reference.spatial_partition(h, w, sx, sy, cell_choice(...)):
    each position is tested for being its cell's destination, and running
    counts of B positions give every position its rank in A or in B."""
    lanes = tl.arange(0, BLOCK)
    if RAND:
        inner = _mix(tl.load(step_ptr) * 1000003 + block * 7919 + seed)
    n_b = 0
    for n0 in range(0, N, BLOCK):
        n = n0 + lanes
        mask = n < N
        y = n // W
        x = n % W
        cy = y // SY
        cx = x // SX
        if RAND:
            cell = (cy * WSX + cx).to(tl.int64)
            choice = ((_mix(cell + inner) & 9223372036854775807) % (SX * SY)).to(tl.int32)
        else:
            choice = tl.zeros([BLOCK], dtype=tl.int32)
        is_b = mask & (cy < HSY) & (cx < WSX) & ((y - cy * SY) * SX + (x - cx * SX) == choice)
        b_upto = n_b + tl.cumsum(is_b.to(tl.int32), axis=0)  # B positions up to and including n
        b_rank = b_upto - 1
        a_rank = n - b_upto
        tl.store(slot_ptr + n, tl.where(is_b, NA + b_rank, a_rank).to(tl.int64), mask=mask)
        tl.store(b_pos_ptr + b_rank, n.to(tl.int64), mask=is_b)
        tl.store(a_pos_ptr + a_rank, n.to(tl.int64), mask=mask & ~is_b)
        n_b += tl.sum(is_b.to(tl.int32), axis=0)


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
            key = _order_key(node_max_ptr, offs, mask, IDX_BITS)
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
        is_src = mask & (_order_key(node_max_ptr, offs, mask, IDX_BITS) >= threshold)
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
        keep = mask & (_order_key(node_max_ptr, offs, mask, IDX_BITS) < threshold)
        pos = n_kept + tl.cumsum(keep.to(tl.int32), axis=0) - 1
        tl.store(unm_idx_ptr + pos, offs.to(tl.int64), mask=keep)
        dst = tl.load(node_idx_ptr + offs, mask=mask, other=0)
        tl.store(a_row_ptr + offs, tl.where(keep, pos.to(tl.int64), NA - R + dst), mask=mask)
        n_kept += tl.sum(keep.to(tl.int32), axis=0)


@triton.jit
def _unmerge_kernel(
    y_ptr, res_ptr, slot_ptr, a_row_ptr, out_ptr,
    stride_yb, stride_yn, stride_yc, stride_rb, stride_rn, stride_rc,
    N, C, NA, R,
    HAS_RES: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program per output row (batch, position n): out[n] = y[row(n)] (+ res[n])."""
    pid = tl.program_id(0).to(tl.int64)
    batch = pid // N
    n = pid % N
    slot = tl.load(slot_ptr + n)
    is_a = slot < NA
    a_row = tl.load(a_row_ptr + batch * NA + slot, mask=is_a, other=0)
    row = tl.where(is_a, a_row, slot - R)  # B token j = slot - NA sits at row NA - R + j
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    v = tl.load(y_ptr + batch * stride_yb + row * stride_yn + offs_c * stride_yc, mask=mask_c)
    if HAS_RES:
        # As torch adds two fp16/bf16 tensors: in fp32, rounded once.
        res = tl.load(res_ptr + batch * stride_rb + n * stride_rn + offs_c * stride_rc, mask=mask_c)
        v = (v.to(tl.float32) + res.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + pid * C + offs_c, v, mask=mask_c)


# --------------------------------------------------------------------------- launchers


# Tests set this to fill every output with NaN (floats) or -1 (indices)
# before a kernel runs, so an element a kernel forgets to write fails them.
POISON_OUTPUTS = False


def _empty(*shape, dtype, device) -> torch.Tensor:
    if not POISON_OUTPUTS:
        return torch.empty(*shape, dtype=dtype, device=device)
    return torch.full(shape, float("nan") if dtype.is_floating_point else -1, dtype=dtype, device=device)


def _match_blocks(d: int, dot_fp32: bool):
    """(BLOCK_A, BLOCK_B, BLOCK_D) for head dim ``d``; tl.dot needs each >= 16."""
    block_a, block_b, max_block_d = MATCH_BLOCKS[dot_fp32]
    return block_a, block_b, max(16, min(triton.next_power_of_2(d), max_block_d))


def _block_c(c: int) -> int:
    if c > MERGE_MAX_C:
        raise ValueError(f"the Triton merge supports C <= {MERGE_MAX_C} channels, got C = {c}")
    return triton.next_power_of_2(c)


def _merge_num_warps(block_c: int) -> int:
    # About 8 fp32 values per thread per row-sized tensor keeps mlerp's
    # backward (five such tensors live) free of spills.
    return max(1, min(16, block_c // 256))


def _plain(kernel):
    return kernel


def match(metric: torch.Tensor, r: int, protected: int, wrap=_plain):
    """Launch match + select.

    metric: [B, N, D] fp32/fp16/bf16, any strides; ``r`` already clamped to
    ``[1, Nb]``. Returns (unm_idx [B, Na-r], src_idx [B, r], dst_idx [B, r],
    dst_start [B, Nb+1], dst_src [B, r]), all int64 (see reference.Match).
    ``wrap``: applied to each kernel before its launch
    (``torch.library.wrap_triton`` when the launcher runs inside a
    ``triton_op``, so torch.export and AOTInductor see the kernels).
    """
    batch, n, d = metric.shape
    na, nb = (n - protected + 1) // 2, (n - protected) // 2
    dev = metric.device
    node_max = _empty(batch, na, dtype=torch.float32, device=dev)
    node_idx = _empty(batch, na, dtype=torch.int64, device=dev)
    # The interpreter has no bf16 arithmetic; fp32 products of bf16 are exact anyway.
    dot_fp32 = metric.dtype == torch.float32 or (interpreting() and metric.dtype == torch.bfloat16)
    block_a, block_b, block_d = _match_blocks(d, dot_fp32)
    num_a_blocks = triton.cdiv(na, block_a)
    wrap(_match_kernel)[(batch * num_a_blocks,)](
        metric, node_max, node_max, node_max, node_idx,  # no position arrays (POS=False)
        metric.stride(0), metric.stride(1), metric.stride(2),
        na, nb, d, protected, num_a_blocks,
        BLOCK_A=block_a, BLOCK_B=block_b, BLOCK_D=block_d,
        DOT_FP32=dot_fp32, SINGLE_D=d <= block_d, POS=False, num_warps=4,
    )
    unm_idx = _empty(batch, na - r, dtype=torch.int64, device=dev)
    src_idx = _empty(batch, r, dtype=torch.int64, device=dev)
    dst_idx = _empty(batch, r, dtype=torch.int64, device=dev)
    dst_start = _empty(batch, nb + 1, dtype=torch.int64, device=dev)
    dst_src = _empty(batch, r, dtype=torch.int64, device=dev)
    wrap(_select_kernel)[(batch,)](
        node_max, node_idx, unm_idx, src_idx, dst_idx, dst_start, dst_src,
        na, nb, r, BLOCK=SELECT_BLOCK, num_warps=4,
    )
    return unm_idx, src_idx, dst_idx, dst_start, dst_src


def merge_forward(x, size, unm_idx, dst_start, dst_src, protected: int, mode: str, wrap=_plain):
    """Launch the merge. x: [B, N, C] any strides; size: [B, N, 1] fp32 or None; ``wrap`` as in :func:`match`.

    Returns x_out [B, N - r, C] (x's dtype, contiguous) and size_out [B, N - r, 1] fp32.
    """
    batch, n, c = x.shape
    r = dst_src.shape[1]
    na, nb = unm_idx.shape[1] + r, dst_start.shape[1] - 1
    out = _empty(batch, n - r, c, dtype=x.dtype, device=x.device)
    size_out = _empty(batch, n - r, 1, dtype=torch.float32, device=x.device)
    size_arg = size.contiguous() if size is not None else size_out  # unused when HAS_SIZE=False
    block_c = _block_c(c)
    wrap(_merge_kernel)[(batch * (n - r),)](
        x, size_arg, x, x, unm_idx, dst_start, dst_src, out, size_out,
        x.stride(0), x.stride(1), x.stride(2),
        n, c, protected, na, nb, r,
        MODE=MODE_IDS[mode], HAS_SIZE=size is not None, BLOCK_C=block_c, POS=False,
        num_warps=_merge_num_warps(block_c),
    )
    return out, size_out


def merge_backward(grad_out, x, size, unm_idx, dst_start, dst_src, protected: int, mode: str):
    """Gradient of :func:`merge_forward` w.r.t. x: [B, N, C] in x's dtype."""
    batch, n, c = x.shape
    r = dst_src.shape[1]
    na, nb = unm_idx.shape[1] + r, dst_start.shape[1] - 1
    grad_x = _empty(batch, n, c, dtype=x.dtype, device=x.device)
    size_arg = size.contiguous() if size is not None else grad_x
    block_c = _block_c(c)
    _merge_backward_kernel[(batch * (n - r),)](
        grad_out, x, size_arg, x, x, unm_idx, dst_start, dst_src, grad_x,
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        x.stride(0), x.stride(1), x.stride(2),
        n, c, protected, na, nb, r,
        MODE=MODE_IDS[mode], HAS_SIZE=size is not None, BLOCK_C=block_c, POS=False,
        num_warps=_merge_num_warps(block_c),
    )
    return grad_x


# --------------------------------------------------------------------------- launchers, Stable Diffusion step

# The select runs one program per SPATIAL_DST_BLOCK destinations (each also
# takes an equal slice of A): 16 programs per image at N = 4096 (2x2 cells),
# 256 at N = 65536.
SPATIAL_DST_BLOCK = 64
SPATIAL_BLOCK = 2048  # A tokens per tile of its threshold and A-slice passes
SPATIAL_ROUTE_BLOCK = 64  # ... of its routing passes (a ROUTE_BLOCK x DST_BLOCK one-hot per tile)
SPATIAL_SELECT_WARPS = 8
SPATIAL_MODE_IDS = {**MODE_IDS, "sum": 3}  # "sum": the gradient of the unmerge


def _idx_bits(na: int) -> int:
    """Bits of the select key's index part: the smallest multiple of 8 that holds ``na - 1``."""
    for bits in (8, 16, 24):
        if na <= 1 << bits:
            return bits
    raise ValueError(f"the spatial select supports up to {1 << 24} A tokens per image, got {na}")


SPATIAL_PARTITION_BLOCK = 1024  # positions per tile (8 warps: no spills on sm_80/sm_90)
SPATIAL_PARTITION_WARPS = 8


def spatial_partition(step: torch.Tensor, h: int, w: int, sx: int, sy: int, seed: int, block: int, rand: bool,
                      wrap=_plain):
    """Launch the partition kernel: (a_pos [Na], b_pos [Nb], slot [N]) int64 on step's device
    (step: int64 scalar tensor, read only when ``rand``), as reference.spatial_partition."""
    hsy, wsx = h // sy, w // sx
    n, nb = h * w, hsy * wsx
    dev = step.device
    a_pos = _empty(n - nb, dtype=torch.int64, device=dev)
    b_pos = _empty(nb, dtype=torch.int64, device=dev)
    slot = _empty(n, dtype=torch.int64, device=dev)
    wrap(_partition_kernel)[(1,)](
        step, a_pos, b_pos, slot, n, w, hsy, wsx, sx, sy, n - nb, seed, block,
        RAND=rand, BLOCK=SPATIAL_PARTITION_BLOCK, num_warps=SPATIAL_PARTITION_WARPS,
    )
    return a_pos, b_pos, slot


def spatial_match(metric: torch.Tensor, a_pos: torch.Tensor, b_pos: torch.Tensor, r: int, wrap=_plain):
    """Launch match + select for a partition given as position arrays.

    metric: [B, N, D] fp32/fp16/bf16, any strides; a_pos [Na], b_pos [Nb]
    int64 (contiguous); ``r`` in ``[1, Na]``, Nb >= 1. Returns
    (unm_idx [B, Na-r], dst_start [B, Nb+1], dst_src [B, r], a_row [B, Na]),
    int64 (see reference.SpatialMatch).
    """
    node_max, node_idx = spatial_scores(metric, a_pos, b_pos, wrap)
    return spatial_select(node_max, node_idx, r, b_pos.numel(), wrap)


def spatial_scores(metric: torch.Tensor, a_pos: torch.Tensor, b_pos: torch.Tensor, wrap=_plain):
    """The match kernel on a given partition: (node_max [B, Na] fp32, node_idx [B, Na] int64)."""
    batch, _, d = metric.shape
    na, nb = a_pos.numel(), b_pos.numel()
    node_max = _empty(batch, na, dtype=torch.float32, device=metric.device)
    node_idx = _empty(batch, na, dtype=torch.int64, device=metric.device)
    dot_fp32 = metric.dtype == torch.float32 or (interpreting() and metric.dtype == torch.bfloat16)
    block_a, block_b, block_d = _match_blocks(d, dot_fp32)
    num_a_blocks = triton.cdiv(na, block_a)
    wrap(_match_kernel)[(batch * num_a_blocks,)](
        metric, a_pos, b_pos, node_max, node_idx,
        metric.stride(0), metric.stride(1), metric.stride(2),
        na, nb, d, 0, num_a_blocks,
        BLOCK_A=block_a, BLOCK_B=block_b, BLOCK_D=block_d,
        DOT_FP32=dot_fp32, SINGLE_D=d <= block_d, POS=True, num_warps=4,
    )
    return node_max, node_idx


def spatial_select(node_max: torch.Tensor, node_idx: torch.Tensor, r: int, nb: int, wrap=_plain):
    """The select kernel: node_max [B, Na] fp32 (no NaN), node_idx [B, Na] int64
    in [0, nb) (contiguous), ``r`` in [1, Na] -> the four tensors of :func:`spatial_match`."""
    batch, na = node_max.shape
    dev = node_max.device
    nprog = triton.cdiv(nb, SPATIAL_DST_BLOCK)
    unm_idx = _empty(batch, na - r, dtype=torch.int64, device=dev)
    dst_start = _empty(batch, nb + 1, dtype=torch.int64, device=dev)
    dst_src = _empty(batch, r, dtype=torch.int64, device=dev)
    a_row = _empty(batch, na, dtype=torch.int64, device=dev)
    wrap(_spatial_select_kernel)[(batch * nprog,)](
        node_max, node_idx, unm_idx, dst_start, dst_src, a_row,
        na, nb, r, nprog, triton.cdiv(na, nprog),
        IDX_BITS=_idx_bits(na), BLOCK=SPATIAL_BLOCK, BLOCK_ROUTE=SPATIAL_ROUTE_BLOCK,
        DST_BLOCK=SPATIAL_DST_BLOCK, num_warps=SPATIAL_SELECT_WARPS,
    )
    return unm_idx, dst_start, dst_src, a_row


def spatial_merge_forward(x, a_pos, b_pos, unm_idx, dst_start, dst_src, mode: str, wrap=_plain):
    """Launch the merge for a spatial partition. x: [B, N, C] any strides.

    Returns [B, N - r, C] in x's dtype, contiguous: [unmerged A ascending, B].
    ``mode`` may also be "sum" (B rows plus their sources, unweighted: the
    gradient of :func:`spatial_unmerge`).
    """
    batch, n, c = x.shape
    r = dst_src.shape[1]
    na, nb = unm_idx.shape[1] + r, dst_start.shape[1] - 1
    out = _empty(batch, n - r, c, dtype=x.dtype, device=x.device)
    size_out = torch.empty(batch * (n - r), dtype=torch.float32, device=x.device)  # written, not returned
    block_c = _block_c(c)
    wrap(_merge_kernel)[(batch * (n - r),)](
        x, size_out, a_pos, b_pos, unm_idx, dst_start, dst_src, out, size_out,
        x.stride(0), x.stride(1), x.stride(2),
        n, c, 0, na, nb, r,
        MODE=SPATIAL_MODE_IDS[mode], HAS_SIZE=False, BLOCK_C=block_c, POS=True,
        num_warps=_merge_num_warps(block_c),
    )
    return out


def spatial_merge_backward(grad_out, x, a_pos, b_pos, unm_idx, dst_start, dst_src, mode: str):
    """Gradient of :func:`spatial_merge_forward` w.r.t. x: [B, N, C] in x's dtype."""
    batch, n, c = x.shape
    r = dst_src.shape[1]
    na, nb = unm_idx.shape[1] + r, dst_start.shape[1] - 1
    grad_x = _empty(batch, n, c, dtype=x.dtype, device=x.device)
    block_c = _block_c(c)
    _merge_backward_kernel[(batch * (n - r),)](
        grad_out, x, grad_x, a_pos, b_pos, unm_idx, dst_start, dst_src, grad_x,
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        x.stride(0), x.stride(1), x.stride(2),
        n, c, 0, na, nb, r,
        MODE=SPATIAL_MODE_IDS[mode], HAS_SIZE=False, BLOCK_C=block_c, POS=True,
        num_warps=_merge_num_warps(block_c),
    )
    return grad_x


def spatial_unmerge(y, residual, slot, a_row, wrap=_plain):
    """Launch the unmerge: y [B, N - r, C] -> [B, N, C] (+ residual [B, N, C], y's
    dtype, when not None), any strides; slot [N], a_row [B, Na] int64."""
    batch, n_out, c = y.shape
    n, na = slot.numel(), a_row.shape[1]
    out = _empty(batch, n, c, dtype=y.dtype, device=y.device)
    res = residual if residual is not None else y  # unused when HAS_RES=False
    block_c = _block_c(c)
    wrap(_unmerge_kernel)[(batch * n,)](
        y, res, slot, a_row, out,
        y.stride(0), y.stride(1), y.stride(2), res.stride(0), res.stride(1), res.stride(2),
        n, c, na, n - n_out,
        HAS_RES=residual is not None, BLOCK_C=block_c,
        num_warps=_unmerge_num_warps(block_c),
    )
    return out


def _unmerge_num_warps(block_c: int) -> int:
    return max(1, min(8, block_c // 256))
