"""The Stable Diffusion step's merge and unmerge (fused with the residual) and
their gradients against the reference, on CPU through Triton's interpreter,
with the same match fed to both sides. Every output is poisoned first."""
import pytest
import torch

from tofu_triton import ops
from tofu_triton import reference as ref
from tofu_triton.testing import assert_close

from conftest import DEVICE, DTYPES, GRIDS, make_partition, r_values

pytestmark = pytest.mark.usefixtures("poisoned")


@pytest.mark.parametrize("mode", ref.MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grid", GRIDS[:3], ids=lambda g: "x".join(map(str, g)))
def test_spatial_merge_and_unmerge_match_reference(grid, dtype, mode, spatial_launches):
    h, w, sx, sy = grid
    part = make_partition(h, w, sx, sy, rand=True, seed=1)
    cpu_part = ref.Partition(*(t.cpu() for t in part))
    g = torch.Generator().manual_seed(h + w)
    x = torch.randn(2, h * w, 40, generator=g).to(dtype)
    residual = torch.randn(2, h * w, 40, generator=g).to(dtype)
    for r in r_values(part.a_pos.numel()):
        match = ref.spatial_match(x, cpu_part, r)
        dev_match = type(match)(*(t.to(DEVICE) for t in match))
        spatial_launches.clear()
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
        assert spatial_launches == {"merge_forward": 1, "spatial_unmerge": 2}


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


