"""``tofu_triton.patch.diffusers(model)``: ToFu / ToMe / ToDo inside diffusers' denoisers.

Supported, passed directly or inside a pipeline (its ``.unet`` or ``.transformer``):

* ``UNet2DConditionModel`` (SD 1.x, 2.x, SDXL): ``BasicTransformerBlock`` with
  ``norm_type="layer_norm"``;
* ``PixArtTransformer2DModel`` (PixArt-α, PixArt-Σ): ``BasicTransformerBlock``
  with ``norm_type="ada_norm_single"``;
* ``SD3Transformer2DModel`` (SD3, SD3.5): ``JointTransformerBlock``, the last,
  ``context_pre_only`` one included;
* ``FluxTransformer2DModel`` (Flux.1): ``FluxTransformerBlock`` and
  ``FluxSingleTransformerBlock``.

The argument names and defaults are tomesd's ``apply_patch``, so a tomesd
user changes one line, and the same line patches the transformers::

    tomesd.apply_patch(pipe, ratio=0.5)              # before (UNets only)
    tofu_triton.patch.diffusers(pipe, ratio=0.5)     # after: SD 1.x/2.x/SDXL, PixArt, SD3, Flux

In every patched block, tokens are the row-major grid of the image at the
block's resolution (the latent in a UNet, the patch grid in a transformer;
only image tokens, never text). Each full ``sy x sx`` cell gives one
destination, the other tokens are sources; ``r = int(N * ratio)`` sources
merge into their most similar destination (cosine on the block's input
hidden states), the sub-layer runs on the ``N - r`` tokens, and the result is
unmerged back to all ``N`` positions before the residual (docs/design.md §5).
Merging happens before self-attention (``merge_attn``; in Flux's
single-stream blocks before the parallel attention + MLP), and optionally
before cross-attention (``merge_crossattn``: UNets and PixArt) and the MLP
(``merge_mlp``). Modes: ``tome`` (mean, as tomesd), ``mlerp``, ``prune``,
``tofu`` (prune in the first half of the patched blocks in forward order,
MLERP after), and ``todo`` (ToDo: self-attention's keys and values
average-pooled over the cells, queries and everything else untouched;
``ratio = 0`` switches it off like the other modes, any other ``ratio``
switches it on, the cells set how much it pools: 2x2, a quarter of the keys;
the ``merge_*`` flags do not apply to it).

Transformers only: text tokens in joint attention are never merged; they
attend to the merged image tokens, with ``log(size)`` on those keys when
``prop_attn`` is on (docs/design.md §5.2); Flux's rotary positions follow the
merged tokens (a merged token is rotated by its destination's position).

Plans and whole blocks (docs/design.md §5.5): the partition and the match
of a merge (its plan) are computed from each merging block's input by
default (``reuse="none"``); ``reuse="step"`` computes one per resolution per
call, at the first merging block of that resolution, and the later blocks
merge their own tokens with it; ``reuse=k`` keeps it for the next k calls of
the same thread (ToMA's interval across denoising steps; refused under
``torch.compile`` and CUDA graph capture). ``whole_block=True`` merges once
before each merging block and unmerges its update once after it (all
sub-layers on the merged tokens; the ``merge_*`` flags do not apply).

Which blocks (UNets): those at most ``max_downsample`` times below the
latent's resolution; the default (None) is the highest resolution that has
attention: 1 for SD 1.x/2.x, 2 for SDXL, whose full-resolution level has
none. A ``max_downsample`` that reaches no block is refused with that
reason, as are settings that would merge nothing. Transformers patch every
block. ``tofu_triton.patch.plan(model)`` lists what each block does.

Per-call state: the token grid and the denoising step travel with each call
inside ``cross_attention_kwargs`` / ``joint_attention_kwargs`` (under the key
``"tofu_triton"``, removed before any attention processor sees it), so one
patched model can serve several threads at once; nothing is written to
modules during a forward. Flux's grid is read from ``img_ids``, or given as
``joint_attention_kwargs={"tofu_grid": (h, w)}`` (needed under
``torch.compile(fullgraph=True)`` and CUDA graphs). ``use_rand`` picks each
cell's destination with a counter-based hash of ``(seed, step, block,
cell)``: the same for every image of a batch, different across steps and
blocks, reproducible for a given ``seed`` (``None``: one drawn at patch
time). Settings are attributes of the UNet / transformer, changeable between
calls and validated at each call: ``ratio``, ``tofu_mode``,
``max_downsample``, ``sx``, ``sy``, ``use_rand``, ``merge_attn``,
``merge_crossattn``, ``merge_mlp``, ``prop_attn``, ``seed``, ``tofu_backend``,
``plan_reuse``, ``whole_block``.

The step runs through ``tofu_triton.ops.spatial_partition`` /
``spatial_match`` / ``spatial_merge`` / ``spatial_unmerge``: fused Triton
kernels on CUDA, the PyTorch reference on the CPU (``backend="auto"``).
"""
import math
import random
import threading
import weakref
from typing import Callable, List, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from diffusers.models.attention import BasicTransformerBlock, JointTransformerBlock
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, JointAttnProcessor2_0
from diffusers.models.transformers.pixart_transformer_2d import PixArtTransformer2DModel
from diffusers.models.transformers.transformer_flux import (
    FluxAttnProcessor, FluxSingleTransformerBlock, FluxTransformer2DModel, FluxTransformerBlock,
)
from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

from .. import ops
from ..schedule import MODEL_MODES
from . import lifecycle
from .dit import GRID_KEY, PatchedFluxBlock, PatchedFluxSingleBlock, PatchedJointBlock, feed_forward, flux_grid
from .latent_step import CALL_KEY, Call, LatentStep, PlanBook, PlanStore, WholeBlock, begin, grid_at, pooled_sizes

CONFIG = ("ratio", "tofu_mode", "max_downsample", "sx", "sy", "use_rand", "merge_attn", "merge_crossattn",
          "merge_mlp", "prop_attn", "seed", "tofu_backend", "plan_reuse", "whole_block")
REUSE = ("none", "step")  # or an int k >= 1: keep each plan for k denoiser calls
MODES = MODEL_MODES + ("todo",)
BACKENDS = ops.BACKENDS
TRANSFORMERS = (PixArtTransformer2DModel, SD3Transformer2DModel, FluxTransformer2DModel)
# Defaults of the settings whose best value differs between models (None in patch()). UNets: tomesd's. The
# transformers': from the fidelity measured in bench/results/dit_cpu.md (docs/design.md §5.3): merging the MLP
# too costs 1.3-6x the error everywhere; proportional attention helps or is neutral in joint attention, where
# text keys compete with the merged image keys (SD3, Flux), and hurts MLERP in PixArt's image-only attention.
DEFAULTS = {UNet2DConditionModel: dict(merge_mlp=False, prop_attn=False),
            PixArtTransformer2DModel: dict(merge_mlp=False, prop_attn=False),
            SD3Transformer2DModel: dict(merge_mlp=False, prop_attn=True),
            FluxTransformer2DModel: dict(merge_mlp=False, prop_attn=True)}
FLUX_TOKENS = (64, 64)  # Flux has no configured sample size: its plan defaults to 1024 px (64x64 tokens)


def _base(module: nn.Module) -> type:
    """The diffusers class of a module, patched or not."""
    return getattr(type(module), "_tofu_base", type(module))


# --------------------------------------------------------------------------- the patched BasicTransformerBlock


class _PatchedBlock:
    """``BasicTransformerBlock.forward`` with merge / sub-layer / unmerge: the ``layer_norm`` blocks of UNets and
    the ``ada_norm_single`` blocks of PixArt (whose norms are modulated by the timestep embedding)."""

    _tofu_attrs = ("_tofu_layer",)  # (index in forward order, downsampling factor), set at patch time

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                timestep=None, cross_attention_kwargs=None, class_labels=None, added_cond_kwargs=None):
        kwargs = dict(cross_attention_kwargs or {})
        call = kwargs.pop(CALL_KEY, None)
        index, factor = self._tofu_layer
        mode = call.modes[index] if call is not None else None
        if mode is None:  # not patched in this call: diffusers' own block, bitwise
            return super().forward(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                   timestep, kwargs or None, class_labels, added_cond_kwargs)
        step = LatentStep(call, index, mode, hidden_states, grid_at(call, factor, hidden_states.shape[1]))
        step, (on_attn, on_cross, on_mlp) = begin(call, step)
        whole = isinstance(step, WholeBlock)  # the whole block on the merged tokens, its update unmerged once
        x = step.enter(hidden_states) if whole else hidden_states
        out = self._tofu_block(step, on_attn, on_cross, on_mlp, x, attention_mask, encoder_hidden_states,
                               encoder_attention_mask, timestep, kwargs)
        return step.leave(out, x, hidden_states) if whole else out

    def _tofu_block(self, step, on_attn, on_cross, on_mlp, hidden_states, attention_mask, encoder_hidden_states,
                    encoder_attention_mask, timestep, kwargs):
        changed = on_attn or not step.merging  # self-attention sees merged tokens, or (ToDo) pooled keys
        if attention_mask is not None and changed:
            raise ValueError("attention_mask (over all image tokens) cannot follow merged or pooled tokens: "
                             "pass none, or set ratio=0")
        pixart = self.norm_type == "ada_norm_single"
        if pixart:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
                self.scale_shift_table[None] + timestep.reshape(hidden_states.shape[0], 6, -1)).chunk(6, dim=1)

        norm = self.norm1(hidden_states)
        if pixart:
            norm = norm * (1 + scale_msa) + shift_msa
        bias = step.key_bias() if changed else None  # log(size) of the keys, or None: no bias at all
        mask = bias[:, None, :].to(norm.dtype) if bias is not None else attention_mask  # [B, 1, N_keys]: per key
        if step.merging:
            out = self.attn1(step.merge(norm, on_attn),
                             encoder_hidden_states=encoder_hidden_states if self.only_cross_attention else None,
                             attention_mask=mask, **kwargs)
        else:  # ToDo: the keys and values come from the pooled tokens (a linear projection commutes with pooling)
            out = self.attn1(norm, encoder_hidden_states=step.pool(norm), attention_mask=mask, **kwargs)
        if pixart:
            out = gate_msa * out
        hidden_states = step.back(out, on_attn, hidden_states)

        if self.attn2 is not None:
            norm = hidden_states if pixart else self.norm2(hidden_states)  # PixArt has no norm before it
            out = self.attn2(step.merge(norm, on_cross), encoder_hidden_states=encoder_hidden_states,
                             attention_mask=encoder_attention_mask, **kwargs)
            hidden_states = step.back(out, on_cross, hidden_states)

        if pixart:
            norm = self.norm2(hidden_states) * (1 + scale_mlp) + shift_mlp
        else:
            norm = self.norm3(hidden_states)
        out = feed_forward(self, self.ff, step.merge(norm, on_mlp))
        if pixart:
            out = gate_mlp * out
        return step.back(out, on_mlp, hidden_states)


# --------------------------------------------------------------------------- what can be patched


def _target(model: nn.Module) -> nn.Module:
    """The denoiser of a pipeline (``.unet`` / ``.transformer``) or ``model`` itself; TypeError if unsupported."""
    for name in ("unet", "transformer"):
        inner = getattr(model, name, None)
        if isinstance(inner, nn.Module):
            model = inner
            break
    if not isinstance(model, (UNet2DConditionModel,) + TRANSFORMERS):
        raise TypeError("tofu_triton.patch.diffusers needs a diffusers UNet2DConditionModel (SD 1.x, 2.x, SDXL), "
                        "PixArtTransformer2DModel, SD3Transformer2DModel or FluxTransformer2DModel, or a pipeline "
                        f"with one as .unet / .transformer; got {type(model).__module__}.{type(model).__name__}")
    return model


def _is_unet(model: nn.Module) -> bool:
    return isinstance(model, UNet2DConditionModel)


def _blocks(model: nn.Module) -> List[Tuple[nn.Module, int]]:
    """Every transformer block in forward order, with its downsampling factor (1 in a transformer).

    UNets: read from the structure: down blocks halve the resolution after
    each block with a downsampler, up blocks double it after each one with
    an upsampler; the middle block runs at the lowest resolution.
    """
    if isinstance(model, FluxTransformer2DModel):
        return [(blk, 1) for blk in list(model.transformer_blocks) + list(model.single_transformer_blocks)]
    if not _is_unet(model):
        return [(blk, 1) for blk in model.transformer_blocks]
    out, factor = [], 1

    def collect(block):
        for transformer in getattr(block, "attentions", None) or []:
            for blk in getattr(transformer, "transformer_blocks", []):
                if isinstance(blk, BasicTransformerBlock):
                    out.append((blk, factor))

    for block in model.down_blocks:
        collect(block)
        if getattr(block, "downsamplers", None):
            factor *= 2
    if model.mid_block is not None:
        collect(model.mid_block)
    for block in model.up_blocks:
        collect(block)
        if getattr(block, "upsamplers", None):
            factor //= 2
    return out


# The patched forward of each supported block class.
_BLOCK_MIXINS = {BasicTransformerBlock: _PatchedBlock, JointTransformerBlock: PatchedJointBlock,
                 FluxTransformerBlock: PatchedFluxBlock, FluxSingleTransformerBlock: PatchedFluxSingleBlock}
_BLOCK_CLASSES = {UNet2DConditionModel: (BasicTransformerBlock,), PixArtTransformer2DModel: (BasicTransformerBlock,),
                  SD3Transformer2DModel: (JointTransformerBlock,),
                  FluxTransformer2DModel: (FluxTransformerBlock, FluxSingleTransformerBlock)}


def _block_class(block: nn.Module) -> Optional[type]:
    """The supported diffusers block class ``block`` is (or subclasses without its own forward), else None."""
    base = _base(block)
    return next((cls for cls in _BLOCK_MIXINS if issubclass(base, cls) and base.forward is cls.forward), None)


def check_model(model: nn.Module) -> None:
    """Raise TypeError unless ``model`` (a denoiser or a pipeline) can be patched, naming what is not supported."""
    target = _target(model)
    kind = next(cls for cls in _BLOCK_CLASSES if isinstance(target, cls))
    blocks = _blocks(target)
    if not blocks:
        raise TypeError(f"this {kind.__name__} has no transformer blocks: nothing to merge")
    norm = "layer_norm" if kind is UNet2DConditionModel else "ada_norm_single"
    for i, (blk, _) in enumerate(blocks):
        if _block_class(blk) not in _BLOCK_CLASSES[kind]:
            raise TypeError(f"transformer block {i} is a {_base(blk).__name__} with its own forward; "
                            f"{kind.__name__} is supported with diffusers' "
                            f"{' / '.join(c.__name__ for c in _BLOCK_CLASSES[kind])}")
        if _block_class(blk) is BasicTransformerBlock and (blk.norm_type != norm or blk.pos_embed is not None
                                                           or hasattr(blk, "fuser")):
            raise TypeError(f"transformer block {i} has norm_type={blk.norm_type!r}"
                            f"{', a position embedding' if blk.pos_embed is not None else ''}"
                            f"{', gated (GLIGEN) attention' if hasattr(blk, 'fuser') else ''}; the "
                            f"{kind.__name__} step supports BasicTransformerBlock with norm_type={norm!r} only")


def _highest_attention(unet: nn.Module) -> int:
    """The smallest downsampling factor of a UNet's transformer blocks: 1 for SD 1.x/2.x, 2 for SDXL."""
    return min(factor for _, factor in _blocks(unet))


# --------------------------------------------------------------------------- settings


def _validate(model: nn.Module) -> None:
    """TypeError / ValueError naming the setting, for settings that are invalid or would merge nothing.
    Run when patching and at the start of every call (settings may change between calls)."""
    ratio = model.ratio
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ValueError(f"ratio must be a number in [0, 1), got {ratio!r}")
    if model.tofu_mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {model.tofu_mode!r}")
    for name in ("sx", "sy"):
        value = getattr(model, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    for name in ("use_rand", "merge_attn", "merge_crossattn", "merge_mlp", "prop_attn", "whole_block"):
        if not isinstance(getattr(model, name), bool):
            raise TypeError(f"{name} must be a bool, got {type(getattr(model, name)).__name__}")
    if isinstance(model.seed, bool) or not isinstance(model.seed, int):
        raise TypeError(f"seed must be an int or None, got {model.seed!r}")
    if model.tofu_backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {model.tofu_backend!r}")
    reuse = model.plan_reuse
    if not (isinstance(reuse, str) and reuse in REUSE
            or isinstance(reuse, int) and not isinstance(reuse, bool) and reuse >= 1):
        raise ValueError(f"reuse must be 'none', 'step' or an int k >= 1 (keep each plan for k denoiser calls), "
                         f"got {reuse!r}")
    if model.whole_block and model.tofu_mode == "todo":
        raise ValueError("whole_block merges tokens around whole blocks; mode='todo' merges none (it pools "
                         "self-attention's keys): use another mode or whole_block=False")
    name = _base(model).__name__
    if _is_unet(model):
        _validate_unet(model)
    else:
        if model.max_downsample is not None:
            raise ValueError(f"max_downsample does not apply to a {name}: all its blocks run on the one patch "
                             f"grid; leave it None (got {model.max_downsample!r})")
        if model.merge_crossattn and not isinstance(model, PixArtTransformer2DModel):
            raise ValueError(f"merge_crossattn does not apply to a {name}: its text tokens take part in joint "
                             "attention, which merge_attn covers; leave it False")
    flags = model.merge_attn or model.merge_crossattn or model.merge_mlp  # whole_block merges around all sub-layers
    if model.tofu_mode != "todo" and not model.whole_block and not flags:
        raise ValueError("merge_attn, merge_crossattn and merge_mlp are all False: nothing would merge "
                         "(use ratio=0 to switch merging off)")
    _check_attention(model)


def _validate_unet(unet: nn.Module) -> None:
    down = unet.max_downsample
    if down not in (1, 2, 4, 8):
        raise ValueError(f"max_downsample must be 1, 2, 4 or 8 (or None when patching), got {down!r}")
    highest = _highest_attention(unet)
    if down < highest:
        raise ValueError(f"max_downsample={down} reaches no transformer block of this UNet: its highest-resolution "
                         f"attention runs at 1/{highest} of the latent (SDXL: 1/2), so nothing would merge; use "
                         f"max_downsample={highest} or more (None when patching picks {highest})")
    if unet.prop_attn:
        raise ValueError("prop_attn does not apply to UNets: their step is tomesd's, which attends without sizes; "
                         "leave it False (it is for the diffusion transformers)")


def _check_attention(model: nn.Module) -> None:
    """Attention processors the patched blocks can work with (checked at each call: they can be swapped)."""
    if isinstance(model, (SD3Transformer2DModel, FluxTransformer2DModel)):
        wanted = JointAttnProcessor2_0 if isinstance(model, SD3Transformer2DModel) else FluxAttnProcessor
        for i, (blk, _) in enumerate(_blocks(model)):
            for attn in (blk.attn, getattr(blk, "attn2", None)):
                if attn is not None and type(attn.processor) is not wanted:
                    raise TypeError(f"block {i} attends with a {type(attn.processor).__name__}; merging blocks "
                                    "compute their attention themselves (with per-image rotary tables and key "
                                    f"sizes), which stands in for diffusers' default {wanted.__name__} only: set "
                                    "that back, or unpatch")
        return
    if not (model.prop_attn or model.tofu_mode == "todo"):
        return
    for i, (blk, _) in enumerate(_blocks(model)):
        attn = blk.attn1
        if model.prop_attn and type(attn.processor) not in (AttnProcessor2_0, AttnProcessor):
            raise TypeError(f"block {i}'s self-attention processor {type(attn.processor).__name__} may ignore the "
                            "log(size) bias prop_attn passes as its attention_mask; use AttnProcessor2_0 or "
                            "prop_attn=False")
        if model.tofu_mode == "todo" and (attn.norm_k is not None or attn.norm_cross or attn.group_norm is not None
                                          or attn.spatial_norm is not None):
            raise ValueError(f"block {i}'s self-attention normalises its keys or inputs, so pooling its input "
                             "would not be pooling its keys and values: mode='todo' is not supported here")


# --------------------------------------------------------------------------- plan and per-call state


def _modes(model: nn.Module) -> List[Optional[str]]:
    """What each block does in a call: "mean" | "mlerp" | "prune" | "todo", None = runs unpatched."""
    blocks = _blocks(model)
    modes: List[Optional[str]] = [None] * len(blocks)
    if model.ratio == 0:
        return modes
    limit = model.max_downsample if _is_unet(model) else 1
    mode = model.tofu_mode
    patched = [i for i, (blk, factor) in enumerate(blocks) if factor <= limit
               # ToDo pools self-attention's keys: a block whose first attention is cross-attention has none
               and not (mode == "todo" and getattr(blk, "only_cross_attention", False))]
    for k, i in enumerate(patched):
        if mode == "tofu":
            modes[i] = "prune" if k < len(patched) // 2 else "mlerp"
        else:
            modes[i] = "mean" if mode == "tome" else mode
    return modes


class BlockPlan(NamedTuple):
    """What one transformer block does (``tofu_triton.patch.plan`` of a patched denoiser)."""

    index: int  # position in forward order
    block: str  # its diffusers class
    downsample: int  # its resolution is the image's token grid divided by this (1 in a transformer)
    mode: Optional[str]  # "mean" | "mlerp" | "prune" | "todo"; None: runs unpatched
    tokens: int  # image tokens it gets for the plan's grid
    r: int  # tokens merged away (merge modes), or keys pooled away (todo)


def _grid_of(model: nn.Module, n_tokens: Union[None, int, Tuple[int, int]]) -> Tuple[int, int]:
    """(h, w) of the full-resolution token grid: ``n_tokens`` (a square count or (h, w)) or the model's default."""
    if n_tokens is None:
        if isinstance(model, FluxTransformer2DModel):
            return FLUX_TOKENS
        side = model.config.sample_size
        side = side // model.config.patch_size if not _is_unet(model) else side
        return side, side
    if isinstance(n_tokens, (tuple, list)) and len(n_tokens) == 2:
        h, w = (ops.check_int(name, v, low=1) for name, v in zip(("height", "width"), n_tokens))
        return h, w
    n = ops.check_int("n_tokens", n_tokens, low=1)
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"n_tokens={n} is not a square grid: pass the token grid as (height, width)")
    return side, side


def _plan_of(model: nn.Module, n_tokens: Union[None, int, Tuple[int, int]] = None) -> List[BlockPlan]:
    """Per block, for an image whose full-resolution token grid is ``n_tokens`` (a square count or (h, w); the
    latent's positions in a UNet, the patch grid in a transformer; default: the model's configured size)."""
    h, w = _grid_of(model, n_tokens)
    out = []
    for i, ((blk, factor), mode) in enumerate(zip(_blocks(model), _modes(model))):
        bh, bw = math.ceil(h / factor), math.ceil(w / factor)
        tokens, r = bh * bw, 0
        if mode == "todo":
            r = tokens - pooled_sizes(bh, bw, model.sy, model.sx).numel()
        elif mode is not None:
            nb = (bh // model.sy) * (bw // model.sx)
            r = min(int(tokens * model.ratio), tokens - nb) if nb else 0
        out.append(BlockPlan(i, _base(blk).__name__, factor, mode, tokens, r))
    return out


# reuse=k: each thread's plans of each patched model (a PlanStore per thread and model). A pipeline calls its
# denoiser from one thread, step after step, so a thread's calls are one denoising loop; threads serving other
# requests never see each other's plans. Dropped when the model is patched again (or collected).
_STORES: "weakref.WeakKeyDictionary[nn.Module, threading.local]" = weakref.WeakKeyDictionary()
_STORES_LOCK = threading.Lock()


def _plan_store(model: nn.Module) -> PlanStore:
    with _STORES_LOCK:
        local = _STORES.get(model)
        if local is None:
            local = _STORES[model] = threading.local()
    if not hasattr(local, "store"):
        local.store = PlanStore()
    return local.store


def _plans(model: nn.Module, device) -> Optional[PlanBook]:
    """The PlanBook of this call: None (``reuse="none"``), a fresh one (``"step"``), or over the thread's
    store (``k``), which a compiled graph or CUDA graph capture cannot follow (it reads and writes plans
    of earlier calls on the host)."""
    reuse = model.plan_reuse
    if reuse == "none":
        return None
    if reuse == "step":
        return PlanBook()
    if torch.compiler.is_compiling() or (torch.device(device).type == "cuda"
                                         and torch.cuda.is_current_stream_capturing()):
        raise ValueError(f"reuse={reuse} keeps plans across calls on the host, which torch.compile and CUDA graph "
                         "capture cannot follow: use reuse='step' (plans shared within a call) or 'none'")
    return _plan_store(model).book(reuse)


def _call(model: nn.Module, grid: Callable[[], Tuple[int, int]], timestep, device) -> Optional[Call]:
    """Validate the settings; the Call of this forward, or None when ``ratio`` is 0 (nothing patched runs).

    grid: returns the image's full-resolution token grid (only asked for when merging)."""
    _validate(model)
    if model.ratio == 0:
        return None
    height, width = grid()
    step = torch.as_tensor(timestep, device=device).reshape(-1)[:1].float()
    return Call(height, width, (step * 1000).round().to(torch.int64)[0], tuple(_modes(model)), model.ratio,
                model.sx, model.sy, model.use_rand, model.seed, (model.merge_attn, model.merge_crossattn,
                                                                 model.merge_mlp), model.prop_attn, model.tofu_backend,
                _plans(model, device), model.whole_block)


def _with_call(kwargs: Optional[dict], call: Optional[Call]) -> Optional[dict]:
    return kwargs if call is None else {**(kwargs or {}), CALL_KEY: call}


# --------------------------------------------------------------------------- patched models


class _PatchedUNet:
    """``UNet2DConditionModel.forward`` that hands its blocks the per-call state."""

    def forward(self, sample, timestep, encoder_hidden_states, class_labels=None, timestep_cond=None,
                attention_mask=None, cross_attention_kwargs=None, **kwargs):
        call = _call(self, lambda: tuple(sample.shape[-2:]), timestep, sample.device)
        return super().forward(sample, timestep, encoder_hidden_states, class_labels=class_labels,
                               timestep_cond=timestep_cond, attention_mask=attention_mask,
                               cross_attention_kwargs=_with_call(cross_attention_kwargs, call), **kwargs)


def _patch_grid(model: nn.Module, latent: Tensor) -> Tuple[int, int]:
    """The patch grid of a latent [B, C, H, W] (PixArt, SD3 embed it in p x p patches)."""
    p = model.config.patch_size
    return latent.shape[-2] // p, latent.shape[-1] // p


class _PatchedPixArt:
    """``PixArtTransformer2DModel.forward`` that hands its blocks the per-call state."""

    def forward(self, hidden_states, encoder_hidden_states=None, timestep=None, added_cond_kwargs=None,
                cross_attention_kwargs=None, **kwargs):
        call = _call(self, lambda: _patch_grid(self, hidden_states), timestep, hidden_states.device)
        return super().forward(hidden_states, encoder_hidden_states, timestep, added_cond_kwargs,
                               _with_call(cross_attention_kwargs, call), **kwargs)


class _PatchedSD3:
    """``SD3Transformer2DModel.forward`` that hands its blocks the per-call state."""

    def forward(self, hidden_states, encoder_hidden_states=None, pooled_projections=None, timestep=None,
                block_controlnet_hidden_states=None, joint_attention_kwargs=None, **kwargs):
        call = _call(self, lambda: _patch_grid(self, hidden_states), timestep, hidden_states.device)
        return super().forward(hidden_states, encoder_hidden_states, pooled_projections, timestep,
                               block_controlnet_hidden_states, _with_call(joint_attention_kwargs, call), **kwargs)


class _PatchedFlux:
    """``FluxTransformer2DModel.forward`` that hands its blocks the per-call state; the token grid comes from
    ``img_ids`` or ``joint_attention_kwargs["tofu_grid"]`` (see :func:`tofu_triton.patch.dit.flux_grid`)."""

    def forward(self, hidden_states, encoder_hidden_states=None, pooled_projections=None, timestep=None,
                img_ids=None, txt_ids=None, guidance=None, joint_attention_kwargs=None, **kwargs):
        if joint_attention_kwargs is not None and GRID_KEY in joint_attention_kwargs:
            joint_attention_kwargs = dict(joint_attention_kwargs)
            given = joint_attention_kwargs.pop(GRID_KEY)
        else:
            given = None
        call = _call(self, lambda: flux_grid(img_ids, hidden_states.shape[1], given), timestep, hidden_states.device)
        return super().forward(hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                               guidance, _with_call(joint_attention_kwargs, call), **kwargs)


_MODEL_MIXINS = {UNet2DConditionModel: _PatchedUNet, PixArtTransformer2DModel: _PatchedPixArt,
                 SD3Transformer2DModel: _PatchedSD3, FluxTransformer2DModel: _PatchedFlux}


def _parts(model: nn.Module):
    return [(blk, _BLOCK_MIXINS[_block_class(blk)], {"_tofu_layer": (i, factor)})
            for i, (blk, factor) in enumerate(_blocks(model))]


FAMILY = lifecycle.register(lifecycle.Family(
    name="diffusers", settings=CONFIG, target=_target, validate=_validate, plan=_plan_of, parts=_parts))


def patch(model: nn.Module, ratio: float = 0.5, mode: str = "tofu", max_downsample: Optional[int] = None,
          sx: int = 2, sy: int = 2, use_rand: bool = True, merge_attn: bool = True, merge_crossattn: bool = False,
          merge_mlp: Optional[bool] = None, prop_attn: Optional[bool] = None, seed: Optional[int] = None,
          backend: str = "auto", reuse: Union[str, int] = "none", whole_block: bool = False) -> nn.Module:
    """Patch a diffusers pipeline (``.unet`` / ``.transformer``) or denoiser in place; returns ``model``.

    Arguments as tomesd's ``apply_patch`` (see the module docstring), plus
    ``mode`` ("tofu" | "tome" | "mlerp" | "prune" | "todo"), ``prop_attn``
    (transformers: ``log(size)`` on merged keys), ``seed`` for the random
    destinations (None: drawn now), ``backend`` ("auto" | "triton" |
    "reference"), ``reuse`` ("none" | "step" | int k: compute each merge's
    plan once per resolution and call, or keep it for k calls; attribute
    ``plan_reuse``) and ``whole_block`` (merge once around whole blocks).
    None picks the model's default: ``max_downsample`` the highest
    resolution with attention (UNets; transformers take None only),
    ``merge_mlp`` and ``prop_attn`` from :data:`DEFAULTS` (on: SD3, Flux).
    Patching a patched model only updates the settings;
    settings it refuses leave it as it was.
    """
    check_model(model)
    target = _target(model)
    defaults = next(d for cls, d in DEFAULTS.items() if isinstance(target, cls))
    if max_downsample is None and _is_unet(target):
        max_downsample = _highest_attention(target)
    merge_mlp = defaults["merge_mlp"] if merge_mlp is None else merge_mlp
    prop_attn = defaults["prop_attn"] if prop_attn is None else prop_attn
    if seed is None:
        seed = random.SystemRandom().randrange(1 << 31)
    values = dict(zip(CONFIG, (ratio, mode, max_downsample, sx, sy, use_rand, merge_attn, merge_crossattn,
                               merge_mlp, prop_attn, seed, backend, reuse, whole_block)))
    mixin = next(m for cls, m in _MODEL_MIXINS.items() if isinstance(target, cls))
    lifecycle.apply(model, FAMILY, mixin, values)
    with _STORES_LOCK:  # plans kept by reuse=k were made under the previous patch
        _STORES.pop(target, None)
    return model
