"""What the model-patch tests of every family share (``tests/test_patch_*.py``)."""
import torch

import tofu_triton.patch as tp
from tofu_triton.testing import assert_close


def images(batch: int = 3, seed: int = 1, size: int = 32) -> torch.Tensor:
    """[batch, 3, size, size] float32 standard-normal pixels drawn from ``seed``."""
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def assert_r0_is_unpatched(model, patch, *args, **kwargs):
    """``patch(model, r=0)`` leaves ``model(*args, **kwargs)`` as it was, to the bit; returns the patched output.

    Compares the output tensor, or every tensor field of a Hugging Face
    ``ModelOutput`` (the patched one has fields of its own besides: tokens,
    token_size, token_mask).
    """
    with torch.no_grad():
        expected = model(*args, **kwargs)
        assert patch(model, r=0) is model
        got = model(*args, **kwargs)
    if isinstance(expected, torch.Tensor):
        assert torch.equal(got, expected)
        return got
    fields = {name: value for name, value in expected.items() if isinstance(value, torch.Tensor)}
    assert fields, f"nothing to compare in the output: {list(expected.keys())}"
    for name, value in fields.items():
        assert torch.equal(got[name], value), f"{name} changed at r=0"
    return got


def assert_triton_matches_reference(model, x: torch.Tensor) -> None:
    """A patched timm ``model`` keeps the same tokens, sizes and sources on ``x`` with the Triton kernels
    (``backend="triton"``: the interpreter on the CPU) as with the reference, and logits to fp32 tolerance."""
    with torch.no_grad():
        model.tofu_backend = "reference"
        ref, ref_info = tp.forward_with_info(model, x, trace_source=True)
        model.tofu_backend = "triton"
        out, info = tp.forward_with_info(model, x, trace_source=True)
    assert info.tokens == ref_info.tokens
    assert torch.equal(info.size, ref_info.size) and torch.equal(info.source, ref_info.source)
    assert_close(out.cpu(), ref.cpu(), torch.float32, "triton vs reference logits")
