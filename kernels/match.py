"""Match: every A token's most similar B token (reference.match_scores, docs/design.md §1.2).

One program per (image, block of A rows) streams the B rows in tiles with
``tl.dot`` (fp32 accumulation), scales by inverse norms and keeps a running
max/argmax (``common.best_partners``). The ``Na x Nb`` score matrix never
reaches memory; only ``node_max``/``node_idx`` do. The partition is the
alternating one of a ViT (A = ``P, P+2, ...``, B = ``P+1, P+3, ...``) or,
for the Stable Diffusion step, given as position arrays.
"""
import torch
import triton
import triton.language as tl

from tofu_triton.reference import split_sizes

from .common import best_partners, cdiv, dot_in_fp32, empty, next_power_of_2, on_device, plain

# (BLOCK_A, BLOCK_B, largest BLOCK_D), keyed by whether the dot runs on fp32
# inputs. The exact fp32 dot runs on CUDA cores and needs far more registers
# per tile: these are the largest tiles that compile without spills on sm_80/90.
MATCH_BLOCKS = {True: (32, 32, 16), False: (64, 32, 64)}
MATCH_WARPS = 4


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
            num_warps=MATCH_WARPS,
        )
    return node_max, node_idx
