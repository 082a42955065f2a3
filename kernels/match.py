"""Match: every A token's most similar B token (reference.match_scores, docs/design.md §1.2).

One program per (image, block of A rows) streams the B rows in tiles with
``tl.dot`` (fp32 accumulation), scales by inverse norms and keeps a running
max/argmax (``common.best_partners``). The ``Na x Nb`` score matrix never
reaches memory; only ``node_max``/``node_idx`` do. The partition is the
alternating one of a ViT (A = ``P, P+2, ...``, B = ``P+1, P+3, ...``) or,
for the Stable Diffusion step, given as position arrays.

The Stable Diffusion step has a second scores candidate, "dot"
(``spatial_scores``): every token's inverse norm first (one small launch),
then larger ``tl.dot`` tiles that only multiply, scale and keep the best, so
no program recomputes a B norm; ``SPATIAL_SCORES_CANDIDATES`` names both, and
bench/tournament_sd.py measures which runs (docs/design.md §5.1).
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from tofu_triton.reference import split_sizes

from .common import EPS, best_partners, cdiv, dot_in_fp32, empty, keep_best, next_power_of_2, on_device, plain

# (BLOCK_A, BLOCK_B, largest BLOCK_D), keyed by whether the dot runs on fp32
# inputs. The exact fp32 dot runs on CUDA cores and needs far more registers
# per tile: these are the largest tiles that compile without spills on sm_80/90.
MATCH_BLOCKS = {True: (32, 32, 16), False: (64, 32, 64)}
MATCH_WARPS = 4
# With the keys in (a ViT step's heads averaged as loaded) the fp16/bf16 tiles spill at 4 warps on sm_80/sm_90.
MATCH_WARPS_KEYS = 8


def match_blocks(d: int, dot_fp32: bool):
    """(BLOCK_A, BLOCK_B, BLOCK_D) for head dim ``d``; tl.dot needs each >= 16."""
    block_a, block_b, max_block_d = MATCH_BLOCKS[dot_fp32]
    return block_a, block_b, max(16, min(next_power_of_2(d), max_block_d))


@triton.jit
def _match_kernel(
    metric_ptr, a_pos_ptr, b_pos_ptr, node_max_ptr, node_idx_ptr,
    stride_b, stride_n, stride_d, stride_h, H, inv_h,
    NA, NB, D, P, num_a_blocks,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, SINGLE_D: tl.constexpr, POS: tl.constexpr, HEADS: tl.constexpr,
):
    pid = tl.program_id(0)
    batch = pid // num_a_blocks
    offs_a = (pid % num_a_blocks) * BLOCK_A + tl.arange(0, BLOCK_A)
    mask_a = offs_a < NA
    if POS:
        rows_a = tl.load(a_pos_ptr + offs_a, mask=mask_a, other=0)
    else:
        rows_a = (P + 2 * offs_a).to(tl.int64)
    best, best_idx = best_partners(
        metric_ptr + batch.to(tl.int64) * stride_b, rows_a, mask_a, b_pos_ptr, NB, D, P, stride_n, stride_d,
        BLOCK_A, BLOCK_B, BLOCK_D, DOT_FP32, SINGLE_D, POS, stride_h, H, inv_h, HEADS)
    out = batch.to(tl.int64) * NA + offs_a
    tl.store(node_max_ptr + out, best, mask=mask_a)
    tl.store(node_idx_ptr + out, best_idx.to(tl.int64), mask=mask_a)


def match_scores(metric: torch.Tensor, protected: int = 0, positions=None, wrap=plain):
    """Launch the match.

    metric: [B, N, D] fp32/fp16/bf16, any strides; or a ViT block's keys
    [B, H, N, D] (any strides), averaged over heads as each tile is loaded
    (``common.load_rows``, exactly reference.head_mean): the metric then costs
    no launch and never reaches memory. The partition is the
    alternating one after ``protected`` prefix tokens, or ``positions =
    (a_pos [Na], b_pos [Nb])`` int64 contiguous arrays of token positions.
    Returns (node_max [B, Na] fp32, node_idx [B, Na] int64), as
    reference.match_scores. ``wrap``: see ``common.plain``.
    """
    heads = metric.shape[1] if metric.dim() == 4 else 1
    batch, n, d = metric.shape[0], metric.shape[-2], metric.shape[-1]
    if positions is None:
        na, nb = split_sizes(n, protected)
        a_pos = b_pos = metric  # not read (POS=False)
    else:
        a_pos, b_pos = positions
        na, nb = a_pos.numel(), b_pos.numel()
    node_max = empty(batch, na, dtype=torch.float32, device=metric.device)
    node_idx = empty(batch, na, dtype=torch.int64, device=metric.device)
    dot_fp32 = dot_in_fp32(metric.dtype)
    block_a, block_b, block_d = match_blocks(d, dot_fp32)
    num_a_blocks = cdiv(na, block_a)
    with on_device(metric):
        wrap(_match_kernel)[(batch * num_a_blocks,)](
            metric, a_pos, b_pos, node_max, node_idx,
            metric.stride(0), metric.stride(-2), metric.stride(-1), metric.stride(1) if metric.dim() == 4 else 0,
            heads, 1.0 / heads, na, nb, d, protected, num_a_blocks,
            BLOCK_A=block_a, BLOCK_B=block_b, BLOCK_D=block_d,
            DOT_FP32=dot_fp32, SINGLE_D=d <= block_d, POS=positions is not None, HEADS=metric.dim() == 4,
            num_warps=MATCH_WARPS_KEYS if metric.dim() == 4 else MATCH_WARPS,
        )
    return node_max, node_idx


HEAD_MEAN_ELEMENTS = 1024  # rows x channels per program: 16 rows at D = 64 (13 programs per image at N = 197)
HEAD_MEAN_WARPS = 8  # 4 elements per thread per head: every head's load in flight without spills (sm_80/90)


def head_mean_rows(d: int) -> int:
    """Token rows per program of the head mean for head dim ``d``."""
    return max(1, HEAD_MEAN_ELEMENTS // next_power_of_2(d))


@triton.jit
def _head_mean_kernel(keys_ptr, out_ptr, stride_b, stride_h, stride_n, stride_d, N, D, inv_h, num_blocks,
                      H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[b, n] = reference.head_mean(keys)[b, n] for BLOCK_N rows: the heads summed in fp32 in head order.
    H is a constant so the loop unrolls and every head's load is in flight at once (the sum stays in order)."""
    pid = tl.program_id(0)
    batch = (pid // num_blocks).to(tl.int64)
    offs_n = (pid % num_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_n < N)[:, None] & (offs_d < D)[None, :]
    ptrs = keys_ptr + batch * stride_b + offs_n[:, None].to(tl.int64) * stride_n + offs_d[None, :] * stride_d
    acc = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    for h in tl.static_range(1, H):
        acc += tl.load(ptrs + h * stride_h, mask=mask, other=0.0).to(tl.float32)
    out = (acc * inv_h).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + batch * N * D + offs_n[:, None] * D + offs_d[None, :], out, mask=mask)


def head_mean(keys: torch.Tensor, wrap=plain) -> torch.Tensor:
    """reference.head_mean in one launch: keys [B, H, N, D] fp32/fp16/bf16 (any strides) ->
    metric [B, N, D] contiguous in keys' dtype, bitwise equal to the reference."""
    batch, heads, n, d = keys.shape
    out = empty(batch, n, d, dtype=keys.dtype, device=keys.device)
    rows = head_mean_rows(d)
    num_blocks = cdiv(n, rows)
    with on_device(keys):
        wrap(_head_mean_kernel)[(batch * num_blocks,)](
            keys, out, keys.stride(0), keys.stride(1), keys.stride(2), keys.stride(3), n, d, 1.0 / heads,
            num_blocks, H=heads, BLOCK_N=rows, BLOCK_D=next_power_of_2(d), num_warps=HEAD_MEAN_WARPS)
    return out


class SpatialScoresSettings(NamedTuple):
    """Tiles of the "dot" scores candidate (the defaults ship and are compiled ahead of time)."""

    block_a: int = 128  # A rows per program: 48 programs per image at N = 4096 (2x2 cells)
    block_b: int = 64  # B rows per tile
    block_d: int = 64  # channels per tl.dot (C = 320 takes 5)
    num_warps: int = 8
    num_stages: int = 3  # software pipelining of the tile loads


SPATIAL_SCORES = SpatialScoresSettings()
NORM_BLOCK = 64  # rows per program of the inverse-norm pass


@triton.jit
def _inv_norm_kernel(metric_ptr, inv_ptr, stride_b, stride_n, stride_d, N, D, num_blocks,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """inv[b, n] = 1 / max(|metric[b, n]|, EPS) in fp32, summed in BLOCK_D chunks as best_partners does."""
    pid = tl.program_id(0)
    batch = (pid // num_blocks).to(tl.int64)
    offs_n = (pid % num_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    ptrs = metric_ptr + batch * stride_b + offs_n[:, None].to(tl.int64) * stride_n
    sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        v = tl.load(ptrs + offs_d[None, :] * stride_d, mask=mask_n[:, None] & (offs_d < D)[None, :],
                    other=0.0).to(tl.float32)
        sq += tl.sum(v * v, axis=1)
    tl.store(inv_ptr + batch * N + offs_n, 1.0 / tl.maximum(tl.sqrt(sq), EPS), mask=mask_n)


@triton.jit
def _spatial_scores_kernel(
    metric_ptr, inv_ptr, a_pos_ptr, b_pos_ptr, node_max_ptr, node_idx_ptr,
    stride_b, stride_n, stride_d, N, NA, NB, D, num_a_blocks,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr,
):
    pid = tl.program_id(0)
    batch = (pid // num_a_blocks).to(tl.int64)
    offs_a = (pid % num_a_blocks) * BLOCK_A + tl.arange(0, BLOCK_A)
    mask_a = offs_a < NA
    base = metric_ptr + batch * stride_b
    inv = inv_ptr + batch * N
    rows_a = tl.load(a_pos_ptr + offs_a, mask=mask_a, other=0)
    inv_a = tl.load(inv + rows_a, mask=mask_a, other=0.0)
    a_ptrs = base + rows_a[:, None] * stride_n
    best = tl.full([BLOCK_A], float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_A], dtype=tl.int32)
    for b0 in range(0, NB, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        mask_b = offs_b < NB
        rows_b = tl.load(b_pos_ptr + offs_b, mask=mask_b, other=0)
        b_ptrs = base + rows_b[None, :] * stride_n
        dot = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            a = tl.load(a_ptrs + offs_d[None, :] * stride_d, mask=mask_a[:, None] & mask_d[None, :], other=0.0)
            bt = tl.load(b_ptrs + offs_d[:, None] * stride_d, mask=mask_d[:, None] & mask_b[None, :], other=0.0)
            if DOT_FP32:  # exact IEEE products, as best_partners
                dot = tl.dot(a.to(tl.float32), bt.to(tl.float32), dot, input_precision="ieee")
            else:
                dot = tl.dot(a, bt, dot)
        inv_b = tl.load(inv + rows_b, mask=mask_b, other=0.0)
        best, best_idx = keep_best(dot * inv_a[:, None] * inv_b[None, :], mask_b, b0, best, best_idx)
    out = batch * NA + offs_a
    tl.store(node_max_ptr + out, best, mask=mask_a)
    tl.store(node_idx_ptr + out, best_idx.to(tl.int64), mask=mask_a)


def spatial_scores(metric: torch.Tensor, a_pos: torch.Tensor, b_pos: torch.Tensor, wrap=plain,
                   settings: SpatialScoresSettings = SPATIAL_SCORES):
    """The "dot" scores candidate: metric [B, N, D] fp32/fp16/bf16 (any strides),
    a_pos [Na] / b_pos [Nb] int64 contiguous (Nb >= 1). Returns (node_max [B, Na]
    fp32, node_idx [B, Na] int64) as ``match_scores(metric, positions=(a_pos, b_pos))``:
    the same scores up to the rounding of the sums, ties to the smallest B index.
    Two launches: the inverse norms of all N tokens, then the scores."""
    batch, n, d = metric.shape
    na, nb = a_pos.numel(), b_pos.numel()
    dot_fp32 = dot_in_fp32(metric.dtype)
    # An fp32 dot runs on CUDA cores with MATCH_BLOCKS' small tiles; fp16/bf16 on tensor cores.
    block_a, block_b, block_d = (MATCH_BLOCKS[True] if dot_fp32 else settings[:3])
    block_d = max(16, min(next_power_of_2(d), block_d))
    inv = torch.empty(batch, n, dtype=torch.float32, device=metric.device)  # scratch: every entry written
    node_max = empty(batch, na, dtype=torch.float32, device=metric.device)
    node_idx = empty(batch, na, dtype=torch.int64, device=metric.device)
    strides = (metric.stride(0), metric.stride(1), metric.stride(2))
    norm_blocks, num_a_blocks = cdiv(n, NORM_BLOCK), cdiv(na, block_a)
    with on_device(metric):
        wrap(_inv_norm_kernel)[(batch * norm_blocks,)](
            metric, inv, *strides, n, d, norm_blocks, BLOCK_N=NORM_BLOCK, BLOCK_D=block_d, num_warps=4)
        wrap(_spatial_scores_kernel)[(batch * num_a_blocks,)](
            metric, inv, a_pos, b_pos, node_max, node_idx, *strides, n, na, nb, d, num_a_blocks,
            BLOCK_A=block_a, BLOCK_B=block_b, BLOCK_D=block_d, DOT_FP32=dot_fp32,
            num_warps=MATCH_WARPS if dot_fp32 else settings.num_warps,
            num_stages=settings.num_stages,
        )
    return node_max, node_idx


def _match_on_positions(metric, a_pos, b_pos):
    """Today's scores ("match"): the match kernel on position arrays (looked up when called)."""
    return match_scores(metric, positions=(a_pos, b_pos))


# The SD scores' candidates for dispatch (tofu_triton.dispatch, op "spatial_scores"),
# each (metric, a_pos, b_pos) -> (node_max, node_idx).
SPATIAL_SCORES_CANDIDATES = {"match": _match_on_positions, "dot": spatial_scores}
