"""Step: one whole ViT token-reduction step in one launch
(reference.token_fusion_step, docs/design.md §3.1).

Reads a block's attention keys and tokens and writes the reduced tokens,
their sizes, the log-size bias the next attention adds to its logits, and
the match (for the backward, source tracing and rotary positions). Grid:
``T`` programs per image, each owning every ``T``-th channel tile of the
tokens. Every program of an image computes the image's small match and
selection itself (no communication between programs, so no atomics and no
grid-wide barrier), then merges its own channel tiles:

1. **head mean**: the keys ``[H, N, D]`` of its image, summed over heads in
   fp32 in head order, times ``1/H``, rounded to the keys' dtype: the metric
   ``[N, D]``, in the program's scratch.
2. **match**: ``common.best_partners`` over the scratch metric: node_max and
   node_idx of every A token, in scratch.
3. **select**: ``common.rank_select`` (counting, O(Na^2) compares): the
   kept A tokens, the sources in score order and grouped by destination.
   Program 0 of an image writes them to the output index buffer, the others
   to scratch.
4. **merge** its channel tiles, tiles of rows at a time: rows that are
   copied (prefix, kept A, B without sources, every B in prune mode) as they
   are; each B row with sources combined with them in ascending A order. MLERP
   needs the norms over all C channels of the merged rows and of their
   contributors, which each program computes itself (a few rows). Program 0
   also writes sizes and the bias.

The phases pass data between the threads of a program through its scratch
memory, separated by ``tl.debug_barrier()`` (a CTA-wide barrier, which also
orders the memory accesses before it). That per-image work is repeated by
the ``T`` programs of an image: ``T`` is 1 when the batch alone fills the
GPU and grows at small batch, where spreading the merge over more programs
shortens the step. For token counts above ``STEP_MAX_N`` or head dims above
128 the three-launch path (match, select, merge) is used instead.

The same launcher also runs the step's other candidates (``STEP_PATHS``; which
one runs on a card is measured by bench/tournament_vit.py and looked up by
tofu_triton.dispatch, op "vit_step"; docs/design.md §3.1-3.2). All write the same
four outputs, so the op around them does not care which ran:

* ``"three_launch"``: the match kernel reading the keys (heads averaged as it
  loads them), the ViT select (counting), the merge (one program per output
  row, also writing the bias).
* ``"four_launch"``: the three launches with the metric first written by its
  own launch (``match.head_mean``: every head's load in flight at once, many
  programs per image), so the match reads ``[N, D]`` rows instead of averaging
  ``H`` loads per tile. On the H200 (2026-12-04, 12358bf) the three launches
  with the keys in took 55 us at B = 1 and 173 us at B = 256 (ViT-B), where the
  run before had measured 28 and 108 us with the metric given (its own cost
  left out): bench/results/h200-2026-12-04-run3.
* ``"two_launch"``: ``_plan_kernel``, one program per image that matches
  (keys in) and selects by sorting in registers (``common.sort_select``), then
  the same merge. The per-image work runs once, not T times, and the merge is
  spread over ``B * (N - r)`` programs.
* ``"mean_plan"``: the head mean's launch, then the plan on that metric (no
  head loop; A tiles of up to 128 rows, so ViT-B walks its B tiles once), then
  the merge.

``PATH_PARTS`` lists each path's parts. Every path but one_launch ends in the
merge variant ``merge`` (``merge.MERGE_VARIANTS``: one row per program, or more
rows in flight per SM), chosen apart from the path (tofu_triton.dispatch, table
"vit_merge"). ``mean_plan`` and every merge variant but "rows" were written for
the H200's run 4 (four_launch 146 us at B = 256, where the bytes need 53 us; 24
us at B = 1) and are not measured yet: they win only by a tournament's
committed result.
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from tofu_triton.reference import split_sizes

from .common import (
    MODE_IDS, MODE_MLERP, MODE_PRUNE, best_partners, cdiv, dot_in_fp32, empty, load_size, merged_rows,
    next_power_of_2, on_device, plain, rank_select, sort_select, sort_select_values, weighted_sum,
)
from . import match as _match
from . import merge as _merge
from . import select as _select
from .match import match_blocks
from .select import SELECT_BLOCK

STEP_MAX_N = 1025  # ViT-H/14 at 448 px, ViT-B/16 at 512 px: the largest token counts the step is tuned for
STEP_MAX_D = 128  # head dims the match keeps in registers
STEP_MAX_C = 8192
PLAN_MAX_NA = 1024  # A tokens the two-launch plan sorts in registers (N <= 2049)
# Warps of the plan, by whether its dot runs on fp32 inputs: the fp16/bf16 tiles need 8 (4 spill on sm_80),
# the fp32 tiles 4 (8 spill on sm_80): tests/test_aot_compile.py.
PLAN_WARPS = {True: 4, False: 8}

# The step's candidates (the names of tofu_triton/tables/vit_step.json).
STEP_PATHS = ("one_launch", "two_launch", "three_launch", "four_launch", "mean_plan")
# How each path but one_launch is put together before its merge (one launch per part but "keys"): the metric
# (the keys as they are, heads averaged where read, or the head mean's own launch), then match and selection
# (match_scores + select, or the plan: one program per image, a sort in registers).
PATH_PARTS = {
    "two_launch": ("keys", "plan"),
    "three_launch": ("keys", "match_select"),
    "four_launch": ("head_mean", "match_select"),
    "mean_plan": ("head_mean", "plan"),
}


class StepSettings(NamedTuple):
    """Tiles and grid of the step kernel (the defaults ship and are compiled ahead of time)."""

    block_rows: int = 32  # output rows per tile of the rows copied as they are
    block_merged: int = 16  # B rows per tile of the rows combined with their sources (fp32 math: smaller)
    block_c: int = 128  # channels per tile
    block_n: int = 32  # token rows per tile of the head mean
    num_warps: int = 8
    programs_per_image: int = 0  # T; 0 picks from the batch and the device (see programs_per_image)


STEP = StepSettings()


def supports(n: int, c: int, head_dim: int) -> bool:
    """Whether the one-launch step handles these sizes (else use match, select, merge)."""
    return n <= STEP_MAX_N and head_dim <= STEP_MAX_D and c <= STEP_MAX_C


def paths_for(n: int, c: int, head_dim: int, protected: int = 0, dtype=None, device_type: str = "cpu") -> tuple:
    """The candidates (of ``STEP_PATHS``) that handle these sizes; three_launch and four_launch handle every size.

    The one-launch step is left out for bf16 on CUDA: on the H200 (2026-12-04, commit 12358bf,
    bench/results/h200-2026-12-04-run3/tournament_vit.md) its bf16 output failed the tournament's check
    at every batch (wrong selection, x off by 11 %), while fp16 passed; the interpreter cannot run bf16
    arithmetic, so the CPU tests never saw it. It was also the slowest path at every shape."""
    two = split_sizes(n, protected)[0] <= PLAN_MAX_NA
    one = supports(n, c, head_dim) and not (dtype == torch.bfloat16 and device_type == "cuda")
    return tuple(p for p in STEP_PATHS if (one if p == "one_launch" else two if PATH_PARTS[p][1] == "plan" else True))


_SM_COUNT = {}


def programs_per_image(batch: int, c: int, device: torch.device, block_c: int) -> int:
    """T: about two programs per SM in all, at most one per channel tile."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        sms = _SM_COUNT.get(index)
        if sms is None:
            sms = _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    else:
        sms = 2  # the interpreter: a couple of programs per image still exercise the T > 1 path
    return max(1, min(cdiv(c, block_c), cdiv(2 * sms, batch)))


def index_fields(n: int, protected: int, r: int):
    """Entries per image of each match tensor in the step's index buffer, in buffer order:
    unm_idx (Na-r), src_idx (r), dst_idx (r), dst_start (Nb+1), dst_src (r). The buffer
    holds each field for the whole batch contiguously ([B, entries]), one after another."""
    na, nb = split_sizes(n, protected)
    return (na - r, r, r, nb + 1, r)


def bias_row(n_out: int) -> int:
    """Elements per image of the bias buffer: rows start 16-element aligned, which
    SDPA's memory-efficient kernel needs to take the bias without copying it."""
    return 16 * cdiv(n_out, 16)


@triton.jit
def _step_kernel(
    x_ptr, keys_ptr, size_ptr,
    out_ptr, size_out_ptr, bias_ptr, index_ptr,
    metric_ptr, node_max_ptr, node_idx_ptr,
    stride_xb, stride_xn, stride_xc, stride_kb, stride_kh, stride_kn, stride_kd,
    inv_h,
    N, C, H, D, P, NA, NB, R, T, BATCH, BIAS_STRIDE,
    MODE: tl.constexpr, HAS_SIZE: tl.constexpr, BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, SINGLE_D: tl.constexpr, BLOCK_SEL: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    image = (pid // T).to(tl.int64)
    t = pid % T
    pid = pid.to(tl.int64)
    n_out = N - R
    n_unm = NA - R

    # 1. Head mean of the keys -> this program's metric [N, D] (keys' dtype).
    metric = metric_ptr + pid * N * D
    keys = keys_ptr + image * stride_kb
    offs_d = tl.arange(0, BLOCK_H)
    mask_d = offs_d < D
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask = (offs_n < N)[:, None] & mask_d[None, :]
        rows = keys + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
        acc = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
        for h in range(H):
            acc += tl.load(rows + h * stride_kh, mask=mask, other=0.0).to(tl.float32)
        tl.store(metric + offs_n[:, None] * D + offs_d[None, :], (acc * inv_h).to(metric_ptr.dtype.element_ty),
                 mask=mask)
    tl.debug_barrier()

    # 2. Match every A token against every B token of the image.
    node_max = node_max_ptr + pid * NA
    node_idx = node_idx_ptr + pid * NA
    for a0 in range(0, NA, BLOCK_A):
        offs_a = a0 + tl.arange(0, BLOCK_A)
        mask_a = offs_a < NA
        best, best_idx = best_partners(metric, (P + 2 * offs_a).to(tl.int64), mask_a, metric, NB, D, P, D, 1,
                                       BLOCK_A, BLOCK_B, BLOCK_D, DOT_FP32, SINGLE_D, False)
        tl.store(node_max + offs_a, best, mask=mask_a)
        tl.store(node_idx + offs_a, best_idx.to(tl.int64), mask=mask_a)
    tl.debug_barrier()

    # 3. Select. Program 0 of the image writes the output index buffer (each
    #    field contiguous over the batch), the others their own scratch.
    if t == 0:
        unm_idx = index_ptr + image * n_unm
        src_idx = index_ptr + BATCH * n_unm + image * R
        dst_idx = src_idx + BATCH * R
        dst_start = index_ptr + BATCH * (n_unm + 2 * R) + image * (NB + 1)
        dst_src = index_ptr + BATCH * (n_unm + 2 * R + NB + 1) + image * R
    else:  # their lists follow every program's node_idx in the same scratch
        unm_idx = node_idx_ptr + BATCH * T * NA + (image * (T - 1) + t - 1) * (NA + 2 * R + NB + 1)
        src_idx = unm_idx + n_unm
        dst_idx = src_idx + R
        dst_start = dst_idx + R
        dst_src = dst_start + NB + 1
    rank_select(node_max, node_idx, unm_idx, src_idx, dst_idx, dst_start, dst_src, NA, NB, R, BLOCK_SEL)
    tl.debug_barrier()

    # 4. Merge this program's channel tiles (every T-th).
    x = x_ptr + image * stride_xb
    size = size_ptr + image * N
    out = out_ptr + image * n_out * C
    lanes_r = tl.arange(0, BLOCK_R)
    lanes_c = tl.arange(0, BLOCK_C)
    n_tiles_c = tl.cdiv(C, BLOCK_C)

    # 4a. Rows copied as they are: prefix, kept A, B rows without sources (all B rows in prune mode).
    for o0 in range(0, n_out, BLOCK_R):
        o = o0 + lanes_r
        mask_o = o < n_out
        is_unm = (o >= P) & (o < P + n_unm)
        is_b = mask_o & (o >= P + n_unm)
        j = o - P - n_unm
        i = tl.load(unm_idx + (o - P), mask=is_unm, other=0)
        count = tl.load(dst_start + j + 1, mask=is_b, other=0) - tl.load(dst_start + j, mask=is_b, other=0)
        row = tl.where(o < P, o, tl.where(is_b, P + 2 * j + 1, P + 2 * i)).to(tl.int64)
        if MODE == MODE_PRUNE:
            copy = mask_o
        else:
            copy = mask_o & ~(is_b & (count > 0))
        for tc in range(t, n_tiles_c, T):
            offs_c = tc * BLOCK_C + lanes_c
            mask = copy[:, None] & (offs_c < C)[None, :]
            v = tl.load(x + row[:, None] * stride_xn + offs_c[None, :] * stride_xc, mask=mask)
            tl.store(out + o[:, None] * C + offs_c[None, :], v, mask=mask)
        if t == 0:
            s = load_size(size, row, copy, HAS_SIZE)
            tl.store(size_out_ptr + image * n_out + o, s, mask=copy)
            if BIAS:
                tl.store(bias_ptr + image * BIAS_STRIDE + o, tl.log(s).to(bias_ptr.dtype.element_ty), mask=copy)

    # 4b. B rows with sources, combined with them (mean and mlerp).
    if MODE != MODE_PRUNE:
        for j0 in range(0, NB, BLOCK_M):
            j = j0 + tl.arange(0, BLOCK_M)
            mask_j = j < NB
            start = tl.load(dst_start + j, mask=mask_j, other=0)
            count = tl.load(dst_start + j + 1, mask=mask_j, other=0) - start
            most = tl.max(count, axis=0)
            if most > 0:
                active = count > 0
                b_row = (P + 2 * j + 1).to(tl.int64)
                s_b, s_total, scale = merged_rows(x, size, dst_src, start, count, most, b_row, active, stride_xn,
                                                  stride_xc, C, P, MODE, HAS_SIZE, BLOCK_M, BLOCK_C)
                for tc in range(t, n_tiles_c, T):
                    offs_c = tc * BLOCK_C + lanes_c
                    merged = weighted_sum(x, size, dst_src, start, count, most, b_row, s_b, active, offs_c,
                                          stride_xn, stride_xc, C, P, HAS_SIZE) / s_total[:, None]
                    if MODE == MODE_MLERP:
                        merged = merged * scale[:, None]
                    o = P + n_unm + j
                    tl.store(out + o[:, None] * C + offs_c[None, :], merged.to(out_ptr.dtype.element_ty),
                             mask=active[:, None] & (offs_c < C)[None, :])
                if t == 0:
                    o = P + n_unm + j
                    tl.store(size_out_ptr + image * n_out + o, s_total, mask=active)
                    if BIAS:
                        tl.store(bias_ptr + image * BIAS_STRIDE + o, tl.log(s_total).to(bias_ptr.dtype.element_ty),
                                 mask=active)


@triton.jit
def _plan_kernel(
    keys_ptr, node_max_ptr, node_idx_ptr, index_ptr,
    stride_kb, stride_kh, stride_kn, stride_kd, inv_h,
    H, D, P, NA, NB, R, BATCH,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr,
    SINGLE_D: tl.constexpr, BLOCK_SEL: tl.constexpr, BLOCK_NB: tl.constexpr, HEADS: tl.constexpr,
    SINGLE_A: tl.constexpr,
):
    """The plan: one program per image matches its A tokens and selects (sorting in
    registers), writing the five index fields of the step's index buffer. With HEADS
    it reads the keys [H, N, D] and averages the heads as it loads them (the
    two-launch step); without, the metric [N, D] (``keys_ptr``: the head mean's
    output; H = 1, stride_kh unused). With SINGLE_A (Na <= BLOCK_A = BLOCK_SEL) the
    one A tile's scores go to the sort in registers; else through the scratch
    ``node_max`` / ``node_idx``, one A tile at a time."""
    image = tl.program_id(0).to(tl.int64)
    keys = keys_ptr + image * stride_kb
    n_unm = NA - R
    unm_idx = index_ptr + image * n_unm
    src_idx = index_ptr + BATCH * n_unm + image * R
    dst_idx = src_idx + BATCH * R
    dst_start = index_ptr + BATCH * (n_unm + 2 * R) + image * (NB + 1)
    dst_src = index_ptr + BATCH * (n_unm + 2 * R + NB + 1) + image * R
    if SINGLE_A:
        offs_a = tl.arange(0, BLOCK_A)
        best, best_idx = best_partners(keys, (P + 2 * offs_a).to(tl.int64), offs_a < NA, keys, NB, D, P, stride_kn,
                                       stride_kd, BLOCK_A, BLOCK_B, BLOCK_D, DOT_FP32, SINGLE_D, False,
                                       stride_kh, H, inv_h, HEADS)
        sort_select_values(best, best_idx, unm_idx, src_idx, dst_idx, dst_start, dst_src, NA, NB, R, BLOCK_A,
                           BLOCK_NB)
    else:
        node_max = node_max_ptr + image * NA
        node_idx = node_idx_ptr + image * NA
        for a0 in range(0, NA, BLOCK_A):
            offs_a = a0 + tl.arange(0, BLOCK_A)
            mask_a = offs_a < NA
            best, best_idx = best_partners(keys, (P + 2 * offs_a).to(tl.int64), mask_a, keys, NB, D, P, stride_kn,
                                           stride_kd, BLOCK_A, BLOCK_B, BLOCK_D, DOT_FP32, SINGLE_D, False,
                                           stride_kh, H, inv_h, HEADS)
            tl.store(node_max + offs_a, best, mask=mask_a)
            tl.store(node_idx + offs_a, best_idx.to(tl.int64), mask=mask_a)
        tl.debug_barrier()  # the select reads what every thread of the program wrote
        sort_select(node_max, node_idx, unm_idx, src_idx, dst_idx, dst_start, dst_src, NA, NB, R, BLOCK_SEL,
                    BLOCK_NB)


def plan(keys: torch.Tensor, protected: int, r: int, index: torch.Tensor, wrap=plain) -> None:
    """Launch ``_plan_kernel``: keys [B, H, N, D], or a metric [B, N, D] (the head
    mean's output), any strides -> the five match fields written into ``index``
    (the step's flat int64 buffer, see :func:`index_fields`)."""
    heads = keys.shape[1] if keys.dim() == 4 else 1
    batch, n, d = keys.shape[0], keys.shape[-2], keys.shape[-1]
    na, nb = split_sizes(n, protected)
    dot_fp32 = dot_in_fp32(keys.dtype)
    const = plan_constants(d, dot_fp32, na, nb, keys.dim() == 4)
    if const["SINGLE_A"]:  # the scores stay in registers: no scratch (the pointers are not read)
        node_max = node_idx = index
    else:
        node_max = torch.empty(batch, na, dtype=torch.float32, device=keys.device)  # scratch
        node_idx = torch.empty(batch, na, dtype=torch.int64, device=keys.device)
    with on_device(keys):
        wrap(_plan_kernel)[(batch,)](
            keys, node_max, node_idx, index,
            keys.stride(0), keys.stride(1) if keys.dim() == 4 else 0, keys.stride(-2), keys.stride(-1), 1.0 / heads,
            heads, d, protected, na, nb, r, batch, **const, num_warps=PLAN_WARPS[dot_fp32],
        )


def plan_constants(d: int, dot_fp32: bool, na: int, nb: int, heads: bool) -> dict:
    """The constexprs ``_plan_kernel`` is launched with (and compiled ahead of time with) for head dim
    ``d``, Na and Nb, keys (``heads``) or a metric in."""
    block_a, block_b, block_d = plan_blocks(d, dot_fp32, na, heads)
    single = na <= block_a
    return dict(BLOCK_A=block_a, BLOCK_B=block_b, BLOCK_D=block_d, DOT_FP32=dot_fp32, SINGLE_D=d <= block_d,
                BLOCK_SEL=block_a if single else plan_block(na), BLOCK_NB=plan_block(nb + 1), HEADS=heads,
                SINGLE_A=single)


# A tiles of the plan on a given metric (fp16/bf16): one program matches every A token of an image, so at
# small batch its time is the chain of B tiles it walks; up to 128 A rows per tile halve that chain at
# ViT-B (Na = 98: one A tile instead of two) at 64 fp32 accumulators per thread (8 warps).
PLAN_METRIC_MAX_A = 128


def plan_blocks(d: int, dot_fp32: bool, na: int, heads: bool):
    """(BLOCK_A, BLOCK_B, BLOCK_D) of the plan: the match's tiles, with the keys in (heads averaged as loaded,
    H loads per tile) or an fp32 dot; with an fp16/bf16 metric given, up to PLAN_METRIC_MAX_A A rows a tile."""
    block_a, block_b, block_d = match_blocks(d, dot_fp32)
    if not heads and not dot_fp32:
        block_a = max(block_a, min(PLAN_METRIC_MAX_A, next_power_of_2(na)))
    return block_a, block_b, block_d


def plan_block(k: int) -> int:
    """Register tile of the plan's sort (k = Na) and histogram (k = Nb + 1): a power of two >= 16."""
    return max(16, next_power_of_2(k))


def split_index(index: torch.Tensor, batch: int, n: int, protected: int, r: int):
    """The five match tensors ([B, k] int64, contiguous views) of the step's flat index buffer."""
    fields = index_fields(n, protected, r)
    return [t.view(batch, k) for t, k in zip(index.split([batch * k for k in fields]), fields)]


def _multi_launch(x, keys, size, r: int, protected: int, mode: str, bias_dtype, path: str, wrap, merge: str):
    """Every path but one_launch (see the module docstring): the same outputs as the one-launch step."""
    batch, n, _ = x.shape
    nb = split_sizes(n, protected)[1]
    dev = x.device
    index = empty(batch * sum(index_fields(n, protected, r)), dtype=torch.int64, device=dev)
    fields = split_index(index, batch, n, protected, r)
    bias = empty(batch, bias_row(n - r) if bias_dtype is not None else 0, dtype=bias_dtype or x.dtype, device=dev)
    metric_from, chooser = PATH_PARTS[path]
    # Looked up in their modules when called (the tests count the launchers).
    metric = _match.head_mean(keys, wrap=wrap) if metric_from == "head_mean" else keys
    if chooser == "plan":
        plan(metric, protected, r, index, wrap)
    else:
        node_max, node_idx = _match.match_scores(metric, protected, wrap=wrap)
        _select.select(node_max, node_idx, r, nb, wrap=wrap, out=fields)
    unm_idx, _, _, dst_start, dst_src = fields
    out, size_out = _merge.merge_forward(x, size, unm_idx, dst_start, dst_src, protected, mode, wrap=wrap,
                                         bias=bias if bias_dtype is not None else None, variant=merge)
    return out, size_out, bias, index


def token_fusion_step(x: torch.Tensor, keys: torch.Tensor, size, r: int, protected: int, mode: str,
                      bias_dtype=None, settings: StepSettings = STEP, wrap=plain, path: str = "one_launch",
                      merge: str = "rows"):
    """Launch the step: ``path`` one of ``STEP_PATHS`` (one that :func:`paths_for` allows).

    x: [B, N, C] fp32/fp16/bf16, any strides; keys: [B, H, N, D] (D <= 128 on
    the one-launch path), any strides; size: [B, N, 1] fp32 or None (all ones);
    ``r`` in [1, Nb]; ``mode``: mean, mlerp or prune; ``bias_dtype``: the dtype
    of the next attention's log-size bias, or None for no bias; ``merge``: the
    merge variant of every path but one_launch (``merge.MERGE_VARIANTS``).

    Returns (x_out [B, N - r, C] in x's dtype; size_out [B, N - r, 1] fp32;
    bias [B, bias_row(N - r)] in ``bias_dtype``, log(size_out) in its first
    N - r columns ([B, 0] without a bias); index, int64: the match's five
    tensors (see :func:`index_fields`) one after another, flat).
    """
    if path not in STEP_PATHS:
        raise ValueError(f"path must be one of {STEP_PATHS}, got {path!r}")
    if path != "one_launch":
        return _multi_launch(x, keys, size, r, protected, mode, bias_dtype, path, wrap, merge)
    batch, n, c = x.shape
    heads, d = keys.shape[1], keys.shape[3]
    na, nb = split_sizes(n, protected)
    dev = x.device
    dot_fp32 = dot_in_fp32(keys.dtype)
    block_a, block_b, block_d = match_blocks(d, dot_fp32)
    block_c = min(settings.block_c, next_power_of_2(c))
    t = settings.programs_per_image or programs_per_image(batch, c, dev, block_c)
    n_out = n - r
    out = empty(batch, n_out, c, dtype=x.dtype, device=dev)
    size_out = empty(batch, n_out, 1, dtype=torch.float32, device=dev)
    index = empty(batch * sum(index_fields(n, protected, r)), dtype=torch.int64, device=dev)
    bias = empty(batch, bias_row(n_out) if bias_dtype is not None else 0, dtype=bias_dtype or x.dtype, device=dev)
    # Scratch of each program: its metric and match (node_max; node_idx, then the
    # index lists of every program but an image's first, in one int64 buffer).
    metric = torch.empty(batch * t, n, d, dtype=keys.dtype, device=dev)
    node_max = torch.empty(batch * t, na, dtype=torch.float32, device=dev)
    scratch = torch.empty(batch * t * na + batch * (t - 1) * (na + 2 * r + nb + 1), dtype=torch.int64, device=dev)
    with on_device(x):
        wrap(_step_kernel)[(batch * t,)](
            x, keys, size if size is not None else out,
            out, size_out, bias, index,
            metric, node_max, scratch,
            x.stride(0), x.stride(1), x.stride(2), keys.stride(0), keys.stride(1), keys.stride(2), keys.stride(3),
            1.0 / heads,
            n, c, heads, d, protected, na, nb, r, t, batch, bias.shape[1],
            MODE=MODE_IDS[mode], HAS_SIZE=size is not None, BIAS=bias_dtype is not None,
            BLOCK_N=settings.block_n, BLOCK_H=next_power_of_2(d), BLOCK_A=block_a, BLOCK_B=block_b,
            BLOCK_D=block_d, DOT_FP32=dot_fp32, SINGLE_D=d <= block_d, BLOCK_SEL=SELECT_BLOCK,
            BLOCK_R=settings.block_rows, BLOCK_M=settings.block_merged, BLOCK_C=block_c, num_warps=settings.num_warps,
        )
    return out, size_out, bias, index
