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

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"


@pytest.fixture
def device() -> str:
    return DEVICE


def count_calls(monkeypatch, module, names) -> dict:
    """Wrap ``module.<name>`` for each name so calls are counted in the returned dict
    (by name; a name never called is absent). Used on kernel launchers, each of which
    launches one kernel, so a test fails if an op quietly took another path."""
    counts = {}

    def counting(name, fn):
        def counted(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return fn(*args, **kwargs)
        return counted

    for name in names:
        monkeypatch.setattr(module, name, counting(name, getattr(module, name)))
    return counts


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (see tofu_triton.testing.one_thread: shared CPUs)."""
    from tofu_triton.testing import one_thread as single

    with single():
        yield
