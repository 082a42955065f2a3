"""The ViT match (match + select kernels) against the reference, on CPU through
Triton's interpreter: indices exactly, or up to a near-tie checked against the
scores. Every output is poisoned (NaN / -1) before the kernel runs."""
import itertools

import pytest
import torch

import tofu_triton as tt
from tofu_triton import reference as ref
from tofu_triton.kernels import match as match_kernels
from tofu_triton.kernels import select as select_kernels
from tofu_triton.testing import assert_close, check_match_structure, make_inputs

from conftest import DEVICE, DTYPES, assert_match, count_calls

pytestmark = pytest.mark.usefixtures("poisoned")


@pytest.fixture
def launched(monkeypatch):
    """Counts launcher calls, so a test fails if the op quietly took another path.
    An effective r of 0 never reaches a kernel (tested in test_api.py)."""
    return count_calls(monkeypatch, [match_kernels, select_kernels], ("match_scores", "select"))


def _r_values(n, p):
    nb = (n - p) // 2
    return sorted({1, nb}) if nb >= 1 else []


MATCH_CASES = [
    (b, n, p, r)
    for b, n, p in itertools.product([1, 3], [2, 3, 17, 64, 197], [0, 1, 5])
    if p <= n
    for r in _r_values(n, p)
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,n,p,r", MATCH_CASES)
def test_match_matches_reference(b, n, p, r, dtype, launched):
    _, metric, _ = make_inputs(b, n, 4, d=24, dtype=dtype, seed=hash((b, n, p, r)) % 1000)
    km = tt.bipartite_match(metric.to(DEVICE), r, p, backend="triton")
    rm = ref.bipartite_match(metric, r, p)
    assert launched == {"match_scores": 1, "select": 1}
    assert km.r == rm.r == r
    assert_match(km, rm, metric, n)


def test_non_contiguous_metric():
    _, base_m, _ = make_inputs(2, 33, 4, d=32, seed=6)
    metric = base_m[..., ::2]  # stride 2 in D
    assert not metric.is_contiguous()
    km = tt.bipartite_match(metric.to(DEVICE), 10, 1, backend="triton")
    assert_match(km, ref.bipartite_match(metric.contiguous(), 10, 1), metric, 33)


def test_nan_and_inf_scores_give_the_reference_indices():
    _, metric, _ = make_inputs(2, 41, 4, d=8, seed=8)
    metric[0, 3] = float("nan")
    metric[0, 10] = float("inf")
    metric[1, :] = float("nan")  # a whole batch of NaN scores
    km = tt.bipartite_match(metric.to(DEVICE), 12, 1, backend="triton")
    check_match_structure(km, 41, 12)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(km[:5], ref.bipartite_match(metric, 12, 1)[:5]))


def test_exact_ties_and_signed_zeros_follow_the_reference():
    # Equal scores must rank by index; a score of -0.0 ties with +0.0 (as in torch's sort).
    zeros = torch.zeros(2, 21, 8)
    zeros[0, 3] = 1.0
    zeros[1, ::3] = -0.0
    for metric in [zeros, torch.ones(1, 33, 4), -torch.ones(2, 12, 3)]:
        km = tt.bipartite_match(metric.to(DEVICE), 6, 1, backend="triton")
        rm = ref.bipartite_match(metric, 6, 1)
        assert all(torch.equal(a.cpu(), b) for a, b in zip(km[:5], rm[:5]))


def test_long_sequences_n4096():
    # Stable Diffusion latents: N = 4096 (Na = Nb = 2048), the largest N we promise.
    x, metric, size = make_inputs(1, 4096, 8, d=16, dtype=torch.float16, seed=12)
    km = tt.bipartite_match(metric.to(DEVICE), 1536, 0, backend="triton")
    rm = ref.bipartite_match(metric, 1536, 0)
    assert_match(km, rm, metric, 4096)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, heads, n, d", [(2, 3, 17, 16), (1, 12, 21, 64), (2, 1, 5, 80)])
def test_head_mean_kernel_is_the_reference_to_the_bit(batch, heads, n, d, dtype):
    # The four-launch step's first launch. Keys as a patched block passes them: a strided view of qkv; the
    # output is poisoned first, so a row or channel the kernel misses shows up.
    g = torch.Generator().manual_seed(batch * 1000 + heads * 10 + d)
    qkv = torch.randn(batch, n, 3, heads, d, generator=g).to(dtype).to(DEVICE)
    keys = qkv.permute(2, 0, 3, 1, 4)[1]
    got = match_kernels.head_mean(keys)
    assert got.shape == (batch, n, d) and got.dtype == dtype and got.is_contiguous()
    want = ref.head_mean(keys)
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        assert_close(got, want)  # the interpreter's fp32 -> bf16 cast does not round to nearest
    else:
        assert torch.equal(got, want)
