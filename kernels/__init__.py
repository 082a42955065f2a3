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
* ``attention.py``: flash attention with a per-key additive bias (proportional
  attention's ``log(size)``), forward only.
* ``common.py``: what several of them share (mode ids, device helpers such as
  the selection order key and the best-partner search, output allocation,
  the device guard).

No kernel uses atomics: every result is bitwise reproducible. Launchers take
tensors with any strides, return contiguous outputs, and launch on the
device of their tensors.
"""
import importlib.machinery
import importlib.util
import os
import sys

if __name__ == "kernels":
    # Imported under its folder's name, not as tofu_triton.kernels: the
    # repository root is on sys.path (python -c / -m / a notebook started
    # there). "kernels" is another project's name (Hugging Face's package,
    # which transformers imports), so this folder must never stand in for it:
    # hand the import to the first other finder that knows a "kernels".
    _root = os.path.realpath(os.path.dirname(os.path.dirname(__file__)))
    _elsewhere = [p for p in sys.path if os.path.realpath(p or os.curdir) != _root]
    del sys.modules["kernels"]
    _spec = None
    for _finder in sys.meta_path:
        _spec = getattr(_finder, "find_spec", lambda *_: None)("kernels", _elsewhere)
        if _spec is not None:
            break
    if _spec is None:
        # No other "kernels" anywhere: the import has to succeed all the same,
        # with what reads as "not installed". transformers' availability check
        # (utils/import_utils.py _is_package_available) finds this folder with
        # find_spec, finds no distribution called kernels, falls back to
        # importing it and counts a module without __version__ and with
        # __file__ None as a namespace package shadowing on sys.path, not an
        # install; had the import raised, every transformers (and so diffusers)
        # model import would fail. So the module is an empty namespace package
        # (what module_from_spec makes of a spec without a location): none of
        # our names, no submodules (__path__ is empty), `from kernels import X`
        # is an ImportError, and tofu_triton.kernels stays a module of its own.
        _spec = importlib.machinery.ModuleSpec("kernels", None, is_package=True)
        sys.modules["kernels"] = importlib.util.module_from_spec(_spec)
    else:
        _module = sys.modules["kernels"] = importlib.util.module_from_spec(_spec)
        try:
            _spec.loader.exec_module(_module)
        except BaseException:
            del sys.modules["kernels"]
            raise
else:
    from . import common, match, merge, partition, select, step, unmerge  # noqa: F401  (ops reaches them as attributes)
