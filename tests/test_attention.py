"""Proportional attention on every path (tofu_triton.attention) against its definition:
SDPA with the log-size bias as an additive float mask, and softmax written out; and
which path ``auto`` takes on a CUDA card (asked with the capabilities of an H200).

Tests that run a path put their tensors on conftest's DEVICE: the GPU where the
Triton kernel is compiled for it, the CPU where it runs in Triton's interpreter."""
import json

import pytest
import torch
import torch.nn.functional as F

from tofu_triton import attention, dispatch
from tofu_triton.kernels import attention as kernel
from tofu_triton.kernels.common import interpreting
from tofu_triton.testing import assert_close

from conftest import DEVICE, ON_GPU

# The paths that run with a bias on DEVICE (cuDNN runs on CUDA only: tested by itself below).
PATHS_HERE = ("mask", "triton", "vsize", "vsize_v")
H200 = attention.Capabilities("cuda", (9, 0), 91002, True, True)


def inputs(dtype, batch=2, heads=3, n=21, d=16, seed=0, device="cpu", empty=0):
    """q, k, v [batch, heads, n, d] and bias = log(size) [batch, 1, 1, n] with sizes in 1..6;
    the last ``empty`` keys of every image have size 0 (bias -inf: padding)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, d, generator=g).to(device, dtype) for _ in range(3))
    size = 1 + torch.randint(0, 6, (batch, n), generator=g).float()
    if empty:
        size[:, n - empty:] = 0
    return q, k, v, size.log()[:, None, None, :].to(device, dtype)


def runs_here(path, dtype):
    """Whether ``path`` runs for ``dtype`` on DEVICE: the Triton kernel takes fp32 in the
    interpreter only (compiled for a GPU, its exact fp32 products do not fit the registers)."""
    return not (ON_GPU and path == "triton" and dtype == torch.float32)


def written_out(q, k, v, bias):
    """softmax(q k^T / sqrt(d) + bias) v in fp64, the definition."""
    q, k, v, bias = (t.double() for t in (q, k, v, bias))
    return ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5 + bias).softmax(-1) @ v


# (batch, heads, n, head dim, padding keys): N off every tile size, head dims 64, 80 (a 128 tile), 128.
SHAPES = [(2, 3, 25, 64, 0), (1, 2, 197, 80, 7), (1, 1, 1025, 128, 100)]
# The long sequence (17 x 17 tiles, seconds in the interpreter) is for the kernel's tiles, in fp16 only.
CASES = [(path, shape, dtype) for path in PATHS_HERE for shape in SHAPES for dtype in (torch.float32, torch.float16)
         if (shape[2] < 1000 or (path == "triton" and dtype == torch.float16)) and runs_here(path, dtype)]


@pytest.mark.parametrize("path,shape,dtype", CASES,
                         ids=lambda c: "B{}H{}N{}D{}pad{}".format(*c) if isinstance(c, tuple) else str(c))
def test_every_path_adds_the_key_bias(path, shape, dtype, poisoned):
    batch, heads, n, d, empty = shape
    q, k, v, bias = inputs(dtype, batch, heads, n, d, seed=n, device=DEVICE, empty=empty)
    got = attention.sized_attention(q, k, v, bias, path=path)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    assert got.dtype == dtype and got.shape == want.shape
    assert_close(got, want, name=f"{path} vs the float mask")
    assert_close(got.double(), written_out(q, k, v, bias), dtype=dtype, name=f"{path} vs the definition")


@pytest.mark.parametrize("config", list(kernel.CONFIGS))
def test_every_triton_config_computes_the_same(config, poisoned):
    # 70 keys: a partial last tile for BLOCK_N 32 and 64; 70 queries: a partial last query block.
    q, k, v, bias = inputs(torch.float16, batch=2, heads=2, n=70, d=32, seed=3, device=DEVICE, empty=5)
    got = kernel.biased_attention(q, k, v, bias, config)
    assert_close(got, F.scaled_dot_product_attention(q, k, v, attn_mask=bias), name=config)


def test_configs_that_spill_at_wide_heads_are_not_offered_there():
    # m32n64w2 spills ~250 bytes at the 128 head-dim tile (tests/test_aot_compile.py compiles what is offered).
    assert "m32n64w2" in kernel.configs_for(64) and "m32n64w2" not in kernel.configs_for(80)
    assert kernel.configs_for(128) == tuple(n for n in kernel.CONFIGS if n != "m32n64w2")
    assert kernel.configs_for(128)[0] == kernel.configs_for(64)[0]  # one default for every head dim


def test_triton_reads_strided_inputs_and_a_broadcast_fp32_bias(poisoned):
    # q, k, v as timm makes them (a permuted [B, N, 3, H, D] view); one bias for every image, in fp32.
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(2, 40, 3, 2, 16, generator=g).to(DEVICE, torch.float16).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    bias = (1 + torch.rand(1, 1, 1, 40, generator=g) * 4).log().to(DEVICE)
    got = attention.sized_attention(q, k, v, bias, path="triton")
    assert_close(got, F.scaled_dot_product_attention(q, k, v, attn_mask=bias.half()), name="strided")


def test_a_key_of_size_s_counts_as_s_copies():
    # The property proportional attention is for: one key with bias log(3) == that key three times.
    for dtype in (torch.float32, torch.float16):
        q, k, v, _ = inputs(dtype, batch=1, heads=2, n=5, device=DEVICE)
        bias = torch.zeros(1, 1, 1, 5, device=DEVICE, dtype=dtype)
        bias[..., 2] = torch.tensor(3.0).log()
        copies = [0, 1, 2, 2, 2, 3, 4]
        want = F.scaled_dot_product_attention(q, k[:, :, copies], v[:, :, copies])
        for path in (p for p in PATHS_HERE if runs_here(p, dtype)):
            assert_close(attention.sized_attention(q, k, v, bias, path=path), want, name=f"{path} {dtype}")


def test_no_bias_is_plain_sdpa_bitwise():
    q, k, v, _ = inputs(torch.float32)
    for path in attention.PATHS:
        assert torch.equal(attention.sized_attention(q, k, v, None, path=path), F.scaled_dot_product_attention(q, k, v))


def test_auto_picks_mask_on_the_cpu_and_unknown_paths_are_refused():
    q, k, v, bias = inputs(torch.float32)
    assert attention.choose(q) == "mask"
    assert torch.equal(attention.sized_attention(q, k, v, bias), attention.sized_attention(q, k, v, bias, path="mask"))
    with pytest.raises(ValueError, match="attention path must be one of"):
        attention.sized_attention(q, k, v, bias, path="fast")


def test_cudnn_on_the_cpu_is_a_one_line_error_naming_what_runs():
    q, k, v, bias = inputs(torch.float16)  # CPU tensors on every machine
    # What runs on the CPU: the float mask and the vsize paths everywhere; the Triton kernel only where
    # it runs in the interpreter (on a CUDA machine it is compiled for the GPU and takes CUDA tensors).
    here = ("mask", "triton", "vsize", "vsize_v") if interpreting() else ("mask", "vsize", "vsize_v")
    runnable = attention.runnable(attention.capabilities(q.device), q, k, v, bias)
    assert {"triton" if name.startswith("triton_") else name for name in runnable} == set(here)
    with pytest.raises(ValueError) as err:
        attention.sized_attention(q, k, v, bias, path="cudnn")
    message = str(err.value)
    assert "\n" not in message and "'cudnn'" in message
    assert message.endswith("paths that run here: " + ", ".join(here))


def test_paths_without_a_gradient_fall_back_to_the_float_mask():
    # A dtype the Triton kernel takes on DEVICE, so that only the gradient stops it.
    q, k, v, bias = inputs(torch.float16 if ON_GPU else torch.float32, device=DEVICE)
    q.requires_grad_()
    got = attention.sized_attention(q, k, v, bias, path="triton")
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    assert torch.equal(got, want)  # the mask path itself, so the gradient is the mask path's
    got.sum().backward()
    assert q.grad is not None
    with pytest.raises(ValueError, match="vsize paths have no dropout"):
        attention._sized_values(q, k, v, bias, 0.1, pad_qk=True)


# --------------------------------------------------------------------------- what a CUDA card picks


TABLES = dispatch.TABLE_DIR  # the committed tables


def committed_row(dtype="float16", **shape):
    """The committed attention table's H200 row of exactly this dtype and shape (B, N, D)."""
    return next(r for r in json.loads((TABLES / "attention.json").read_text())["rows"]
                if r["card"] == "NVIDIA H200" and r["dtype"] == dtype and r["shape"] == shape)


@pytest.fixture
def cuda_like(monkeypatch, tmp_path):
    """``setup(winner=None)``: tofu_triton.attention answers as on an H200 with cuDNN 9 for
    CPU tensors. The cuDNN path runs a stand-in with the real op's autograd property: it
    raises, as ``_scaled_dot_product_cudnn_attention`` does, for a bias that needs a
    gradient while grad is on; else it computes the float mask and records the call
    (list returned). With ``winner``, the dispatch table names that candidate the
    winner at every shape and dtype."""
    calls = []

    def cudnn_stand_in(q, k, v, bias, dropout_p):
        if torch.is_grad_enabled() and bias.requires_grad:
            raise RuntimeError("The function '_scaled_dot_product_cudnn_attention' is not differentiable with "
                               "respect to argument 'attn_bias'. This input cannot have requires_grad True.")
        calls.append(tuple(q.shape))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)

    def setup(winner=None):
        monkeypatch.setattr(attention, "capabilities", lambda device: H200)
        monkeypatch.setattr(attention, "_cudnn", cudnn_stand_in)
        if winner is not None:  # a table of its own in a folder of its own (the committed one stays as it is)
            rows = [dict(card="NVIDIA H200", dtype=dt, shape=dict(B=8, N=197, D=64), winner=winner, us={winner: 1.0})
                    for dt in ("float16", "bfloat16", "float32")]
            folder = tmp_path / f"tables_{winner}"
            folder.mkdir(exist_ok=True)
            (folder / "attention.json").write_text(json.dumps(dict(op="attention", rows=rows)))
            monkeypatch.setattr(dispatch, "TABLE_DIR", folder)
        else:
            monkeypatch.setattr(dispatch, "TABLE_DIR", TABLES)
        dispatch.clear_cache()
        return calls

    yield setup
    dispatch.clear_cache()


def test_cuda_picks_the_committed_tables_winner(cuda_like):
    cuda_like()
    q, k, v, bias = inputs(torch.float16, batch=8, heads=12, n=197, d=64)
    assert dispatch.table("attention")["provenance"]["card"] == "NVIDIA H200"
    # The committed H200 row of this very shape: its winner (a Triton config since the run of 2026-12-04)...
    row = committed_row(B=8, N=197, D=64)
    with dispatch.for_graphs():  # as a CUDA graph or a compiled model: device time alone
        assert attention.choose(q, bias=bias) == row["winner"] == "triton_m64n64w4"
    # Eager at B = 8 (host-bound on the H200): the Triton path's 14 us on the GPU cost 74 us of host time
    # there, the float mask 29 us and 23 us (bench/results/h200-2026-12-04-run4/host_profile.md).
    assert attention.choose(q, bias=bias) == "mask"
    # ... and, where a gradient is needed, the row's fastest path that gives one.
    bias.requires_grad_()
    differentiable = {name: us for name, us in row["us"].items() if name in ("mask", "vsize", "vsize_v")}
    assert attention.choose(q, bias=bias) == min(differentiable, key=differentiable.__getitem__)


def test_cuda_runs_only_differentiable_paths_where_a_gradient_is_needed(cuda_like):
    cuda_like()
    q, k, v, bias = inputs(torch.float16, d=64)
    every = attention.runnable(H200, q, k, v, bias)
    assert "cudnn" in every and {f"triton_{c}" for c in kernel.configs_for(64)} <= set(every)
    bias.requires_grad_()
    assert attention.runnable(H200, q, k, v, bias) == ("mask", "vsize", "vsize_v")
    with torch.no_grad():
        assert attention.runnable(H200, q, k, v, bias) == every
    assert attention.runnable(H200, q, k, v, bias, dropout_p=0.1) == ("mask",)
    # cuDNN takes fp16/bf16 only, head dims that are multiples of 8 up to 128.
    assert "cudnn" not in attention.runnable(H200, *inputs(torch.float32, d=64)[:3], bias.detach())
    assert "cudnn" not in attention.runnable(H200, *inputs(torch.float16, d=60)[:3], bias.detach())


@pytest.mark.parametrize("winner", ["cudnn", "triton_m128n64w8", "vsize"])
def test_cuda_takes_the_measured_winner_unless_it_cannot_give_a_gradient(cuda_like, winner):
    calls = cuda_like(winner)
    q, k, v, bias = inputs(torch.float16, batch=4, heads=2, n=50, d=64, device=DEVICE)  # the winner runs
    assert attention.choose(q, bias=bias) == winner
    bias.requires_grad_()
    with torch.no_grad():
        assert attention.choose(q, bias=bias) == winner
    assert attention.choose(q, bias=bias) == ("vsize" if winner == "vsize" else "mask")
    got = attention.sized_attention(q, k, v, bias)  # the gradient path: never the stand-in
    assert calls == [] and got.requires_grad
    with torch.no_grad():
        attention.sized_attention(q, k, v, bias)
    assert calls == ([(4, 2, 50, 64)] if winner == "cudnn" else [])


@pytest.mark.skipif(not ON_GPU, reason="cuDNN attention runs on CUDA only")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cudnn_path_adds_the_key_bias(dtype):
    q, k, v, bias = inputs(dtype, batch=4, heads=12, n=197, d=64, device="cuda")
    if "cudnn" not in attention.runnable(attention.capabilities(q.device), q, k, v, bias):
        pytest.skip(f"cuDNN attention does not run here (torch {torch.__version__}, "
                    f"cuDNN {torch.backends.cudnn.version()})")
    got = attention.sized_attention(q, k, v, bias, path="cudnn")
    assert_close(got, F.scaled_dot_product_attention(q, k, v, attn_mask=bias), name="cudnn")
    # An fp32 bias is cast to the query's dtype first (cuDNN misreads one in another dtype).
    assert_close(attention.sized_attention(q, k, v, bias.float(), path="cudnn"), got, name="fp32 bias")


def test_choose_on_cuda_is_a_constant_inside_a_full_graph(cuda_like):
    # On CUDA, choose() reads the card (cuDNN's version, SDPA's switches) and the dispatch table: Dynamo
    # cannot trace either, and the graph break it made showed only on a card (2026-12-04). Ask it here as
    # an H200 would, inside fullgraph, once with the committed table and once with another winner.
    q, k, v, bias = inputs(torch.float16, batch=8, heads=12, n=197, d=64)
    for winner in (None, "vsize"):
        cuda_like(winner)
        torch._dynamo.reset()
        compiled = torch.compile(lambda q: attention.choose(q, bias=bias), fullgraph=True, backend="eager")
        with dispatch.for_graphs():  # compiled: device time alone decides, as for a capture
            want = attention.choose(q, bias=bias)
        assert compiled(q) == want == (winner or committed_row(B=8, N=197, D=64)["winner"])


def test_the_device_query_is_a_constant_inside_a_full_graph():
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: x + attention.capabilities(x.device).capability[0], fullgraph=True,
                             backend="eager")
    assert compiled(torch.zeros(1)).item() == 0 and attention.capabilities(torch.device("cpu")).kind == "cpu"


def test_triton_output_needs_no_copy_to_go_back_to_tokens():
    # As SDPA's CUDA kernels: [B, H, N, D] over a [B, N, H, D] buffer, so the block's transpose(1, 2).reshape
    # back to [B, N, C] is a view (else one more copy launch per block).
    q, k, v, bias = inputs(torch.float16 if ON_GPU else torch.float32, batch=2, heads=3, n=21, d=16, device=DEVICE)
    out = kernel.biased_attention(q, k, v, bias)
    tokens = out.transpose(1, 2).reshape(2, 21, 3 * 16)
    assert tokens.data_ptr() == out.data_ptr() and tokens._base is not None
    assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype)), name="triton")
