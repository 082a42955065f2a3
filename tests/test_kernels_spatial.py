"""The Stable Diffusion step's kernels (spatial partition: match, select, merge, unmerge)
against the reference, on CPU through Triton's interpreter.

Select is checked exactly on the kernel's own scores (so near-ties of the
scores cannot hide a select bug), the scores up to near-ties, merge and
unmerge with the same match fed to both sides. Every output is poisoned
before a kernel runs. "many" runs the select with tiny slices so that one
image is split over many programs, as it is at N = 4096 and beyond.
"""
import pytest
import torch

from tofu_triton import ops
from tofu_triton import reference as ref
from tofu_triton.kernels import tofu as kernels
from tofu_triton.testing import SCORE_TIE, assert_close

from conftest import DEVICE, count_calls

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (h, w, sx, sy): even grids, odd ones, cells that do not tile the grid, tall cells
GRIDS = [(8, 8, 2, 2), (7, 9, 2, 2), (6, 10, 3, 2), (9, 5, 1, 3)]
LAUNCHERS = ("spatial_partition", "spatial_scores", "spatial_select", "spatial_merge_forward", "spatial_merge_backward",
             "spatial_unmerge")


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(kernels, "POISON_OUTPUTS", True)


@pytest.fixture
def launched(monkeypatch):
    """Counts launcher calls (each launches one kernel), so a test fails if an op took another path."""
    return count_calls(monkeypatch, kernels, LAUNCHERS)


@pytest.fixture(params=["one", "many"])
def programs(request, monkeypatch):
    """Select programs per image: one, or many (16 destinations and their share of A each, in tiles of 16)."""
    if request.param == "many":
        monkeypatch.setattr(kernels, "SPATIAL_DST_BLOCK", 16)
        monkeypatch.setattr(kernels, "SPATIAL_BLOCK", 16)
        monkeypatch.setattr(kernels, "SPATIAL_ROUTE_BLOCK", 16)
    return request.param


def make_partition(h, w, sx, sy, rand, seed=0):
    choice = None
    if rand:
        g = torch.Generator().manual_seed(seed)
        choice = torch.randint(0, sx * sy, (h // sy, w // sx), generator=g)
    part = ref.spatial_partition(h, w, sx, sy, choice)
    return ref.Partition(*(t.to(DEVICE) for t in part))


def to_cpu(match):
    return type(match)(*(t.cpu() for t in match))


def r_values(na):
    return sorted({1, max(1, na // 2), na})


def assert_same(got, want):
    for name, a, b in zip(want._fields, got, want):
        assert torch.equal(a.cpu(), b.cpu()), f"{name} differs"


@pytest.mark.parametrize("grid", GRIDS + [(64, 64, 2, 2), (33, 17, 4, 3), (1, 3, 2, 2)],
                         ids=lambda g: "x".join(map(str, g)))
def test_partition_kernel_matches_reference(grid, launched):
    h, w, sx, sy = grid
    top_left = None
    for seed, step, block in [(None, 0, 0), (5, 0, 0), (5, 371, 3), (123456, 999000, 15)]:
        launched.clear()
        step = torch.tensor(step)
        got = ops.spatial_partition(h, w, sx, sy, seed=seed, step=step.to(DEVICE), block=block, backend="triton")
        choice = None if seed is None else ref.cell_choice(seed, step, block, (h // sy, w // sx), sx * sy)
        want = ref.spatial_partition(h, w, sx, sy, choice)
        assert_same(got, want)
        assert launched == ({"spatial_partition": 1} if (h // sy) * (w // sx) else {})  # no cell: no kernel
        a_pos, b_pos, slot = (t.cpu() for t in got)
        assert torch.equal(torch.cat([a_pos, b_pos]).sort().values, torch.arange(h * w))
        assert torch.equal(slot[torch.cat([a_pos, b_pos])], torch.arange(h * w))
        if seed is None:
            top_left = b_pos
        elif h * w >= 64:
            assert not torch.equal(b_pos, top_left)  # random destinations really move


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rand", [False, True])
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: "x".join(map(str, g)))
def test_spatial_match_matches_reference(grid, rand, dtype, launched):
    h, w, sx, sy = grid
    part = make_partition(h, w, sx, sy, rand, seed=h * w)
    na, nb = part.a_pos.numel(), part.b_pos.numel()
    g = torch.Generator().manual_seed(h * w + int(rand))
    metric = torch.randn(2, h * w, 24, generator=g).to(dtype)
    want_max, want_idx = ref.spatial_scores(metric, ref.Partition(*(t.cpu() for t in part)))
    node_max, node_idx = kernels.spatial_scores(metric.to(DEVICE), part.a_pos, part.b_pos)
    # Scores: the same maxima, each chosen destination within a near-tie of the best.
    torch.testing.assert_close(node_max.cpu(), want_max, rtol=0, atol=SCORE_TIE[dtype])
    same_idx = node_idx.cpu() == want_idx
    assert same_idx.float().mean() > 0.9
    for r in r_values(na):
        launched.clear()
        got = ops.spatial_match(metric.to(DEVICE), part, r, backend="triton")
        assert launched == {"spatial_scores": 1, "spatial_select": 1}
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
        got = kernels.spatial_select(node_max.to(DEVICE), node_idx.to(DEVICE), r, nb)
        assert_same(got, ref.to_spatial(ref.select(node_max, node_idx, r, nb, 0)))


def test_spatial_select_on_many_programs_matches_one(programs):
    # Random scores of a real grid, the image split over 3 programs in "many".
    part = ref.spatial_partition(16, 12, 2, 2)
    g = torch.Generator().manual_seed(9)
    node_max = torch.rand(2, part.a_pos.numel(), generator=g)
    node_idx = torch.randint(0, part.b_pos.numel(), node_max.shape, generator=g)
    for r in (1, 96, 144):
        got = kernels.spatial_select(node_max.to(DEVICE), node_idx.to(DEVICE), r, part.b_pos.numel())
        assert_same(got, ref.to_spatial(ref.select(node_max, node_idx, r, part.b_pos.numel(), 0)))


@pytest.mark.parametrize("side", [64, 128], ids=["N4096", "N16384"])
def test_spatial_select_at_sd_sizes(side, monkeypatch):
    # SD 1.5 at 512 px and SDXL at 1024 px; 2x2 cells, ratio 0.5 and the
    # largest r. The interpreter gets large tiles and few programs to stay
    # fast (the many-program path is covered above, at small sizes). N = 65536
    # (2048 px) costs the interpreter minutes: bench/sd_check.py runs it on a GPU.
    if DEVICE == "cpu":
        monkeypatch.setattr(kernels, "SPATIAL_BLOCK", 4096)
        monkeypatch.setattr(kernels, "SPATIAL_ROUTE_BLOCK", 64)
        monkeypatch.setattr(kernels, "SPATIAL_DST_BLOCK", 4096)
    part = ref.spatial_partition(side, side, 2, 2)
    na, nb = part.a_pos.numel(), part.b_pos.numel()
    g = torch.Generator().manual_seed(side)
    node_max = torch.randn(1, na, generator=g).round(decimals=2)  # many exact ties
    node_idx = torch.randint(0, nb, (1, na), generator=g)
    for r in (side * side // 2, na):
        got = kernels.spatial_select(node_max.to(DEVICE), node_idx.to(DEVICE), r, nb)
        assert_same(got, ref.to_spatial(ref.select(node_max, node_idx, r, nb, 0)))


@pytest.mark.parametrize("mode", ref.MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grid", GRIDS[:3], ids=lambda g: "x".join(map(str, g)))
def test_spatial_merge_and_unmerge_match_reference(grid, dtype, mode, launched):
    h, w, sx, sy = grid
    part = make_partition(h, w, sx, sy, rand=True, seed=1)
    cpu_part = ref.Partition(*(t.cpu() for t in part))
    g = torch.Generator().manual_seed(h + w)
    x = torch.randn(2, h * w, 40, generator=g).to(dtype)
    residual = torch.randn(2, h * w, 40, generator=g).to(dtype)
    for r in r_values(part.a_pos.numel()):
        match = ref.spatial_match(x, cpu_part, r)
        dev_match = type(match)(*(t.to(DEVICE) for t in match))
        launched.clear()
        out = ops.spatial_merge(x.to(DEVICE), dev_match, part, mode, backend="triton")
        want = ref.spatial_merge(x, match, cpu_part, mode)
        assert_close(out.cpu(), want)
        if mode != "mlerp":  # rows that nothing merged into are copied bitwise
            untouched = torch.cat([torch.ones(2, match.unm_idx.shape[1], dtype=torch.bool),
                                   match.dst_start.diff(dim=1) == 0], dim=1)
            assert torch.equal(out.cpu()[untouched], want[untouched])
        y = out * 2  # a sub-layer
        for res in (None, residual):
            back = ops.spatial_unmerge(y, dev_match, part, None if res is None else res.to(DEVICE), backend="triton")
            want = ref.spatial_unmerge(y.cpu(), match, cpu_part, res)
            if res is not None and dtype == torch.bfloat16 and DEVICE == "cpu":
                assert_close(back, want)  # the interpreter's fp32 -> bf16 cast does not round to nearest
            else:
                assert torch.equal(back.cpu(), want)  # a gather (+ the add torch does)
        assert launched == {"spatial_merge_forward": 1, "spatial_unmerge": 2}


@pytest.mark.parametrize("mode", ref.MODES)
def test_spatial_gradients_match_reference(mode):
    h, w, sx, sy = 7, 9, 2, 2
    part = make_partition(h, w, sx, sy, rand=True, seed=2)
    cpu_part = ref.Partition(*(t.cpu() for t in part))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, h * w, 24, generator=g)
    residual = torch.randn(2, h * w, 24, generator=g)
    weight = torch.randn(2, h * w, 24, generator=g)
    match = ref.spatial_match(x, cpu_part, 25)
    dev_match = type(match)(*(t.to(DEVICE) for t in match))

    grads = []
    for backend, p, m in (("triton", part, dev_match), ("reference", cpu_part, match)):
        dev = DEVICE if backend == "triton" else "cpu"
        xx, res = x.to(dev).requires_grad_(), residual.to(dev).requires_grad_()
        y = torch.tanh(ops.spatial_merge(xx, m, p, mode, backend=backend))
        (ops.spatial_unmerge(y, m, p, res, backend=backend) * weight.to(dev)).sum().backward()
        grads.append((xx.grad.cpu(), res.grad.cpu()))
    assert_close(grads[0][0], grads[1][0], name="grad x")
    assert torch.equal(grads[0][1], grads[1][1])


def test_the_step_compiles_fullgraph():
    torch._dynamo.reset()
    part = make_partition(8, 6, 2, 2, rand=True)
    x = torch.randn(2, 48, 16, device=DEVICE)

    def step(t):
        match = ops.spatial_match(t, part, 20, backend="triton")
        y = ops.spatial_merge(t, match, part, "mlerp", backend="triton") * 3
        return ops.spatial_unmerge(y, match, part, t, backend="triton")

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), step(x))


def test_unusable_arguments_are_refused():
    part = make_partition(8, 8, 2, 2, rand=False)
    x = torch.randn(1, 64, 8, device=DEVICE)
    match = ops.spatial_match(x, part, 10, backend="triton")
    with pytest.raises(ValueError, match="partition covers 48 \\+ 16 = 64 tokens but the tensor has N = 63"):
        ops.spatial_match(x[:, :63], part, 10, backend="triton")
    with pytest.raises(TypeError, match="partition must be"):
        ops.spatial_match(x, (part.a_pos, part.b_pos), 10)
    with pytest.raises(TypeError, match="match must be"):
        ops.spatial_merge(x, tuple(match), part)
    other = make_partition(4, 16, 2, 2, rand=False)  # also 64 tokens, but 48 + 16 in a different layout
    with pytest.raises(ValueError, match="different shape"):
        ops.spatial_merge(x.expand(2, -1, -1), match, other)
    y = ops.spatial_merge(x, match, part, backend="triton")
    with pytest.raises(ValueError, match="residual must be"):
        ops.spatial_unmerge(y, match, part, x[:, :, :4], backend="triton")
    with pytest.raises(ValueError, match="N - r = 54 rows"):
        ops.spatial_unmerge(x, match, part, backend="triton")
    with pytest.raises(ValueError, match="mode must be one of"):
        ops.spatial_merge(x, match, part, "sum")


def test_partition_arguments_are_checked():
    with pytest.raises(ValueError, match="h must be >= 1"):
        ops.spatial_partition(0, 4)
    with pytest.raises(TypeError, match="sx must be an int"):
        ops.spatial_partition(4, 4, sx=2.0)
    with pytest.raises(TypeError, match="step must be an int64 scalar tensor"):
        ops.spatial_partition(4, 4, seed=1, step=3)


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
