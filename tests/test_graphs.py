"""tofu_triton.graphs.CudaGraphRunner: a patched model served from one CUDA graph per batch size."""
import pytest
import torch

import tofu_triton.patch as tp
from tofu_triton.graphs import CudaGraphRunner
from tofu_triton.models import create_vit
from tofu_triton.testing import assert_close

from conftest import ON_GPU


def patched_vit(device="cpu"):
    return tp.timm(create_vit("smoke"), r=4, mode="tofu").to(device)


def test_padding_to_the_next_batch_size_gives_the_model_output():
    model = patched_vit()
    x = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    runner = CudaGraphRunner(model, example=x, batch_sizes=(2, 8))
    with torch.no_grad():
        want = model(x)
    got = runner(x)  # padded to 8 (on the CPU: run eagerly, same padding)
    assert got.shape == want.shape
    assert_close(got, want, torch.float32, "padded batch")
    assert torch.equal(runner(x[:2]), runner(x[:2]))


def test_bad_inputs_are_refused_with_the_reason():
    runner = CudaGraphRunner(patched_vit(), example=torch.zeros(1, 3, 64, 64), batch_sizes=(1, 4))
    with pytest.raises(ValueError, match="larger than the largest batch size 4"):
        runner(torch.zeros(5, 3, 64, 64))
    with pytest.raises(ValueError, match=r"x must be \[B, 3, 64, 64\]"):
        runner(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="batch_sizes must be positive ints"):
        CudaGraphRunner(patched_vit(), example=torch.zeros(1, 3, 64, 64), batch_sizes=(0, 2))


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU (on the CPU the runner runs the model eagerly)")
def test_graph_replay_equals_eager_on_the_gpu():
    model = patched_vit("cuda").half()
    x = torch.randn(3, 3, 64, 64, device="cuda", dtype=torch.float16)
    runner = CudaGraphRunner(model, example=x, batch_sizes=(1, 4)).capture_all()
    assert runner.captured == [1, 4]
    with torch.no_grad():
        want = model(x)
    assert_close(runner(x), want, torch.float16, "graph replay")
    assert torch.equal(runner(x), runner(x))

