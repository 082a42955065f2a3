"""Patch whole models for ToFu / ToMe in one call; one module per family.

    import timm, tofu_triton.patch as tp
    model = tp.timm(timm.create_model("vit_base_patch16_224").eval(), r=16, mode="tofu")
    model.r = 8                      # settings are plain attributes, changeable between calls
    model.mode = "tome"              # AttributeError: did you mean 'tofu_mode'? (lifecycle.Patched)
    tp.plan(model)                   # the per-layer schedule it really follows (r clamped)
    tp.unpatch(model)

Families (one module each, ``<call>_models.py``: a module named like its
call would be bound over the function when imported):

* ``tp.timm(model, ...)``, :mod:`tofu_triton.patch.timm_models`: timm ``VisionTransformer``
  (ViT, DeiT, register tokens, no class token, LayerScale, qk_norm, SigLIP) and ``Eva``
  (EVA-02, rotary ViTs).
* ``tp.transformers(model, ...)``, :mod:`tofu_triton.patch.transformers_models`: Hugging Face
  ``BertModel``, ``ViTModel``, ``ViTForImageClassification``, ``CLIPVisionModel``, ``Dinov2Model``,
  ``SiglipVisionModel``.
* ``tp.diffusers(pipe, ...)``, :mod:`tofu_triton.patch.diffusers_models`: Stable Diffusion UNets
  (SD 1.x, 2.x, SDXL) and the PixArt, SD3 and Flux transformers, tomesd's arguments.

Every family goes through :mod:`tofu_triton.patch.lifecycle`, so
:func:`unpatch`, :func:`is_patched`, :func:`plan`, :func:`settings` and
:func:`patched` work on any patched model. The Hugging Face and diffusers
modules (and those libraries) are imported on the first call of
:func:`transformers` / :func:`diffusers`.
"""
import importlib
from contextlib import contextmanager
from typing import Optional

import torch
from torch import Tensor

from . import lifecycle
from .lifecycle import is_patched, plan, settings, unpatch
from .timm_models import TokenInfo, forward_with_info, trace
from .timm_models import patch as _patch_timm

_INSTALL_HINT = {"transformers": 'pip install "tofu-triton[hf]"', "diffusers": 'pip install "tofu-triton[diffusers]"'}


def _family_module(name: str):
    """Import ``tofu_triton.patch.<name>_models`` (the family of ``tofu_triton.patch.<name>(...)``), saying what
    to install if its library is missing. The modules' names differ from the calls' so that importing a
    module never binds it over the function of the same name on this package."""
    try:
        return importlib.import_module(f"{__name__}.{name}_models")
    except ModuleNotFoundError as e:
        if e.name is not None and e.name.split(".")[0] == name:
            raise ModuleNotFoundError(
                f"tofu_triton.patch.{name} needs the {name} package: {_INSTALL_HINT[name]}", name=name) from e
        raise


def timm(model, r=16, mode="tofu", prune_layers=None, prop_attn=True, trace_source=False, backend="auto",
         attention="auto"):
    """Patch a timm ``VisionTransformer`` in place (see :mod:`tofu_triton.patch.timm_models`); returns it."""
    return _patch_timm(model, r=r, mode=mode, prune_layers=prune_layers, prop_attn=prop_attn,
                       trace_source=trace_source, backend=backend, attention=attention)


def transformers(model, r=16, mode="tofu", prune_layers=None, prop_attn=True, backend="auto"):
    """Patch a Hugging Face encoder in place (see :mod:`tofu_triton.patch.transformers_models`); returns it.

    Imports ``transformers`` on this first call.
    """
    return _family_module("transformers").patch(model, r=r, mode=mode, prune_layers=prune_layers,
                                                 prop_attn=prop_attn, backend=backend)


def diffusers(model, ratio=0.5, mode="tofu", max_downsample=None, sx=2, sy=2, use_rand=True, merge_attn=True,
              merge_crossattn=False, merge_mlp=None, prop_attn=None, seed=None, backend="auto", reuse="none",
              whole_block=False):
    """Patch a diffusers pipeline or denoiser in place (see :mod:`tofu_triton.patch.diffusers_models`); returns it.

    Stable Diffusion UNets and the PixArt, SD3 and Flux transformers; tomesd's
    arguments (None: the model's default). Imports ``diffusers`` on this first call.
    """
    return _family_module("diffusers").patch(
        model, ratio=ratio, mode=mode, max_downsample=max_downsample, sx=sx, sy=sy, use_rand=use_rand,
        merge_attn=merge_attn, merge_crossattn=merge_crossattn, merge_mlp=merge_mlp, prop_attn=prop_attn, seed=seed,
        backend=backend, reuse=reuse, whole_block=whole_block)


_PATCHERS = {"timm": timm, "transformers": transformers, "diffusers": diffusers}


def _patcher_for(model):
    """The patch function of the family a (patched or unpatched) model belongs to."""
    if is_patched(model):
        return _PATCHERS[lifecycle.family_of(model).name]
    library = type(model).__module__.split(".")[0]
    if library not in _PATCHERS:
        raise TypeError(f"no tofu_triton.patch family for {type(model).__module__}.{type(model).__name__}; "
                        f"supported: {', '.join(_PATCHERS)}")
    return _PATCHERS[library]


@contextmanager
def patched(model, **kwargs):
    """``with patched(model, r=8, mode="tome"):`` patch for the block, then restore
    the model as it was (unpatched, or patched with its previous settings).
    Works for every family; ``kwargs`` are those of the family's patch call."""
    previous = settings(model) if is_patched(model) else None
    _patcher_for(model)(model, **kwargs)
    try:
        yield model
    finally:
        if previous is None:
            unpatch(model)
        else:
            target = lifecycle.patched_module(model)
            for name, value in previous.items():
                setattr(target, name, value)


def mean_pool(hidden: Tensor, size: Optional[Tensor] = None, mask: Optional[Tensor] = None) -> Tensor:
    """Size-weighted mean over tokens: ``sum(w * h) / sum(w)``, ``w = size * mask``.

    hidden: [B, N, C]; size: [B, N, 1] or [B, N] (None = ones); mask: [B, N]
    0/1 (None = ones). With ``size=None`` this is sentence-transformers'
    mean pooling (``clamp(sum(mask), 1e-9)`` in the denominator); with the
    ``token_size`` and ``token_mask`` of a patched model's output it is the
    same pooling over the merged tokens. Returns [B, C] in ``hidden``'s
    dtype, accumulated in fp32.
    """
    weight = torch.ones(hidden.shape[:2], dtype=torch.float32, device=hidden.device)
    if size is not None:
        weight = weight * (size[..., 0] if size.dim() == 3 else size).float()
    if mask is not None:
        weight = weight * mask.float()
    weight = weight[..., None]
    pooled = (hidden.float() * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1e-9)
    return pooled.to(hidden.dtype)


__all__ = ["TokenInfo", "diffusers", "forward_with_info", "is_patched", "mean_pool", "patched", "plan", "settings",
           "timm", "trace", "transformers", "unpatch"]
