"""Device work of a patched ViT-B forward, counted on the CPU (testing.DeviceOps): the
one-launch step must keep token reduction to at most one device op per block over
the unpatched model (bench/launches.py measures the same and the host time)."""
import pytest
import torch

import tofu_triton.patch as tp
from tofu_triton.models import create_vit
from tofu_triton.testing.device_ops import DeviceOps

from conftest import ON_GPU


@pytest.fixture(scope="module")
def vit_b():
    return create_vit("vit_base_patch16_224")


def device_ops(model, images) -> DeviceOps:
    with torch.no_grad(), DeviceOps(stub=True) as ops:  # the kernels' values are not needed to count
        model(images)
    return ops


@pytest.mark.skipif(ON_GPU, reason="counts CPU dispatch with stubbed Triton kernels (the interpreter's launchers)")
@pytest.mark.parametrize("mode", ["tofu", "tome"])
def test_triton_path_adds_at_most_one_device_op_per_block(vit_b, mode):
    images = torch.randn(1, 3, 224, 224)
    unpatched = device_ops(tp.unpatch(vit_b), images)
    patched = device_ops(tp.timm(vit_b, r=16, mode=mode, backend="triton"), images)
    tp.unpatch(vit_b)
    blocks = len(vit_b.blocks)
    extra = patched.total - unpatched.total
    assert extra <= blocks, (f"{mode}: {patched.total} device ops per forward against {unpatched.total} unpatched "
                             f"(+{extra / blocks:.2f} per block); aten {patched.aten}; triton {patched.triton}")
    assert patched.triton == {"_step_kernel": blocks}  # one launch per block, nothing else
