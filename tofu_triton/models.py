"""The one place that builds the timm ViTs the CLI, the evaluation and the benchmarks run.

    model = create_vit("vit_base_patch16_224")              # random init, seeded: same weights every run
    model = create_vit("vit_base_patch16_224", pretrained=True)
    model = create_vit("tiny")                              # 6 blocks at 64 px: seconds on a CPU
"""
from typing import Optional

import torch
from torch import nn

# Small random ViTs with no pretrained weights, for quick CPU runs and tests.
PRESETS = {
    "tiny": dict(base="vit_tiny_patch16_224", img_size=64, patch_size=8, embed_dim=64, depth=6, num_heads=2,
                 num_classes=100),
    "smoke": dict(base="vit_tiny_patch16_224", img_size=64, depth=4),
}


def create_vit(name: str, pretrained: bool = False, seed: int = 0, img_size: Optional[int] = None,
               num_classes: Optional[int] = None) -> nn.Module:
    """A timm ``VisionTransformer`` or ``Eva`` in eval mode, on the CPU, in float32.

    name: a timm model name or a key of :data:`PRESETS`. Random init is
    seeded with ``seed`` (the global torch RNG is left as it was), so two
    runs, or two processes, build the same weights. ``img_size`` and
    ``num_classes`` override the model's own. Raises ValueError for an
    unknown name or a model that is not a ViT ToFu can patch, with the
    reason in one line.
    """
    import timm
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer

    kwargs = {}
    if name in PRESETS:
        if pretrained:
            raise ValueError(f"model {name!r} is a small random preset with no pretrained weights")
        kwargs.update(PRESETS[name])
        base = kwargs.pop("base")
    elif timm.is_model(name):
        base = name
    else:
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5] if name else []
        hint = f"; similar timm names: {', '.join(close)}" if close else ""
        raise ValueError(f"unknown model {name!r}: not a timm model name nor one of {sorted(PRESETS)}{hint}")
    if img_size is not None:
        kwargs["img_size"] = img_size
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(base, pretrained=pretrained, **kwargs)
    if not isinstance(model, (VisionTransformer, Eva)):
        raise ValueError(f"model {name!r} is a {type(model).__name__}, not a timm VisionTransformer or Eva "
                         "(ToFu patches ViT, DeiT, SigLIP, EVA-02 and their variants)")
    return model.eval()


def load_weights(model: nn.Module, path: str) -> nn.Module:
    """Load a state dict saved with ``torch.save`` (plain, or under a ``state_dict`` /
    ``model`` key) into ``model``; ValueError saying what is wrong with the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # missing, truncated, not a torch file, or not weights-only
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"{path}: cannot read it ({type(e).__name__}: {first})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{path}: does not fit the model ({str(e).splitlines()[0]})") from None
    return model
