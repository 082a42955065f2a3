"""Attention with proportional attention's per-key bias on a fast path (docs/design.md §2.1).

Proportional attention adds ``log(size)`` of each key to every query's logit
of that key. Any path that adds exactly that bias computes the same thing;
they differ in speed:

======== ================================================================ ==========================
path     how                                                              where it runs
======== ================================================================ ==========================
mask     SDPA with the bias as an additive float mask ``[B, 1, 1, N]``    everywhere (the fallback);
         (the definition). On CUDA it leaves the flash kernel for the     CPU: the flash kernel
         memory-efficient one                                             takes the mask natively
cudnn    SDPA's cuDNN kernel, which takes a broadcastable additive bias   CUDA, cuDNN >= 9, sm_80+,
         (called directly, with the bias in the query's dtype: an fp32    fp16/bf16, head dim a
         bias is misread)                                                 multiple of 8 up to 128
channel  one more head channel: ``q' = [q, 1]``, ``k' = [k, bias/scale]`` everywhere; exact up to the
         (zero-padded to a multiple of 8), the scale passed explicitly,   rounding of ``bias/scale``
         so SDPA stays on its flash kernel; ~12 % more attention work     in the keys' dtype
flex     ``flex_attention`` with a ``score_mod`` adding the key's bias    torch >= 2.5; compiled on
         (compiled once per token count)                                  CUDA
======== ================================================================ ==========================

:func:`choose` is the one place that picks the path for ``"auto"``: it
reads only the device, the torch/cuDNN versions, the dtype and the head
dim, never data, so the choice is the same at every call (CUDA graphs and
``torch.compile`` see one path). Today: ``cudnn`` where it runs, else
``mask``. The table has no token-count threshold yet: which path wins at
which ``N`` is measured by ``bench/probe.py`` on a GPU (not measured yet for
cuDNN and the bias channel; see README's status table).
"""
import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

PATHS = ("auto", "mask", "cudnn", "channel", "flex")


@functools.lru_cache(maxsize=None)
def _cudnn_runs(device_index: int, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether SDPA's cuDNN kernel takes these inputs (from versions and the card, not data)."""
    if not hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention"):
        return False
    if not (torch.backends.cudnn.is_available() and (torch.backends.cudnn.version() or 0) >= 90000):
        return False
    if torch.cuda.get_device_capability(device_index) < (8, 0):
        return False
    return dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 and head_dim <= 128


def choose(q: Tensor, dropout_p: float = 0.0) -> str:
    """The path ``"auto"`` takes for queries ``q`` [B, H, N, D] (see the module's table)."""
    if q.device.type != "cuda":
        return "mask"
    cudnn = (dropout_p == 0.0 and torch.backends.cuda.cudnn_sdp_enabled()
             and _cudnn_runs(q.device.index if q.device.index is not None else torch.cuda.current_device(),
                             q.dtype, q.shape[-1]))
    return "cudnn" if cudnn else "mask"


def sized_attention(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], dropout_p: float = 0.0,
                    path: str = "auto") -> Tensor:
    """``softmax(q k^T / sqrt(D) + bias) v`` for q [B, H, Nq, D], k, v [B, H, Nk, D].

    bias: [B, 1, 1, Nk] (any float dtype), added to every query's logit of
    key n, or None (then plain SDPA, bitwise what timm computes). ``path``:
    one of :data:`PATHS`. Returns [B, H, Nq, D] in q's dtype.
    """
    if bias is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    if path == "auto":
        path = choose(q, dropout_p)
    if path == "channel":
        return _bias_channel(q, k, v, bias, dropout_p)
    if path == "flex":
        if dropout_p:
            raise ValueError("the flex_attention path has no dropout; use path='mask' while training with dropout")
        return _flex(q, k, v, bias)
    if bias.dtype != q.dtype:  # a mask must be in the query's dtype (under autocast, the autocast dtype)
        bias = bias.to(q.dtype)
    if path == "mask":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
    if path == "cudnn":
        # What SDPA itself calls when it picks cuDNN; called directly because
        # picking it through sdpa_kernel(..., set_priority=True) changes a
        # process-wide setting, which other threads would see.
        lse = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, bias, lse, dropout_p, False, False)[0]
    raise ValueError(f"attention path must be one of {PATHS}, got {path!r}")


def _bias_channel(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, dropout_p: float) -> Tensor:
    """The bias as one more channel: ``q' k'^T scale = q k^T scale + bias``."""
    d = q.shape[-1]
    scale = d ** -0.5
    pad = -(d + 1) % 8  # flash kernels want head dims that are multiples of 8
    heads = q.shape[1]
    key_bias = (bias[:, :, 0, :, None] / scale).to(k.dtype).expand(-1, heads, -1, -1)  # [B, H, N, 1]
    q2 = F.pad(torch.cat([q, torch.ones_like(q[..., :1])], dim=-1), (0, pad))
    k2 = F.pad(torch.cat([k, key_bias], dim=-1), (0, pad))
    v2 = F.pad(v, (0, pad + 1))
    return F.scaled_dot_product_attention(q2, k2, v2, dropout_p=dropout_p, scale=scale)[..., :d]


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    key_bias = bias[:, 0, 0, :]

    def add_key_bias(score, b, h, q_idx, kv_idx):
        return score + key_bias[b, kv_idx]

    # flex_attention is only fast compiled; inside a compiled model it already is.
    # On the CPU (tests) its eager form is enough.
    fn = _compiled_flex() if q.is_cuda and not torch.compiler.is_compiling() else flex_attention
    return fn(q, k, v, score_mod=add_key_bias)
