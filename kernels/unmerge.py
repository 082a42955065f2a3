"""Unmerge: the merged tokens back to all N positions of the grid, fused with the
block's residual add (reference.spatial_unmerge, docs/design.md §5.1).

One program per output row gathers row ``a_row[slot[n]]`` (an A position) or
``slot[n] - r`` (a B position) of the merged tokens and adds the residual in
fp32, rounded once: bitwise what torch's add gives.
"""
import triton
import triton.language as tl

from .common import empty, on_device, plain, row_block


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


def unmerge_num_warps(block_c: int) -> int:
    return max(1, min(8, block_c // 256))


def spatial_unmerge(y, residual, slot, a_row, wrap=plain):
    """Launch the unmerge: y [B, N - r, C] -> [B, N, C] (+ residual [B, N, C], y's
    dtype, when not None), any strides; slot [N], a_row [B, Na] int64."""
    batch, n_out, c = y.shape
    n, na = slot.numel(), a_row.shape[1]
    out = empty(batch, n, c, dtype=y.dtype, device=y.device)
    res = residual if residual is not None else y  # unused when HAS_RES=False
    block_c = row_block(c)
    with on_device(y):
        wrap(_unmerge_kernel)[(batch * n,)](
            y, res, slot, a_row, out,
            y.stride(0), y.stride(1), y.stride(2), res.stride(0), res.stride(1), res.stride(2),
            n, c, na, n - n_out,
            HAS_RES=residual is not None, BLOCK_C=block_c, num_warps=unmerge_num_warps(block_c),
        )
    return out
