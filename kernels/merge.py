"""Merge: apply a match to the tokens (reference.merge_tokens / reference.spatial_merge,
docs/design.md §1.5), and its gradient.

``_merge_kernel``: one program per output row. It copies prefix, kept and
untouched B rows bitwise, and combines each B row with its sources in a
fixed order (``mean``, ``mlerp``, ``prune``; ``sum`` for the gradient of the
spatial unmerge). Every input row is read once; a pruned source not at all.

``_merge_tiles_kernel``: the same output for a ViT step (its partition, sizes
written), several output rows per program: the rows copied as they are move as
one tile, the tile's B rows with sources are combined in channel chunks. Which
of the launch variants (``MERGE_VARIANTS``) a step runs is measured per card.

``_merge_backward_kernel``: one program per output row too, writing the
gradient of every input row that fed it (each input row feeds exactly one
output row), so the backward is a gather without atomics.

The partition is the alternating one of a ViT (after ``P`` prefix tokens) or
given as position arrays (``POS``: the Stable Diffusion step).
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .common import (
    EPS, MODE_IDS, MODE_MLERP, MODE_PRUNE, MODE_SUM, a_position, b_position, cdiv, empty, load_size, merged_rows,
    on_device, plain, row_block, weighted_sum,
)


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
    row_b = b_position(b_pos_ptr, j, is_b, P, POS)
    row_a = a_position(a_pos_ptr, i, is_unm, P, POS)
    row = tl.where(o < P, o, tl.where(is_b, row_b, row_a))
    return batch, o, row, k_start, k_end, dst_src_ptr


@triton.jit
def _merge_kernel(
    x_ptr, size_ptr, a_pos_ptr, b_pos_ptr, unm_idx_ptr, dst_start_ptr, dst_src_ptr, out_ptr, size_out_ptr, bias_ptr,
    stride_xb, stride_xn, stride_xc,
    N, C, P, NA, NB, R, BIAS_STRIDE,
    MODE: tl.constexpr, HAS_SIZE: tl.constexpr, WRITE_SIZE: tl.constexpr, BLOCK_C: tl.constexpr, POS: tl.constexpr,
    BIAS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    batch, o, row, k_start, k_end, dst_src_ptr = _locate_output_row(
        unm_idx_ptr, dst_start_ptr, dst_src_ptr, a_pos_ptr, b_pos_ptr, pid, N, P, NA, NB, R, POS)
    x_ptr += batch * stride_xb
    size_ptr += batch * N
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    v = tl.load(x_ptr + row * stride_xn + offs_c * stride_xc, mask=mask_c)
    s = load_size(size_ptr, row, True, HAS_SIZE)
    out_row = out_ptr + pid * C + offs_c
    if (MODE == MODE_PRUNE) | (k_end == k_start):
        # Prefix, unmerged and untouched B rows are copied bitwise; in prune
        # mode the sources are dropped without being read.
        tl.store(out_row, v, mask=mask_c)
        if WRITE_SIZE:
            tl.store(size_out_ptr + pid, s)
        if BIAS:
            tl.store(bias_ptr + batch * BIAS_STRIDE + o, tl.log(s).to(bias_ptr.dtype.element_ty))
    else:
        b_row = v.to(tl.float32)
        total = b_row * s
        s_total = s
        norm_max = tl.sqrt(tl.sum(b_row * b_row, axis=0))
        for k in range(k_start, k_end):
            src_row = a_position(a_pos_ptr, tl.load(dst_src_ptr + k), k < k_end, P, POS)
            a = tl.load(x_ptr + src_row * stride_xn + offs_c * stride_xc, mask=mask_c).to(tl.float32)
            s_a = load_size(size_ptr, src_row, True, HAS_SIZE)
            total += a * s_a
            s_total += s_a
            norm_max = tl.maximum(norm_max, tl.sqrt(tl.sum(a * a, axis=0)))
        if MODE == MODE_SUM:
            merged = total
        else:
            merged = total / s_total
        if MODE == MODE_MLERP:
            # NaN propagates (as in the reference): a NaN contributor makes the whole merged row NaN.
            norm_m = tl.maximum(tl.sqrt(tl.sum(merged * merged, axis=0)), EPS, propagate_nan=tl.PropagateNan.ALL)
            merged = merged / norm_m * norm_max
        tl.store(out_row, merged.to(out_ptr.dtype.element_ty), mask=mask_c)
        if WRITE_SIZE:
            tl.store(size_out_ptr + pid, s_total)
        if BIAS:
            tl.store(bias_ptr + batch * BIAS_STRIDE + o, tl.log(s_total).to(bias_ptr.dtype.element_ty))


@triton.jit
def _merge_tiles_kernel(
    x_ptr, size_ptr, unm_idx_ptr, dst_start_ptr, dst_src_ptr, out_ptr, size_out_ptr, bias_ptr,
    stride_xb, stride_xn, stride_xc,
    N, C, P, NA, NB, R, BIAS_STRIDE, num_tiles,
    MODE: tl.constexpr, HAS_SIZE: tl.constexpr, BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``_merge_kernel``'s output (ViT partition, sizes written) for BLOCK_R output rows of one image per program.

    One row per program keeps ~1.5 KB in flight per 8 warps, too little to cover HBM latency behind the
    index loads each row waits on; here the rows copied as they are (most of them) move as one
    [BLOCK_R, BLOCK_C >= C] tile. The tile's B rows with sources are then combined in BLOCK_K-channel
    chunks (``common.weighted_sum`` / ``mlerp_scale``, as the one-launch step), so their fp32 work does
    not hold whole rows in registers: registers bound how many tiles an SM keeps in flight."""
    pid = tl.program_id(0)
    batch = (pid // num_tiles).to(tl.int64)
    o = (pid % num_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
    n_out = N - R
    n_unm = NA - R
    mask_o = o < n_out
    is_unm = (o >= P) & (o < P + n_unm)
    is_b = mask_o & (o >= P + n_unm)
    j = o - P - n_unm
    dst_start = dst_start_ptr + batch * (NB + 1)
    i = tl.load(unm_idx_ptr + batch * n_unm + (o - P), mask=is_unm, other=0)
    start = tl.load(dst_start + j, mask=is_b, other=0)
    count = tl.load(dst_start + j + 1, mask=is_b, other=0) - start
    row = tl.where(o < P, o, tl.where(is_b, P + 2 * j + 1, P + 2 * i)).to(tl.int64)
    if MODE == MODE_PRUNE:
        copy = mask_o  # the sources are dropped unread
    else:
        copy = mask_o & (count == 0)
    x = x_ptr + batch * stride_xb
    size = size_ptr + batch * N
    out = out_ptr + (batch * n_out + o)[:, None] * C
    offs_c = tl.arange(0, BLOCK_C)
    mask = copy[:, None] & (offs_c < C)[None, :]
    tl.store(out + offs_c[None, :], tl.load(x + row[:, None] * stride_xn + offs_c[None, :] * stride_xc, mask=mask),
             mask=mask)
    s = load_size(size, row, copy, HAS_SIZE)
    if MODE != MODE_PRUNE:
        most = tl.max(count, axis=0)
        if most > 0:
            active = count > 0
            dst_src = dst_src_ptr + batch * R
            s_b, s_total, scale = merged_rows(x, size, dst_src, start, count, most, row, active, stride_xn,
                                              stride_xc, C, P, MODE, HAS_SIZE, BLOCK_R, BLOCK_K)
            lanes_k = tl.arange(0, BLOCK_K)
            for c0 in range(0, C, BLOCK_K):
                offs_k = c0 + lanes_k
                merged = weighted_sum(x, size, dst_src, start, count, most, row, s_b, active, offs_k,
                                      stride_xn, stride_xc, C, P, HAS_SIZE) / s_total[:, None]
                if MODE == MODE_MLERP:
                    merged = merged * scale[:, None]
                tl.store(out + offs_k[None, :], merged.to(out_ptr.dtype.element_ty),
                         mask=active[:, None] & (offs_k < C)[None, :])
            s = tl.where(active, s_total, s)
    tl.store(size_out_ptr + batch * n_out + o, s, mask=mask_o)
    if BIAS:
        tl.store(bias_ptr + batch * BIAS_STRIDE + o, tl.log(s).to(bias_ptr.dtype.element_ty), mask=mask_o)


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
    if (MODE == MODE_PRUNE) | (k_end == k_start):
        tl.store(grad_x_ptr + row * C + offs_c, g.to(dtype), mask=mask_c)
        for k in range(k_start, k_end):  # prune: sources get zero
            src_row = a_position(a_pos_ptr, tl.load(dst_src_ptr + k), k < k_end, P, POS)
            tl.store(grad_x_ptr + src_row * C + offs_c, tl.zeros([BLOCK_C], dtype), mask=mask_c)
    else:
        gf = g.to(tl.float32)
        s = load_size(size_ptr, row, True, HAS_SIZE)
        s_total = s
        if MODE == MODE_MLERP:
            # Recompute the forward: the weighted sum, and which contributor
            # has the largest norm (the first one on a tie).
            v = tl.load(x_ptr + row * stride_xn + offs_c * stride_xc, mask=mask_c).to(tl.float32)
            total = v * s
            norm_max = tl.sqrt(tl.sum(v * v, axis=0))
            arg_row = row
            for k in range(k_start, k_end):
                src_row = a_position(a_pos_ptr, tl.load(dst_src_ptr + k), k < k_end, P, POS)
                a = tl.load(x_ptr + src_row * stride_xn + offs_c * stride_xc, mask=mask_c).to(tl.float32)
                s_a = load_size(size_ptr, src_row, True, HAS_SIZE)
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
                s_total += load_size(
                    size_ptr, a_position(a_pos_ptr, tl.load(dst_src_ptr + k), k < k_end, P, POS), True, HAS_SIZE)
        # gf is now the gradient of the weighted mean (of the sum, MODE 3);
        # every contributor gets its share, and in mlerp the largest one also
        # gets the norm's.
        if MODE != MODE_SUM:
            gf = gf / s_total
        grad = gf * s
        if MODE == MODE_MLERP:
            if arg_row == row:
                grad += arg_scale * v
        tl.store(grad_x_ptr + row * C + offs_c, grad.to(dtype), mask=mask_c)
        for k in range(k_start, k_end):
            src_row = a_position(a_pos_ptr, tl.load(dst_src_ptr + k), k < k_end, P, POS)
            s_a = load_size(size_ptr, src_row, True, HAS_SIZE)
            grad = gf * s_a
            if MODE == MODE_MLERP:
                if arg_row == src_row:
                    a = tl.load(x_ptr + src_row * stride_xn + offs_c * stride_xc, mask=mask_c).to(tl.float32)
                    grad += arg_scale * a
            tl.store(grad_x_ptr + src_row * C + offs_c, grad.to(dtype), mask=mask_c)


def merge_num_warps(block_c: int) -> int:
    # About 4 fp32 values per thread per row-sized tensor keeps mlerp's
    # backward (five such tensors live) free of spills; at 8 per thread ptxas
    # 12.9 spilled the spatial mean merge at C = 1280 on sm_90.
    return max(1, min(16, block_c // 128))


def _sets(n, r, unm_idx, dst_start, positions):
    """(Na, Nb, a_pos, b_pos) of a launch: a_pos/b_pos are placeholders when
    the partition is the alternating one (POS=False never reads them)."""
    na, nb = unm_idx.shape[1] + r, dst_start.shape[1] - 1
    a_pos, b_pos = positions if positions is not None else (unm_idx, unm_idx)
    return na, nb, a_pos, b_pos


class MergeVariant(NamedTuple):
    """How a ViT step's merge is launched: ``rows`` output rows per program (more than one: the tiles of
    ``_merge_tiles_kernel``; one: ``_merge_kernel``) and elements per thread (so warps = rows x padded
    row / (32 x per_thread), at most 16; 0: the row kernel's ``merge_num_warps``)."""

    rows: int = 1
    per_thread: int = 0

    @property
    def tiles(self) -> bool:
        return self.rows > 1


# The ViT step's merge candidates (the names of tofu_triton/tables/vit_merge.json; bench/tournament_vit.py).
# One row per program of 8 warps ("rows", the first and the default) holds ~1.5 KB in flight per 8 warps
# at C = 768, and an SM runs at most 64 warps: with the index loads each row waits on, that is too little
# to cover HBM's latency (H200, run 4: the four-launch step's 146 us at B = 256 where its bytes need 53).
# The others hold more rows per SM: 2 warps a row, or tiles of 2 or 4 rows. Registers hold 64-bit
# pointers for every element a thread loads, so ~16 elements per thread keeps them few (ahead-of-time
# compile: tests/test_aot_compile.py).
MERGE_VARIANTS = {
    "rows": MergeVariant(),
    "rows_lean": MergeVariant(per_thread=16),
    "tiles2": MergeVariant(rows=2, per_thread=16),
    "tiles4": MergeVariant(rows=4, per_thread=16),
}
# fp32 values per thread in each [rows, chunk] tile of the tiles' merged rows (their sums, norms and
# contributors). 2 spilled least over the widths compiled ahead of time (4 and 1 spilled more at some;
# tests/test_aot_compile.py): the candidates may spill a few words, which their measured times include.
MERGE_CHUNK_PER_THREAD = 2


def merge_launch(variant: str, block_c: int):
    """(rows per program, num_warps, channels per chunk of the merged rows) of the merge ``variant`` for
    rows padded to ``block_c`` channels (all powers of two)."""
    v = MERGE_VARIANTS[variant]
    rows = v.rows
    warps = max(1, min(16, rows * block_c // (32 * v.per_thread))) if v.per_thread else merge_num_warps(block_c)
    return rows, warps, min(block_c, max(16, 32 * warps * MERGE_CHUNK_PER_THREAD // rows))


def merge_forward(x, size, unm_idx, dst_start, dst_src, protected: int, mode: str, positions=None,
                  with_size: bool = True, wrap=plain, bias=None, variant: str = "rows"):
    """Launch the merge.

    x: [B, N, C] any strides; size: [B, N, 1] fp32 or None (all ones);
    unm_idx [B, Na-r], dst_start [B, Nb+1], dst_src [B, r] int64; the
    partition alternates after ``protected`` tokens, or ``positions = (a_pos,
    b_pos)``. ``mode``: mean, mlerp, prune or sum. Returns (x_out [B, N - r, C]
    in x's dtype, contiguous; size_out [B, N - r, 1] fp32, or None without
    ``with_size``). ``bias``: None, or a [B, >= N - r] buffer (last dim
    contiguous, any float dtype) that also receives log(size_out), the next
    attention's bias (the ViT step's; needs ``with_size``). ``variant``: one of
    ``MERGE_VARIANTS``; the tiled ones take the ViT partition with sizes written
    only. All copy rows bitwise; merged rows agree up to rounding.
    """
    if variant not in MERGE_VARIANTS:
        raise ValueError(f"variant must be one of {tuple(MERGE_VARIANTS)}, got {variant!r}")
    tiles = MERGE_VARIANTS[variant].tiles
    if tiles and (positions is not None or not with_size):
        raise ValueError("the tiled merge takes the ViT partition with sizes written (positions=None, with_size=True)")
    batch, n, c = x.shape
    r = dst_src.shape[1]
    na, nb, a_pos, b_pos = _sets(n, r, unm_idx, dst_start, positions)
    out = empty(batch, n - r, c, dtype=x.dtype, device=x.device)
    size_out = empty(batch, n - r, 1, dtype=torch.float32, device=x.device) if with_size else None
    size_arg = size.contiguous() if size is not None else out  # unused when HAS_SIZE=False
    bias_arg, bias_stride = (bias, bias.stride(0)) if bias is not None else (out, 0)
    block_c = row_block(c)
    rows, warps, chunk = merge_launch(variant, block_c)
    with on_device(x):
        if tiles:
            num_tiles = cdiv(n - r, rows)
            wrap(_merge_tiles_kernel)[(batch * num_tiles,)](
                x, size_arg, unm_idx, dst_start, dst_src, out, size_out, bias_arg,
                x.stride(0), x.stride(1), x.stride(2),
                n, c, protected, na, nb, r, bias_stride, num_tiles,
                MODE=MODE_IDS[mode], HAS_SIZE=size is not None, BIAS=bias is not None,
                BLOCK_R=rows, BLOCK_C=block_c, BLOCK_K=chunk, num_warps=warps,
            )
        else:
            wrap(_merge_kernel)[(batch * (n - r),)](
                x, size_arg, a_pos, b_pos, unm_idx, dst_start, dst_src, out, size_out if with_size else out,
                bias_arg, x.stride(0), x.stride(1), x.stride(2),
                n, c, protected, na, nb, r, bias_stride,
                MODE=MODE_IDS[mode], HAS_SIZE=size is not None, WRITE_SIZE=with_size, BLOCK_C=block_c,
                POS=positions is not None, BIAS=bias is not None, num_warps=warps,
            )
    return out, size_out


def merge_backward(grad_out, x, size, unm_idx, dst_start, dst_src, protected: int, mode: str, positions=None):
    """Gradient of :func:`merge_forward` w.r.t. x: [B, N, C] in x's dtype."""
    batch, n, c = x.shape
    r = dst_src.shape[1]
    na, nb, a_pos, b_pos = _sets(n, r, unm_idx, dst_start, positions)
    grad_x = empty(batch, n, c, dtype=x.dtype, device=x.device)
    size_arg = size.contiguous() if size is not None else grad_x
    block_c = row_block(c)
    with on_device(x):
        _merge_backward_kernel[(batch * (n - r),)](
            grad_out, x, size_arg, a_pos, b_pos, unm_idx, dst_start, dst_src, grad_x,
            grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
            x.stride(0), x.stride(1), x.stride(2),
            n, c, protected, na, nb, r,
            MODE=MODE_IDS[mode], HAS_SIZE=size is not None, BLOCK_C=block_c, POS=positions is not None,
            num_warps=merge_num_warps(block_c),
        )
    return grad_x
