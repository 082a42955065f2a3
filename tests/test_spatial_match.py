"""The Stable Diffusion step's match (match kernel on position arrays, spatial
select) against the reference, on CPU through Triton's interpreter.

Select is checked exactly on the kernel's own scores (so near-ties of the
scores cannot hide a select bug), the scores up to near-ties. "many" runs the
select with tiny tiles so that one image is split over many programs, as it
is at N = 4096 and beyond. Every candidate of the select ("radix64", "sort", "topk", "fused")
and of the scores ("match", "dot") is checked (the GPU runs whichever a
dispatch table names). Every output is poisoned before a kernel runs."""
import functools

import pytest
import torch

from tofu_triton import dispatch, ops
from tofu_triton import reference as ref
from tofu_triton.kernels import match as match_kernels
from tofu_triton.kernels import select as select_kernels
from tofu_triton.testing import SCORE_TIE

from conftest import DEVICE, DTYPES, GRIDS, assert_same, make_partition, r_values

pytestmark = pytest.mark.usefixtures("poisoned")


@pytest.fixture(params=["radix64", "radix64_many", "sort", "topk", "fused", "fused_tiles"])
def select_candidate(request):
    """A spatial select (node_max, node_idx, r, nb): the radix kernel with the shipped
    settings or with many programs per image (16 destinations and their share of A
    each, in tiles of 16, as at N = 4096 and beyond), a candidate built on torch's
    sorts, or the one-program kernel with the shipped tiles or tiles of 16 (many
    tiles per image, so the cursors carry across tiles)."""
    if request.param in ("sort", "topk", "fused"):
        return select_kernels.SPATIAL_SELECT_CANDIDATES[request.param]
    if request.param == "fused_tiles":
        return functools.partial(select_kernels.spatial_select_fused,
                                 settings=select_kernels.FusedSelectSettings(block=16, block_t=16))
    settings = select_kernels.SpatialSelectSettings()
    if request.param == "radix64_many":
        settings = select_kernels.SpatialSelectSettings(dst_block=16, block=16, route_block=16)
    return functools.partial(select_kernels.spatial_select, settings=settings)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rand", [False, True])
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: "x".join(map(str, g)))
def test_spatial_match_matches_reference(grid, rand, dtype, spatial_launches):
    h, w, sx, sy = grid
    part = make_partition(h, w, sx, sy, rand, seed=h * w)
    na, nb = part.a_pos.numel(), part.b_pos.numel()
    g = torch.Generator().manual_seed(h * w + int(rand))
    metric = torch.randn(2, h * w, 24, generator=g).to(dtype)
    want_max, want_idx = ref.spatial_scores(metric, ref.Partition(*(t.cpu() for t in part)))
    node_max, node_idx = match_kernels.match_scores(metric.to(DEVICE), positions=(part.a_pos, part.b_pos))
    # Scores: the same maxima, each chosen destination within a near-tie of the best.
    torch.testing.assert_close(node_max.cpu(), want_max, rtol=0, atol=SCORE_TIE[dtype])
    same_idx = node_idx.cpu() == want_idx
    assert same_idx.float().mean() > 0.9
    for r in r_values(na):
        spatial_launches.clear()
        got = ops.spatial_match(metric.to(DEVICE), part, r, backend="triton")
        scores, select = ops._spatial_candidates(metric.to(DEVICE))
        # Counted launchers: today's kernels; a "dot" / "sort" candidate launches neither.
        assert spatial_launches == {name: 1 for name, used in (("match_scores", scores == "match"),
                                                               ("spatial_select", select == "radix64")) if used}
        assert got.r == r and got.a_row.shape == (2, na) and got.dst_start.shape == (2, nb + 1)
        # Select: exactly the reference's on the kernel's own scores.
        assert_same(got, ref.to_spatial(ref.select(node_max.cpu(), node_idx.cpu(), r, nb, 0)))
        if same_idx.all() and torch.equal(node_max.cpu(), want_max):
            assert_same(got, ref.spatial_match(metric, ref.Partition(*(t.cpu() for t in part)), r))


@pytest.mark.parametrize("case", ["rounded", "signed_zeros", "constant", "with_-inf"])
def test_spatial_select_ties_follow_the_reference(case, select_candidate):
    # Equal scores rank by index, -0.0 ties with +0.0, -inf (a NaN score) ranks last.
    g = torch.Generator().manual_seed(3)
    na, nb = 48, 40
    node_max = {
        "rounded": torch.randn(3, na, generator=g).round(decimals=1),
        "signed_zeros": torch.where(torch.rand(3, na, generator=g) < 0.5, -0.0, 0.0),
        "constant": torch.full((3, na), 0.25),
        "with_-inf": torch.where(torch.rand(3, na, generator=g) < 0.3, float("-inf"), torch.rand(3, na, generator=g)),
    }[case]
    node_idx = torch.randint(0, nb, (3, na), generator=g)
    node_idx[1] = 5  # every source into one destination
    for r in (1, 17, 47, 48):
        got = select_candidate(node_max.to(DEVICE), node_idx.to(DEVICE), r, nb)
        assert_same(got, ref.to_spatial(ref.select(node_max, node_idx, r, nb, 0)))


def test_spatial_select_on_many_programs_matches_one(select_candidate):
    # Random scores of a real grid, the image split over 3 programs in "many".
    part = ref.spatial_partition(16, 12, 2, 2)
    g = torch.Generator().manual_seed(9)
    node_max = torch.rand(2, part.a_pos.numel(), generator=g)
    node_idx = torch.randint(0, part.b_pos.numel(), node_max.shape, generator=g)
    for r in (1, 96, 144):
        got = select_candidate(node_max.to(DEVICE), node_idx.to(DEVICE), r, part.b_pos.numel())
        assert_same(got, ref.to_spatial(ref.select(node_max, node_idx, r, part.b_pos.numel(), 0)))


@pytest.mark.parametrize("side", [64, 128], ids=["N4096", "N16384"])
def test_spatial_select_at_sd_sizes(side):
    # SD 1.5 at 512 px and SDXL at 1024 px; 2x2 cells, ratio 0.5 and the
    # largest r. The interpreter gets large tiles and few programs to stay
    # fast (the many-program path is covered above, at small sizes). N = 65536
    # (2048 px) costs the interpreter minutes: bench/sd_check.py runs it on a GPU.
    settings = select_kernels.SpatialSelectSettings()
    if DEVICE == "cpu":
        settings = select_kernels.SpatialSelectSettings(dst_block=4096, block=4096, route_block=64)
    part = ref.spatial_partition(side, side, 2, 2)
    na, nb = part.a_pos.numel(), part.b_pos.numel()
    g = torch.Generator().manual_seed(side)
    node_max = torch.randn(1, na, generator=g).round(decimals=2)  # many exact ties
    node_idx = torch.randint(0, nb, (1, na), generator=g)
    for r in (side * side // 2, na):
        want = ref.to_spatial(ref.select(node_max, node_idx, r, nb, 0))
        got = select_kernels.spatial_select(node_max.to(DEVICE), node_idx.to(DEVICE), r, nb, settings=settings)
        assert_same(got, want)
        for name in ("sort", "topk", "fused"):  # 16-bit index part of the keys here
            assert_same(select_kernels.SPATIAL_SELECT_CANDIDATES[name](node_max.to(DEVICE), node_idx.to(DEVICE), r, nb),
                        want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dot_scores_match_the_reference(dtype):
    # The "dot" candidate with small tiles (several A programs, B tiles and channel
    # chunks, each with a ragged end), a NaN row (its scores are -inf), a zero
    # row (cosine 0 after the EPS clamp) and an exact tie (a B row repeated:
    # the smaller index wins).
    part = make_partition(9, 11, 2, 2, rand=True, seed=5)
    g = torch.Generator().manual_seed(11)
    metric = torch.randn(2, 99, 40, generator=g)
    a0, b0, b1 = part.a_pos[0].item(), part.b_pos[1].item(), part.b_pos[4].item()
    metric[:, b1] = metric[:, b0]
    metric[0, part.a_pos[3]] = float("nan")
    metric[1, part.a_pos[5]] = 0.0
    metric[:, a0] = metric[:, b0] * 2  # its best partners are B 1 and B 4, equally
    metric = metric.to(dtype)
    settings = match_kernels.SpatialScoresSettings(block_a=16, block_b=16, block_d=16)
    node_max, node_idx = match_kernels.spatial_scores(metric.to(DEVICE), part.a_pos, part.b_pos, settings=settings)
    want_max, want_idx = ref.spatial_scores(metric, ref.Partition(*(t.cpu() for t in part)))
    torch.testing.assert_close(node_max.cpu(), want_max, rtol=0, atol=SCORE_TIE[dtype])
    assert (node_idx.cpu() == want_idx).float().mean() > 0.9
    assert node_idx[:, 0].tolist() == [1, 1]
    assert node_max[0, 3].item() == float("-inf") and node_max[1, 5].item() == 0.0


@pytest.mark.parametrize("scores,select", [("dot", "sort"), ("dot", "fused"), ("match", "topk")])
def test_spatial_match_op_with_each_candidate(scores, select):
    # The op the GPU dispatches to, with each pair the table may name: the
    # select exactly the reference's on that candidate's own scores.
    part = make_partition(8, 10, 2, 2, rand=False)
    nb = part.b_pos.numel()
    metric = torch.randn(2, 80, 24, generator=torch.Generator().manual_seed(2)).half().to(DEVICE)
    node_max, node_idx = match_kernels.SPATIAL_SCORES_CANDIDATES[scores](metric, part.a_pos, part.b_pos)
    for r in r_values(part.a_pos.numel()):
        got = ops._spatial_match_op(metric, part.a_pos, part.b_pos, r, scores, select)
        assert_same(ref.SpatialMatch(*got), ref.to_spatial(ref.select(node_max.cpu(), node_idx.cpu(), r, nb, 0)))


def test_dispatch_tables_name_known_candidates():
    # A committed table naming a candidate that no longer exists would make the GPU
    # path raise a KeyError; each row's times must also include its winner's.
    for op, candidates in (("spatial_select", select_kernels.SPATIAL_SELECT_CANDIDATES),
                           ("spatial_scores", match_kernels.SPATIAL_SCORES_CANDIDATES)):
        rows = dispatch.table(op).get("rows", [])
        for row in rows:
            assert row["winner"] in candidates and set(row["us"]) <= set(candidates) | {"argsort"}, (op, row)
            assert row["us"][row["winner"]] is not None, (op, row)
    assert ops.SPATIAL_SELECT_DEFAULT in select_kernels.SPATIAL_SELECT_CANDIDATES
    assert ops.SPATIAL_SCORES_DEFAULT in match_kernels.SPATIAL_SCORES_CANDIDATES


def test_ratio_limits_and_empty_sets():
    # r = 0 returns the input itself; r beyond Na is clamped; a grid smaller than a cell has no B.
    part = make_partition(5, 5, 2, 2, rand=False)
    x = torch.randn(1, 25, 8, device=DEVICE)
    empty = ops.spatial_match(x, part, 0, backend="triton")
    assert empty.r == 0 and ops.spatial_merge(x, empty, part, backend="triton") is x
    full = ops.spatial_match(x, part, 1000, backend="triton")
    assert full.r == part.a_pos.numel() == 21
    assert ops.spatial_merge(x, full, part, backend="triton").shape == (1, 4, 8)
    tiny = make_partition(1, 3, 2, 2, rand=False)
    assert ops.spatial_match(torch.randn(1, 3, 8, device=DEVICE), tiny, 2, backend="triton").r == 0
