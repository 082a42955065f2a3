"""The one place that decides where the kernels run in tests.

Without CUDA, the Triton kernels run in Triton's CPU interpreter. It must be
switched on before anything imports them, which is why it is set here, at
collection time, before any test module imports tofu_triton.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

# Where tests put the tensors the Triton kernels run on: the GPU, where the kernels are compiled for it;
# the CPU in the interpreter (no CUDA here, or TRITON_INTERPRET=1 set by hand on a CUDA machine), which
# reads CPU tensors. On a GPU, backend="triton" and attention path "triton" refuse CPU tensors.
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1" else "cpu"
ON_GPU = DEVICE == "cuda"  # the kernels compiled for a GPU (not the interpreter)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # what the kernels take (tolerances: tofu_triton.testing.RTOL)


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture
def poisoned(monkeypatch):
    """Every kernel output filled with NaN (floats) or -1 (indices) before the kernel
    runs, so an element a kernel forgets to write fails the test."""
    from tofu_triton.kernels import common

    monkeypatch.setattr(common, "POISON_OUTPUTS", True)


def count_calls(monkeypatch, module, names) -> dict:
    """Wrap ``module.<name>`` for each name so calls are counted in the returned dict
    (by name; a name never called is absent). Used on kernel launchers, each of which
    launches one kernel, so a test fails if an op quietly took another path.
    ``module`` may be a list of modules, each holding some of the names."""
    counts = {}

    def counting(name, fn):
        def counted(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return fn(*args, **kwargs)
        return counted

    modules = module if isinstance(module, (list, tuple)) else [module]
    for name in names:
        owner = next(m for m in modules if hasattr(m, name))
        monkeypatch.setattr(owner, name, counting(name, getattr(owner, name)))
    return counts


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (see tofu_triton.testing.one_thread: shared CPUs)."""
    from tofu_triton.testing import one_thread as single

    with single():
        yield


def assert_match(km, rm, metric, n):
    """A kernel's Match ``km`` equals the reference's ``rm`` on ``metric`` [B, N, D]: exactly,
    or where they differ only by choices between scores within rounding of each other."""
    from tofu_triton.testing import SCORE_TIE, check_match_against_scores, check_match_structure

    check_match_structure(km, n, rm.r)
    if all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(km[:5], rm[:5])):
        return
    check_match_against_scores(km._replace(**{f: getattr(km, f).cpu() for f in km._fields[:5]}),
                               metric.cpu(), SCORE_TIE[metric.dtype])


# --------------------------------------------------------------------------- the Stable Diffusion step

# (h, w, sx, sy): even grids, odd ones, cells that do not tile the grid, tall cells
GRIDS = [(8, 8, 2, 2), (7, 9, 2, 2), (6, 10, 3, 2), (9, 5, 1, 3)]


@pytest.fixture
def spatial_launches(monkeypatch):
    """Counts the SD step's launcher calls (each launches one kernel), so a test fails if an op took another path."""
    from tofu_triton.kernels import match, merge, partition, select, unmerge

    return count_calls(monkeypatch, [partition, match, select, merge, unmerge],
                       ("spatial_partition", "match_scores", "spatial_select", "merge_forward", "merge_backward",
                        "spatial_unmerge"))


def make_partition(h, w, sx, sy, rand, seed=0):
    """reference.spatial_partition on the test device, with random destinations when ``rand``."""
    choice = None
    if rand:
        g = torch.Generator().manual_seed(seed)
        choice = torch.randint(0, sx * sy, (h // sy, w // sx), generator=g)
    from tofu_triton import reference as ref

    part = ref.spatial_partition(h, w, sx, sy, choice)
    return ref.Partition(*(t.to(DEVICE) for t in part))


def to_cpu(match):
    """A Match / SpatialMatch / Partition with its tensors on the CPU."""
    return type(match)(*(t.cpu() for t in match))


def r_values(na):
    """r to test for Na source candidates: one, half, all."""
    return sorted({1, max(1, na // 2), na})


def assert_same(got, want):
    """Every field of two (Spatial)Match or Partition tuples bitwise equal."""
    for name, a, b in zip(want._fields, got, want):
        assert torch.equal(a.cpu(), b.cpu()), f"{name} differs"


# --------------------------------------------------------------------------- model patches (every family)


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
    import tofu_triton.patch as tp
    from tofu_triton.testing import assert_close

    with torch.no_grad():
        model.tofu_backend = "reference"
        ref, ref_info = tp.forward_with_info(model, x, trace_source=True)
        model.tofu_backend = "triton"
        out, info = tp.forward_with_info(model, x, trace_source=True)
    assert info.tokens == ref_info.tokens
    assert torch.equal(info.size, ref_info.size) and torch.equal(info.source, ref_info.source)
    assert_close(out.cpu(), ref.cpu(), torch.float32, "triton vs reference logits")
