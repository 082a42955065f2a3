"""Test fixtures shared by ``tests/`` and ``bench/``: one tolerance table, one
input generator, one comparison rule, and checks of a Match.

Not the library's API. Next to them: :mod:`tofu_triton.testing.tome_baseline`,
the unfused ToMe-style step the benchmarks compare against,
:mod:`tofu_triton.testing.minilm`, a real sentence encoder loaded offline, and
:mod:`tofu_triton.testing.device_ops`, which counts the device work of code
run on the CPU.
"""
import threading
from contextlib import contextmanager
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..reference import EPS, split_sizes

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
