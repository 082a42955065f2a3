"""tofu-triton: fused Triton kernels for Token Fusion (ToFu) and ToMe in Vision Transformers.

``reference.py`` defines the op; ``ops.py`` dispatches CUDA tensors to the
kernels in ``tofu_triton.kernels`` and CPU tensors to the reference.
"""
from .ops import BACKENDS, bipartite_match, merge_tokens, token_fusion
from .reference import MODES, Match

__version__ = "0.1.0"
__all__ = ["BACKENDS", "MODES", "Match", "bipartite_match", "merge_tokens", "token_fusion", "__version__"]
