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
def _match_kernel(
    metric_ptr, node_max_ptr, node_idx_ptr,
    stride_b, stride_n, stride_d,
    NA, NB, D, P, num_a_blocks,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, SINGLE_D: tl.constexpr,
):
    pid = tl.program_id(0)
    batch = pid // num_a_blocks
    offs_a = (pid % num_a_blocks) * BLOCK_A + tl.arange(0, BLOCK_A)
    mask_a = offs_a < NA
    base = metric_ptr + batch.to(tl.int64) * stride_b
    rows_a = base + (P + 2 * offs_a)[:, None].to(tl.int64) * stride_n

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
        rows_b = base + (P + 2 * offs_b + 1)[None, :].to(tl.int64) * stride_n
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
def _order_key(node_max_ptr, offs, mask):
    """One int64 per A token whose order is the selection order: larger
    node_max first, then smaller index. NaN never reaches here (the match
    kernel wrote -inf for it); -0.0 is folded into +0.0 so they tie, as they
    do in torch's sort."""
    v = tl.load(node_max_ptr + offs, mask=mask, other=float("-inf")) + 0.0
    bits = v.to(tl.int32, bitcast=True)
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # float order as signed-int order
    return bits.to(tl.int64) * 4294967296 + (2147483647 - offs).to(tl.int64)


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
        key_i = _order_key(node_max_ptr, offs_i, mask_i)
        rank = tl.zeros([BLOCK], dtype=tl.int32)
        for k0 in range(0, NA, BLOCK):
            offs_k = k0 + lanes
            mask_k = offs_k < NA
            key_k = _order_key(node_max_ptr, offs_k, mask_k)
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
        is_src = mask_i & (_order_key(node_max_ptr, offs_i, mask_i) >= threshold)
        keep = mask_i & ~is_src
        pos = n_unm + tl.cumsum(keep.to(tl.int32), axis=0) - 1
        tl.store(unm_idx_ptr + pos, offs_i.to(tl.int64), mask=keep)
        n_unm += tl.sum(keep.to(tl.int32), axis=0)

        dst_i = tl.load(node_idx_ptr + offs_i, mask=mask_i, other=0)
        slot = tl.zeros([BLOCK], dtype=tl.int32)
        for k0 in range(0, NA, BLOCK):
            offs_k = k0 + lanes
            mask_k = offs_k < NA
            src_k = mask_k & (_order_key(node_max_ptr, offs_k, mask_k) >= threshold)
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
            src_k = mask_k & (_order_key(node_max_ptr, offs_k, mask_k) >= threshold)
            dst_k = tl.load(node_idx_ptr + offs_k, mask=mask_k, other=0)
            start += tl.sum(((dst_k[None, :] < offs_j[:, None]) & src_k[None, :]).to(tl.int32), axis=1)
        tl.store(dst_start_ptr + offs_j, start.to(tl.int64), mask=offs_j <= NB)


@triton.jit
def _locate_output_row(unm_idx_ptr, dst_start_ptr, dst_src_ptr, pid, N, P, NA, NB, R):
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
    a_pos = tl.load(unm_idx_ptr + (o - P), mask=is_unm, other=0)
    k_start = tl.load(dst_start_ptr + j, mask=is_b, other=0)
    k_end = tl.load(dst_start_ptr + j + 1, mask=is_b, other=0)
    row = tl.where(o < P, o, tl.where(is_b, P + 2 * j + 1, P + 2 * a_pos))
    return batch, o, row, k_start, k_end, dst_src_ptr


@triton.jit
def _load_size(size_ptr, row, HAS_SIZE: tl.constexpr):
    if HAS_SIZE:
        return tl.load(size_ptr + row)
    else:
        return tl.full([], 1.0, tl.float32)


@triton.jit
def _merge_kernel(
    x_ptr, size_ptr, unm_idx_ptr, dst_start_ptr, dst_src_ptr, out_ptr, size_out_ptr,
    stride_xb, stride_xn, stride_xc,
    N, C, P, NA, NB, R,
    MODE: tl.constexpr, HAS_SIZE: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    batch, o, row, k_start, k_end, dst_src_ptr = _locate_output_row(
        unm_idx_ptr, dst_start_ptr, dst_src_ptr, pid, N, P, NA, NB, R)
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
            src_row = P + 2 * tl.load(dst_src_ptr + k)
            a = tl.load(x_ptr + src_row * stride_xn + offs_c * stride_xc, mask=mask_c).to(tl.float32)
            s_a = _load_size(size_ptr, src_row, HAS_SIZE)
            total += a * s_a
            s_total += s_a
            norm_max = tl.maximum(norm_max, tl.sqrt(tl.sum(a * a, axis=0)))
        merged = total / s_total
        if MODE == 1:
            merged = merged / tl.maximum(tl.sqrt(tl.sum(merged * merged, axis=0)), EPS) * norm_max
        tl.store(out_row, merged.to(out_ptr.dtype.element_ty), mask=mask_c)
        tl.store(size_out_ptr + pid, s_total)


@triton.jit
def _merge_backward_kernel(
    grad_out_ptr, x_ptr, size_ptr, unm_idx_ptr, dst_start_ptr, dst_src_ptr, grad_x_ptr,
    stride_gb, stride_gn, stride_gc, stride_xb, stride_xn, stride_xc,
    N, C, P, NA, NB, R,
    MODE: tl.constexpr, HAS_SIZE: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    batch, o, row, k_start, k_end, dst_src_ptr = _locate_output_row(
        unm_idx_ptr, dst_start_ptr, dst_src_ptr, pid, N, P, NA, NB, R)
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
            src_row = P + 2 * tl.load(dst_src_ptr + k)
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
                src_row = P + 2 * tl.load(dst_src_ptr + k)
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
                s_total += _load_size(size_ptr, P + 2 * tl.load(dst_src_ptr + k), HAS_SIZE)
        # gf is now the gradient of the weighted mean; every contributor gets
        # its share, and in mlerp the largest one also gets the norm's.
        gf = gf / s_total
        grad = gf * s
        if MODE == 1:
            if arg_row == row:
                grad += arg_scale * v
        tl.store(grad_x_ptr + row * C + offs_c, grad.to(dtype), mask=mask_c)
        for k in range(k_start, k_end):
            src_row = P + 2 * tl.load(dst_src_ptr + k)
            s_a = _load_size(size_ptr, src_row, HAS_SIZE)
            grad = gf * s_a
            if MODE == 1:
                if arg_row == src_row:
                    a = tl.load(x_ptr + src_row * stride_xn + offs_c * stride_xc, mask=mask_c).to(tl.float32)
                    grad += arg_scale * a
            tl.store(grad_x_ptr + src_row * C + offs_c, grad.to(dtype), mask=mask_c)


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
        metric, node_max, node_idx,
        metric.stride(0), metric.stride(1), metric.stride(2),
        na, nb, d, protected, num_a_blocks,
        BLOCK_A=block_a, BLOCK_B=block_b, BLOCK_D=block_d,
        DOT_FP32=dot_fp32, SINGLE_D=d <= block_d, num_warps=4,
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
        x, size_arg, unm_idx, dst_start, dst_src, out, size_out,
        x.stride(0), x.stride(1), x.stride(2),
        n, c, protected, na, nb, r,
        MODE=MODE_IDS[mode], HAS_SIZE=size is not None, BLOCK_C=block_c,
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
        grad_out, x, size_arg, unm_idx, dst_start, dst_src, grad_x,
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        x.stride(0), x.stride(1), x.stride(2),
        n, c, protected, na, nb, r,
        MODE=MODE_IDS[mode], HAS_SIZE=size is not None, BLOCK_C=block_c,
        num_warps=_merge_num_warps(block_c),
    )
    return grad_x
