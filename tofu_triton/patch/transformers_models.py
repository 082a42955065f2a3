"""ToFu / ToMe inside Hugging Face ``transformers`` encoders (BERT, ViT, CLIP vision, DINOv2).

Supported (checked against transformers 5.x; the layer code is read from its
submodules, so a release that renames them is refused, not silently run):

* ``BertModel`` (encoder only: what sentence-transformers loads, e.g.
  all-MiniLM-L6-v2), protected prefix: ``[CLS]``.
* ``ViTModel`` and ``ViTForImageClassification`` (its inner ``.vit`` is
  patched; the classifier reads ``[CLS]``), protected prefix: ``[CLS]``.
* ``CLIPVisionModel`` (class token protected; ``pooler_output`` is
  ``post_layernorm`` of it, as unpatched).
* ``Dinov2Model`` (``[CLS]`` protected; ``pooler_output`` = ``[CLS]``).

Anything else (``CLIPModel``, ``Dinov2ForImageClassification`` whose head
mean-pools patch tokens unweighted, DINOv2 with registers, BERT decoders /
cross-attention, ...) raises TypeError at patch time.

Patching swaps the base model's class for a cached subclass whose
``forward`` runs the embeddings, then the layers through this module's own
layer function, which calls the layer's submodules (projections, output
dense/LayerNorm, MLP) and the attention function transformers selected
(``config._attn_implementation``: ``"sdpa"`` or ``"eager"``; others, e.g.
``"flex_attention"`` or ``"flash_attention_2"``, are refused at patch time, and
at call time if set after patching, since they cannot take a float mask). A patched layer::

    attention with an additive float mask  (padding keys: -inf-like; log(size) when sized)
    token reduction step (docs/design.md §1), metric = keys averaged over heads
    the rest of the layer (BERT: intermediate/output; ViT: LayerNorm + MLP)

BERT is post-norm, so the step sits after ``attention.output`` (dense +
residual + LayerNorm) and before ``intermediate``; ViT is pre-norm, the step
sits after the attention residual, as in timm.

Padding (BERT): a padded token has size 0. Consequences, all exact by
construction and tested:

* it never receives attention (its key gets ``finfo.min`` in the mask);
* its metric is the zero vector while real tokens get ``[k/|k|, 1]``, so
  scores real-real are ``(1 + cos)/2 >= 0`` (same order as plain cosine),
  and anything with a pad scores 0: a real A token never picks a padded B
  token while a real B exists, and padded A tokens rank below every real A
  token, so they are only removed once no real A token is left to merge;
* before each step padded rows are zeroed, so when a padded token is
  merged into a real one it adds nothing to the mean (size 0) nor to the
  mlerp max-norm (norm 0): padding never changes a real token;
* after each step tokens are stably partitioned so real tokens come first
  in the order an unpadded run would have them, padding last;
* padding merged only into padding (a row that is all padding, or [CLS] and
  padding) stays zero with size 0 instead of 0/0 = NaN: such a row comes out
  finite, as unpatched (its values are as meaningless as unpatched ones).

Hence the guarantee: a sentence in a right-padded batch gets the same real
tokens, sizes and embeddings (to float rounding of masked attention) as the
same sentence run alone, **provided every layer removes the same number of
tokens in both runs**, i.e. the requested ``r`` of each layer is not
clamped for the shorter (unpadded) sequence (docs/design.md §1.1: at most half its
non-prefix tokens). When it is clamped, the padded run removes more real
tokens than the lone run (never mixing in padding). ``mean_pool`` with the
returned sizes and mask ignores padding. ``r = 0`` runs no step at all and
equals the unpatched model to float tolerance (the float mask instead of
transformers' bool mask may change the last bits).

Outputs: the usual ``last_hidden_state`` (``[B, N_out, C]``) and
``pooler_output`` (``[CLS]``, untouched by merging), plus ``token_size``
(``[B, N_out, 1]`` float32, original tokens per output token, 0 = padding)
and ``token_mask`` (``[B, N_out]``, 1 for real tokens): pass both to
:func:`mean_pool` for sentence-transformers-style mean pooling.

Per-call state (sizes, validity, token counts) lives in local variables of
one forward; configuration lives on the patched base model as plain
attributes changeable between calls: ``r``, ``tofu_mode``,
``tofu_prune_layers``, ``tofu_prop_attn``, ``tofu_backend`` (a new attribute
named like one, e.g. ``model.mode``, raises AttributeError: see
:class:`tofu_triton.patch.lifecycle.Patched`).

Not supported (refused): ``output_attentions`` / ``output_hidden_states``
(token counts change across layers), caches, ``encoder_hidden_states``,
4-D attention masks, ViT ``attention_mask``, ``bool_masked_pos`` with
r > 0 is allowed (mask tokens are ordinary tokens). Gradient checkpointing
is ignored. ``interpolate_pos_encoding`` works.
"""
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.bert import modeling_bert
from transformers.models.bert.modeling_bert import BertLayer, BertModel, BertSelfAttention
from transformers.models.clip import modeling_clip
from transformers.models.clip.modeling_clip import CLIPEncoderLayer, CLIPVisionModel
from transformers.models.dinov2 import modeling_dinov2
from transformers.models.siglip import modeling_siglip
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer, SiglipVisionModel
from transformers.models.dinov2.modeling_dinov2 import Dinov2Layer, Dinov2Model
from transformers.models.vit import modeling_vit
from transformers.models.vit.modeling_vit import ViTForImageClassification, ViTLayer, ViTModel

from .. import ops
from ..reference import gather_rows
from ..schedule import LayerPlan, cached_plan, parse_modes, parse_r, sized_after, token_counts
from . import lifecycle

CONFIG = ("r", "tofu_mode", "tofu_prune_layers", "tofu_prop_attn", "tofu_backend")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
# The size a padded token merges with: far below fp32's resolution of any real size (>= 1, so s + PAD_SIZE == s),
# and the sum of a sequence's worth of it (< 2**40 tokens) far below 1: tokens under that sum are padding again.
PAD_SIZE = 2.0 ** -100
SUPPORTED = ("BertModel", "ViTModel", "ViTForImageClassification", "CLIPVisionModel", "Dinov2Model",
             "SiglipVisionModel")


@dataclass
class TofuModelOutput(BaseModelOutputWithPooling):
    """``BaseModelOutputWithPooling`` plus the per-call token state.

    token_size: [B, N_out, 1] float32, original tokens per output token (0 = padding).
    token_mask: [B, N_out] int64, 1 for real tokens, 0 for padding.
    tokens: tokens entering each layer, then leaving the last (a plain list).
    """

    token_size: Optional[torch.FloatTensor] = None
    token_mask: Optional[torch.LongTensor] = None
    tokens: Optional[List[int]] = None


# --------------------------------------------------------------------------- pieces


def _check_attn_implementation(config) -> None:
    """NotImplementedError unless the model attends with one of ATTN_IMPLEMENTATIONS: checked at patch time,
    and again at every call (``model.set_attn_implementation`` may change it after patching)."""
    impl = config._attn_implementation
    if impl not in ATTN_IMPLEMENTATIONS:
        raise NotImplementedError(
            f"attn_implementation={impl!r} is not supported by tofu_triton.patch.transformers "
            f"(it needs an additive float mask): load the model with attn_implementation=\"sdpa\" or \"eager\", "
            "or call model.set_attn_implementation(\"sdpa\")"
        )


def _attend(module: nn.Module, config, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor],
            dropout: float, scaling: float, eager) -> Tensor:
    _check_attn_implementation(config)
    impl = config._attn_implementation
    fn = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager)
    out, _ = fn(module, q, k, v, mask, dropout=dropout, scaling=scaling)
    return out  # [B, N, heads, head_dim]


def _key_mask(size: Tensor, padded: bool, sized: bool, prop_attn: bool, dtype: torch.dtype) -> Optional[Tensor]:
    """Additive mask [B, 1, 1, N]: finfo.min on padding keys, log(size) when proportional."""
    use_sizes = prop_attn and sized
    if not padded and not use_sizes:
        return None
    s = size[..., 0]
    mask = s.log() if use_sizes else torch.zeros_like(s)
    if padded:
        mask = mask.masked_fill(s <= 0, torch.finfo(dtype).min)
    return mask[:, None, None, :].to(dtype)


def _metric(k: Tensor, size: Tensor, padded: bool) -> Tensor:
    metric = k.mean(dim=1)  # [B, N, head_dim]
    if not padded:
        return metric
    unit = F.normalize(metric.float(), dim=-1)
    valid = (size > 0).float()
    return (torch.cat([unit, torch.ones_like(unit[..., :1])], dim=-1) * valid).to(metric.dtype)


def _pads_last(x: Tensor, size: Tensor) -> Tuple[Tensor, Tensor]:
    """Stable partition of tokens: real (size > 0) first, in order; padding last."""
    order = torch.sort((size[..., 0] <= 0).to(torch.int32), dim=1, stable=True).indices
    return gather_rows(x, order), gather_rows(size, order)


class Run(NamedTuple):
    """What every layer of one forward call needs besides its own step."""

    padded: bool  # an attention mask was given: some tokens are padding (size 0)
    prop_attn: bool  # proportional attention
    backend: str
    protected: int  # leading tokens never merged: 1 ([CLS]) or 0 (SigLIP has no class token)
    triton: bool  # the step runs the Triton kernels (ops.step_backend, once per forward)


def _reduce(x: Tensor, k: Tensor, size: Tensor, step: LayerPlan, run: Run):
    if step.r == 0:
        return x, size
    if not run.padded:  # the whole step from the keys: one launch on the GPU
        res = ops.block_step(x, k, step.r, size, step.mode, run.protected, None, run.triton, with_match=False)
        return res.x, res.size
    x = x * (size > 0).to(x.dtype)  # a padded token adds nothing to a merge
    match = ops.bipartite_match(_metric(k, size, run.padded), step.r, run.protected, run.backend)
    # Padding merges with size PAD_SIZE, not 0: padding merged only into padding (a row with no real
    # token but [CLS], or none at all) then averages zeros instead of dividing 0 by 0 (NaN, which
    # attention spreads over the whole row), and a real token's size and value are bitwise those of size 0.
    x, size = ops.merge_tokens(x, match, size.clamp_min(PAD_SIZE), step.mode, run.backend)
    return _pads_last(x, size.masked_fill(size < PAD_SIZE * 2.0 ** 40, 0))


def _heads(x: Tensor, proj: nn.Module, head_dim: int) -> Tensor:
    B, N, _ = x.shape
    return proj(x).view(B, N, -1, head_dim).transpose(1, 2)


def bert_layer_forward(layer: BertLayer, x: Tensor, size: Tensor, step: LayerPlan, run: Run) -> Tuple[Tensor, Tensor]:
    """One patched ``BertLayer`` (post-norm): attention, step, feed-forward."""
    sa = layer.attention.self
    B, N, _ = x.shape
    mask = _key_mask(size, run.padded, step.sized, run.prop_attn, x.dtype)
    q, k, v = (_heads(x, p, sa.attention_head_size) for p in (sa.query, sa.key, sa.value))
    out = _attend(sa, sa.config, q, k, v, mask, sa.dropout.p if sa.training else 0.0, sa.scaling,
                  modeling_bert.eager_attention_forward)
    x = layer.attention.output(out.reshape(B, N, -1).contiguous(), x)
    x, size = _reduce(x, k, size, step, run)
    return layer.feed_forward_chunk(x), size


def _self_attention(attn: nn.Module, h: Tensor, mask: Optional[Tensor], out_proj: nn.Module,
                    dropout: float, scaling: float, eager) -> Tuple[Tensor, Tensor]:
    """q/k/v projections, attention, output projection: (out [B, N, C], keys [B, heads, N, head_dim])."""
    B, N, _ = h.shape
    q, k, v = (_heads(h, p, attn.head_dim) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    out = _attend(attn, attn.config, q, k, v, mask, dropout if attn.training else 0.0, scaling, eager)
    return out_proj(out.reshape(B, N, -1).contiguous()), k


_EAGER = {CLIPEncoderLayer: modeling_clip.eager_attention_forward,
          SiglipEncoderLayer: modeling_siglip.eager_attention_forward}


def clip_layer_forward(layer: nn.Module, x: Tensor, size: Tensor, step: LayerPlan, run: Run) -> Tuple[Tensor, Tensor]:
    """One patched ``CLIPEncoderLayer`` or ``SiglipEncoderLayer`` (the same pre-norm layer)."""
    attn = layer.self_attn
    mask = _key_mask(size, run.padded, step.sized, run.prop_attn, x.dtype)
    out, k = _self_attention(attn, layer.layer_norm1(x), mask, attn.out_proj, attn.dropout, attn.scale,
                             _EAGER[type(layer)])
    x = x + out
    x, size = _reduce(x, k, size, step, run)
    x = x + layer.mlp(layer.layer_norm2(x))
    return x, size


def siglip_pooling_head(head: nn.Module, x: Tensor, size: Tensor) -> Tensor:
    """``SiglipMultiheadAttentionPoolingHead`` with sizes: ``log(size)`` added to each
    key's logit (pooling over ``size`` copies of every token). x: [B, N, C] -> [B, C]."""
    probe = head.probe.repeat(x.shape[0], 1, 1)
    heads = head.attention.num_heads
    # nn.MultiheadAttention takes a float mask [B * heads, queries, keys], batch-major.
    mask = size[..., 0].log()[:, None, :].repeat_interleave(heads, dim=0).to(x.dtype)
    pooled = head.attention(probe, x, x, attn_mask=mask)[0]
    return (pooled + head.mlp(head.layernorm(pooled)))[:, 0]


def _dinov2_attention(attn: nn.Module, h: Tensor, mask: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """DINOv2 self-attention in either layout transformers 5.x has shipped:
    one flat module (``q_proj`` ... ``o_proj``) or, up to about 5.20, ViT's
    older nesting (``attention.query/key/value`` + ``output.dense``)."""
    eager = modeling_dinov2.eager_attention_forward
    if hasattr(attn, "q_proj"):
        return _self_attention(attn, h, mask, attn.o_proj, attn.attention_dropout, attn.scaling, eager)
    sa = attn.attention
    B, N, _ = h.shape
    q, k, v = (_heads(h, p, sa.attention_head_size) for p in (sa.query, sa.key, sa.value))
    out = _attend(sa, sa.config, q, k, v, mask, sa.dropout_prob if sa.training else 0.0, sa.scaling, eager)
    return attn.output(out.reshape(B, N, -1).contiguous(), h), k


def dinov2_layer_forward(layer: Dinov2Layer, x: Tensor, size: Tensor, step: LayerPlan,
                         run: Run) -> Tuple[Tensor, Tensor]:
    """One patched ``Dinov2Layer`` (pre-norm, layer scale, drop path)."""
    mask = _key_mask(size, run.padded, step.sized, run.prop_attn, x.dtype)
    out, k = _dinov2_attention(layer.attention, layer.norm1(x), mask)
    x = layer.drop_path(layer.layer_scale1(out)) + x
    x, size = _reduce(x, k, size, step, run)
    x = layer.drop_path(layer.layer_scale2(layer.mlp(layer.norm2(x)))) + x
    return x, size


def vit_layer_forward(layer: ViTLayer, x: Tensor, size: Tensor, step: LayerPlan, run: Run) -> Tuple[Tensor, Tensor]:
    """One patched ``ViTLayer`` (pre-norm): attention residual, step, MLP residual."""
    attn = layer.attention
    B, N, _ = x.shape
    mask = _key_mask(size, run.padded, step.sized, run.prop_attn, x.dtype)
    h = layer.layernorm_before(x)
    q, k, v = (_heads(h, p, attn.head_dim) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    out = _attend(attn, attn.config, q, k, v, mask, attn.attention_dropout if attn.training else 0.0,
                  attn.scaling, modeling_vit.eager_attention_forward)
    out = attn.o_proj(out.reshape(B, N, -1).contiguous())
    x = layer.dropout(out) + x
    x, size = _reduce(x, k, size, step, run)
    x = layer.dropout(layer.mlp(layer.layernorm_after(x))) + x
    return x, size


# --------------------------------------------------------------------------- models


def _plan(model: nn.Module, n_tokens: int) -> Tuple[LayerPlan, ...]:
    return cached_plan(n_tokens, _protected(model), len(_layers(model)), model.r, model.tofu_mode,
                       model.tofu_prune_layers)


def _plan_or_default(base: nn.Module, n_tokens: Optional[int]) -> List[LayerPlan]:
    if n_tokens is None:
        cfg = base.config
        if isinstance(base, BertModel):
            raise ValueError("plan() of a text model needs n_tokens: the sequence length, [CLS] and [SEP] included")
        n_tokens = (cfg.image_size // cfg.patch_size) ** 2 + _protected(base)
    return list(_plan(base, n_tokens))


def _protected(model: nn.Module) -> int:
    """Leading tokens never merged: the class token, which SigLIP does not have."""
    return 0 if isinstance(model, SiglipVisionModel) else 1


def _layers(model: nn.Module) -> nn.ModuleList:
    if isinstance(model, (BertModel, Dinov2Model)):
        return model.encoder.layer
    if isinstance(model, (CLIPVisionModel, SiglipVisionModel)):
        return model.encoder.layers
    return model.layers


def _refuse_kwargs(kwargs: dict, config=None) -> None:
    for name in ("output_attentions", "output_hidden_states", "use_cache"):
        default = getattr(config, name, False) if name != "use_cache" else False
        if kwargs.get(name, default):
            raise NotImplementedError(f"{name}=True is not supported by a ToFu-patched model (token counts change)")
    for name in ("encoder_hidden_states", "encoder_attention_mask", "past_key_values", "cache"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"{name} is not supported by a ToFu-patched encoder")


def _refuse_vision_kwargs(model: nn.Module, kwargs: dict, attention_mask, name: str) -> None:
    """:func:`_refuse_kwargs`, and an attention mask, which no patched vision model takes."""
    _refuse_kwargs(kwargs, model.config)
    if attention_mask is not None:
        raise NotImplementedError(f"a ToFu-patched {name} does not take attention_mask")


def _run_layers(model: nn.Module, layer_fn, x: Tensor, size: Tensor, padded: bool):
    steps = _plan(model, x.shape[1])
    if padded and any(s.r > 0 for s in steps):
        x, size = _pads_last(x, size)  # left padding too; right padding: identity
    # What every step would check, once per forward (only where a step runs: an r = 0 model never checks).
    triton = not padded and any(s.r > 0 for s in steps) and ops.step_backend(x, model.tofu_backend)
    run = Run(padded, model.tofu_prop_attn, model.tofu_backend, _protected(model), triton)
    for layer, step in zip(_layers(model), steps):
        x, size = layer_fn(layer, x, size, step, run)
    return x, size, steps


def _run_vision(model: nn.Module, layer_fn, x: Tensor):
    """The layers of a vision model on unpadded tokens x [B, N, C]: (x, size, steps)."""
    size = torch.ones(x.shape[0], x.shape[1], 1, dtype=torch.float32, device=x.device)
    return _run_layers(model, layer_fn, x, size, False)


def _output(x: Tensor, pooled, size: Tensor, steps, return_dict) -> TofuModelOutput:
    out = TofuModelOutput(last_hidden_state=x, pooler_output=pooled, token_size=size,
                          token_mask=(size[..., 0] > 0).long(), tokens=token_counts(steps))
    return out if return_dict is not False else out.to_tuple()


class _PatchedBert:
    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, return_dict=None, **kwargs):
        _refuse_kwargs(kwargs, self.config)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        x = self.embeddings(input_ids=input_ids, position_ids=position_ids, token_type_ids=token_type_ids,
                            inputs_embeds=inputs_embeds)
        B, N, _ = x.shape
        padded = attention_mask is not None
        if padded:
            if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (B, N):
                raise NotImplementedError(f"attention_mask must be [batch, seq] = {(B, N)} (0/1); "
                                          f"got {tuple(attention_mask.shape)}")
            size = attention_mask.to(device=x.device, dtype=torch.float32)[..., None]
        else:
            size = torch.ones(B, N, 1, dtype=torch.float32, device=x.device)
        x, size, steps = _run_layers(self, bert_layer_forward, x, size, padded)
        pooled = self.pooler(x) if self.pooler is not None else None
        return _output(x, pooled, size, steps, return_dict)


class _PatchedViT:
    def forward(self, pixel_values=None, bool_masked_pos=None, interpolate_pos_encoding=None,
                attention_mask=None, return_dict=None, **kwargs):
        _refuse_vision_kwargs(self, kwargs, attention_mask, "ViTModel")
        expected = self.embeddings.patch_embeddings.projection.weight.dtype
        if pixel_values.dtype != expected:
            pixel_values = pixel_values.to(expected)
        x = self.embeddings(pixel_values, bool_masked_pos=bool_masked_pos,
                            interpolate_pos_encoding=interpolate_pos_encoding)
        x, size, steps = _run_vision(self, vit_layer_forward, x)
        x = self.layernorm(x)
        pooled = self.pooler(x) if self.pooler is not None else None
        return _output(x, pooled, size, steps, return_dict)


class _PatchedCLIPVision:
    def forward(self, pixel_values=None, interpolate_pos_encoding=False, return_dict=None, **kwargs):
        _refuse_vision_kwargs(self, kwargs, kwargs.get("attention_mask"), "CLIPVisionModel")
        x = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        x = self.pre_layrnorm(x)
        x, size, steps = _run_vision(self, clip_layer_forward, x)
        pooled = self.post_layernorm(x[:, 0, :])
        return _output(x, pooled, size, steps, return_dict)


class _PatchedDinov2:
    def forward(self, pixel_values=None, bool_masked_pos=None, attention_mask=None, return_dict=None, **kwargs):
        _refuse_vision_kwargs(self, kwargs, attention_mask, "Dinov2Model")
        x = self.embeddings(pixel_values, bool_masked_pos=bool_masked_pos)
        x, size, steps = _run_vision(self, dinov2_layer_forward, x)
        x = self.layernorm(x)
        return _output(x, x[:, 0, :], size, steps, return_dict)


class _PatchedSiglipVision:
    def forward(self, pixel_values=None, interpolate_pos_encoding=False, return_dict=None, **kwargs):
        _refuse_vision_kwargs(self, kwargs, kwargs.get("attention_mask"), "SiglipVisionModel")
        x = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        x, size, steps = _run_vision(self, clip_layer_forward, x)
        x = self.post_layernorm(x)
        pooled = None
        if self.use_head:  # unweighted (transformers' own head) while every size is 1
            pooled = siglip_pooling_head(self.head, x, size) if sized_after(steps) else self.head(x)
        return _output(x, pooled, size, steps, return_dict)


_MIXINS = {BertModel: _PatchedBert, ViTModel: _PatchedViT, CLIPVisionModel: _PatchedCLIPVision,
           Dinov2Model: _PatchedDinov2, SiglipVisionModel: _PatchedSiglipVision}


def _base(model: nn.Module) -> nn.Module:
    """The module that gets patched: the model itself or its inner encoder model."""
    if isinstance(model, ViTForImageClassification):
        return model.vit
    return model


# Submodules and attributes the layer functions read, per layer class: a
# transformers release that renames them is refused at patch time.
_NEEDS = {
    BertLayer: ("attention.self.query", "attention.self.key", "attention.self.value", "attention.self.dropout",
                "attention.self.attention_head_size", "attention.self.scaling", "attention.self.config",
                "attention.output", "feed_forward_chunk"),
    ViTLayer: ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "attention.head_dim",
               "attention.scaling", "attention.attention_dropout", "attention.config", "layernorm_before",
               "layernorm_after", "mlp", "dropout"),
    CLIPEncoderLayer: ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                       "self_attn.head_dim", "self_attn.scale", "self_attn.dropout", "self_attn.config",
                       "layer_norm1", "layer_norm2", "mlp"),
    SiglipEncoderLayer: ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                         "self_attn.head_dim", "self_attn.scale", "self_attn.dropout", "self_attn.config",
                         "layer_norm1", "layer_norm2", "mlp"),
    Dinov2Layer: ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj",
                  "attention.head_dim", "attention.scaling", "attention.attention_dropout", "attention.config",
                  "norm1", "norm2", "layer_scale1", "layer_scale2", "drop_path", "mlp"),
}
# Older layouts a layer class may have instead (any one complete layout is accepted).
_NEEDS_ALT = {
    Dinov2Layer: ("attention.attention.query", "attention.attention.key", "attention.attention.value",
                  "attention.attention.attention_head_size", "attention.attention.scaling",
                  "attention.attention.dropout_prob", "attention.attention.config", "attention.output",
                  "norm1", "norm2", "layer_scale1", "layer_scale2", "drop_path", "mlp"),
}


def _missing(layer: nn.Module, paths) -> Optional[str]:
    """The first of ``paths`` (dotted attribute paths) that ``layer`` lacks, or None."""
    for path in paths:
        obj = layer
        for part in path.split("."):
            if not hasattr(obj, part):
                return path
            obj = getattr(obj, part)
    return None


def _check_layout(layers) -> None:
    import transformers

    for i, layer in enumerate(layers):
        missing = _missing(layer, _NEEDS[type(layer)])
        if missing is not None and type(layer) in _NEEDS_ALT and _missing(layer, _NEEDS_ALT[type(layer)]) is None:
            missing = None
        if missing is not None:
            raise TypeError(
                f"layer {i} ({type(layer).__name__}) has no {missing!r} in transformers "
                f"{transformers.__version__}; tofu_triton.patch.transformers knows the 5.x layouts "
                "(tested: 5.17 and 5.24)"
            )


def check_model(model: nn.Module) -> None:
    """Raise TypeError unless ``model`` is a family (and a layer layout) this module patches, and
    NotImplementedError if it attends with an implementation the patched layers cannot use."""
    _check_family(model)
    _check_layout(_layers(_base(model)))
    _check_attn_implementation(_base(model).config)


def _check_family(model: nn.Module) -> None:
    base = _base(model)
    if isinstance(base, BertModel):
        cfg = base.config
        if cfg.is_decoder or cfg.add_cross_attention:
            raise TypeError("tofu_triton.patch.transformers patches BERT encoders only "
                            "(is_decoder/add_cross_attention set)")
        for i, layer in enumerate(base.encoder.layer):
            if type(layer) is not BertLayer or type(layer.attention.self) is not BertSelfAttention:
                raise TypeError(f"layer {i} is a {type(layer).__name__}; only transformers' BertLayer is supported")
        return
    if isinstance(base, ViTModel):
        for i, layer in enumerate(base.layers):
            if type(layer) is not ViTLayer:
                raise TypeError(f"layer {i} is a {type(layer).__name__}; only transformers' ViTLayer is supported")
        return
    for cls, layer_cls in ((CLIPVisionModel, CLIPEncoderLayer), (Dinov2Model, Dinov2Layer),
                           (SiglipVisionModel, SiglipEncoderLayer)):
        if isinstance(base, cls):
            for i, layer in enumerate(_layers(base)):
                if type(layer) is not layer_cls:
                    raise TypeError(f"layer {i} is a {type(layer).__name__}; only {layer_cls.__name__} is supported")
            return
    raise TypeError(
        f"tofu_triton.patch.transformers supports {', '.join(SUPPORTED)}; got "
        f"{type(model).__module__}.{type(model).__name__} (heads that mean-pool patch tokens, e.g. "
        "Dinov2ForImageClassification, and text/decoder models other than BERT encoders are not supported)"
    )


def _validate(base: nn.Module) -> None:
    depth = len(_layers(base))
    parse_r(base.r, depth)
    parse_modes(base.tofu_mode, depth, base.tofu_prune_layers)
    if base.tofu_backend not in ops.BACKENDS:
        raise ValueError(f"backend must be one of {ops.BACKENDS}, got {base.tofu_backend!r}")
    if not isinstance(base.tofu_prop_attn, bool):
        raise TypeError(f"prop_attn must be a bool, got {type(base.tofu_prop_attn).__name__}")


FAMILY = lifecycle.register(lifecycle.Family(
    name="transformers", settings=CONFIG, target=_base, validate=_validate, plan=_plan_or_default))


def patch(model: nn.Module, r=16, mode="tofu", prune_layers: Optional[int] = None,
          prop_attn: bool = True, backend: str = "auto") -> nn.Module:
    """Patch a supported transformers model (see the module docstring) in place; return it.

    Same meaning of r, mode, prune_layers, prop_attn, backend as
    :func:`tofu_triton.patch.timm`. The settings live on the patched base
    model (``model`` itself, or ``model.vit`` of a ``ViTForImageClassification``)
    and may be changed between calls. Patching a patched model only updates
    them; settings it refuses leave it as it was.
    """
    check_model(model)
    base = _base(model)
    mixin = next(m for cls, m in _MIXINS.items() if isinstance(base, cls))
    values = dict(zip(CONFIG, (r, mode, prune_layers, prop_attn, backend)))
    return lifecycle.apply(model, FAMILY, mixin, values)
