"""Public API: argument checks, backend dispatch, autograd wiring, torch.compile."""
import re

import pytest
import torch

import tofu_triton as tt
from tofu_triton import reference as ref
from tofu_triton.testing import assert_close, make_inputs

from conftest import DEVICE, ON_GPU


@pytest.fixture
def inputs():
    return make_inputs(2, 17, 8, d=4, seed=0)


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda x, m, s: tt.token_fusion(x[0], m, 2), ValueError, "x must have shape"),
        (lambda x, m, s: tt.token_fusion(x, m[0], 2), ValueError, "metric must have shape"),
        (lambda x, m, s: tt.token_fusion(x, m[:1], 2), ValueError, "share [B, N]"),
        (lambda x, m, s: tt.token_fusion(x, m[:, :5], 2), ValueError, "share [B, N]"),
        (lambda x, m, s: tt.token_fusion(x.long(), m, 2), TypeError, "x must have dtype"),
        (lambda x, m, s: tt.token_fusion(x, m.int(), 2), TypeError, "metric must have dtype"),
        (lambda x, m, s: tt.token_fusion(x, m, -1), ValueError, "r must be >= 0"),
        (lambda x, m, s: tt.token_fusion(x, m, 2.5), TypeError, "r must be an int"),
        (lambda x, m, s: tt.token_fusion(x, m, 2, protected=18), ValueError, "protected must be <="),
        (lambda x, m, s: tt.token_fusion(x, m, 2, protected=-1), ValueError, "protected must be >= 0"),
        (lambda x, m, s: tt.token_fusion(x, m, 2, mode="avg"), ValueError, "mode must be one of"),
        (lambda x, m, s: tt.token_fusion(x, m, 2, backend="cuda"), ValueError, "backend must be one of"),
        (lambda x, m, s: tt.token_fusion(x, m, 2, size=s[:, :3]), ValueError, "size must have shape"),
        (lambda x, m, s: tt.token_fusion(x, m, 2, size=s.double()), TypeError, "size must be float32"),
        (lambda x, m, s: tt.token_fusion(x, m, 2, size=s - 2), ValueError, "size must be >= 0"),
        # The Triton backend checks sizes too, where it reads CPU tensors (the interpreter); on CUDA reading
        # them back would be a device-to-host sync, so there a NaN size is the caller's bug (ops._check_size).
        pytest.param(lambda x, m, s: tt.token_fusion(x, m, 2, size=s / 0 * 0, backend="triton"), ValueError,
                     "size must be >= 0", marks=pytest.mark.skipif(ON_GPU, reason="sizes on CUDA are not read back")),
        (lambda x, m, s: tt.token_fusion_step(x, m[:, None], 2, size=-s), ValueError, "size must be >= 0"),
        (lambda x, m, s: tt.token_fusion(x, m, 2, size=s.to("meta")), ValueError, "size is on"),
        (lambda x, m, s: tt.token_fusion(x, m.to("meta"), 2), ValueError, "metric is on"),
        (lambda x, m, s: tt.merge_tokens(x, (1, 2), s), TypeError, "match must be"),
        (lambda x, m, s: tt.merge_tokens(x[:, :9], tt.bipartite_match(m, 2), s[:, :9]), ValueError,
         "different shape"),
        (lambda x, m, s: tt.merge_tokens(x[:1], tt.bipartite_match(m, 2), s[:1]), ValueError, "different shape"),
    ],
)
def test_bad_input_raises_naming_the_argument(inputs, call, error, words):
    with pytest.raises(error, match=re.escape(words)):
        call(*inputs)


def test_triton_rejects_float64_but_reference_takes_it(inputs):
    x, metric, size = inputs
    with pytest.raises(TypeError, match="metric must have dtype"):
        tt.token_fusion(x.double().to(DEVICE), metric.double().to(DEVICE), 2, backend="triton")
    out, _ = tt.token_fusion(x.double(), metric.double(), 2, backend="reference")
    assert out.dtype == torch.float64


def test_triton_on_cpu_without_interpreter_is_a_clear_error(inputs, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, metric, _ = inputs
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        tt.token_fusion(x, metric, 2, backend="triton")


def test_auto_dispatch_follows_the_device(inputs, monkeypatch):
    calls = []
    from tofu_triton.kernels import match as match_kernels

    monkeypatch.setattr(match_kernels, "match_scores",
                        lambda *a, **k: calls.append("match") or (_ for _ in ()).throw(KeyError))
    x, metric, _ = inputs
    tt.token_fusion(x, metric, 3)  # CPU + auto: the reference, no kernel
    tt.token_fusion(x.to(DEVICE), metric.to(DEVICE), 3, backend="reference")
    assert calls == []
    with pytest.raises(KeyError):
        tt.token_fusion(x.to(DEVICE), metric.to(DEVICE), 3, backend="triton")
    assert calls == ["match"]
    if DEVICE == "cuda":
        with pytest.raises(KeyError):
            tt.token_fusion(x.to(DEVICE), metric.to(DEVICE), 3)  # CUDA + auto: the kernels
        assert calls == ["match", "match"]


def test_r_is_clamped_to_nb_and_zero_returns_inputs(inputs):
    x, metric, size = inputs
    out, size_out = tt.token_fusion(x, metric, 1000, size, protected=1)
    assert out.shape == (2, 17 - 8, 8)  # Nb = floor(16 / 2)
    x, size = x.to(DEVICE), size.to(DEVICE)
    out, size_out = tt.token_fusion(x, metric.to(DEVICE), 0, size, backend="triton")
    assert out is x and size_out is size
    x, size = x.cpu(), size.cpu()
    out, size_out = tt.token_fusion(x, metric, 0, None)
    assert out is x and torch.equal(size_out, torch.ones(2, 17, 1))


def test_zero_sizes_are_padding_not_an_error(inputs):
    x, metric, size = inputs
    size[:, 5:] = 0
    out, size_out = tt.token_fusion(x, metric, 3, size, mode="prune")
    assert out.shape == (2, 14, 8) and (size_out >= 0).all()


@pytest.mark.parametrize("mode", ref.MODES)
def test_nan_inputs_give_the_reference_result_on_the_kernels(mode, poisoned):
    # Batch 0: an all-NaN metric (every score -inf: the first r A tokens merge into B token 0) and finite x.
    # Batch 1: a finite metric and x with a NaN in one channel of every A token, so that some of them merge:
    # the merged tokens carry it exactly as in the reference (mlerp: the whole row, through the norms).
    x, metric, size = make_inputs(2, 17, 8, seed=13)
    metric[0] = float("nan")
    x[1, 1::2, 2] = float("nan")
    keys = metric[:, None].expand(2, 2, 17, 8)
    want = ref.token_fusion_step(x, keys, 6, size, mode, 1)
    for got in (tt.token_fusion(x.to(DEVICE), metric.to(DEVICE), 6, size.to(DEVICE), mode, backend="triton"),
                tt.token_fusion_step(x.to(DEVICE), keys.to(DEVICE), 6, size.to(DEVICE), mode, backend="triton")[:2]):
        assert torch.equal(got[0].isnan().cpu(), want.x.isnan())
        assert_close(got[0][0].cpu(), want.x[0])
        assert_close(got[0][1].nan_to_num().cpu(), want.x[1].nan_to_num())
        assert_close(got[1].cpu(), want.size, name="size")
    assert want.match.dst_idx[0].tolist() == [0] * 6 and want.x[0].isfinite().all()
    b_rows = want.x[1, 1 + 8 - 6:]  # after [CLS] and the 2 kept A tokens (which keep their NaN as they are)
    nan_rows = b_rows.isnan().any(-1)
    assert nan_rows.any() if mode != "prune" else not nan_rows.any()  # pruned sources are dropped unread
    if mode == "mlerp":
        assert b_rows[nan_rows].isnan().all()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gradients_flow_to_x_only(backend):
    x, metric, size = make_inputs(2, 17, 8, d=4, seed=1, device=DEVICE)
    x.requires_grad_(True)
    metric.requires_grad_(True)
    out, size_out = tt.token_fusion(x, metric, 5, size, mode="mlerp", backend=backend)
    assert not size_out.requires_grad
    out.square().sum().backward()
    assert metric.grad is None
    xr = x.detach().cpu().requires_grad_(True)
    expected, _ = ref.token_fusion(xr, metric.detach().cpu(), 5, size.cpu(), mode="mlerp")
    expected.square().sum().backward()
    assert_close(x.grad.cpu(), xr.grad)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gradcheck_through_the_public_op(backend):
    x, metric, size = make_inputs(1, 9, 3, d=4, seed=2, device=DEVICE if backend == "triton" else "cpu")
    x = x.double().requires_grad_(True)
    match = tt.bipartite_match(metric, 3, backend=backend)
    if backend == "triton":
        # The kernels take fp32 at most: check the op's backward against finite
        # differences of its own forward in fp32, with tolerances to match.
        xf = x.detach().float().requires_grad_(True)
        assert torch.autograd.gradcheck(
            lambda t: tt.merge_tokens(t, match, size, "mlerp", backend=backend)[0], (xf,),
            eps=1e-2, atol=1e-2, rtol=1e-2,
        )
    else:
        assert torch.autograd.gradcheck(lambda t: tt.merge_tokens(t, match, size, "mlerp", backend=backend)[0], (x,))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_torch_compile_fullgraph(backend, compiler):
    x, metric, size = make_inputs(2, 21, 8, d=4, seed=3, device=DEVICE if backend == "triton" else "cpu")

    def step(x, metric, size):
        y, s = tt.token_fusion(x, metric, 4, size, mode="mlerp", backend=backend)
        y, s = tt.token_fusion(y, y, 3, s, mode="mean", backend=backend)
        return y * 2, s

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    out, s = compiled(x1, metric, size)
    expected, s_expected = step(x2, metric, size)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(s, s_expected)
    out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (tensors on cuda:1 while cuda:0 is current)")
def test_kernels_run_on_the_device_of_their_tensors():
    # Triton launches on the current device; the launchers switch to their tensors' one.
    x, metric, size = make_inputs(2, 33, 16, d=8, seed=7)
    want = tt.token_fusion(x.cuda(0), metric.cuda(0), 8, size.cuda(0), backend="triton")
    with torch.cuda.device(0):
        got = tt.token_fusion(x.cuda(1), metric.cuda(1), 8, size.cuda(1), backend="triton")
        keys = metric.cuda(1)[:, None].expand(-1, 2, -1, -1)
        step = tt.token_fusion_step(x.cuda(1), keys, 8, size.cuda(1), bias_dtype=torch.float32, backend="triton")
        torch.cuda.synchronize(1)
    assert got[0].device == torch.device("cuda", 1) and torch.equal(got[0].cpu(), want[0].cpu())
    assert step.x.device == step.bias.device == torch.device("cuda", 1)
    assert torch.equal(step.x.cpu(), tt.token_fusion_step(x.cuda(0), keys.cuda(0), 8, size.cuda(0),
                                                          backend="triton").x.cpu())
