"""The one place that builds the models the CLI, the evaluation and the benchmarks run.

    model = create_vit("vit_base_patch16_224")              # random init, seeded: same weights every run
    model = create_vit("vit_base_patch16_224", pretrained=True)
    model = create_vit("tiny")                              # 6 blocks at 64 px: seconds on a CPU

    unet = create_unet("sd15", device="cuda", dtype=torch.float16)   # SD 1.5's UNet layout, random weights
    unet = create_unet("tiny")                              # SD 1.5's layout at 32-64 channels: a CPU runs it
    out = unet_step(unet, unet_inputs(unet, batch=2, size=64))     # one denoising step's UNet forward

    flux = create_denoiser("tiny-flux")                     # Flux.1's layout (19 + 38 blocks) at 64 channels
    out = denoiser_step(flux, denoiser_inputs(flux, batch=1, size=64))   # any preset: UNet or transformer
"""
import difflib
import os
from typing import Dict, List, Optional, Tuple

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
        close = similar_names(name, [*PRESETS, *timm.list_models()])
        hint = f"; similar names: {', '.join(close)}" if close else ""
        raise ValueError(f"unknown model {name!r}: not a timm model name nor one of {sorted(PRESETS)}{hint}")
    if pretrained:
        check_weights_reachable(base)
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


def similar_names(name: str, names: List[str], n: int = 5) -> List[str]:
    """Up to ``n`` of ``names`` a user may have meant by ``name``, most likely first: the names
    that start with it, then difflib's close matches, each group by closeness
    (``vit_base_patch16`` -> ``vit_base_patch16_224``, ``vit_base_patch16_384``, ...)."""
    def closeness(other: str) -> float:
        return difflib.SequenceMatcher(None, name, other).ratio()

    starting = sorted((m for m in names if name and m.startswith(name)), key=lambda m: (-closeness(m), m))
    return list(dict.fromkeys(starting + difflib.get_close_matches(name, names, n=n, cutoff=0.6)))[:n]


def check_weights_reachable(name: str, timeout_s: float = 5.0) -> None:
    """OSError (one line) unless the pretrained weights of timm model ``name`` are cached or can be fetched.

    Without a network timm's own download retries for about a minute before it
    fails; this asks once, with a ``timeout_s`` second timeout, and only when
    the weights are not in the local cache (the Hugging Face cache, or torch
    hub's for timm models whose weights come from a URL). Honours
    ``HF_HUB_OFFLINE`` and proxies.
    """
    import urllib.error
    import urllib.request

    from huggingface_hub import constants, try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None or cfg.file or cfg.state_dict:  # no weights at all (timm says so), or local ones
        return
    if cfg.hf_hub_id:
        files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        if any(isinstance(try_to_load_from_cache(cfg.hf_hub_id, f), str) for f in files):
            return
        source = constants.ENDPOINT
    elif cfg.url:
        if os.path.exists(os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(cfg.url))):
            return
        source = cfg.url
    else:
        return
    if constants.HF_HUB_OFFLINE:
        raise OSError(f"the pretrained weights of {name} are not in the local cache and HF_HUB_OFFLINE is set")
    try:
        urllib.request.urlopen(urllib.request.Request(source, method="HEAD"), timeout=timeout_s).close()
    except urllib.error.HTTPError:  # the server answered: the download itself will say what is wrong
        return
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise OSError(f"cannot reach {source} to download the pretrained weights of {name} ({reason}); "
                      "check the network, or run without pretrained weights") from None


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
        why = state_dict_mismatch(model, state) if isinstance(state, dict) else ""
        raise ValueError(f"{path}: does not fit the model ({why or str(e).splitlines()[0]})") from None
    return model


def state_dict_mismatch(model: nn.Module, state: Dict[str, object], show: int = 3) -> str:
    """What keeps ``state`` from loading into ``model``, in one line: the missing and unexpected keys and the
    shape mismatches, each counted with the first ``show`` named ("" when the keys and shapes all fit)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    sizes = [f"{k} {tuple(getattr(state[k], 'shape', ()))} vs {tuple(own[k].shape)} in the model"
             for k in own if k in state and getattr(state[k], "shape", None) != own[k].shape]

    def listed(one: str, many: str, items: List[str]) -> str:
        more = f" and {len(items) - show} more" if len(items) > show else ""
        return f"{len(items)} {one if len(items) == 1 else many}: {', '.join(items[:show])}{more}"

    parts = [listed(*names, items) for names, items in ((("missing key", "missing keys"), missing),
                                                        (("unexpected key", "unexpected keys"), unexpected),
                                                        (("size mismatch", "size mismatches"), sizes)) if items]
    return "; ".join(parts)


# --------------------------------------------------------------------------- Stable Diffusion UNets

# The UNet configs of Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5, unet/config.json) and SDXL
# base 1.0 (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json), written out so that a
# random-weight model of the published size and layout can be built without downloading anything.
# Keys left out are UNet2DConditionModel's defaults, which are the published values.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, mid_block_scale_factor=1,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    # diffusers reads attention_head_dim as the number of heads here (a historical misnomer): 64-wide heads.
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    # Added conditioning: pooled text embedding (1280) + 6 size/crop numbers embedded at 256 each = 2816.
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    norm_num_groups=32, norm_eps=1e-5, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
)
# The same layouts at 32-64 channels (the widths tests/test_patch_diffusers.py uses), for CPU runs and
# tests: every block type, resolution and added-conditioning path of the full models, in milliseconds.
_TINY = dict(block_out_channels=(32, 32, 64, 64), cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
             sample_size=32)
UNET_PRESETS: Dict[str, dict] = {
    "tiny": dict(SD15_UNET, **_TINY),
    "tiny-xl": dict(SDXL_UNET, block_out_channels=(32, 64, 64), transformer_layers_per_block=(1, 2, 3),
                    attention_head_dim=8, cross_attention_dim=32, norm_num_groups=8, sample_size=32,
                    addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32),
    "sd15": SD15_UNET,
    "sdxl": SDXL_UNET,
}
TEXT_TOKENS = 77  # CLIP's context length: the encoder_hidden_states every SD pipeline passes
TIMESTEP = 500  # a mid-schedule step of the 1000 training steps


def unet_config(name: str) -> dict:
    """A copy of :data:`UNET_PRESETS` ``[name]``; ValueError naming the presets for an unknown name."""
    if name not in UNET_PRESETS:
        raise ValueError(f"unknown UNet preset {name!r}: choose one of {', '.join(UNET_PRESETS)}")
    return dict(UNET_PRESETS[name])


def latent_multiple(name: str) -> int:
    """The latent side must be a multiple of this: the UNet halves it once per down block but the last; the
    transformers cut it into 2x2 patches (Flux packs 2x2 latent pixels into one token)."""
    if name in DIT_PRESETS:
        return 2
    return 2 ** (len(unet_config(name)["block_out_channels"]) - 1)


def attention_downsample(name: str) -> int:
    """How far below the latent's resolution the highest-resolution transformer blocks run: 1 for SD 1.x/2.x,
    2 for SDXL (its first down block has no attention). tomesd's ``max_downsample`` must be at least this
    for anything to merge. 1 for the transformers (every block runs on the patch grid)."""
    if name in DIT_PRESETS:
        return 1
    types = unet_config(name)["down_block_types"]
    return 2 ** next(i for i, kind in enumerate(types) if "CrossAttn" in kind)


def create_unet(name: str, seed: int = 0, device=None, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """A diffusers ``UNet2DConditionModel`` of preset ``name`` with random weights, in eval mode.

    Built directly on ``device`` (default CPU; on a GPU that takes seconds
    where initialising SDXL's 2.6 G parameters on a CPU takes a minute),
    seeded with ``seed`` without touching the global RNGs, in float32 and
    then cast to ``dtype``. Attention runs through diffusers' default
    processor (``AttnProcessor2_0``: PyTorch SDPA). Nothing is downloaded.
    Needs diffusers (``pip install "tofu-triton[diffusers]"``).
    """
    config = unet_config(name)
    from diffusers import UNet2DConditionModel

    return _build(UNet2DConditionModel, config, seed, device, dtype)


def _build(cls: type, config: dict, seed: int, device, dtype: Optional[torch.dtype]) -> nn.Module:
    """``cls(**config)`` built on ``device`` with the global RNGs seeded and restored, cast, in eval mode."""
    device = torch.device(device or "cpu")
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        with device:
            model = cls(**config)
    # nn.Module.to, not ModelMixin.to: the latter warns about keeping modules in float32 for
    # from_pretrained, a list that is empty for these models.
    return nn.Module.to(model, dtype=dtype or torch.float32).eval()


def unet_inputs(model: nn.Module, batch: int, size: int, seed: int = 0, device=None,
                dtype: Optional[torch.dtype] = None) -> Dict[str, object]:
    """Random inputs of one denoising step of ``model`` (a UNet2DConditionModel), as a pipeline passes them.

    Returns ``sample`` [batch, in_channels, size, size] (the latent,
    standard normal), ``timestep`` [batch] int64 (:data:`TIMESTEP`),
    ``encoder_hidden_states`` [batch, 77, cross_attention_dim] (stand-in text
    embeddings) and, for SDXL's ``text_time`` conditioning,
    ``added_cond_kwargs`` with ``text_embeds`` [batch, pooled width] and
    ``time_ids`` [batch, 6] (original size, crop corner, target size, in
    pixels). Floats in ``dtype`` (default float32) on ``device``; drawn on the
    CPU from ``seed``, so they do not depend on the device.
    """
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    dtype = dtype or torch.float32

    def normal(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    out: Dict[str, object] = dict(
        sample=normal(batch, cfg.in_channels, size, size),
        timestep=torch.full((batch,), TIMESTEP, dtype=torch.int64, device=device),
        encoder_hidden_states=normal(batch, TEXT_TOKENS, cfg.cross_attention_dim),
    )
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        pixels = 8 * size  # the VAE's 8x: the image size the latent stands for
        time_ids = torch.tensor([pixels, pixels, 0, 0, pixels, pixels], dtype=dtype, device=device)
        out["added_cond_kwargs"] = dict(text_embeds=normal(batch, pooled), time_ids=time_ids.repeat(batch, 1))
    return out


def unet_step(model: nn.Module, inputs: Dict[str, object]) -> torch.Tensor:
    """``model``'s noise prediction [batch, out_channels, size, size] for :func:`unet_inputs`.

    The latent goes in positionally, as pipelines pass it: tomesd's size hook
    reads it from the positional arguments.
    """
    rest = {k: v for k, v in inputs.items() if k != "sample"}
    return model(inputs["sample"], **rest).sample


# --------------------------------------------------------------------------- diffusion transformers

# The transformer configs of PixArt-Sigma (PixArt-alpha/PixArt-Sigma-XL-2-1024-MS), Stable Diffusion 3
# medium (stabilityai/stable-diffusion-3-medium-diffusers) and Flux.1 dev (black-forest-labs/FLUX.1-dev),
# transformer/config.json each, written out as for the UNets (keys left out are the class defaults, which
# are the published values). tests/test_dit_presets.py checks the published parameter counts.
PIXART_SIGMA = dict(
    num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
    cross_attention_dim=1152, caption_channels=4096, sample_size=128, patch_size=2, interpolation_scale=2,
    use_additional_conditions=False, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
)
SD3_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=192,
)
FLUX_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
# The same layouts (every block) at 64 channels (2 heads of 32) and 32-wide text embeddings: a CPU runs a
# step in about a second at a 64x64 latent.
_TINY_DIT = dict(num_attention_heads=2, attention_head_dim=32)
DIT_PRESETS: Dict[str, Tuple[str, dict]] = {  # name: (family, config)
    "tiny-pixart": ("pixart", dict(PIXART_SIGMA, **_TINY_DIT, cross_attention_dim=64, caption_channels=32)),
    "tiny-sd3": ("sd3", dict(SD3_MEDIUM, **_TINY_DIT, joint_attention_dim=32, caption_projection_dim=64,
                             pooled_projection_dim=32)),
    "tiny-flux": ("flux", dict(FLUX_DEV, **_TINY_DIT, joint_attention_dim=32, pooled_projection_dim=32,
                               axes_dims_rope=(4, 14, 14))),
    "pixart-sigma": ("pixart", PIXART_SIGMA),
    "sd3-medium": ("sd3", SD3_MEDIUM),
    "flux-dev": ("flux", FLUX_DEV),
}
# Text tokens each pipeline passes: PixArt-Sigma's T5 (300), SD3's CLIP (77) + T5 (256), Flux dev's T5 (512).
DIT_TEXT_TOKENS = {"pixart": 300, "sd3": 77 + 256, "flux": 512}
LATENT_CHANNELS = {"pixart": 4, "sd3": 16, "flux": 16}  # the VAE's: Flux packs 2x2 of its 16 into 64
FLUX_GUIDANCE = 3.5  # Flux dev's default guidance scale, embedded by its transformer


def is_dit(name: str) -> bool:
    """True for a transformer preset of :data:`DIT_PRESETS`, False for a UNet of :data:`UNET_PRESETS`."""
    if name not in DIT_PRESETS and name not in UNET_PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(list(UNET_PRESETS) + list(DIT_PRESETS))}")
    return name in DIT_PRESETS


def dit_family(model: nn.Module) -> str:
    """"pixart", "sd3" or "flux" for a diffusers transformer; ValueError for anything else."""
    families = {"PixArtTransformer2DModel": "pixart", "SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
    for cls in type(model).__mro__:
        if cls.__name__ in families:
            return families[cls.__name__]
    raise ValueError(f"{type(model).__name__} is not a PixArt, SD3 or Flux transformer")


def create_transformer(name: str, seed: int = 0, device=None, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """A diffusers PixArt / SD3 / Flux transformer of preset ``name`` with random weights, in eval mode.

    As :func:`create_unet`: built on ``device``, seeded without touching the
    global RNGs, float32 cast to ``dtype``, default attention processors
    (PyTorch SDPA), nothing downloaded.
    """
    if name not in DIT_PRESETS:
        raise ValueError(f"unknown transformer preset {name!r}: choose one of {', '.join(DIT_PRESETS)}")
    family, config = DIT_PRESETS[name]
    from diffusers.models.transformers.pixart_transformer_2d import PixArtTransformer2DModel
    from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel
    from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel

    cls = {"pixart": PixArtTransformer2DModel, "sd3": SD3Transformer2DModel, "flux": FluxTransformer2DModel}[family]
    return _build(cls, config, seed, device, dtype)


def transformer_inputs(model: nn.Module, batch: int, size: int, seed: int = 0, device=None,
                       dtype: Optional[torch.dtype] = None) -> Dict[str, object]:
    """Random inputs of one denoising step of a PixArt / SD3 / Flux transformer, as its pipeline passes them.

    ``size`` is the latent's side (image side / 8), even. All three get a
    standard normal latent, stand-in text embeddings (the pipeline's text
    length, :data:`DIT_TEXT_TOKENS`) and a mid-schedule timestep:

    * PixArt: ``hidden_states`` [batch, 4, size, size], ``encoder_hidden_states``
      [batch, 300, caption_channels], ``timestep`` [batch] int64 (500),
      ``added_cond_kwargs`` (no resolution / aspect-ratio conditions);
    * SD3: ``hidden_states`` [batch, 16, size, size], ``encoder_hidden_states``
      [batch, 333, joint_attention_dim], ``pooled_projections`` [batch, pooled
      width], ``timestep`` [batch] float (500.0);
    * Flux: ``hidden_states`` [batch, (size/2)^2, 64] (the 16-channel latent
      packed 2x2, row-major), ``encoder_hidden_states`` [batch, 512, ...],
      ``pooled_projections``, ``timestep`` [batch] (0.5: Flux scales by 1000
      itself), ``guidance`` [batch] (3.5) where the model embeds it,
      ``img_ids`` [(size/2)^2, 3] (0, row, col) and ``txt_ids`` [512, 3] zeros.

    Floats in ``dtype`` (default float32) on ``device``, drawn on the CPU from ``seed``.
    """
    family, cfg = dit_family(model), model.config
    if size < 2 or size % 2:
        raise ValueError(f"size (the latent side) must be even and >= 2 for a transformer, got {size}")
    g = torch.Generator().manual_seed(seed)
    dtype = dtype or torch.float32

    def normal(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    text = DIT_TEXT_TOKENS[family]
    latent = normal(batch, LATENT_CHANNELS[family], size, size)  # drawn first: the same latent for every family
    if family == "pixart":
        return dict(hidden_states=latent, encoder_hidden_states=normal(batch, text, cfg.caption_channels),
                    timestep=torch.full((batch,), TIMESTEP, dtype=torch.int64, device=device),
                    added_cond_kwargs=dict(resolution=None, aspect_ratio=None))
    context = normal(batch, text, cfg.joint_attention_dim)
    pooled = normal(batch, cfg.pooled_projection_dim)
    if family == "sd3":
        return dict(hidden_states=latent, encoder_hidden_states=context, pooled_projections=pooled,
                    timestep=torch.full((batch,), float(TIMESTEP), device=device))
    h = w = size // 2  # Flux packs each 2x2 patch of the latent into one token of 4 * 16 channels
    packed = latent.reshape(batch, -1, h, 2, w, 2).permute(0, 2, 4, 1, 3, 5).reshape(batch, h * w, -1)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    out = dict(hidden_states=packed, encoder_hidden_states=context, pooled_projections=pooled,
               timestep=torch.full((batch,), TIMESTEP / 1000, device=device, dtype=dtype),
               img_ids=img_ids.to(device=device, dtype=dtype), txt_ids=torch.zeros(text, 3, device=device, dtype=dtype))
    if cfg.guidance_embeds:
        out["guidance"] = torch.full((batch,), FLUX_GUIDANCE, device=device, dtype=dtype)
    return out


def create_denoiser(name: str, seed: int = 0, device=None, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """:func:`create_unet` or :func:`create_transformer`, by preset name."""
    return (create_transformer if is_dit(name) else create_unet)(name, seed=seed, device=device, dtype=dtype)


def denoiser_inputs(model: nn.Module, batch: int, size: int, seed: int = 0, device=None,
                    dtype: Optional[torch.dtype] = None) -> Dict[str, object]:
    """:func:`unet_inputs` or :func:`transformer_inputs`, by model class."""
    build = unet_inputs if type(model).__name__.endswith("UNet2DConditionModel") else transformer_inputs
    return build(model, batch, size, seed=seed, device=device, dtype=dtype)


def denoiser_step(model: nn.Module, inputs: Dict[str, object]) -> torch.Tensor:
    """One step's noise prediction of a UNet (:func:`unet_step`) or transformer: [batch, C, size, size], or for
    Flux the packed [batch, (size/2)^2, 64]."""
    if "sample" in inputs:
        return unet_step(model, inputs)
    return model(**inputs).sample
