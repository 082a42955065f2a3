"""The ToMe-style baseline step that the benchmarks time our kernels against.

Not part of the library's API: it exists so that a speed-up is measured
against the same work done the unfused way, and
``tests/test_tome_baseline.py`` checks that it computes what
``tofu_triton.reference`` computes.
"""
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from ..reference import EPS

# An unfused ToMe-style reduction step in plain PyTorch: the baseline to beat.
#
# Written the way ToMe (facebookresearch/ToMe, ``tome/merge.py``) writes
# ``bipartite_soft_matching`` + ``merge_wavg``: normalise the metric, build the
# full ``Na x Nb`` score matrix with a batched matmul, ``max`` over it,
# ``argsort`` the row maxima, ``gather`` the unmerged and source rows and
# ``scatter_reduce`` the sources into their destinations; sizes are merged by
# merging ``x * size`` and ``size`` with ``"sum"`` and dividing. Every one of
# those is its own kernel launch (about 20 per step), and the score matrix is
# written to and read back from memory.
#
# Where it departs from ToMe, it does so to compute the same function as
# ``tofu_triton.reference`` (docs/design.md), so that timings compare like with like
# and ``tests/test_tome_baseline.py`` can check the outputs:
#
# * Partition: the ``protected`` prefix is split off first and the rest
#   alternates A/B (ToMe alternates from token 0 and masks the class token's
#   score row with ``-inf``). Same number of launches either way: ToMe's mask
#   fill becomes our prefix ``cat``.
# * ``unm_idx`` is always sorted (ToMe sorts it only when there is a class
#   token, which is the ViT case anyway), so the output order is the reference's.
# * ``size`` is float32 as in the reference (ToMe keeps it in ``x``'s dtype), so the
#   weighted sum runs in float32 and is cast back to ``x``'s dtype at the end.
# * ``mlerp`` and ``prune`` are written in the same style (ToFu's own code is
#   built on ToMe's): ``mlerp`` takes the per-destination maximum norm with
#   ``scatter_reduce("amax")``; ``prune`` drops the sources.
# * The norm is clamped at 1e-12 like the reference's (ToMe divides by the raw norm).
#
# ToMe's ``argsort`` is not stable, so on exactly tied scores this may pick
# different sources than the reference; on random inputs there are no ties.


def bipartite_soft_matching(metric: Tensor, r: int, protected: int = 1) -> Tuple[Callable, int]:
    """ToMe-style matching. metric: [B, N, D] any float dtype.

    Returns ``(merge, r)``: ``merge(x [B, N, C], reduce) -> [B, N - r, C]``
    applies the match with a ``scatter_reduce`` of kind ``reduce`` (``"sum"``,
    ``"amax"``) or, with ``reduce=None``, drops the sources (prune); ``r`` is
    the clamped count actually removed.
    """
    n = metric.shape[1]
    r = max(0, min(r, (n - protected) // 2))
    if r == 0:
        return (lambda x, reduce=None: x), 0

    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(EPS)
        a, b = metric[:, protected::2], metric[:, protected + 1 :: 2]
        scores = a @ b.transpose(-1, -2)  # [B, Na, Nb] in memory, as ToMe does
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx = edge_idx[:, r:].sort(dim=1).values  # [B, Na - r, 1]
        src_idx = edge_idx[:, :r]  # [B, r, 1]
        dst_idx = node_idx[..., None].gather(dim=1, index=src_idx)  # [B, r, 1]

    def merge(x: Tensor, reduce: Optional[str] = "sum") -> Tensor:
        prefix = x[:, :protected]
        src, dst = x[:, protected::2], x[:, protected + 1 :: 2]
        batch, na, c = src.shape
        unm = src.gather(dim=1, index=unm_idx.expand(batch, na - r, c))
        if reduce is not None:
            src = src.gather(dim=1, index=src_idx.expand(batch, r, c))
            dst = dst.scatter_reduce(1, dst_idx.expand(batch, r, c), src, reduce=reduce)
        return torch.cat([prefix, unm, dst], dim=1)

    return merge, r


def merge_wavg(merge: Callable, x: Tensor, size: Tensor) -> Tuple[Tensor, Tensor]:
    """ToMe's size-weighted average: merge ``x * size`` and ``size``, divide.

    Returns (merged [B, N - r, C] float32, size [B, N - r, 1] float32).
    """
    total = merge(x * size, "sum")
    size = merge(size, "sum")
    return total / size, size


def tome_step(
    x: Tensor, metric: Tensor, r: int, size: Optional[Tensor] = None, mode: str = "mean", protected: int = 1
) -> Tuple[Tensor, Tensor]:
    """One unfused reduction step with the interface of ``tofu_triton.token_fusion``.

    x: [B, N, C]; metric: [B, N, D]; size: [B, N, 1] float32 or None (ones).
    Returns (x_out [B, N - r', C] in x's dtype, size_out [B, N - r', 1] float32).
    """
    if size is None:
        size = torch.ones(*x.shape[:2], 1, dtype=torch.float32, device=x.device)
    merge, r = bipartite_soft_matching(metric, r, protected)
    if r == 0:
        return x, size
    if mode == "prune":
        return merge(x, None), merge(size, None)
    merged, size_out = merge_wavg(merge, x, size)
    if mode == "mlerp":
        norm = x.float().norm(dim=-1, keepdim=True)
        norm_max = merge(norm, "amax")
        merged = merged / merged.norm(dim=-1, keepdim=True).clamp_min(EPS) * norm_max
    elif mode != "mean":
        raise ValueError(f"mode must be mean, mlerp or prune; got {mode!r}")
    return merged.to(x.dtype), size_out

