"""The ToMe-style baseline (``tofu_triton.testing.tome_baseline``) computes the same step as the reference.

Benchmarks compare the fused kernels against ``tome_baseline.tome_step``; a
speed-up only means something if the baseline does the same work, so its
outputs are checked here against ``tofu_triton.reference``.
"""
import pytest
import torch

from tofu_triton import reference
from tofu_triton.testing import assert_close, make_inputs, tome_baseline


@pytest.mark.parametrize("mode", ["mean", "mlerp", "prune"])
@pytest.mark.parametrize("with_size", [True, False])
def test_baseline_matches_reference(mode, with_size):
    x, metric, size = make_inputs(2, 197, 96, d=64, seed=3, with_size=with_size)
    got, got_size = tome_baseline.tome_step(x, metric, 16, size, mode, protected=1)
    want, want_size = reference.token_fusion(x, metric, 16, size, mode, protected=1)
    assert got.dtype == want.dtype
    assert_close(got, want, name=f"x_out ({mode})")
    assert_close(got_size, want_size, name=f"size_out ({mode})")


def test_baseline_selects_same_sources():
    _, metric, _ = make_inputs(3, 197, 64, seed=5)
    match = reference.bipartite_match(metric, 20, protected=1)
    # A marker per A token survives the merge only if the token was not a source.
    marker = torch.zeros(3, 197, 1)
    marker[:, 1::2] = torch.arange(1, 99, dtype=torch.float32)[:, None]
    merge, r = tome_baseline.bipartite_soft_matching(metric, 20, protected=1)
    kept = merge(marker, None)[:, 1 : 1 + 98 - r, 0].long() - 1
    assert r == match.r == 20
    assert torch.equal(kept, match.unm_idx)


@pytest.mark.parametrize("r", [0, 500])
def test_baseline_clamps_r(r):
    x, metric, size = make_inputs(1, 9, 8, seed=1)
    out, out_size = tome_baseline.tome_step(x, metric, r, size, "mean")
    want, want_size = reference.token_fusion(x, metric, r, size, "mean")
    assert out.shape == want.shape
    assert_close(out, want)
    assert_close(out_size, want_size)
