"""Proportional attention on every path (tofu_triton.attention) against its definition:
SDPA with the log-size bias as an additive float mask, and softmax written out."""
import pytest
import torch
import torch.nn.functional as F

from tofu_triton import attention
from tofu_triton.testing import assert_close

from conftest import ON_GPU

# Bias rounded once to the keys' dtype (the channel path divides it by the scale first).
CHANNEL_RTOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def inputs(dtype, batch=2, heads=3, n=21, d=16, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, d, generator=g).to(device, dtype) for _ in range(3))
    size = 1 + torch.randint(0, 6, (batch, n, 1), generator=g).float()
    return q, k, v, size.log()[:, None, None, :, 0].to(device, dtype)


def written_out(q, k, v, bias):
    """softmax(q k^T / sqrt(d) + bias) v in fp64, the definition."""
    q, k, v, bias = (t.double() for t in (q, k, v, bias))
    return ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5 + bias).softmax(-1) @ v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", ["mask", "channel", "flex"])
def test_every_path_adds_the_key_bias(path, dtype):
    q, k, v, bias = inputs(dtype)
    got = attention.sized_attention(q, k, v, bias, path=path)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    assert got.dtype == dtype and got.shape == want.shape
    rtol = CHANNEL_RTOL[dtype] if path == "channel" else None
    if rtol is None:
        assert_close(got, want, name=path)
    else:
        err = (got.double() - want.double()).norm() / want.double().norm()
        assert err <= rtol, f"{path}: relative error {err:.3g}"
    assert_close(got.double(), written_out(q, k, v, bias), dtype=dtype, name=f"{path} vs the definition")


@pytest.mark.parametrize("head_dim", [7, 80])
def test_the_bias_channel_pads_any_head_dim(head_dim):
    # head dim + 1 padded to a multiple of 8 (7 + 1 needs none, 80 + 1 needs 7), the scale kept at 1/sqrt(d).
    q, k, v, bias = inputs(torch.float32, d=head_dim, seed=head_dim)
    got = attention.sized_attention(q, k, v, bias, path="channel")
    assert_close(got, F.scaled_dot_product_attention(q, k, v, attn_mask=bias), name="channel")


def test_a_key_of_size_s_counts_as_s_copies():
    # The property proportional attention is for: one key with bias log(3) == that key three times.
    q, k, v, _ = inputs(torch.float32, batch=1, heads=2, n=5)
    bias = torch.zeros(1, 1, 1, 5)
    bias[..., 2] = torch.tensor(3.0).log()
    copies = [0, 1, 2, 2, 2, 3, 4]
    want = F.scaled_dot_product_attention(q, k[:, :, copies], v[:, :, copies])
    for path in ("mask", "channel"):
        assert_close(attention.sized_attention(q, k, v, bias, path=path), want, name=path)


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


@pytest.mark.skipif(not ON_GPU, reason="cuDNN attention runs on CUDA only")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cudnn_path_adds_the_key_bias(dtype):
    q, k, v, bias = inputs(dtype, batch=4, heads=12, n=197, d=64, device="cuda")
    if attention.choose(q) != "cudnn":
        pytest.skip(f"cuDNN attention does not run here (torch {torch.__version__}, "
                    f"cuDNN {torch.backends.cudnn.version()})")
    got = attention.sized_attention(q, k, v, bias, path="cudnn")
    assert_close(got, F.scaled_dot_product_attention(q, k, v, attn_mask=bias), name="cudnn")
    # An fp32 bias is cast to the query's dtype first (cuDNN misreads one in another dtype).
    assert_close(attention.sized_attention(q, k, v, bias.float(), path="cudnn"), got, name="fp32 bias")
