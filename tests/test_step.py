"""The ViT step (kernels/step.py: the one-launch kernel and the other paths of
``STEP_PATHS``) against the reference step, on conftest's DEVICE: the GPU, or the
CPU through Triton's interpreter.

The indices must equal the reference's (up to near-ties of the scores); the
values are checked against the reference merge on the kernel's own match, so
they never depend on a near-tie; sizes exactly; the bias by the tolerance
table; copied rows bitwise. Keys come as a view into a qkv projection, the
way the patched blocks pass them. Every output is poisoned first.
"""
import pytest
import torch

import tofu_triton as tt
from tofu_triton import dispatch, ops
from tofu_triton import reference as ref
from tofu_triton.kernels import match as match_kernels
from tofu_triton.kernels import merge as merge_kernels
from tofu_triton.kernels import select as select_kernels
from tofu_triton.kernels import step as step_kernels
from tofu_triton.testing import assert_close

from conftest import DEVICE, DTYPES, ON_GPU, assert_match, count_calls

pytestmark = pytest.mark.usefixtures("poisoned")

# (B, heads, N, head dim, protected, programs per image)
SHAPES = [(2, 2, 17, 8, 1, 1), (1, 3, 33, 16, 0, 3), (3, 2, 20, 24, 5, 2), (1, 4, 64, 32, 1, 1)]


@pytest.fixture
def launched(monkeypatch):
    return count_calls(monkeypatch, [step_kernels, match_kernels, select_kernels, merge_kernels],
                       ("token_fusion_step", "plan", "head_mean", "match_scores", "select", "merge_forward",
                        "merge_backward"))


# The launchers each path calls besides token_fusion_step (which launches the one-launch step itself).
PATH_LAUNCHES = {"one_launch": (), "two_launch": ("plan", "merge_forward"),
                 "three_launch": ("match_scores", "select", "merge_forward"),
                 "four_launch": ("head_mean", "match_scores", "select", "merge_forward"),
                 "mean_plan": ("head_mean", "plan", "merge_forward")}
OTHER_PATHS = [path for path in step_kernels.STEP_PATHS if path != "one_launch"]


def qkv_keys(batch, heads, n, d, dtype, seed):
    """(x [B, N, C], keys [B, H, N, D] as a strided view of a qkv projection)."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, n, 3 * heads * d, generator=g).to(dtype)
    keys = qkv.reshape(batch, n, 3, heads, d).permute(2, 0, 3, 1, 4)[1]
    x = (torch.randn(batch, n, heads * d, generator=g) * (0.5 + torch.rand(batch, n, 1, generator=g))).to(dtype)
    return x, keys


def copied_rows(match, n_out, mode):
    """[B, n_out] bool: output rows that are copies of an input row."""
    copied = torch.ones(match.unm_idx.shape[0], n_out, dtype=torch.bool)
    if mode != "prune":
        copied[:, n_out - match.dst_start.shape[1] + 1:] = match.dst_start.diff(dim=1) == 0
    return copied


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}N{}D{}P{}T{}".format(*s))
def test_step_matches_reference(shape, dtype):
    # The launcher itself, to set the programs per image (the op picks them from the batch and the GPU).
    check_against_reference(shape, dtype, "one_launch")


# The other paths have no programs per image; sizes given or not by the last field.
PATH_SHAPES = [(2, 2, 17, 8, 1, 1), (1, 3, 33, 16, 0, 2), (3, 2, 20, 24, 5, 2)]
if ON_GPU:  # ViT-B/16's step: the tiles a card runs (bf16's among them, which the interpreter cannot run)
    PATH_SHAPES += [(8, 12, 197, 64, 1, 2)]


@pytest.mark.parametrize("path", OTHER_PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", PATH_SHAPES, ids=lambda s: "B{}H{}N{}D{}P{}".format(*s[:5]))
def test_other_paths_match_reference(shape, dtype, path, launched):
    check_against_reference(shape, dtype, path)
    # Three modes, each the path's own launches only.
    assert launched == {name: 3 for name in ("token_fusion_step",) + PATH_LAUNCHES[path]}


def check_against_reference(shape, dtype, path):
    batch, heads, n, d, p, programs = shape
    settings = step_kernels.StepSettings(programs_per_image=programs)
    x, keys = qkv_keys(batch, heads, n, d, dtype, seed=n * heads)
    size = None if programs == 1 else 1 + 3 * torch.rand(batch, n, 1, generator=torch.Generator().manual_seed(n))
    nb = (n - p) // 2
    metric = ref.head_mean(keys)
    for mode, r in (("mlerp", nb), ("mean", 1), ("prune", nb // 2 + 1)):
        outputs = step_kernels.token_fusion_step(x.to(DEVICE), keys.to(DEVICE), None if size is None else
                                                 size.to(DEVICE), r, p, mode, dtype, settings, path=path)
        got = ops._as_step(*outputs, n, p, r, with_bias=True)
        want = ref.token_fusion_step(x, keys, r, size, mode, p, bias_dtype=dtype)
        own = ref.Match(*(t.cpu() for t in got.match[:5]), p)
        assert_match(own, want.match, metric, n)
        values, sizes = ref.merge_tokens(x, own, size, mode)  # on the kernel's own match
        assert got.x.dtype == dtype and got.x.shape == (batch, n - r, heads * d)
        assert_close(got.x.cpu(), values, name=f"{mode} x")
        copied = copied_rows(own, n - r, mode)
        assert torch.equal(got.x.cpu()[copied], values[copied]), "copied rows must be bitwise"
        torch.testing.assert_close(got.size.cpu(), sizes)  # summed in another order than scatter_add
        assert got.bias.shape == (batch, 1, 1, n - r) and got.bias.dtype == dtype
        assert got.bias.stride(0) % 16 == 0, "bias rows must start 16-element aligned (SDPA takes them as they are)"
        assert_close(got.bias.cpu(), ref.log_size_bias(sizes, dtype), name="bias")


def test_step_is_one_launch_deterministic_and_without_bias_when_not_asked(launched):
    x, keys = qkv_keys(2, 2, 41, 16, torch.float16, seed=3)
    x, keys = x.to(DEVICE), keys.to(DEVICE)
    # The path named: without one, CUDA takes the dispatch table's (test_the_default_path_...).
    runs = [tt.token_fusion_step(x, keys, 12, mode="mlerp", backend="triton", path="one_launch") for _ in range(2)]
    assert launched == {"token_fusion_step": 2}
    assert runs[0].bias is None
    assert torch.equal(runs[0].x, runs[1].x) and torch.equal(runs[0].size, runs[1].size)
    assert all(torch.equal(a, b) for a, b in zip(runs[0].match[:5], runs[1].match[:5]))


@pytest.mark.parametrize("path", OTHER_PATHS)
def test_other_paths_are_deterministic_and_without_bias_when_not_asked(path, launched):
    x, keys = qkv_keys(2, 2, 25, 16, torch.float16, seed=3)
    x, keys = x.to(DEVICE), keys.to(DEVICE)
    runs = [tt.token_fusion_step(x, keys, 9, mode="mean", backend="triton", path=path) for _ in range(2)]
    assert launched == {name: 2 for name in ("token_fusion_step",) + PATH_LAUNCHES[path]}
    assert runs[0].bias is None
    assert torch.equal(runs[0].x, runs[1].x) and torch.equal(runs[0].size, runs[1].size)
    assert all(torch.equal(a, b) for a, b in zip(runs[0].match[:5], runs[1].match[:5]))


def test_the_default_path_is_one_launch_in_the_interpreter_and_the_tables_winner_on_cuda(launched):
    x, keys = qkv_keys(2, 2, 41, 16, torch.float16, seed=3)
    allowed = step_kernels.paths_for(41, 32, 16, protected=1)
    assert allowed == step_kernels.STEP_PATHS  # a shape every path handles: the choice is the table's (or the rule's)
    want = (dispatch.winner("vit_step", torch.device(DEVICE), torch.float16, "three_launch", allowed=allowed,
                            B=2, N=41, C=32, D=16) if ON_GPU else "one_launch")
    tt.token_fusion_step(x.to(DEVICE), keys.to(DEVICE), 12, mode="mlerp", backend="triton")
    assert launched == {name: 1 for name in ("token_fusion_step",) + PATH_LAUNCHES[want]}


@pytest.mark.parametrize("path", step_kernels.STEP_PATHS)
def test_nan_keys_give_valid_indices(path):
    x, keys = qkv_keys(2, 2, 33, 8, torch.float32, seed=4)
    keys[0, :, 3] = float("nan")
    keys[1] = float("nan")  # a whole image of NaN scores
    got = tt.token_fusion_step(x.to(DEVICE), keys.to(DEVICE), 10, backend="triton", path=path)
    want = ref.token_fusion_step(x, keys, 10)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(got.match[:5], want.match[:5]))


@pytest.mark.parametrize("path", OTHER_PATHS)
def test_exact_ties_and_the_smallest_shapes_follow_the_reference(path):
    # Every score tied (ranks by index), signed zeros, and Na = Nb = 1 (the sort's smallest tile).
    ones = torch.ones(2, 2, 21, 8)
    zeros = torch.zeros(1, 2, 21, 8)
    zeros[0, :, 3] = 1.0
    zeros[0, 1, ::3] = -0.0
    for keys, r, p in ((ones, 6, 1), (zeros, 9, 1), (torch.randn(1, 2, 3, 4), 1, 1), (torch.randn(2, 1, 2, 4), 1, 0)):
        x = torch.randn(keys.shape[0], keys.shape[2], 8)
        got = tt.token_fusion_step(x.to(DEVICE), keys.to(DEVICE), r, protected=p, backend="triton", path=path)
        want = ref.token_fusion_step(x, keys, r, protected=p)
        assert all(torch.equal(a.cpu(), b) for a, b in zip(got.match[:5], want.match[:5]))
        assert torch.equal(got.x.cpu(), want.x) or torch.allclose(got.x.cpu(), want.x, atol=1e-6)


def test_path_is_checked():
    x, keys = qkv_keys(1, 1, 13, 144, torch.float32, seed=8)
    x, keys = x.to(DEVICE), keys.to(DEVICE)  # backend="triton" takes CUDA tensors wherever the GPU runs the kernels
    with pytest.raises(ValueError, match="path must be one of"):
        tt.token_fusion_step(x, keys, 2, backend="triton", path="fastest")
    with pytest.raises(ValueError, match="does not handle"):  # head dim 144 > the one-launch kernel's 128
        tt.token_fusion_step(x, keys, 2, backend="triton", path="one_launch")


@pytest.mark.parametrize("mode, path", [("mean", "one_launch"), ("mlerp", "one_launch"), ("prune", "one_launch"),
                                        ("mlerp", "two_launch"), ("mean", "three_launch"),
                                        ("mlerp", "four_launch"), ("mlerp", "mean_plan")])
def test_step_gradient_matches_reference(mode, path, launched):
    x, keys = qkv_keys(2, 2, 21, 8, torch.float32, seed=5)
    size = 1 + 3 * torch.rand(2, 21, 1, generator=torch.Generator().manual_seed(6))
    weight = torch.randn(2, 21 - 7, 16, generator=torch.Generator().manual_seed(7))
    xk = x.clone().to(DEVICE).requires_grad_(True)
    got = tt.token_fusion_step(xk, keys.to(DEVICE), 7, size.to(DEVICE), mode, backend="triton", path=path)
    (got.x * weight.to(DEVICE)).sum().backward()
    assert launched["token_fusion_step"] == 1 and launched["merge_backward"] == 1
    xr = x.double().requires_grad_(True)  # x itself never required a gradient: a leaf
    want = ref.merge_tokens(xr, ref.Match(*(t.cpu() for t in got.match[:5]), 1), size, mode)[0]
    (want * weight.double()).sum().backward()
    assert_close(xk.grad.cpu().double(), xr.grad, torch.float32, "grad x")


def test_wide_heads_take_the_three_launch_path(launched):
    # Head dims above 128 do not fit the step's match tile (nor, in the interpreter, does the
    # two-launch path come first): match (keys in), select, merge instead.
    x, keys = qkv_keys(1, 1, 13, 144, torch.float32, seed=8)
    got = tt.token_fusion_step(x.to(DEVICE), keys.to(DEVICE), 4, mode="mean", bias_dtype=torch.float32,
                               backend="triton")
    assert launched == {"token_fusion_step": 1, "match_scores": 1, "select": 1, "merge_forward": 1}
    want = ref.token_fusion_step(x, keys, 4, mode="mean", bias_dtype=torch.float32)
    assert_close(got.x.cpu(), want.x)
    assert_close(got.bias.cpu(), want.bias)


def test_r_zero_and_clamping():
    x, keys = qkv_keys(1, 2, 9, 8, torch.float32, seed=9)
    size = torch.full((1, 9, 1), 2.0)
    zero = tt.token_fusion_step(x.to(DEVICE), keys.to(DEVICE), 0, size.to(DEVICE), bias_dtype=torch.float32,
                                backend="triton")
    assert zero.x is not None and zero.match.r == 0 and torch.equal(zero.x.cpu(), x)
    assert torch.equal(zero.bias.cpu(), ref.log_size_bias(size, torch.float32))
    assert tt.token_fusion_step(x.to(DEVICE), keys.to(DEVICE), 100, backend="triton").x.shape == (1, 5, 16)


def test_step_compiles_fullgraph_with_its_backward():
    x, keys = qkv_keys(2, 2, 17, 8, torch.float32, seed=10)
    x, keys = x.to(DEVICE), keys.to(DEVICE)

    def two_steps(t):
        a = tt.token_fusion_step(t, keys, 4, mode="prune", bias_dtype=t.dtype, backend="triton")
        b = tt.token_fusion_step(a.x * 2, keys[:, :, :13], 3, a.size, "mlerp", bias_dtype=t.dtype, backend="triton")
        return b.x, b.size, b.bias

    torch._dynamo.reset()
    compiled = torch.compile(two_steps, fullgraph=True, backend="aot_eager")
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    got, want = compiled(x1), two_steps(x2)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    got[0].sum().backward()
    want[0].sum().backward()
    assert torch.equal(x1.grad, x2.grad)


@pytest.mark.parametrize("call, error, words", [
    (lambda x, k: tt.token_fusion_step(x, k[0], 2), ValueError, "keys must be a \\[B, H, N, D\\]"),
    (lambda x, k: tt.token_fusion_step(x, k[:, :, :5], 2), ValueError, "do not belong to x"),
    (lambda x, k: tt.token_fusion_step(x, k, 2, mode="sum"), ValueError, "mode must be one of"),
    (lambda x, k: tt.token_fusion_step(x, k, -1), ValueError, "r must be >= 0"),
    (lambda x, k: tt.token_fusion_step(x, k, 2, bias_dtype=torch.int32), TypeError, "bias_dtype must be"),
    (lambda x, k: tt.token_fusion_step(x, k, 2, size=torch.ones(1, 8, 1)), ValueError, "size must have shape"),
])
def test_bad_arguments_name_what_is_wrong(call, error, words):
    x, keys = qkv_keys(1, 2, 9, 8, torch.float32, seed=11)
    with pytest.raises(error, match=words):
        call(x, keys)


def test_one_launch_is_not_offered_for_bf16_on_cuda():
    # Its bf16 output failed the tournament's check at every batch on the H200 (bench/results/
    # h200-2026-12-04-run3/tournament_vit.md); the interpreter cannot show it (no bf16 arithmetic).
    assert "one_launch" in step_kernels.paths_for(197, 768, 64, 1, torch.float16, "cuda")
    assert "one_launch" in step_kernels.paths_for(197, 768, 64, 1, torch.bfloat16, "cpu")
    assert step_kernels.paths_for(197, 768, 64, 1, torch.bfloat16, "cuda") == tuple(OTHER_PATHS)


def test_plan_on_the_metric_takes_a_128_row_tile():
    # Na = 70 > 64: the plan on a given fp16 metric matches it in one A tile of 128 rows (kernels.step.plan_blocks),
    # where the keys-in plan and an fp32 dot take the match's 64 / 32.
    assert step_kernels.plan_blocks(16, False, 70, heads=False)[0] == 128
    assert step_kernels.plan_blocks(16, False, 70, heads=True)[0] == 64
    assert step_kernels.plan_blocks(16, True, 70, heads=False)[0] == 32
    check_against_reference((1, 2, 141, 16, 1, 1), torch.float16, "mean_plan")
    # The same Na through the keys-in plan: two A tiles of 64 through its scratch, then the sort.
    assert not step_kernels.plan_constants(16, False, 70, 70, heads=True)["SINGLE_A"]
    check_against_reference((1, 2, 141, 16, 1, 1), torch.float16, "two_launch")
