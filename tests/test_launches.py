"""Device work of a patched ViT-B forward, counted on the CPU (testing.DeviceOps). Each step path
must add exactly its own launches per block over the unpatched model and no torch op; which path
runs on a card is decided by measurement (tofu_triton.dispatch), so more launches are fine where
they are faster. bench/launches.py measures the same and the host time."""
import pytest
import torch

import tofu_triton.patch as tp
from tofu_triton import ops
from tofu_triton.models import create_vit
from tofu_triton.testing.device_ops import DeviceOps

from conftest import ON_GPU

# The kernels each path launches per step (kernels/step.py).
PATH_KERNELS = {
    "one_launch": ("_step_kernel",),
    "two_launch": ("_plan_kernel", "_merge_kernel"),
    "three_launch": ("_match_kernel", "_select_kernel", "_merge_kernel"),
    "four_launch": ("_head_mean_kernel", "_match_kernel", "_select_kernel", "_merge_kernel"),
    "mean_plan": ("_head_mean_kernel", "_plan_kernel", "_merge_kernel"),
}


@pytest.fixture(scope="module")
def vit_b():
    return create_vit("vit_base_patch16_224")


def device_ops(model, images) -> DeviceOps:
    with torch.no_grad(), DeviceOps(stub=True) as ops_:  # the kernels' values are not needed to count
        model(images)
    return ops_


@pytest.mark.skipif(ON_GPU, reason="counts CPU dispatch with stubbed Triton kernels (the interpreter's launchers)")
@pytest.mark.parametrize("mode, path", [("tofu", "one_launch"), ("tome", "two_launch"), ("tofu", "three_launch"),
                                        ("tofu", "four_launch"), ("tofu", "mean_plan")])
def test_triton_path_adds_only_its_own_launches_per_block(vit_b, mode, path, monkeypatch):
    chosen = ops._step_path
    monkeypatch.setattr(ops, "_step_path", lambda _, *args: chosen(path, *args))  # what dispatch would pick
    # Stubbed kernels leave the sizes unwritten: skip any check of their values (never device work on a GPU).
    monkeypatch.setattr(ops, "_check_size", lambda size, x: None)
    images = torch.randn(1, 3, 224, 224)
    unpatched = device_ops(tp.unpatch(vit_b), images)
    patched = device_ops(tp.timm(vit_b, r=16, mode=mode, backend="triton"), images)
    tp.unpatch(vit_b)
    blocks = len(vit_b.blocks)
    kernels = PATH_KERNELS[path]
    extra = patched.total - unpatched.total
    print(f"{mode} {path}: {patched.total} device ops per forward against {unpatched.total} unpatched "
          f"(+{extra / blocks:.2f} per block); triton {patched.triton}")
    assert extra == len(kernels) * blocks, f"aten {patched.aten}; triton {patched.triton}"
    assert patched.triton == {name: blocks * kernels.count(name) for name in kernels}
