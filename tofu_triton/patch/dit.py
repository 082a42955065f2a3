"""The patched blocks of diffusers' diffusion transformers with joint attention: SD3 and Flux.

Used by :mod:`tofu_triton.patch.diffusers_models` (which owns the settings, the
per-call :class:`~tofu_triton.patch.latent_step.Call` and the lifecycle);
PixArt's blocks are ``BasicTransformerBlock`` and are patched there.

Each patched forward restates diffusers' block forward (same modules, same
order of operations) with the merge of docs/design.md §5.2 around the
sub-layers it merges:

* ``JointTransformerBlock`` (SD3 / SD3.5, also the last, ``context_pre_only``
  block, and SD3.5's second image-only attention): image tokens merge before
  the joint attention (``merge_attn``) and the MLP (``merge_mlp``); the text
  tokens are projected, attended and updated as they are, their queries
  seeing the merged image tokens as keys.
* ``FluxTransformerBlock``: the same, with rotary positions: a merged token
  is rotated by its destination's position, a kept source by its own.
* ``FluxSingleTransformerBlock``: attention and MLP run in parallel on one
  normalised input and are projected together, so they are one sub-layer,
  merged when ``merge_attn`` is on; the text tokens of the concatenated
  sequence are never merged.

In whole-block mode (``whole_block``) each forward's body runs once on the
merged image tokens (a :class:`~tofu_triton.patch.latent_step.WholeBlock`
step: nothing merges inside, the sizes and rotary positions are the merge's)
and only the block's update is unmerged, onto the block's input.

Attention in a merging block runs PyTorch SDPA here rather than the block's
processor (the processors cannot take per-image rotary tables or a key
bias), which is why only diffusers' default processors are accepted; a key
bias goes through :func:`tofu_triton.attention.sized_attention` (on CUDA the
path measured fastest for the card and shape).
``log(size)`` is added to the image keys' logits when ``prop_attn`` is on;
the text keys get 0. In ToDo mode the image keys and values are
average-pooled after their norm and rotation, queries stay whole.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusers.models.attention import _chunked_feed_forward

from ..attention import sized_attention
from .latent_step import CALL_KEY, Call, LatentStep, WholeBlock, begin, grid_at

GRID_KEY = "tofu_grid"  # joint_attention_kwargs={"tofu_grid": (h, w)}: Flux's token grid, given by the caller


# --------------------------------------------------------------------------- attention pieces


def _heads(x: Tensor, heads: int) -> Tensor:
    """[B, S, H * D] -> [B, H, S, D]."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Flux's rotary embedding (pairs of adjacent channels) of x [B, H, S, D] by per-token tables
    cos/sin [S, D] or [B, S, D] (float32); the result is in x's dtype."""
    if cos.dim() == 3:  # one table per image: broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    real, imag = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(-2)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def attend(image: Tuple[Tensor, Tensor, Tensor], text: Optional[Tuple[Tensor, Tensor, Tensor]],
           image_bias: Optional[Tensor], text_first: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """SDPA over the image and text tokens together: (image out [B, Nq, H*D], text out [B, T, H*D] or None).

    image / text: (q, k, v), each [B, H, S, D]; the image keys may be fewer
    than its queries (ToDo). image_bias: float32 [B, N_keys], added to
    the logits of the image keys (text keys get 0), or None. ``text_first``
    is the order the model concatenates in (Flux: text first; SD3: image
    first), kept so results round as the model's own.
    """
    parts = [image] if text is None else ([text, image] if text_first else [image, text])
    q, k, v = (torch.cat([p[i] for p in parts], dim=2) for i in range(3))
    if image_bias is None:
        out = F.scaled_dot_product_attention(q, k, v)
    else:
        zeros = image_bias.new_zeros(image_bias.shape[0], 0 if text is None else text[1].shape[2])
        bias = torch.cat([zeros, image_bias] if text_first else [image_bias, zeros], dim=1)
        out = sized_attention(q, k, v, bias[:, None, None, :])  # on the fastest path the device has
    out = out.transpose(1, 2).flatten(2)
    n_img = image[0].shape[2]
    if text is None:
        return out, None
    if text_first:
        return out[:, out.shape[1] - n_img:], out[:, :out.shape[1] - n_img]
    return out[:, :n_img], out[:, n_img:]


def image_keys(step: LatentStep, q: Tensor, k: Tensor, v: Tensor, rope: Optional[Tuple[Tensor, Tensor]],
               merged: bool) -> Tuple[Tuple[Tensor, Tensor, Tensor], Optional[Tensor]]:
    """The image queries, keys and values a merging block attends with, and their key bias.

    q, k, v: [B, H, S, D] after the projections and q/k norms, for the
    merged image tokens (``merged``) or all of them. rope: the image rows of
    the model's rotary tables (cos, sin) [N, D], or None. ToDo pools k and v
    after rotation: the keys and values themselves are averaged.
    """
    if rope is not None:
        cos, sin = rope
        if merged:  # each merged row is rotated by the grid position it stands at
            where = step.positions()
            cos, sin = cos[where], sin[where]
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    if step.mode == "todo":
        k, v = step.pool(k), step.pool(v)
    return (q, k, v), step.key_bias()


def _sd3_qkv(attn, x: Tensor, context: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Queries, keys, values [B, H, S, D] of ``x`` through an SD3 ``Attention``'s image (or context) projections
    and q/k norms, as ``JointAttnProcessor2_0``."""
    if context:
        projections, norms = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj), (attn.norm_added_q, attn.norm_added_k)
    else:
        projections, norms = (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k)
    q, k, v = (_heads(p(x), attn.heads) for p in projections)
    q = norms[0](q) if norms[0] is not None else q
    k = norms[1](k) if norms[1] is not None else k
    return q, k, v


def _flux_qkv(attn, x: Tensor, context: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Queries, keys, values [B, H, S, D] of ``x`` through a ``FluxAttention``'s image (or context) projections
    (fused or not) and q/k norms, as ``FluxAttnProcessor``."""
    if context:
        fused, projections = getattr(attn, "to_added_qkv", None), (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        norms = (attn.norm_added_q, attn.norm_added_k)
    else:
        fused, projections = getattr(attn, "to_qkv", None), (attn.to_q, attn.to_k, attn.to_v)
        norms = (attn.norm_q, attn.norm_k)
    if attn.fused_projections and fused is not None:
        q, k, v = fused(x).chunk(3, dim=-1)
    else:
        q, k, v = (p(x) for p in projections)
    q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in (q, k, v))
    return norms[0](q).transpose(1, 2), norms[1](k).transpose(1, 2), v.transpose(1, 2)


def _rotated(qkv: Tuple[Tensor, Tensor, Tensor], rope) -> Tuple[Tensor, Tensor, Tensor]:
    """(q, k, v) with q and k rotated by ``rope`` (cos, sin) [S, D]; as they are when there is none."""
    if rope is None:
        return qkv
    q, k, v = qkv
    return rotate(q, *rope), rotate(k, *rope), v


def feed_forward(block, ff, x: Tensor) -> Tensor:
    """``ff(x)``, in chunks where the block was told to (``set_chunk_feed_forward``), as diffusers does."""
    if block._chunk_size is not None:
        return _chunked_feed_forward(ff, x, block._chunk_dim, block._chunk_size)
    return ff(x)


def _split_rope(rope, text_len: int):
    """Flux's rotary tables over [text, image] -> (text rows, image rows), each (cos, sin) [S, D], or Nones."""
    if rope is None:
        return None, None
    cos, sin = rope
    return (cos[:text_len], sin[:text_len]), (cos[text_len:], sin[text_len:])


# --------------------------------------------------------------------------- the blocks


def _begin(block, kwargs) -> Tuple[Optional[Call], Optional[str], dict]:
    """(call, this block's mode, the other kwargs) from a block's joint_attention_kwargs."""
    kwargs = dict(kwargs or {})
    call = kwargs.pop(CALL_KEY, None)
    mode = call.modes[block._tofu_layer[0]] if call is not None else None
    if mode is not None and kwargs:
        raise ValueError(f"joint_attention_kwargs {sorted(kwargs)} cannot be used while tofu_triton merges this "
                         "block (its attention runs without the processor); set ratio=0 to pass them")
    return call, mode, kwargs


def _enter(block, call: Call, mode: str, hidden_states: Tensor):
    """(step, (merge before attention, -, before the MLP), the image tokens the block's body runs on): its input,
    or in whole-block mode the merged input (the body then merges nothing, :class:`WholeBlock`)."""
    index, factor = block._tofu_layer
    step = LatentStep(call, index, mode, hidden_states, grid_at(call, factor, hidden_states.shape[1]))
    step, merges = begin(call, step)
    return step, merges, step.enter(hidden_states) if isinstance(step, WholeBlock) else hidden_states


def _leave(step, out: Tensor, x: Tensor, hidden_states: Tensor) -> Tensor:
    """The body's image output, unmerged once (plus the block's input) in whole-block mode."""
    return step.leave(out, x, hidden_states) if isinstance(step, WholeBlock) else out


def _clip_fp16(x: Tensor) -> Tensor:
    """Flux keeps fp16 activations finite by clipping, as diffusers does."""
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


def _sd3_attention(attn, step: LatentStep, image: Tensor, text: Optional[Tensor], merged: bool):
    """One SD3 attention (joint, or image-only for SD3.5's ``attn2``): (image out, text out or None), projected."""
    img, bias = image_keys(step, *_sd3_qkv(attn, image, context=False), None, merged)
    txt = _sd3_qkv(attn, text, context=True) if text is not None else None
    out_img, out_txt = attend(img, txt, bias, text_first=False)
    out_img = attn.to_out[1](attn.to_out[0](out_img))
    if out_txt is None or attn.context_pre_only:
        return out_img, None
    return out_img, attn.to_add_out(out_txt)


class PatchedJointBlock:
    """``JointTransformerBlock.forward`` (SD3) with merge / sub-layer / unmerge of the image tokens."""

    _tofu_attrs = ("_tofu_layer",)  # (index in forward order, downsampling factor = 1), set at patch time

    def forward(self, hidden_states, encoder_hidden_states, temb, joint_attention_kwargs=None):
        call, mode, kwargs = _begin(self, joint_attention_kwargs)
        if mode is None:  # not merging in this call: diffusers' own block, bitwise
            return super().forward(hidden_states, encoder_hidden_states, temb, kwargs or None)
        step, (on_attn, _, on_mlp), x = _enter(self, call, mode, hidden_states)
        context, out = self._tofu_block(step, on_attn, on_mlp, x, encoder_hidden_states, temb)
        return context, _leave(step, out, x, hidden_states)

    def _tofu_block(self, step, on_attn, on_mlp, hidden_states, encoder_hidden_states, temb):
        if self.use_dual_attention:
            norm, gate_msa, shift_mlp, scale_mlp, gate_mlp, norm2, gate_msa2 = self.norm1(hidden_states, emb=temb)
        else:
            norm, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
        if self.context_pre_only:
            norm_context = self.norm1_context(encoder_hidden_states, temb)
        else:
            norm_context, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(
                encoder_hidden_states, emb=temb)

        out, context_out = _sd3_attention(self.attn, step, step.merge(norm, on_attn), norm_context, on_attn)
        hidden_states = step.back(gate_msa.unsqueeze(1) * out, on_attn, hidden_states)
        if self.use_dual_attention:
            out2, _ = _sd3_attention(self.attn2, step, step.merge(norm2, on_attn), None, on_attn)
            hidden_states = step.back(gate_msa2.unsqueeze(1) * out2, on_attn, hidden_states)

        norm = self.norm2(hidden_states) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        ff = feed_forward(self, self.ff, step.merge(norm, on_mlp))
        hidden_states = step.back(gate_mlp.unsqueeze(1) * ff, on_mlp, hidden_states)

        if self.context_pre_only:  # the last block: its text stream has no output
            return None, hidden_states
        encoder_hidden_states = encoder_hidden_states + c_gate_msa.unsqueeze(1) * context_out
        norm_context = self.norm2_context(encoder_hidden_states) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        ff = feed_forward(self, self.ff_context, norm_context)
        return encoder_hidden_states + c_gate_mlp.unsqueeze(1) * ff, hidden_states


class PatchedFluxBlock:
    """``FluxTransformerBlock.forward`` (Flux's double-stream block) with merge / sub-layer / unmerge."""

    _tofu_attrs = ("_tofu_layer",)

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                joint_attention_kwargs=None):
        call, mode, kwargs = _begin(self, joint_attention_kwargs)
        if mode is None:
            return super().forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb, kwargs or None)
        step, (on_attn, _, on_mlp), x = _enter(self, call, mode, hidden_states)
        context, out = self._tofu_block(step, on_attn, on_mlp, x, encoder_hidden_states, temb, image_rotary_emb)
        return context, _leave(step, out, x, hidden_states)

    def _tofu_block(self, step, on_attn, on_mlp, hidden_states, encoder_hidden_states, temb, image_rotary_emb):
        norm, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
        norm_context, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(
            encoder_hidden_states, emb=temb)

        text_rope, image_rope = _split_rope(image_rotary_emb, encoder_hidden_states.shape[1])
        attn = self.attn
        img, bias = image_keys(step, *_flux_qkv(attn, step.merge(norm, on_attn), context=False), image_rope, on_attn)
        txt = _rotated(_flux_qkv(attn, norm_context, context=True), text_rope)
        out, context_out = attend(img, txt, bias, text_first=True)
        out = attn.to_out[1](attn.to_out[0](out))
        context_out = attn.to_add_out(context_out)

        hidden_states = step.back(gate_msa.unsqueeze(1) * out, on_attn, hidden_states)
        norm = self.norm2(hidden_states) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        hidden_states = step.back(gate_mlp.unsqueeze(1) * self.ff(step.merge(norm, on_mlp)), on_mlp, hidden_states)

        encoder_hidden_states = encoder_hidden_states + c_gate_msa.unsqueeze(1) * context_out
        norm_context = self.norm2_context(encoder_hidden_states) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * self.ff_context(norm_context)
        return _clip_fp16(encoder_hidden_states), hidden_states


class PatchedFluxSingleBlock:
    """``FluxSingleTransformerBlock.forward`` with the parallel attention + MLP sub-layer on merged image tokens."""

    _tofu_attrs = ("_tofu_layer",)

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                joint_attention_kwargs=None):
        call, mode, kwargs = _begin(self, joint_attention_kwargs)
        if mode is None:
            return super().forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb, kwargs or None)
        step, (on, _, _), x = _enter(self, call, mode, hidden_states)
        context, out = self._tofu_block(step, on, x, encoder_hidden_states, temb, image_rotary_emb)
        return context, _clip_fp16(_leave(step, out, x, hidden_states))

    def _tofu_block(self, step, on, hidden_states, encoder_hidden_states, temb, image_rotary_emb):
        text_len = encoder_hidden_states.shape[1]
        norm, gate = self.norm(torch.cat([encoder_hidden_states, hidden_states], dim=1), emb=temb)
        x = torch.cat([norm[:, :text_len], step.merge(norm[:, text_len:], on)], dim=1)

        mlp = self.act_mlp(self.proj_mlp(x))
        text_rope, image_rope = _split_rope(image_rotary_emb, text_len)
        q, k, v = _flux_qkv(self.attn, x, context=False)
        img, bias = image_keys(step, q[:, :, text_len:], k[:, :, text_len:], v[:, :, text_len:], image_rope, on)
        txt = _rotated((q[:, :, :text_len], k[:, :, :text_len], v[:, :, :text_len]), text_rope)
        out, context_out = attend(img, txt, bias, text_first=True)

        out = gate.unsqueeze(1) * self.proj_out(torch.cat([torch.cat([context_out, out], dim=1), mlp], dim=2))
        context = encoder_hidden_states + out[:, :text_len]
        return _clip_fp16(context), step.back(out[:, text_len:], on, hidden_states)


# --------------------------------------------------------------------------- Flux's token grid


def flux_grid(img_ids: Tensor, n: int, given) -> Tuple[int, int]:
    """The (h, w) grid of Flux's ``n`` image tokens, checked against ``img_ids`` [n, 3] (or [B, n, 3]).

    Flux's transformer gets packed tokens [B, n, 64] with their positions in
    ``img_ids`` (``(0, row, col)``, row-major), not the grid's shape. ``given``
    (``joint_attention_kwargs["tofu_grid"]``) names it without reading
    ``img_ids`` on the host, which ``torch.compile(fullgraph=True)`` and CUDA
    graph capture need; without it the last position is read (one device
    sync). Either way the positions must be exactly the row-major grid:
    checked on the host when the call may sync (ValueError), else by a
    device-side assert.
    """
    ids = img_ids[0] if img_ids.dim() == 3 else img_ids
    in_graph = torch.compiler.is_compiling() or (ids.is_cuda and torch.cuda.is_current_stream_capturing())
    if given is not None:
        if (not isinstance(given, (tuple, list)) or len(given) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in given)):
            raise ValueError(f"joint_attention_kwargs[{GRID_KEY!r}] must be (height, width) in tokens, got {given!r}")
        h, w = given
    elif in_graph:
        raise ValueError(f"under torch.compile or CUDA graph capture, pass Flux's token grid: joint_attention_kwargs="
                         f"{{{GRID_KEY!r}: (height // 16, width // 16)}} (pixels / 16): it cannot be read from "
                         "img_ids in a graph")
    else:
        last = ids[-1, 1:].tolist()
        h, w = int(last[0]) + 1, int(last[1]) + 1
    if h * w != n or ids.shape[0] != n:
        raise ValueError(f"Flux's {n} image tokens are not a {h}x{w} grid (img_ids has {ids.shape[0]} rows): "
                         "tofu_triton merges one row-major grid of image tokens only")
    pos = torch.arange(n, device=ids.device)
    grid = torch.stack([torch.zeros_like(pos), pos // w, pos % w], dim=1).to(ids.dtype)
    message = ("Flux's img_ids are not the row-major grid of its image tokens; tofu_triton merges one row-major "
               "grid of image tokens only")
    if in_graph:
        torch._assert_async((ids == grid).all(), message)
    elif not bool((ids == grid).all()):
        raise ValueError(message + f" (checked as a {h}x{w} grid)")
    return h, w
