"""Triton kernels and their launchers (installed as ``tofu_triton.kernels``).

One file per op, each holding its ``@triton.jit`` kernels and then the Python
launchers that pick block sizes and grids; the op each one computes is
defined in ``tofu_triton/reference.py`` (docs/design.md):

* ``step.py``: a ViT block's whole reduction step in one launch (head mean of
  the keys, match, select, merge, sizes, the next attention's bias).
* ``match.py``: every A token's most similar B token (node_max, node_idx).
* ``select.py``: the sources and their grouping by destination: the ViT
  select (one program per image) and the spatial select of the Stable
  Diffusion step (many programs per image).
* ``merge.py``: the merge and its gradient.
* ``partition.py``: the cell partition of a latent grid (Stable Diffusion).
* ``unmerge.py``: merged tokens back to the grid, fused with the residual add.
* ``common.py``: what several of them share (mode ids, device helpers such as
  the selection order key and the best-partner search, output allocation,
  the device guard).

No kernel uses atomics: every result is bitwise reproducible. Launchers take
tensors with any strides, return contiguous outputs, and launch on the
device of their tensors.
"""
from . import common, match, merge, partition, select, step, unmerge  # noqa: F401  (ops reaches them as attributes)
