"""``tofu_triton.patch.timm(model)``: ToFu / ToMe inside timm's ``VisionTransformer`` and ``Eva``.

Supported:

* ``VisionTransformer`` built from timm's ``Block`` and ``Attention``: ViT,
  DeiT (also distilled), register tokens, no class token, LayerScale,
  ``qk_norm``, SigLIP / SigLIP 2 (``vit_*_siglip_*``: no class token,
  attention pooling), pooling ``token`` / ``avg`` / ``max`` / ``avgmax`` /
  ``map``.
* ``Eva`` built from ``EvaBlock`` with ``EvaAttention`` or ``AttentionRope``:
  EVA-02 (``eva02_*``) and the ViTs with rotary positions (``vit_*_rope_*``),
  with one rotary table for all blocks; any of the pools above.

Patching (through :mod:`tofu_triton.patch.lifecycle`, shared by every
family) swaps the model's class for a subclass whose ``forward`` runs the
blocks through :func:`block_forward` / :func:`eva_block_forward` instead of
the blocks' own; parameters, hooks and ``state_dict`` are untouched, and
``tofu_triton.patch.unpatch`` swaps the class back.

What a patched block does (timm's pre-norm block, with one step added)::

    x = x + drop_path1(ls1(attention(norm1(x), bias=log(size))))  # SDPA kept
    x, size, bias = token reduction step (r, mode of this layer)   # docs/design.md §1, §3.1
    x = x + drop_path2(ls2(mlp(norm2(x))))

* The step is :func:`tofu_triton.ops.token_fusion_step` (through
  ``ops.block_step``: its argument checks run once per forward, not per block):
  on the GPU the launches the card measured fastest (docs/design.md §3.1) that
  average the keys over heads into the metric, match, select, merge, and write
  the sizes and the next attention's bias. The metric is the attention keys (after ``k_norm``, before any
  rotary rotation) averaged over heads.
* The first ``model.num_prefix_tokens`` tokens (class, register,
  distillation) are protected.
* Proportional attention adds ``log(size)`` to each key's logits only in
  layers where sizes can differ from 1, decided by
  :func:`tofu_triton.schedule.plan_layers` from the schedule, not the data,
  on the path :mod:`tofu_triton.attention` picks (``model.tofu_attention``,
  default ``"auto"``).
* Rotary positions (Eva): every token carries its grid position through the
  call. A merged token keeps its destination's, a pruned one leaves with its
  own, and each block rotates queries and keys by the table rows at the
  positions of the tokens it holds.
* Pooling: ``avg`` (and the mean half of ``avgmax``) is weighted by size
  over the non-prefix tokens; attention pooling (``map``) adds ``log(size)``
  to each key's logit, which is pooling over ``size`` copies of the token;
  ``token`` reads token 0; ``max`` is a plain max. Where sizes are all 1 by
  the schedule, timm's own pooling runs, so an ``r = 0`` model computes
  exactly what the unpatched one does.

Per-call state (sizes, positions, source matrix, token counts) lives in
local variables of one forward call and is returned from it
(:func:`forward_with_info`); nothing is written to modules during a forward,
so one patched model can run in several threads at once and
``torch.compile(fullgraph=True)`` sees no mutation and no data-dependent
branch. Configuration lives on the model as plain attributes that may be
changed between calls: ``model.r``, ``model.tofu_mode``,
``model.tofu_prune_layers``, ``model.tofu_prop_attn``,
``model.tofu_trace_source``, ``model.tofu_backend``, ``model.tofu_attention``.

Refused at patch time, with the reason: other model classes (BEiT's
relative position bias table cannot follow merged tokens; windowed attention
needs the full grid), other block or attention classes, mixed (per-layer)
rotary frequencies, grouped key/value heads, ``global_pool='prr'``, an
attention pool with its own position embedding. Not covered:
``forward_intermediates`` (runs the blocks unpatched), gradient
checkpointing (ignored: blocks always run one by one), user ``attn_mask`` /
``is_causal`` (refused at call), Eva patch dropout while training.
``model.forward_features`` returns the final tokens without their sizes, so
``model.forward_head(model.forward_features(x))`` pools unweighted; use
``model(x)`` or :func:`forward_with_info`.
"""
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from timm.layers import AttentionPoolLatent, AttentionRope, apply_rot_embed_cat
from timm.models.eva import Eva, EvaAttention, EvaBlock
from timm.models.vision_transformer import Attention, Block, VisionTransformer

from .. import ops
from ..attention import PATHS, sized_attention
from ..reference import Match, Step, gather_rows, log_size_bias
from ..schedule import LayerPlan, cached_plan, sized_after, token_counts
from . import lifecycle

POOLS = ("", "token", "avg", "max", "avgmax", "map")
CONFIG = ("r", "tofu_mode", "tofu_prune_layers", "tofu_prop_attn", "tofu_trace_source", "tofu_backend",
          "tofu_attention")


class TokenInfo(NamedTuple):
    """Per-call results besides the logits.

    size: [B, N_out, 1] float32, original patches per final token (prefix tokens 1).
    source: [B, N_out, N_patches] float32 0/1 or None: which original patches
        each final token holds (prefix rows are all 0; patches dropped by a
        ``prune`` step belong to no token).
    tokens: tokens entering each block, then the tokens leaving the last.
    """

    size: Tensor
    source: Optional[Tensor]
    tokens: List[int]


# --------------------------------------------------------------------------- checks


def check_model(model: nn.Module) -> None:
    """Raise TypeError, naming the model and the reason, unless this module can patch ``model``."""
    if isinstance(model, VisionTransformer):
        for i, blk in enumerate(model.blocks):
            if not isinstance(blk, Block) or type(blk).forward is not Block.forward:
                raise TypeError(f"block {i} is a {type(blk).__name__}; only timm's Block (pre-norm) is supported")
            if not isinstance(blk.attn, Attention) or type(blk.attn).forward is not Attention.forward:
                raise TypeError(f"block {i} has a {type(blk.attn).__name__} attention; "
                                "only timm's Attention is supported")
    elif isinstance(model, Eva):
        _check_eva(model)
    else:
        name = f"{type(model).__module__}.{type(model).__name__}"
        reason = ""
        if "beit" in name.lower():
            reason = " (BEiT's relative position bias is a table over token pairs that merged tokens cannot follow)"
        elif "sam" in name.lower() or "swin" in name.lower():
            reason = " (windowed attention needs the full token grid)"
        raise TypeError("tofu_triton.patch.timm needs a timm VisionTransformer (ViT, DeiT, SigLIP, registers, ...) "
                        f"or Eva (EVA-02, ViTs with rotary positions); got {name}{reason}")
    _check_pool(model)


def _check_eva(model: Eva) -> None:
    if getattr(model, "rope_mixed", False):
        raise TypeError(f"{type(model).__name__} uses mixed (per-layer learned) rotary frequencies; only one "
                        "rotary table for all blocks (EVA-02, vit_*_rope_*) is supported")
    if model.rope is not None and model.rope.get_embed().dim() != 2:
        raise TypeError(f"rotary embedding {type(model.rope).__name__} is not a [tokens, dim] table; "
                        "only RotaryEmbeddingCat-style tables can follow merged tokens")
    for i, blk in enumerate(model.blocks):
        if type(blk) is not EvaBlock or type(blk).forward is not EvaBlock.forward:
            raise TypeError(f"block {i} is a {type(blk).__name__}; only timm's EvaBlock (pre-norm) is supported")
        attn = blk.attn
        if type(attn) not in (EvaAttention, AttentionRope):
            raise TypeError(f"block {i} has a {type(attn).__name__} attention; EvaAttention or AttentionRope needed")
        if getattr(attn, "num_kv_groups", 1) > 1:
            raise TypeError(f"block {i} uses grouped key/value heads, which are not supported")


def _check_pool(model: nn.Module) -> None:
    if model.global_pool not in POOLS:
        raise TypeError(f"global_pool={model.global_pool!r} is not supported; supported: {POOLS}")
    pool = getattr(model, "attn_pool", None)
    if pool is not None:
        if type(pool) is not AttentionPoolLatent:
            raise TypeError(f"attention pooling {type(pool).__name__} is not supported (only AttentionPoolLatent, "
                            "global_pool='map', can weight merged tokens by size)")
        if pool.pos_embed is not None:
            raise TypeError("AttentionPoolLatent with its own position embedding needs all tokens in place")


def _validate_config(model: nn.Module) -> None:
    _plan(model, 1)  # r, mode and prune_layers
    if model.tofu_backend not in ops.BACKENDS:
        raise ValueError(f"backend must be one of {ops.BACKENDS}, got {model.tofu_backend!r}")
    if model.tofu_attention not in PATHS:
        raise ValueError(f"attention must be one of {PATHS}, got {model.tofu_attention!r}")
    for name in ("tofu_prop_attn", "tofu_trace_source"):
        if not isinstance(getattr(model, name), bool):
            raise TypeError(f"{name[5:]} must be a bool, got {type(getattr(model, name)).__name__}")


# --------------------------------------------------------------------------- one block


class Run(NamedTuple):
    """What every block of one forward call needs besides its own step."""

    protected: int  # leading tokens never merged (class, register, distillation)
    prop_attn: bool  # proportional attention
    attention: str  # path of the sized attention (tofu_triton.attention.PATHS)
    triton: bool  # the step runs the Triton kernels (ops.step_backend: the backend against the device, once)


def _attend(attn: nn.Module, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], path: str) -> Tensor:
    """timm's attention core (SDPA, or its eager softmax) with an additive key bias [B, 1, 1, N] or None."""
    if attn.fused_attn:
        return sized_attention(q, k, v, bias, attn.attn_drop.p if attn.training else 0.0, path)
    scores = (q * attn.scale) @ k.transpose(-2, -1)
    if bias is not None:
        scores = scores + bias
    return attn.attn_drop(scores.softmax(dim=-1)) @ v


def attention_forward(attn: Attention, x: Tensor, bias: Optional[Tensor], path: str = "auto") -> Tuple[Tensor, Tensor]:
    """timm's ``Attention.forward`` with proportional attention's bias; also returns the keys.

    x: [B, N, C]; bias: log(size) [B, 1, 1, N] or None. Returns (out [B, N,
    C_out], k [B, heads, N, head_dim] after k_norm). Same ops in the same
    order as timm's, so with ``bias=None`` the output is bitwise timm's.
    """
    B, N, _ = x.shape
    gate = getattr(attn, "gate", None)
    gate = gate(x).sigmoid() if gate is not None else None
    attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = _attend(attn, q, k, v, bias, path)
    out = out.transpose(1, 2).reshape(B, N, attn_dim)
    out = attn.norm(out) if hasattr(attn, "norm") else out
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), k


def merge_source(source: Tensor, match: Match, mode: str) -> Tensor:
    """Carry a 0/1 source matrix [B, N, P] through one step (-> [B, N - r, P]).

    Token order as merge_tokens: [prefix, unmerged A, B]. Through ``prune``
    a B token keeps its own patches; through ``mean``/``mlerp`` it holds the
    union of its own and its sources' patches.
    """
    if match.r == 0:
        return source
    p, width = match.protected, source.shape[-1]
    a, b = source[:, p::2], source[:, p + 1 :: 2]
    if mode != "prune":
        dst = match.dst_idx[..., None].expand(-1, -1, width)
        b = b.scatter_reduce(1, dst, gather_rows(a, match.src_idx), "amax")
    return torch.cat([source[:, :p], gather_rows(a, match.unm_idx), b], dim=1)


def reduce(x: Tensor, k: Tensor, size: Optional[Tensor], step: LayerPlan, bias_dtype: Optional[torch.dtype],
           run: Run, with_match: bool) -> Step:
    """The block's step (docs/design.md §1, §3.1): x [B, N, C], keys k [B, heads, N, D],
    size [B, N, 1] or None (all ones); ``bias_dtype``: write the next attention's bias;
    ``with_match``: the caller needs the match (source tracing, rotary positions)."""
    return ops.block_step(x, k, step.r, size, step.mode, run.protected, bias_dtype, run.triton, with_match)


def block_forward(
    blk: Block, x: Tensor, size: Optional[Tensor], bias: Optional[Tensor], source: Optional[Tensor],
    step: LayerPlan, bias_dtype: Optional[torch.dtype], run: Run,
) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """One patched block: attention, the token-reduction step, MLP.

    x: [B, N, C]; size: [B, N, 1] float32 or None (all ones so far); bias:
    log(size) [B, 1, 1, N] for this block's attention, or None; source:
    [B, N, P] or None. ``step`` (from plan_layers) fixes r, mode and whether
    the bias is used; ``bias_dtype``: whether (and in what dtype) the step
    writes the next block's bias. Returns (x, size, bias, source) for
    N - step.r tokens.
    """
    out, k = attention_forward(blk.attn, blk.norm1(x), bias if run.prop_attn and step.sized else None, run.attention)
    x = x + blk.drop_path1(blk.ls1(out))
    if step.r > 0:
        res = reduce(x, k, size, step, bias_dtype, run, with_match=source is not None)
        x, size, bias = res.x, res.size, res.bias
        if source is not None:
            source = merge_source(source, res.match, step.mode)
    x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return x, size, bias, source


# --------------------------------------------------------------------------- Eva blocks (rotary positions)


def rope_attention_forward(attn: nn.Module, x: Tensor, rope: Optional[Tensor],
                           bias: Optional[Tensor], path: str = "auto") -> Tuple[Tensor, Tensor]:
    """timm's ``EvaAttention`` / ``AttentionRope`` forward with proportional attention's bias;
    also returns the keys.

    x: [B, N, C]; rope: the rotary table for the N - prefix tokens, [N', D]
    or [B, 1, N', D]; bias: log(size) [B, 1, 1, N] or None. Returns (out [B,
    N, C], k [B, heads, N, head_dim] after k_norm and before the rotation:
    the metric compares content, not position). Same ops in the same order
    as timm's, so with ``bias=None`` the output is bitwise timm's.
    """
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    if attn.qkv is not None:
        q_bias = getattr(attn, "q_bias", None)
        if q_bias is None:
            qkv = attn.qkv(x)
        else:
            qkv_bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
            if attn.qkv_bias_separate:
                qkv = attn.qkv(x)
                qkv += qkv_bias
            else:
                qkv = F.linear(x, weight=attn.qkv.weight, bias=qkv_bias)
        q, k, v = qkv.reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q = attn.q_proj(x).reshape(B, N, attn.num_heads, -1).transpose(1, 2)
        k = attn.k_proj(x).reshape(B, N, attn.num_heads, -1).transpose(1, 2)
        v = attn.v_proj(x).reshape(B, N, attn.num_heads, -1).transpose(1, 2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    metric_keys = k
    if rope is not None:
        npt, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
        q = torch.cat([q[:, :, :npt, :], apply_rot_embed_cat(q[:, :, npt:, :], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :npt, :], apply_rot_embed_cat(k[:, :, npt:, :], rope, half=half)], dim=2).type_as(v)
    out = attn.norm(_attend(attn, q, k, v, bias, path).transpose(1, 2).reshape(B, N, -1))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), metric_keys


def merge_positions(pos: Tensor, match: Match) -> Tensor:
    """Grid positions [B, N - p] (int64) of the non-prefix tokens through one step.

    A merged token keeps its destination's position; a pruned or merged
    source leaves with its own. Token order as merge_tokens: [unmerged A, B].
    """
    if match.r == 0:
        return pos
    a, b = pos[:, 0::2], pos[:, 1::2]
    return torch.cat([a.gather(1, match.unm_idx), b], dim=1)


def eva_block_forward(
    blk: EvaBlock, x: Tensor, size: Optional[Tensor], bias: Optional[Tensor], source: Optional[Tensor],
    pos: Optional[Tensor], rope: Optional[Tensor], step: LayerPlan, bias_dtype: Optional[torch.dtype], run: Run,
) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """One patched ``EvaBlock``: rotary attention, the token-reduction step, MLP.

    As :func:`block_forward`, plus pos: [B, N - protected] grid positions of
    the tokens (None while they are still all in place); rope: the model's
    rotary table [N_patches, D] or None. Each block rotates its queries and
    keys by the rows of the table at the positions of the tokens it has.
    Returns (x, size, bias, source, pos) for N - step.r tokens.
    """
    block_rope = rope if rope is None or pos is None else rope[pos].unsqueeze(1)  # [B, 1, N', D]
    out, k = rope_attention_forward(blk.attn, blk.norm1(x), block_rope,
                                    bias if run.prop_attn and step.sized else None, run.attention)
    x = x + blk.drop_path1(out if blk.gamma_1 is None else blk.gamma_1 * out)
    if step.r > 0:
        res = reduce(x, k, size, step, bias_dtype, run, with_match=source is not None or rope is not None)
        x, size, bias = res.x, res.size, res.bias
        if source is not None:
            source = merge_source(source, res.match, step.mode)
        if rope is not None:
            if pos is None:
                pos = torch.arange(rope.shape[0], device=x.device).expand(x.shape[0], -1)
            pos = merge_positions(pos, res.match)
    mlp = blk.mlp(blk.norm2(x))
    x = x + blk.drop_path2(mlp if blk.gamma_2 is None else blk.gamma_2 * mlp)
    return x, size, bias, source, pos


# --------------------------------------------------------------------------- the model


def _plan(model: VisionTransformer, n_tokens: int) -> Tuple[LayerPlan, ...]:
    return cached_plan(n_tokens, model.num_prefix_tokens, len(model.blocks), model.r, model.tofu_mode,
                       model.tofu_prune_layers)


def _plan_or_default(model: VisionTransformer, n_tokens: Optional[int]) -> List[LayerPlan]:
    if n_tokens is None:
        n_tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    return list(_plan(model, n_tokens))


def _pool(model: nn.Module, x: Tensor, size: Tensor, sized: bool) -> Tensor:
    if not sized or model.global_pool in ("", "token", "max"):
        return model.pool(x)  # timm's own: sizes are all 1 or do not matter
    # VisionTransformer pools over the non-prefix tokens unless pool_include_prefix;
    # Eva's attention pool sees every token, its average the non-prefix ones.
    if getattr(model, "attn_pool", None) is not None:
        p = 0 if isinstance(model, Eva) or model.pool_include_prefix else model.num_prefix_tokens
        # Attention pooling with sizes: log(size) on each key's logit, as in the blocks.
        return model.attn_pool(x[:, p:], attn_mask=log_size_bias(size[:, p:], x.dtype))
    p = 0 if getattr(model, "pool_include_prefix", False) else model.num_prefix_tokens
    tokens, weight = x[:, p:], size[:, p:]
    mean = ((tokens * weight).sum(dim=1) / weight.sum(dim=1)).to(x.dtype)
    if model.global_pool == "avg":
        return mean
    return 0.5 * (tokens.amax(dim=1) + mean)  # avgmax


def _embed(model: nn.Module, images: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
    """Tokens before the first block, as timm computes them, and the rotary table (Eva) or None."""
    x = model.patch_embed(images)
    if isinstance(model, Eva):
        if model.patch_drop is not None and model.training:
            raise NotImplementedError("patch dropout while training is not supported by a ToFu-patched Eva")
        x, rope = model._pos_embed(x)
        return model.norm_pre(x), rope
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    return model.norm_pre(x), None


def _features(model: nn.Module, images: Tensor, trace_source: bool):
    """Embedding, the patched blocks and the final norm: (x, size or None, source, plan).

    Sizes start as None (all ones: no tensor to build) and the attention bias
    as None; each step returns the new sizes, and the bias when the next
    block's attention uses one.
    """
    x, rope = _embed(model, images)
    batch, n_tokens, _ = x.shape
    protected = model.num_prefix_tokens
    steps = _plan(model, n_tokens)
    if model.tofu_attention not in PATHS:
        raise ValueError(f"tofu_attention must be one of {PATHS}, got {model.tofu_attention!r}")
    # What every block's step would check, once per forward: the backend against the device, the dtype
    # (only where a step runs: an r = 0 model never checks).
    triton = any(s.r > 0 for s in steps) and ops.step_backend(x, model.tofu_backend)
    run = Run(protected, model.tofu_prop_attn, model.tofu_attention, triton)
    # The dtype of the bias each step writes for the next block, None where that block's attention needs none.
    bias_dtypes = [x.dtype if run.prop_attn and nxt.sized else None for nxt in steps[1:]] + [None]
    size = bias = source = pos = None
    if trace_source:
        n_patches = n_tokens - protected
        eye = torch.eye(n_patches, dtype=torch.float32, device=x.device)
        source = torch.cat([eye.new_zeros(protected, n_patches), eye]).expand(batch, -1, -1)
    eva = isinstance(model, Eva)
    for blk, step, bias_dtype in zip(model.blocks, steps, bias_dtypes):
        if eva:
            x, size, bias, source, pos = eva_block_forward(
                blk, x, size, bias, source, pos, rope, step, bias_dtype, run)
        else:
            x, size, bias, source = block_forward(blk, x, size, bias, source, step, bias_dtype, run)
    return model.norm(x), size, source, steps


_OWN_HEADS = (VisionTransformer.forward_head, Eva.forward_head)


def forward_with_info(
    model: nn.Module, images: Tensor, trace_source: Optional[bool] = None, pre_logits: bool = False
) -> Tuple[Tensor, TokenInfo]:
    """Run a patched model once: (logits, :class:`TokenInfo`).

    images: [B, 3, H, W]. trace_source: record the source matrix (default:
    the model's ``tofu_trace_source``). pre_logits: return the pooled
    features instead of the logits. Reentrant: all state is local.
    """
    model = lifecycle.require_patched(model)
    if trace_source is None:
        trace_source = model.tofu_trace_source
    x, size, source, steps = _features(model, images, trace_source)
    if size is None:  # no step removed a token
        size = torch.ones(*x.shape[:2], 1, dtype=torch.float32, device=x.device)
    if type(model)._tofu_base.forward_head in _OWN_HEADS:
        out = model.head_drop(model.fc_norm(_pool(model, x, size, sized_after(steps))))
        out = out if pre_logits else model.head(out)
    else:  # e.g. DeiT's distilled head: reads prefix tokens only, sizes do not matter
        out = model.forward_head(x, pre_logits=pre_logits)
    return out, TokenInfo(size, source, token_counts(steps))


def trace(model: VisionTransformer, images: Tensor) -> Tuple[Tensor, Tensor]:
    """(logits, source [B, N_out, N_patches]) of one call of a patched model."""
    logits, info = forward_with_info(model, images, trace_source=True)
    return logits, info.source


class _Patched:
    """Methods of the patched subclass (mixed in before the original class)."""

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        _no_mask(attn_mask, is_causal)
        return forward_with_info(self, x, trace_source=False)[0]

    def forward_features(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        """Final tokens [B, N_out, C] (their sizes are dropped; see module docstring)."""
        _no_mask(attn_mask, is_causal)
        return _features(self, x, trace_source=False)[0]


def _no_mask(attn_mask, is_causal) -> None:
    if attn_mask is not None or is_causal:
        raise NotImplementedError("a ToFu-patched ViT does not take attn_mask/is_causal (tokens move between layers)")


FAMILY = lifecycle.register(lifecycle.Family(
    name="timm", settings=CONFIG, target=lambda model: model, validate=_validate_config, plan=_plan_or_default))


def patch(
    model: VisionTransformer, r=16, mode="tofu", prune_layers: Optional[int] = None,
    prop_attn: bool = True, trace_source: bool = False, backend: str = "auto", attention: str = "auto",
) -> VisionTransformer:
    """Patch a timm ``VisionTransformer`` in place for ToFu/ToMe and return it.

    r: int, list or (r, inflect) (see :func:`tofu_triton.schedule.parse_r`).
    mode: "tofu" | "tome" | "prune" | "mlerp" or a list of op modes, one per
    layer (see :func:`tofu_triton.schedule.parse_modes`). prune_layers:
    "tofu" prunes in this many first blocks (default depth // 2).
    prop_attn: proportional attention. trace_source: default of
    :func:`forward_with_info`'s ``trace_source``. backend: "auto" |
    "triton" | "reference". attention: the path of proportional attention
    (:data:`tofu_triton.attention.PATHS`; "auto" picks it per device, see
    :func:`tofu_triton.attention.choose`). Patching a patched model only
    updates these; settings the model refuses leave it as it was.
    """
    check_model(model)
    values = dict(zip(CONFIG, (r, mode, prune_layers, prop_attn, trace_source, backend, attention)))
    return lifecycle.apply(model, FAMILY, _Patched, values)
