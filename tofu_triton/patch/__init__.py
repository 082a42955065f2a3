"""Patch model families for ToFu / ToMe in one call.

    import timm, tofu_triton.patch
    model = timm.create_model("vit_base_patch16_224", pretrained=True).eval()
    tofu_triton.patch.timm(model, r=16, mode="tofu")
    logits = model(images)
    model.r = 8                      # change the schedule between calls
    logits, source = tofu_triton.patch.trace(model, images)
    tofu_triton.patch.unpatch(model)

All timm glue is in :mod:`tofu_triton.patch.timm_vit`. Hugging Face
encoders (``BertModel``, ``ViTModel``, ``ViTForImageClassification``)::

    tofu_triton.patch.transformers(bert, r=4, mode="tofu")
    out = bert(**batch)                     # + out.token_size, out.token_mask
    emb = tofu_triton.patch.hf.mean_pool(out.last_hidden_state, out.token_size, out.token_mask)

That glue is in :mod:`tofu_triton.patch.hf`, imported (with transformers)
only on the first call of :func:`transformers`.
"""
from contextlib import contextmanager

from .timm_vit import TokenInfo, forward_with_info, is_patched, plan, trace, unpatch
from .timm_vit import CONFIG as _CONFIG
from .timm_vit import patch as timm


@contextmanager
def patched(model, **kwargs):
    """``with patched(model, r=8, mode="tome"):`` patch for the block, then restore
    the model as it was (unpatched, or patched with its previous settings)."""
    previous = {name: getattr(model, name) for name in _CONFIG} if is_patched(model) else None
    timm(model, **kwargs)
    try:
        yield model
    finally:
        if previous is None:
            unpatch(model)
        else:
            for name, value in previous.items():
                setattr(model, name, value)


def transformers(model, r=16, mode="tofu", prune_layers=None, prop_attn=True, backend="auto"):
    """Patch a Hugging Face encoder in place (see :mod:`tofu_triton.patch.hf`); returns it.

    Imports ``transformers`` lazily, on this first call.
    """
    from . import hf

    return hf.patch(model, r=r, mode=mode, prune_layers=prune_layers, prop_attn=prop_attn, backend=backend)


__all__ = ["TokenInfo", "forward_with_info", "is_patched", "patched", "plan", "timm", "trace", "transformers", "unpatch"]
