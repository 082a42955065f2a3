"""The Stable Diffusion step's match (match kernel on position arrays, spatial
select) against the reference, on CPU through Triton's interpreter.

Select is checked exactly on the kernel's own scores (so near-ties of the
scores cannot hide a select bug), the scores up to near-ties. "many" runs the
select with tiny tiles so that one image is split over many programs, as it
is at N = 4096 and beyond. Every output is poisoned before a kernel runs."""
import pytest
import torch

from tofu_triton import ops
from tofu_triton import reference as ref
from tofu_triton.kernels import match as match_kernels
from tofu_triton.kernels import select as select_kernels
from tofu_triton.testing import SCORE_TIE

from conftest import DEVICE, DTYPES, GRIDS, assert_same, make_partition, r_values

pytestmark = pytest.mark.usefixtures("poisoned")


@pytest.fixture(params=["one", "many"])
def programs(request):
    """Select settings: the shipped ones, or many programs per image (16 destinations
    and their share of A each, in tiles of 16), as at N = 4096 and beyond."""
    if request.param == "many":
        return select_kernels.SpatialSelectSettings(dst_block=16, block=16, route_block=16)
    return select_kernels.SpatialSelectSettings()


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
        assert spatial_launches == {"match_scores": 1, "spatial_select": 1}
        assert got.r == r and got.a_row.shape == (2, na) and got.dst_start.shape == (2, nb + 1)
        # Select: exactly the reference's on the kernel's own scores.
        assert_same(got, ref.to_spatial(ref.select(node_max.cpu(), node_idx.cpu(), r, nb, 0)))
        if same_idx.all() and torch.equal(node_max.cpu(), want_max):
            assert_same(got, ref.spatial_match(metric, ref.Partition(*(t.cpu() for t in part)), r))


@pytest.mark.parametrize("case", ["rounded", "signed_zeros", "constant", "with_-inf"])
def test_spatial_select_ties_follow_the_reference(case, programs):
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
        got = select_kernels.spatial_select(node_max.to(DEVICE), node_idx.to(DEVICE), r, nb, settings=programs)
        assert_same(got, ref.to_spatial(ref.select(node_max, node_idx, r, nb, 0)))


def test_spatial_select_on_many_programs_matches_one(programs):
    # Random scores of a real grid, the image split over 3 programs in "many".
    part = ref.spatial_partition(16, 12, 2, 2)
    g = torch.Generator().manual_seed(9)
    node_max = torch.rand(2, part.a_pos.numel(), generator=g)
    node_idx = torch.randint(0, part.b_pos.numel(), node_max.shape, generator=g)
    for r in (1, 96, 144):
        got = select_kernels.spatial_select(node_max.to(DEVICE), node_idx.to(DEVICE), r, part.b_pos.numel(),
                                            settings=programs)
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
        got = select_kernels.spatial_select(node_max.to(DEVICE), node_idx.to(DEVICE), r, nb, settings=settings)
        assert_same(got, ref.to_spatial(ref.select(node_max, node_idx, r, nb, 0)))


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
