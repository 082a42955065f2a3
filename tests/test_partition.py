"""The Stable Diffusion step's partition kernel against the reference, on CPU
through Triton's interpreter (outputs poisoned first)."""
import pytest
import torch

from tofu_triton import ops
from tofu_triton import reference as ref
from tofu_triton.kernels import match as match_kernels
from tofu_triton.kernels import merge as merge_kernels
from tofu_triton.kernels import partition as partition_kernels
from tofu_triton.kernels import select as select_kernels
from tofu_triton.kernels import unmerge as unmerge_kernels

from conftest import DEVICE, count_calls, assert_same

pytestmark = pytest.mark.usefixtures("poisoned")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (h, w, sx, sy): even grids, odd ones, cells that do not tile the grid, tall cells
GRIDS = [(8, 8, 2, 2), (7, 9, 2, 2), (6, 10, 3, 2), (9, 5, 1, 3)]


@pytest.fixture
def launched(monkeypatch):
    """Counts launcher calls (each launches one kernel), so a test fails if an op took another path."""
    return count_calls(monkeypatch, [partition_kernels, match_kernels, select_kernels, merge_kernels, unmerge_kernels],
                       ("spatial_partition", "match_scores", "spatial_select", "merge_forward", "merge_backward",
                        "spatial_unmerge"))


@pytest.mark.parametrize("grid", GRIDS + [(64, 64, 2, 2), (33, 17, 4, 3), (1, 3, 2, 2)],
                         ids=lambda g: "x".join(map(str, g)))
def test_partition_kernel_matches_reference(grid, launched):
    h, w, sx, sy = grid
    top_left = None
    for seed, step, block in [(None, 0, 0), (5, 0, 0), (5, 371, 3), (123456, 999000, 15)]:
        launched.clear()
        step = torch.tensor(step)
        got = ops.spatial_partition(h, w, sx, sy, seed=seed, step=step.to(DEVICE), block=block, backend="triton")
        choice = None if seed is None else ref.cell_choice(seed, step, block, (h // sy, w // sx), sx * sy)
        want = ref.spatial_partition(h, w, sx, sy, choice)
        assert_same(got, want)
        assert launched == ({"spatial_partition": 1} if (h // sy) * (w // sx) else {})  # no cell: no kernel
        a_pos, b_pos, slot = (t.cpu() for t in got)
        assert torch.equal(torch.cat([a_pos, b_pos]).sort().values, torch.arange(h * w))
        assert torch.equal(slot[torch.cat([a_pos, b_pos])], torch.arange(h * w))
        if seed is None:
            top_left = b_pos
        elif h * w >= 64:
            assert not torch.equal(b_pos, top_left)  # random destinations really move


def test_partition_arguments_are_checked():
    with pytest.raises(ValueError, match="h must be >= 1"):
        ops.spatial_partition(0, 4)
    with pytest.raises(TypeError, match="sx must be an int"):
        ops.spatial_partition(4, 4, sx=2.0)
    with pytest.raises(TypeError, match="step must be an int64 scalar tensor"):
        ops.spatial_partition(4, 4, seed=1, step=3)


