"""The ViT merge kernel and its gradient against the reference (on CPU through
Triton's interpreter), with the same match fed to both sides: values by the
tolerance table, copied rows bitwise. Every output is poisoned first."""
import pytest
import torch

import tofu_triton as tt
from tofu_triton import reference as ref
from tofu_triton.kernels import common
from tofu_triton.kernels import merge as merge_kernels
from tofu_triton.testing import assert_close, make_inputs

from conftest import DEVICE, DTYPES, ON_GPU, count_calls

pytestmark = pytest.mark.usefixtures("poisoned")


@pytest.fixture
def launched(monkeypatch):
    return count_calls(monkeypatch, merge_kernels, ("merge_forward", "merge_backward"))


# (B, N, C, protected): small C keeps the interpreter quick; the GPU run adds big shapes.
MERGE_SHAPES = [(1, 2, 8, 0), (3, 3, 8, 1), (3, 17, 24, 1), (1, 17, 33, 5), (3, 64, 16, 0), (1, 197, 16, 1)]
if ON_GPU:
    MERGE_SHAPES += [(8, 197, 768, 1), (4, 577, 1024, 1), (2, 1025, 1280, 5), (1, 4096, 320, 0)]


def _match_for(metric, r, p):
    return ref.bipartite_match(metric.cpu(), r, p)


def _to(match, device):
    return match._replace(**{f: getattr(match, f).to(device) for f in match._fields[:5]})


# Sizes and the match's extent pair up (one source without sizes, every B row
# fed with sizes) rather than multiply: each still meets every shape and dtype.
@pytest.mark.parametrize("r_kind,with_size", [("one", False), ("max", True)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,n,c,p", MERGE_SHAPES)
def test_merge_forward_matches_reference(b, n, c, p, r_kind, dtype, with_size, launched):
    x, metric, size = make_inputs(b, n, c, d=16, dtype=dtype, seed=n + c, with_size=with_size)
    nb = (n - p) // 2
    r = 1 if r_kind == "one" else nb
    match = _match_for(metric, r, p)
    assert match.r == r >= 1
    for calls, mode in enumerate(ref.MODES, start=1):
        expected, expected_size = ref.merge_tokens(x, match, size, mode)
        out, size_out = tt.merge_tokens(
            x.to(DEVICE), _to(match, DEVICE), None if size is None else size.to(DEVICE), mode, backend="triton"
        )
        assert launched == {"merge_forward": calls}
        assert out.dtype == dtype
        assert_close(out.cpu(), expected, name=f"{mode} x_out")
        torch.testing.assert_close(size_out.cpu(), expected_size)
        # Rows that are copied (prefix, unmerged, B rows with no source, all of prune) are bitwise.
        copied = torch.ones(b, n - match.r, dtype=torch.bool)
        if mode != "prune":
            off = p + match.unm_idx.shape[1]
            copied[:, off:] = match.dst_start.diff(dim=1) == 0
        assert torch.equal(out.cpu()[copied], expected[copied])


@pytest.mark.parametrize("dtype,with_size", [(torch.float32, True), (torch.float16, False)])
@pytest.mark.parametrize("b,n,c,p", MERGE_SHAPES[1:])
def test_merge_backward_matches_reference(b, n, c, p, dtype, with_size, launched):
    x, metric, size = make_inputs(b, n, c, d=16, dtype=dtype, seed=2 * n + c, with_size=with_size)
    x = x * (0.5 + torch.rand(b, n, 1)).to(dtype)  # varied norms: a clear max-norm contributor
    match = _match_for(metric, n, p)  # r = Nb: many multi-source groups
    grad_out = torch.randn(b, n - match.r, c).to(dtype)
    for mode in ref.MODES:
        xr = x.double().requires_grad_(True)
        expected_out, _ = ref.merge_tokens(xr, match, None if size is None else size, mode)
        (expected,) = torch.autograd.grad(expected_out, xr, grad_out.double())
        xk = x.to(DEVICE).requires_grad_(True)
        out, _ = tt.merge_tokens(xk, _to(match, DEVICE), None if size is None else size.to(DEVICE), mode,
                                 backend="triton")
        (grad,) = torch.autograd.grad(out, xk, grad_out.to(DEVICE))
        assert launched.get("merge_backward", 0) >= 1
        launched.clear()
        assert grad.dtype == dtype
        assert_close(grad.cpu().double(), expected, dtype=dtype, name=f"{mode} grad")
        if mode == "prune":
            src_rows = p + 2 * match.src_idx
            assert (grad.cpu().gather(1, src_rows[..., None].expand(-1, -1, c)) == 0).all()


def test_token_fusion_end_to_end_and_deterministic():
    x, metric, size = make_inputs(3, 64, 32, d=16, dtype=torch.float16, seed=9)
    x, metric, size = x.to(DEVICE), metric.to(DEVICE), size.to(DEVICE)
    runs = [tt.token_fusion(x, metric, 20, size, mode="mlerp", protected=1, backend="triton") for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    match = _to(tt.bipartite_match(metric, 20, 1, backend="triton"), "cpu")  # its own match: no near-tie doubt
    expected, expected_size = ref.merge_tokens(x.cpu(), match, size.cpu(), "mlerp")
    assert_close(runs[0][0].cpu(), expected)
    torch.testing.assert_close(runs[0][1].cpu(), expected_size)


def test_non_contiguous_tokens():
    base_x, metric, size = make_inputs(2, 33, 40, d=8, seed=6)
    x = base_x.transpose(1, 2).contiguous().transpose(1, 2)  # strides (N*C, 1, N)
    assert not x.is_contiguous()
    match = ref.bipartite_match(metric, 10, 1)
    for mode in ref.MODES:
        out, _ = tt.merge_tokens(x.to(DEVICE), _to(match, DEVICE), size.to(DEVICE), mode, backend="triton")
        assert_close(out.cpu(), ref.merge_tokens(base_x, match, size, mode)[0], name=mode)


def test_nan_and_inf_tokens_propagate():
    x, metric, _ = make_inputs(2, 41, 16, d=8, seed=8)
    x[0, 5] = float("nan")
    x[1, 8] = float("inf")
    match = ref.bipartite_match(metric, 12, 1)
    for mode in ref.MODES:
        out, _ = tt.merge_tokens(x.to(DEVICE), _to(match, DEVICE), None, mode, backend="triton")
        expected, _ = ref.merge_tokens(x, match, None, mode)
        assert torch.equal(out.cpu().isnan(), expected.isnan())
        finite = ~expected.isnan()
        torch.testing.assert_close(out.cpu()[finite], expected[finite], rtol=1e-5, atol=1e-6)


def test_merge_at_n4096():
    # Stable Diffusion latents: N = 4096 (Na = Nb = 2048).
    x, metric, size = make_inputs(1, 4096, 8, d=16, dtype=torch.float16, seed=12)
    match = ref.bipartite_match(metric, 1536, 0)
    out, size_out = tt.merge_tokens(x.to(DEVICE), _to(match, DEVICE), size.to(DEVICE), "mlerp", backend="triton")
    expected, expected_size = ref.merge_tokens(x, match, size, "mlerp")
    assert_close(out.cpu(), expected)
    torch.testing.assert_close(size_out.cpu(), expected_size)


def test_too_wide_rows_are_refused():
    x, metric, _ = make_inputs(1, 5, common.MAX_ROW_C + 1, d=4, seed=13, device=DEVICE)
    match = tt.bipartite_match(metric, 1, backend="triton")
    with pytest.raises(ValueError, match="C <= 4096"):
        tt.merge_tokens(x, match, backend="triton")




# The tiled merge (several output rows per program): the step's merge variants "tiles2" / "tiles4" run it.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,n,c,p", MERGE_SHAPES)
def test_tiled_merge_matches_reference(b, n, c, p, dtype, monkeypatch):
    # Four rows per program and 16-channel chunks of the merged rows at these small widths: tiles hold B rows
    # with and without sources side by side, and C = 24 / 33 take several chunks.
    monkeypatch.setitem(merge_kernels.MERGE_VARIANTS, "tiles4",
                        merge_kernels.MergeVariant(rows=4, per_thread=16))
    monkeypatch.setattr(merge_kernels, "MERGE_CHUNK_PER_THREAD", 1)
    x, metric, size = make_inputs(b, n, c, d=16, dtype=dtype, seed=3 * n + c)
    nb = (n - p) // 2
    for mode, r, with_size in (("mlerp", nb, True), ("mean", 1, False), ("prune", max(1, nb // 2), True)):
        sized = size if with_size else None
        match = _match_for(metric, r, p)
        bias = torch.full((b, n - r + 3), float("nan"), dtype=dtype, device=DEVICE)
        dev = _to(match, DEVICE)
        out, size_out = merge_kernels.merge_forward(x.to(DEVICE), None if sized is None else sized.to(DEVICE),
                                                    dev.unm_idx, dev.dst_start, dev.dst_src, p, mode, bias=bias,
                                                    variant="tiles4")
        expected, expected_size = ref.merge_tokens(x, match, sized, mode)
        assert_close(out.cpu(), expected, name=f"{mode} x_out")
        copied = torch.ones(b, n - r, dtype=torch.bool)
        if mode != "prune":
            copied[:, p + match.unm_idx.shape[1]:] = match.dst_start.diff(dim=1) == 0
        assert torch.equal(out.cpu()[copied], expected[copied]), "copied rows must be bitwise"
        torch.testing.assert_close(size_out.cpu(), expected_size)
        assert_close(bias[:, : n - r].cpu(), ref.log_size_bias(expected_size, dtype)[:, 0, 0], name="bias")
        assert bias[:, n - r:].isnan().all(), "the bias row's padding is not written"


# The variants as they ship (no settings changed): ViT-B's width with its real tiles and chunks; on a GPU
# ViT-B and ViT-L/384 sizes too.
SHIPPED_SHAPES = [(2, 21, 768, 1)] + ([(8, 197, 768, 1), (4, 577, 1024, 1)] if ON_GPU else [])


@pytest.mark.parametrize("variant", [v for v in merge_kernels.MERGE_VARIANTS if v != "rows"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,n,c,p", SHIPPED_SHAPES)
def test_merge_variants_as_shipped_match_reference(b, n, c, p, dtype, variant):
    x, metric, size = make_inputs(b, n, c, d=16, dtype=dtype, seed=5 * n + c)
    match = _match_for(metric, (n - p) // 2, p)  # r = Nb: B rows with several sources
    dev = _to(match, DEVICE)
    for mode in ref.MODES:
        out, size_out = merge_kernels.merge_forward(x.to(DEVICE), size.to(DEVICE), dev.unm_idx, dev.dst_start,
                                                    dev.dst_src, p, mode, variant=variant)
        expected, expected_size = ref.merge_tokens(x, match, size, mode)
        assert_close(out.cpu(), expected, name=f"{variant} {mode}")
        torch.testing.assert_close(size_out.cpu(), expected_size)


def test_tiled_merge_takes_the_vit_partition_with_sizes_only():
    x, metric, _ = make_inputs(1, 10, 8, d=4, seed=14)
    dev = _to(ref.bipartite_match(metric, 2, 0), DEVICE)
    positions = (torch.arange(0, 10, 2, device=DEVICE), torch.arange(1, 10, 2, device=DEVICE))
    for kwargs in (dict(positions=positions), dict(with_size=False)):
        with pytest.raises(ValueError, match="the tiled merge takes the ViT partition"):
            merge_kernels.merge_forward(x.to(DEVICE), None, dev.unm_idx, dev.dst_start, dev.dst_src, 0, "mean",
                                        variant="tiles2", **kwargs)
    with pytest.raises(ValueError, match="variant must be one of"):
        merge_kernels.merge_forward(x.to(DEVICE), None, dev.unm_idx, dev.dst_start, dev.dst_src, 0, "mean",
                                    variant="fastest")


def test_merge_variants_launch_shapes():
    # ~16 elements per thread, whole rows (tests/test_aot_compile.py compiles each without spills).
    # (rows, warps, chunk): the chunk of the merged rows at MERGE_CHUNK_PER_THREAD (2) fp32 values per thread.
    assert merge_kernels.merge_launch("rows", 1024)[:2] == (1, merge_kernels.merge_num_warps(1024)) == (1, 8)
    assert merge_kernels.merge_launch("rows_lean", 1024)[:2] == (1, 2)
    assert merge_kernels.merge_launch("tiles2", 1024) == (2, 4, 128)
    assert merge_kernels.merge_launch("tiles4", 1024) == (4, 8, 128)
    assert merge_kernels.merge_launch("tiles4", 4096) == (4, 16, 256)
    assert merge_kernels.merge_launch("tiles4", 256) == (4, 2, 32)
