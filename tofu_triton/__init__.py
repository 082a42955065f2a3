"""tofu-triton: fused Triton kernels for Token Fusion (ToFu) and ToMe in Vision Transformers.

``reference.py`` defines the op (the design: ``docs/design.md``); ``ops.py``
dispatches CUDA tensors to the kernels in ``tofu_triton.kernels`` and CPU
tensors to the reference; ``tofu_triton.patch`` patches whole models: timm
``VisionTransformer`` and Hugging Face ``BertModel``, ``ViTModel``,
``ViTForImageClassification``, ``CLIPVisionModel``, ``Dinov2Model``, SigLIP,
EVA-02, and diffusers' Stable Diffusion UNets and PixArt / SD3 / Flux
transformers (imported on first use, since it imports timm).
``token_fusion_step`` is a ViT block's whole step from its attention keys (one
launch on the GPU). The diffusion step's ops: ``spatial_partition``,
``spatial_match``, ``spatial_merge``, ``spatial_unmerge``.
"""
import importlib

from .ops import (
    BACKENDS, bipartite_match, merge_tokens, spatial_match, spatial_merge, spatial_partition, spatial_unmerge,
    token_fusion, token_fusion_step,
)
from .reference import MODES, Match, Partition, SpatialMatch, Step

__version__ = "0.1.0"
__all__ = ["BACKENDS", "MODES", "Match", "Partition", "SpatialMatch", "Step", "bipartite_match", "merge_tokens",
           "patch", "spatial_match", "spatial_merge", "spatial_partition", "spatial_unmerge", "token_fusion",
           "token_fusion_step", "__version__"]


def __getattr__(name):
    if name == "patch":
        return importlib.import_module(".patch", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
