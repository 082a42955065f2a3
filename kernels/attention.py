"""Attention with a per-key additive bias: ``softmax(q k^T / sqrt(D) + bias) v``
(proportional attention's ``log(size)`` bias; tofu_triton/attention.py, docs/design.md §2.1).

One flash-attention forward (online softmax, fp32 accumulation, no score
matrix in memory): each program owns BLOCK_M queries of one (image, head) and
streams the keys in tiles of BLOCK_N. The bias is a vector per image, so each
key tile loads BLOCK_N bias values once and adds them to the whole
[BLOCK_M, BLOCK_N] tile of logits: the bias costs one add per logit and
BLOCK_N loads per tile, where SDPA's float mask makes it leave its flash
kernel. Keys past the end (N not a multiple of BLOCK_N) and keys of size 0
(bias -inf) get probability 0. Head dims up to 128 run in a power-of-two
tile (80 in 128) with the padding channels masked to 0.

Inference only: there is no backward (the caller falls back to a
differentiable path when a gradient is needed).

Block sizes are candidates of the attention tournament (bench/probe.py):
:data:`CONFIGS` names them (each compiles without spills for
sm_80 and sm_90 at head dims 64, 80 and 128: tests/test_aot_compile.py).
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .common import cdiv, dot_in_fp32, empty, next_power_of_2, on_device, plain

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 128  # the widest tile the configs are compiled and checked for


@triton.jit
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, out_ptr,
    H, NQ, NK, qk_scale,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_bb, stride_bn,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr,
):
    # The head dim is a constant (a compile per head dim) and the channels are contiguous
    # (the launcher makes them so): with D == BLOCK_D the channel mask folds away and
    # every row loads as whole vectors.
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < NQ
    mask_d = offs_d < D

    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    bias_base = bias_ptr + b * stride_bb

    # Running max (log2 units), running sum and the unnormalised output of each query row.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, NK, BLOCK_N):
        cols = n0 + offs_n
        mask_n = cols < NK
        kt = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None],
                     mask=mask_d[:, None] & mask_n[None, :], other=0.0)
        # The key bias, once per key tile, in log2 units on the vector (one add per logit, not a multiply
        # too); keys past NK read -inf, so they weigh 0.
        key_bias = tl.load(bias_base + cols * stride_bn, mask=mask_n, other=float("-inf")).to(tl.float32)
        key_bias = key_bias * 1.4426950408889634
        if DOT_FP32:
            s = tl.dot(q, kt.to(tl.float32), input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        s = s * qk_scale + key_bias[None, :]  # logits in log2 units
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row whose keys so far all weigh 0 (bias -inf) keeps m = -inf: subtract 0 there, not -inf (NaN).
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        acc = acc * alpha[:, None]
        if DOT_FP32:
            acc = tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


class Config(NamedTuple):
    """Tiles and launch options of one attention candidate."""

    block_m: int  # queries per program
    block_n: int  # keys per tile of the loop
    num_warps: int
    num_stages: int


# The first is the default before a tournament has measured them. ptxas (sm_80, sm_90)
# keeps every one of them in registers for head-dim tiles 64 and 128; a 128 x 64 tile
# with 4 warps spills (116 bytes on sm_90 at D = 64), so BLOCK_M = 128 runs 8 warps.
CONFIGS = {
    "m64n64w4": Config(64, 64, 4, 2),
    "m128n64w8": Config(128, 64, 8, 2),
    "m64n32w4": Config(64, 32, 4, 2),
    # Added after the H200's run 3 (bench/results/h200-2026-12-04-run3/probe.md), not measured yet: at N = 197
    # and 577, B >= 64, the best config took 1.28-1.30x SDPA without a bias (N = 401: 1.03x), where 64-row tiles
    # leave 23 % (197) and 11 % (577) of each tile dimension padding; 32-query tiles halve the query side's.
    # And one more pipeline stage for the key/value loads.
    "m32n64w2": Config(32, 64, 2, 2),
    "m64n64w4s3": Config(64, 64, 4, 3),
}


def head_dim_block(d: int) -> int:
    """BLOCK_D of head dim ``d`` (<= :data:`MAX_HEAD_DIM`)."""
    if d > MAX_HEAD_DIM:
        raise ValueError(f"the Triton attention takes head dims up to {MAX_HEAD_DIM}, got {d}")
    return max(16, next_power_of_2(d))  # tl.dot wants at least 16


# Configs whose tiles spill at head-dim tiles above 64 (m32n64w2: ~250 bytes at 128 on sm_80/sm_90).
NARROW_ONLY = ("m32n64w2",)


def configs_for(d: int) -> tuple:
    """Config names (keys of :data:`CONFIGS`) that run head dim ``d``, the default first."""
    wide = head_dim_block(d) > 64
    return tuple(name for name in CONFIGS if not (wide and name in NARROW_ONLY))


def biased_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                     config: str = None, wrap=plain) -> torch.Tensor:
    """``softmax(q k^T / sqrt(D) + bias) v``.

    q [B, H, Nq, D], k and v [B, H, Nk, D] (fp16 or bf16, one dtype; fp32 in
    the interpreter; any strides, copied where the channels are not contiguous;
    D <= 128); bias [B or 1, 1, 1, Nk] (any float dtype, read as
    fp32; -inf for a key that must get no weight). ``config``: a key of
    :data:`CONFIGS` (default: the first of :func:`configs_for`). Returns
    [B, H, Nq, D] in q's dtype, a view of a contiguous [B, Nq, H, D] buffer as
    SDPA's CUDA kernels return it: the caller's ``transpose(1, 2).reshape(B,
    Nq, H * D)`` is then a view, not a copy (a copy launch and 2 B Nq H D
    elements of traffic per block otherwise). No autograd.
    """
    batch, heads, nq, d = q.shape
    nk = k.shape[2]
    block_d = head_dim_block(d)
    cfg = CONFIGS[config or configs_for(d)[0]]
    bias = bias.expand(batch, 1, 1, nk)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = empty(batch, nq, heads, d, dtype=q.dtype, device=q.device).transpose(1, 2)
    grid = (cdiv(nq, cfg.block_m), batch * heads)
    with on_device(q):
        wrap(_attention_kernel)[grid](
            q, k, v, bias, out, heads, nq, nk, d ** -0.5 * LOG2E,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], bias.stride(0), bias.stride(3),
            D=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, DOT_FP32=dot_in_fp32(q.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
