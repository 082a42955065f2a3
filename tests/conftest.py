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
