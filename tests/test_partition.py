"""The Stable Diffusion step's partition kernel against the reference, on CPU
through Triton's interpreter (outputs poisoned first)."""
import pytest
import torch

from tofu_triton import ops
from tofu_triton import reference as ref

from conftest import DEVICE, GRIDS, assert_same

pytestmark = pytest.mark.usefixtures("poisoned")


# The kernel runs one program per band of sy rows: (5, 520, 2, 2) has bands longer than one
# tile (2 x 520 > PARTITION_BLOCK) and a last band of one row outside every cell.
@pytest.mark.parametrize("grid", GRIDS + [(64, 64, 2, 2), (33, 17, 4, 3), (1, 3, 2, 2), (5, 520, 2, 2)],
                         ids=lambda g: "x".join(map(str, g)))
def test_partition_kernel_matches_reference(grid, spatial_launches):
    h, w, sx, sy = grid
    top_left = None
    for seed, step, block in [(None, 0, 0), (5, 0, 0), (5, 371, 3), (123456, 999000, 15)]:
        spatial_launches.clear()
        step = torch.tensor(step)
        got = ops.spatial_partition(h, w, sx, sy, seed=seed, step=step.to(DEVICE), block=block, backend="triton")
        choice = None if seed is None else ref.cell_choice(seed, step, block, (h // sy, w // sx), sx * sy)
        want = ref.spatial_partition(h, w, sx, sy, choice)
        assert_same(got, want)
        assert spatial_launches == ({"spatial_partition": 1} if (h // sy) * (w // sx) else {})  # no cell: no kernel
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


