"""What tests and benchmarks share: one tolerance table, one input generator,
and one comparison rule. Imported by ``tests/`` and ``bench/``.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

# Relative RMS error allowed for values computed in each dtype (outputs are
# rounded to the dtype once, accumulation is fp32; fp64 is the reference's own).
RTOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}
# Two cosine scores closer than this are a near-tie: either index is right.
SCORE_TIE = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}


def make_inputs(
    batch: int, n: int, c: int, d: Optional[int] = None, dtype=torch.float32, device="cpu",
    seed: int = 0, with_size: bool = True,
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Fresh random (x [B,N,C], metric [B,N,D], size [B,N,1] float32 or None).

    Sizes are random in [1, 4) so size weighting is actually exercised.
    """
    g = torch.Generator().manual_seed(seed)
    d = d or c
    x = torch.randn(batch, n, c, generator=g).to(device=device, dtype=dtype)
    metric = torch.randn(batch, n, d, generator=g).to(device=device, dtype=dtype)
    size = (1 + 3 * torch.rand(batch, n, 1, generator=g)).to(device) if with_size else None
    return x, metric, size


def rel_error(actual: Tensor, expected: Tensor) -> float:
    """Relative RMS error, computed in fp64 (NaN where either has a NaN)."""
    a, e = actual.double(), expected.double()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def assert_close(actual: Tensor, expected: Tensor, dtype=None, name: str = "value") -> None:
    dtype = dtype or expected.dtype
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not actual.isnan().any(), f"{name}: NaN in output (an element was never written?)"
    err = rel_error(actual, expected)
    assert err <= RTOL[dtype], f"{name}: relative error {err:.3g} > {RTOL[dtype]:.3g} ({dtype})"
