"""Properties of the reference op (docs/design.md §1), checked from first principles."""
import pytest
import torch

from tofu_triton import reference as ref
from tofu_triton.testing import check_match_structure, make_inputs


def _explicit_scores(metric, p):
    """The cosine score matrix written out entry by entry (tiny inputs only)."""
    a, b = metric[:, p::2].double(), metric[:, p + 1 :: 2].double()
    out = torch.empty(metric.shape[0], a.shape[1], b.shape[1], dtype=torch.float64)
    for bi in range(out.shape[0]):
        for i in range(a.shape[1]):
            for j in range(b.shape[1]):
                na, nb = a[bi, i].norm().clamp_min(1e-12), b[bi, j].norm().clamp_min(1e-12)
                out[bi, i, j] = a[bi, i] @ b[bi, j] / (na * nb)
    return out


@pytest.mark.parametrize("n,p,r", [(9, 1, 3), (10, 0, 5), (12, 5, 2), (7, 2, 1)])
def test_match_follows_the_definition(n, p, r):
    _, metric, _ = make_inputs(2, n, 4, seed=n + p)
    match = ref.bipartite_match(metric, r, p)
    check_match_structure(match, n, r)
    scores = _explicit_scores(metric, p)
    for bi in range(2):
        best, best_j = scores[bi].max(dim=1)
        order = sorted(range(len(best)), key=lambda i: (-best[i].item(), i))
        assert match.src_idx[bi].tolist() == order[:r]
        assert match.unm_idx[bi].tolist() == sorted(order[r:])
        assert match.dst_idx[bi].tolist() == [best_j[i].item() for i in order[:r]]


def test_ties_go_to_smaller_indices():
    # Every A token equals every B token: all scores are 1.
    metric = torch.ones(1, 11, 3)
    match = ref.bipartite_match(metric, 3, protected=1)
    assert match.src_idx.tolist() == [[0, 1, 2]]
    assert match.dst_idx.tolist() == [[0, 0, 0]]
    assert match.unm_idx.tolist() == [[3, 4]]


def test_nan_scores_sort_last_and_give_valid_indices():
    _, metric, _ = make_inputs(2, 17, 8, seed=3)
    metric[0, 1] = float("nan")  # A token 0: all its scores are NaN
    metric[1, 2] = float("inf")  # B token 0: NaN against every A token
    match = ref.bipartite_match(metric, 7, protected=1)
    check_match_structure(match, 17, 7)
    assert 0 not in match.src_idx[0].tolist()  # its score counts as -inf
    assert 0 not in match.dst_idx[1].tolist()


def test_all_nan_metric_follows_the_order_rule_and_nan_x_is_never_hidden():
    # An all-NaN metric scores every pair -inf: the first r A tokens (a stable order) merge into B token 0.
    # A NaN in x is carried by the token it lands in (mean: its channel; mlerp: the whole row, through
    # the norms); prune drops the source without reading it. N = 9, p = 1: A = 1, 3, 5, 7; B = 2, 4, 6, 8.
    x, metric, size = make_inputs(1, 9, 4, dtype=torch.float64, seed=12)
    metric[:] = float("nan")
    x[0, 3, 0] = float("nan")  # A token 1: a source
    match = ref.bipartite_match(metric, 3, protected=1)
    assert match.src_idx.tolist() == [[0, 1, 2]] and match.dst_idx.tolist() == [[0, 0, 0]]
    assert match.unm_idx.tolist() == [[3]]
    rows = [2, 1, 3, 5]  # B token 0 and its sources
    w = size[0, rows]
    mean = (x[0, rows] * w).sum(0) / w.sum()
    assert mean.isnan().tolist() == [True, False, False, False]
    for mode in ref.MODES:
        out, size_out = ref.merge_tokens(x, match, size, mode)
        torch.testing.assert_close(out[0, [0, 1, 3, 4, 5]], x[0, [0, 7, 4, 6, 8]], rtol=0, atol=0)
        merged = {"mean": mean, "mlerp": torch.full((4,), float("nan"), dtype=x.dtype), "prune": x[0, 2]}[mode]
        torch.testing.assert_close(out[0, 2], merged, equal_nan=True)
        torch.testing.assert_close(size_out[0, 2, 0], size[0, 2, 0] if mode == "prune" else w.sum().float())


def test_r_is_clamped_and_zero_is_identity():
    x, metric, size = make_inputs(2, 10, 6, seed=1)
    assert ref.bipartite_match(metric, 100, protected=1).r == 4  # Nb = floor(9 / 2)
    match = ref.bipartite_match(metric, 0, protected=1)
    for mode in ref.MODES:
        out, size_out = ref.merge_tokens(x, match, size, mode)
        assert out is x and size_out is size


def _contributors(match, b, j):
    s, e = match.dst_start[b, j].item(), match.dst_start[b, j + 1].item()
    return match.dst_src[b, s:e].tolist()


@pytest.mark.parametrize("p", [0, 1, 3])
def test_output_order_and_mean_is_size_weighted_average(p):
    x, metric, size = make_inputs(2, 21, 5, dtype=torch.float64, seed=p)
    match = ref.bipartite_match(metric, 6, p)
    out, size_out = ref.merge_tokens(x, match, size, "mean")
    na = match.unm_idx.shape[1] + match.r
    assert out.shape == (2, 21 - 6, 5)
    for b in range(2):
        torch.testing.assert_close(out[b, :p], x[b, :p], rtol=0, atol=0)
        for k, i in enumerate(match.unm_idx[b].tolist()):
            torch.testing.assert_close(out[b, p + k], x[b, p + 2 * i], rtol=0, atol=0)
        for j in range((21 - p) // 2):
            rows = [p + 2 * j + 1] + [p + 2 * i for i in _contributors(match, b, j)]
            w = size[b, rows].double()
            expected = (x[b, rows] * w).sum(0) / w.sum()
            torch.testing.assert_close(out[b, p + na - match.r + j], expected)
            torch.testing.assert_close(size_out[b, p + na - match.r + j], w.sum().float().reshape(1))
    # Sizes are conserved by merging.
    torch.testing.assert_close(size_out.sum(dim=1), size.sum(dim=1))


def test_mlerp_keeps_direction_of_mean_and_largest_norm():
    x, metric, size = make_inputs(3, 33, 16, dtype=torch.float64, seed=7)
    x = x * (0.5 + torch.rand(3, 33, 1, dtype=torch.float64))  # varied norms
    match = ref.bipartite_match(metric, 12, protected=1)
    mean, _ = ref.merge_tokens(x, match, size, "mean")
    out, size_out = ref.merge_tokens(x, match, size, "mlerp")
    _, mean_size = ref.merge_tokens(x, match, size, "mean")
    torch.testing.assert_close(size_out, mean_size)
    off = 1 + match.unm_idx.shape[1]
    for b in range(3):
        for j in range(16):
            group = _contributors(match, b, j)
            if not group:
                torch.testing.assert_close(out[b, off + j], x[b, 2 + 2 * j], rtol=0, atol=0)
                continue
            norms = [x[b, 2 + 2 * j].norm()] + [x[b, 1 + 2 * i].norm() for i in group]
            torch.testing.assert_close(out[b, off + j].norm(), max(norms))
            cos = torch.nn.functional.cosine_similarity(out[b, off + j], mean[b, off + j], dim=0)
            torch.testing.assert_close(cos, torch.tensor(1.0, dtype=torch.float64))
    # Averaging shrinks norms; mlerp never does.
    assert (out.norm(dim=-1) >= mean.norm(dim=-1) - 1e-9).all()
    assert (out.norm(dim=-1) > mean.norm(dim=-1) + 1e-6).any()


def test_prune_drops_sources_and_keeps_sizes():
    x, metric, size = make_inputs(2, 19, 4, seed=5)
    match = ref.bipartite_match(metric, 7, protected=1)
    out, size_out = ref.merge_tokens(x, match, size, "prune")
    kept = torch.cat([torch.zeros(2, 1, dtype=torch.long), 1 + 2 * match.unm_idx,
                      2 + 2 * torch.arange(9).expand(2, 9)], dim=1)
    torch.testing.assert_close(out, x.gather(1, kept[..., None].expand(-1, -1, 4)), rtol=0, atol=0)
    torch.testing.assert_close(size_out, size.gather(1, kept[..., None]), rtol=0, atol=0)


def test_low_precision_output_dtype_and_untouched_rows_bitwise():
    x, metric, size = make_inputs(2, 40, 8, dtype=torch.bfloat16, seed=2)
    match = ref.bipartite_match(metric, 5, protected=1)
    for mode in ref.MODES:
        out, size_out = ref.merge_tokens(x, match, size, mode)
        assert out.dtype == torch.bfloat16 and size_out.dtype == torch.float32
        b_rows = x[:, 2::2]
        empty = match.dst_start.diff(dim=1) == 0
        off = 1 + match.unm_idx.shape[1]
        assert torch.equal(out[:, off:][empty], b_rows[empty])


@pytest.mark.parametrize("mode", ref.MODES)
@pytest.mark.parametrize("with_size", [False, True])
def test_gradcheck_fp64(mode, with_size):
    x, metric, size = make_inputs(2, 12, 5, dtype=torch.float64, seed=11, with_size=with_size)
    match = ref.bipartite_match(metric, 4, protected=1)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: ref.merge_tokens(t, match, size, mode)[0], (x,))


def test_pruned_tokens_get_zero_gradient_and_metric_none():
    x, metric, _ = make_inputs(1, 11, 3, seed=4)
    x.requires_grad_(True)
    metric.requires_grad_(True)
    match = ref.bipartite_match(metric, 3, protected=1)
    out, _ = ref.merge_tokens(x, match, None, "prune")
    out.sum().backward()
    src_rows = 1 + 2 * match.src_idx[0]
    assert (x.grad[0, src_rows] == 0).all()
    assert metric.grad is None
