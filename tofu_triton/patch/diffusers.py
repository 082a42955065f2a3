"""``tofu_triton.patch.diffusers``: ToFu / ToMe inside Stable Diffusion UNets (tomesd's step).

Supported: diffusers' ``UNet2DConditionModel`` (SD 1.x, 2.x, SDXL) whose
transformer blocks are ``BasicTransformerBlock`` with ``norm_type="layer_norm"``,
passed directly or inside a pipeline (anything with ``.unet``). The argument
names and defaults are tomesd's ``apply_patch``, so a tomesd user changes one
line::

    tomesd.apply_patch(pipe, ratio=0.5)              # before
    tofu_triton.patch.diffusers(pipe, ratio=0.5)     # after (mode="tofu"; mode="tome" is tomesd's merge)

In every patched block (those whose resolution is at most ``max_downsample``
times below the latent's), tokens are the row-major grid of the latent at the
block's resolution. Each full ``sy x sx`` cell gives one destination, the
other tokens are sources; ``r = int(N * ratio)`` sources merge into their most
similar destination (cosine on the block's input hidden states), the
sub-layer runs on the ``N - r`` tokens, and the result is unmerged back to
all ``N`` positions (docs/design.md §5). Merging happens before
self-attention (``merge_attn``), and optionally before cross-attention
(``merge_crossattn``) and the MLP (``merge_mlp``). Modes: ``tome`` (mean, as
tomesd), ``mlerp``, ``prune``, ``tofu`` (prune in the first half of the
patched blocks in forward order, MLERP after).

Per-call state: the latent's height and width, and the denoising step, travel
with each call inside ``cross_attention_kwargs`` (under the key
``"tofu_triton"``, removed before any attention processor sees it), so one
patched UNet can serve several threads at once; nothing is written to modules
during a forward. ``use_rand`` picks each cell's destination with a
counter-based hash of ``(seed, step, block, cell)``: the same choice for every
image of a batch, different across steps and blocks, reproducible for a given
``seed`` (``None``: one drawn at patch time), and free of generator state, so
threads cannot disturb each other. Settings are attributes of the UNet,
changeable between calls: ``ratio``, ``tofu_mode``, ``max_downsample``,
``sx``, ``sy``, ``use_rand``, ``merge_attn``, ``merge_crossattn``,
``merge_mlp``, ``seed``, ``tofu_backend``.

The step runs through ``tofu_triton.ops.spatial_match`` / ``spatial_merge`` /
``spatial_unmerge``: fused Triton kernels on CUDA (three launches to merge, one
per unmerge, which also adds the block's residual), the PyTorch reference
(``tofu_triton.reference.spatial_*``) on the CPU (``backend="auto"``).
"""
import math
import random
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

from .. import ops
from ..reference import Partition, SpatialMatch
from ..schedule import MODEL_MODES
from . import lifecycle

CONFIG = ("ratio", "tofu_mode", "max_downsample", "sx", "sy", "use_rand", "merge_attn", "merge_crossattn",
          "merge_mlp", "seed", "tofu_backend")
CALL_KEY = "tofu_triton"
BACKENDS = ops.BACKENDS


class Call(NamedTuple):
    """What one UNet call tells its blocks (travels in ``cross_attention_kwargs``): the
    latent's size and step, and the settings as they were when the call began."""

    height: int  # latent height and width, in tokens at full resolution
    width: int
    step: Tensor  # int64 scalar: the denoising step, for the random destinations
    modes: Tuple[Optional[str], ...]  # op mode of each block in forward order; None = not patched
    ratio: float
    sx: int
    sy: int
    use_rand: bool
    seed: int
    merges: Tuple[bool, bool, bool]  # merge before self-attention, cross-attention, MLP
    backend: str


# --------------------------------------------------------------------------- checks and settings


def _unet(model: nn.Module) -> nn.Module:
    unet = getattr(model, "unet", model)
    if not isinstance(unet, UNet2DConditionModel):
        raise TypeError("tofu_triton.patch.diffusers needs a diffusers UNet2DConditionModel or a pipeline with "
                        f".unet (SD 1.x, 2.x, SDXL); got {type(model).__module__}.{type(model).__name__}")
    return unet


def check_model(model: nn.Module) -> None:
    """Raise TypeError unless ``model`` (a UNet or a pipeline) can be patched, naming what is not supported."""
    blocks = _blocks(_unet(model))
    if not blocks:
        raise TypeError("this UNet has no transformer blocks: nothing to merge")
    for i, (blk, _) in enumerate(blocks):
        if type(blk).forward is not BasicTransformerBlock.forward:
            raise TypeError(f"transformer block {i} is a {type(blk).__name__} with its own forward; "
                            "only diffusers' BasicTransformerBlock is supported")
        if blk.norm_type != "layer_norm" or blk.pos_embed is not None:
            raise TypeError(f"transformer block {i} has norm_type={blk.norm_type!r}"
                            f"{' and a position embedding' if blk.pos_embed is not None else ''}; "
                            "the Stable Diffusion step supports the layer_norm blocks of SD 1.x/2.x/SDXL")


def _validate(unet: nn.Module) -> None:
    ratio = unet.ratio
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ValueError(f"ratio must be a number in [0, 1), got {ratio!r}")
    if unet.tofu_mode not in MODEL_MODES:
        raise ValueError(f"mode must be one of {MODEL_MODES}, got {unet.tofu_mode!r}")
    if unet.max_downsample not in (1, 2, 4, 8):
        raise ValueError(f"max_downsample must be 1, 2, 4 or 8, got {unet.max_downsample!r}")
    for name in ("sx", "sy"):
        value = getattr(unet, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    for name in ("use_rand", "merge_attn", "merge_crossattn", "merge_mlp"):
        if not isinstance(getattr(unet, name), bool):
            raise TypeError(f"{name} must be a bool, got {type(getattr(unet, name)).__name__}")
    if isinstance(unet.seed, bool) or not isinstance(unet.seed, int):
        raise TypeError(f"seed must be an int or None, got {unet.seed!r}")
    if unet.tofu_backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {unet.tofu_backend!r}")


def _blocks(unet: nn.Module) -> List[Tuple[nn.Module, int]]:
    """Every BasicTransformerBlock in forward order, with its downsampling factor.

    Read from the UNet's structure: down blocks halve the resolution after
    each block with a downsampler, up blocks double it after each one with
    an upsampler; the middle block runs at the lowest resolution.
    """
    out, factor = [], 1

    def collect(block):
        for transformer in getattr(block, "attentions", None) or []:
            for blk in getattr(transformer, "transformer_blocks", []):
                if isinstance(blk, BasicTransformerBlock):
                    out.append((blk, factor))

    for block in unet.down_blocks:
        collect(block)
        if getattr(block, "downsamplers", None):
            factor *= 2
    if unet.mid_block is not None:
        collect(unet.mid_block)
    for block in unet.up_blocks:
        collect(block)
        if getattr(block, "upsamplers", None):
            factor //= 2
    return out


class BlockPlan(NamedTuple):
    """What one transformer block does (``tofu_triton.patch.plan`` of a patched UNet)."""

    index: int  # position in forward order
    downsample: int  # its resolution is the latent's divided by this
    mode: Optional[str]  # op mode of its step; None: not patched (downsample > max_downsample)


def _plan(unet: nn.Module) -> List[Optional[str]]:
    """Op mode of each transformer block in forward order (None: not patched)."""
    factors = [f for _, f in _blocks(unet)]
    patched = [i for i, f in enumerate(factors) if f <= unet.max_downsample]
    mode = unet.tofu_mode
    modes: List[Optional[str]] = [None] * len(factors)
    for k, i in enumerate(patched):
        if mode == "tofu":
            modes[i] = "prune" if k < len(patched) // 2 else "mlerp"
        else:
            modes[i] = "mean" if mode == "tome" else mode
    return modes


# --------------------------------------------------------------------------- the patched modules


def _grid(call: Call, factor: int, n: int) -> Tuple[int, int]:
    h, w = math.ceil(call.height / factor), math.ceil(call.width / factor)
    if h * w != n:
        raise ValueError(f"a transformer block at 1/{factor} resolution got {n} tokens, but a {call.height}x"
                         f"{call.width} latent gives {h}x{w} there: this UNet's layout is not supported")
    return h, w


class _PatchedBlock:
    """``BasicTransformerBlock.forward`` with merge / sub-layer / unmerge (layer_norm blocks)."""

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
        n = hidden_states.shape[1]
        h, w = _grid(call, factor, n)
        backend = call.backend
        partition = ops.spatial_partition(h, w, call.sx, call.sy, seed=call.seed if call.use_rand else None,
                                          step=call.step, block=index, device=hidden_states.device, backend=backend)
        merge = _Merge(ops.spatial_match(hidden_states, partition, int(n * call.ratio), backend), partition, mode,
                       backend)
        on_attn, on_cross, on_mlp = call.merges

        norm = merge(self.norm1(hidden_states), on_attn)
        out = self.attn1(norm, encoder_hidden_states=encoder_hidden_states if self.only_cross_attention else None,
                         attention_mask=attention_mask, **kwargs)
        hidden_states = merge.back(out, on_attn, hidden_states)
        if self.attn2 is not None:
            norm = merge(self.norm2(hidden_states), on_cross)
            out = self.attn2(norm, encoder_hidden_states=encoder_hidden_states,
                             attention_mask=encoder_attention_mask, **kwargs)
            hidden_states = merge.back(out, on_cross, hidden_states)
        norm = merge(self.norm3(hidden_states), on_mlp)
        if self._chunk_size is not None:
            from diffusers.models.attention import _chunked_feed_forward

            out = _chunked_feed_forward(self.ff, norm, self._chunk_dim, self._chunk_size)
        else:
            out = self.ff(norm)
        return merge.back(out, on_mlp, hidden_states)


class _Merge:
    """m(.) and u(.) + residual of one block call; an off flag makes m the identity and u a plain add."""

    def __init__(self, match: SpatialMatch, partition: Partition, mode: str, backend: str):
        self.match, self.partition, self.mode, self.backend = match, partition, mode, backend

    def __call__(self, x: Tensor, on: bool) -> Tensor:
        return ops.spatial_merge(x, self.match, self.partition, self.mode, self.backend) if on else x

    def back(self, y: Tensor, on: bool, residual: Tensor) -> Tensor:
        if not on:
            return y + residual
        return ops.spatial_unmerge(y, self.match, self.partition, residual, self.backend)


class _PatchedUNet:
    """``UNet2DConditionModel.forward`` that hands its blocks the per-call state."""

    def forward(self, sample, timestep, encoder_hidden_states, class_labels=None, timestep_cond=None,
                attention_mask=None, cross_attention_kwargs=None, **kwargs):
        if self.ratio > 0:
            step = torch.as_tensor(timestep, device=sample.device).reshape(-1)[:1].float()
            call = Call(sample.shape[-2], sample.shape[-1], (step * 1000).round().to(torch.int64)[0],
                        tuple(_plan(self)), self.ratio, self.sx, self.sy, self.use_rand, self.seed,
                        (self.merge_attn, self.merge_crossattn, self.merge_mlp), self.tofu_backend)
            cross_attention_kwargs = {**(cross_attention_kwargs or {}), CALL_KEY: call}
        return super().forward(sample, timestep, encoder_hidden_states, class_labels=class_labels,
                               timestep_cond=timestep_cond, attention_mask=attention_mask,
                               cross_attention_kwargs=cross_attention_kwargs, **kwargs)


def _parts(unet: nn.Module):
    return [(blk, _PatchedBlock, {"_tofu_layer": (i, factor)}) for i, (blk, factor) in enumerate(_blocks(unet))]


def _plan_of(unet: nn.Module, n_tokens: Optional[int] = None) -> List[BlockPlan]:
    factors = [f for _, f in _blocks(unet)]
    return [BlockPlan(i, f, m) for i, (f, m) in enumerate(zip(factors, _plan(unet)))]


FAMILY = lifecycle.register(lifecycle.Family(
    name="diffusers", settings=CONFIG, target=_unet, validate=_validate, plan=_plan_of, parts=_parts))


def patch(model: nn.Module, ratio: float = 0.5, mode: str = "tofu", max_downsample: int = 1, sx: int = 2,
          sy: int = 2, use_rand: bool = True, merge_attn: bool = True, merge_crossattn: bool = False,
          merge_mlp: bool = False, seed: Optional[int] = None, backend: str = "auto") -> nn.Module:
    """Patch a diffusers pipeline (``.unet``) or ``UNet2DConditionModel`` in place; returns ``model``.

    Arguments as tomesd's ``apply_patch`` (see the module docstring), plus
    ``mode`` ("tofu" | "tome" | "mlerp" | "prune"), ``seed`` for the random
    destinations (None: drawn now) and ``backend`` ("auto" | "triton" | "reference").
    Patching a patched model only updates the settings.
    """
    check_model(model)
    if seed is None:
        seed = random.SystemRandom().randrange(1 << 31)
    values = dict(zip(CONFIG, (ratio, mode, max_downsample, sx, sy, use_rand, merge_attn, merge_crossattn,
                               merge_mlp, seed, backend)))
    return lifecycle.apply(model, FAMILY, _PatchedUNet, values)
