"""Attention with proportional attention's per-key bias on a fast path (docs/design.md §2.1).

Proportional attention adds ``log(size)`` of each key to every query's logit
of that key. Any path that adds exactly that bias computes the same thing;
they differ in speed and in where they run:

======= ================================================================ ============================
path    how                                                              where it runs
======= ================================================================ ============================
mask    SDPA with the bias as an additive float mask ``[B, 1, 1, N]``    everywhere (the fallback);
        (the definition). On CUDA it leaves the flash kernel for the     differentiable
        memory-efficient one
cudnn   SDPA's cuDNN kernel, which takes a broadcastable additive bias   CUDA, cuDNN >= 9, sm_80+,
        (called directly, the bias in the query's dtype: an fp32 bias    fp16/bf16, head dim a multiple
        is misread)                                                      of 8 up to 128; no gradient
                                                                         for the bias
triton  our flash-attention forward (kernels/attention.py) that adds     CUDA (the interpreter on the
        the bias vector to each tile of logits; block sizes per head     CPU), head dim <= 128;
        dim are tournament candidates ``triton_<config>``                inference only
vsize   stock SDPA with no bias at all, through the identity             everywhere; differentiable;
        ``softmax(s + log w) V = A(s)[w V] / A(s)[w]``: V extended by    no dropout
        the size column ``w = exp(bias - max bias)``, q, k, v
        zero-padded to one head dim (a multiple of 8) so SDPA keeps its
        flash kernel, the quotient per head
vsize_v the same identity with only V extended: SDPA's flash kernel     as vsize
        needs q, k and v of one head dim, its memory-efficient kernel
        takes a wider V, so q and k stay unpadded
======= ================================================================ ============================

:func:`choose` picks the path for ``"auto"``: on CUDA the measured winner
(:func:`tofu_triton.dispatch.winner`, table ``tofu_triton/tables/attention.json``
written by ``bench/probe.py --write-table``) among the candidates that run
for these inputs; elsewhere ``mask``. It reads the device's capabilities,
versions, dtype, head dim and shapes, never data, so the choice is the same
at every call (CUDA graphs and ``torch.compile`` see one path); the only
other thing it reads is whether a gradient is needed, and only to leave out
the paths that cannot give one.
"""
import functools
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch
from .kernels import attention as kernel
from .kernels.common import interpreting

PATHS = ("auto", "mask", "cudnn", "triton", "vsize", "vsize_v")
# Where a gradient is needed and the path asked for cannot give one, this runs instead.
DIFFERENTIABLE = "mask"


def _triton_configs() -> dict:
    """``{"triton_<config>": config}``: the Triton path's candidates (every block-size config)."""
    return {f"triton_{name}": name for name in kernel.CONFIGS}


TRITON_CANDIDATES = tuple(_triton_configs())
# Every name the dispatch table may hold (a path, or the Triton path with its block sizes).
CANDIDATES = ("mask", "cudnn", "vsize", "vsize_v") + TRITON_CANDIDATES


class Capabilities(NamedTuple):
    """What :func:`choose` reads about a device (never its data).

    Tests build one by hand to ask what a CUDA card would pick for CPU tensors.
    """

    kind: str  # torch.device type: "cuda", "cpu", ...
    capability: tuple = (0, 0)  # CUDA compute capability
    cudnn: int = 0  # cuDNN version (e.g. 91002), 0 without cuDNN
    has_cudnn_op: bool = False  # this torch has aten._scaled_dot_product_cudnn_attention
    triton: bool = False  # Triton kernels run here (CUDA, or the interpreter on the CPU)


def capabilities(device: torch.device) -> Capabilities:
    """The :class:`Capabilities` of ``device`` (cached: one lookup per device)."""
    return Capabilities(*_capabilities(device.type, device.index))


# Under torch.compile the queries below are constants the graph is built around: Dynamo cannot trace
# cuDNN's version or SDPA's backend switches (each a graph break, so fullgraph=True failed on CUDA only).
@torch.compiler.assume_constant_result
def _capabilities(kind: str, index: Optional[int]) -> tuple:
    return tuple(_query(kind, index))


@functools.lru_cache(maxsize=None)
def _query(kind: str, index: Optional[int]) -> Capabilities:
    if kind != "cuda":
        return Capabilities(kind, triton=kind == "cpu" and interpreting())
    index = index if index is not None else torch.cuda.current_device()
    return Capabilities("cuda", torch.cuda.get_device_capability(index),
                        (torch.backends.cudnn.version() or 0) if torch.backends.cudnn.is_available() else 0,
                        hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention"), True)


@torch.compiler.assume_constant_result
def _cudnn_sdp_enabled() -> bool:
    return torch.backends.cuda.cudnn_sdp_enabled()


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def runnable(caps: Capabilities, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, dropout_p: float = 0.0) -> tuple:
    """The candidate names (of :data:`CANDIDATES`) that compute this call here, in
    :data:`CANDIDATES` order. Depends on the capabilities, dtype, head dim,
    dropout and whether a gradient is needed (a path that cannot give one is left out)."""
    return _runnable(caps, q.dtype, q.shape[-1], bool(dropout_p), _needs_grad(bias), _needs_grad(q, k, v, bias),
                     dispatch.exporting(), caps.kind == "cuda" and _cudnn_sdp_enabled())


@functools.lru_cache(maxsize=None)
def _runnable(caps: Capabilities, dtype: torch.dtype, d: int, dropout: bool, bias_grad: bool, any_grad: bool,
              exporting: bool, cudnn_sdp: bool) -> tuple:
    if dropout:
        return ("mask",)  # only the float mask applies dropout as SDPA defines it
    out = ["mask"]
    half = dtype in (torch.float16, torch.bfloat16)
    # cuDNN's op cannot differentiate its bias: with a bias that needs a gradient
    # (torch.export traces with grad on), calling it raises.
    if (caps.kind == "cuda" and caps.has_cudnn_op and caps.cudnn >= 90000 and caps.capability >= (8, 0) and half
            and d % 8 == 0 and d <= 128 and not bias_grad and cudnn_sdp):
        out.append("cudnn")
    out += ["vsize", "vsize_v"]
    # Inference only, and a raw kernel launch that torch.export cannot trace.
    # fp32 only in the interpreter (tests): on a GPU its exact fp32 products do not fit the registers.
    if caps.triton and d <= kernel.MAX_HEAD_DIM and (half or caps.kind != "cuda") and not any_grad and not exporting:
        out += [f"triton_{name}" for name in kernel.configs_for(d)]
    return tuple(out)


def choose(q: Tensor, dropout_p: float = 0.0, k: Optional[Tensor] = None, v: Optional[Tensor] = None,
           bias: Optional[Tensor] = None, caps: Optional[Capabilities] = None) -> str:
    """The candidate ``"auto"`` runs for queries ``q`` [B, H, N, D] (a name of :data:`CANDIDATES`).

    Off CUDA: ``mask``. On CUDA (or with ``caps`` saying CUDA): the table's
    measured winner for (B, N, D) and the dtype on this card among
    :func:`runnable` (default ``mask``: it measured as fast as cuDNN on an
    H200 and is differentiable). ``k``, ``v``, ``bias`` default to ``q`` (for
    the grad check; pass them when they may need a gradient and q not).
    """
    caps = caps or capabilities(q.device)
    if caps.kind != "cuda":
        return "mask"
    k, v = (q if t is None else t for t in (k, v))
    allowed = runnable(caps, q, k, v, q if bias is None else bias, dropout_p)
    batch, _, n, d = q.shape
    return dispatch.winner("attention", q.device, q.dtype, default="mask", allowed=allowed, B=batch, N=n, D=d)


def sized_attention(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], dropout_p: float = 0.0,
                    path: str = "auto") -> Tensor:
    """``softmax(q k^T / sqrt(D) + bias) v`` for q [B, H, Nq, D], k, v [B, H, Nk, D].

    bias: [B, 1, 1, Nk] (any float dtype; -inf for a key of size 0), added to
    every query's logit of key n, or None (then plain SDPA, bitwise what timm
    computes). ``path``: one of :data:`PATHS` (or a name of :data:`CANDIDATES`).
    A path that cannot give a gradient where one is needed (``cudnn`` with a
    bias that needs one, ``triton``) runs ``mask`` instead. Returns
    [B, H, Nq, D] in q's dtype.
    """
    if bias is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    if path == "auto":
        path = choose(q, dropout_p, k, v, bias)
    elif path not in CANDIDATES and path != "triton":
        raise ValueError(f"attention path must be one of {PATHS}, got {path!r}")
    else:
        path = _runnable_path(path, q, k, v, bias, dropout_p)
    if path.startswith("triton_"):
        return kernel.biased_attention(q, k, v, bias, _triton_configs()[path])
    if path in ("vsize", "vsize_v"):
        return _sized_values(q, k, v, bias, dropout_p, pad_qk=path == "vsize")
    if bias.dtype != q.dtype:  # a mask must be in the query's dtype (under autocast, the autocast dtype)
        bias = bias.to(q.dtype)
    if path == "mask":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
    return _cudnn(q, k, v, bias, dropout_p)


def _runnable_path(path: str, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, dropout_p: float) -> str:
    """``path`` as asked (``triton`` as its measured or default config), or ``mask`` where
    a gradient is needed and it cannot give one; a ValueError where it cannot run at all."""
    caps = capabilities(q.device)
    ok = runnable(caps, q, k, v, bias, dropout_p)
    want = path
    if path == "triton":
        names = tuple(n for n in ok if n.startswith("triton_"))
        if names:
            return names[0] if caps.kind != "cuda" else dispatch.winner(
                "attention", q.device, q.dtype, default=names[0], allowed=names, B=q.shape[0], N=q.shape[2],
                D=q.shape[3])
        want = f"triton_{_default_triton_config(q.shape[-1])}"
    if want in ok:
        return want
    # Would it run without the gradient? Then fall back to the differentiable path.
    with torch.no_grad():
        if want in runnable(caps, q, k, v, bias, dropout_p):
            return DIFFERENTIABLE
    here = ", ".join(n for n in ("mask", "cudnn", "triton", "vsize", "vsize_v")
                     if n in ok or (n == "triton" and any(x.startswith("triton_") for x in ok)))
    raise ValueError(f"attention path {path!r} does not run for {tuple(q.shape)} {q.dtype} on {q.device.type}"
                     f"{' with dropout' if dropout_p else ''}; paths that run here: {here}")


def _default_triton_config(d: int) -> str:
    return kernel.configs_for(min(d, kernel.MAX_HEAD_DIM))[0]


def _cudnn(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, dropout_p: float) -> Tensor:
    """SDPA's cuDNN kernel with the additive bias (in q's dtype).

    What SDPA itself calls when it picks cuDNN; called directly because picking it
    through sdpa_kernel(..., set_priority=True) changes a process-wide setting,
    which other threads would see. The op has no gradient for the bias: the
    callers never pass one that needs it (:func:`runnable`).
    """
    lse = _needs_grad(q, k, v)
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, bias, lse, dropout_p, False, False)[0]


def _sized_values(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, dropout_p: float, pad_qk: bool) -> Tensor:
    """``softmax(s + log w) V = A(s)[w V] / A(s)[w]``: no bias, sizes folded into V.

    ``A(s)[X]`` is plain SDPA of values X; ``w = exp(bias - max bias)`` per
    image (the max cancels in the quotient and keeps ``w V`` in range: w <= 1).
    V is extended by the w column and zero-padded to a multiple of 8; with
    ``pad_qk``, q and k are zero-padded to the same head dim (SDPA's flash
    kernel wants one head dim for q, k and v; zero channels add nothing to
    the logits) and the scale stays ``1/sqrt(D)``.
    """
    if dropout_p:
        raise ValueError("the vsize paths have no dropout (it would renormalise); use path='mask' while training")
    d = q.shape[-1]
    heads = q.shape[1]
    b32 = bias.float()
    w = torch.exp(b32 - b32.amax(dim=-1, keepdim=True))[:, 0, 0, :, None]  # [B, N, 1] fp32, 0 for size 0
    w = w[:, None].to(v.dtype).expand(v.shape[0], heads, -1, -1)  # [B, H, N, 1]
    width = d + 1 + (-(d + 1) % 8)
    v2 = F.pad(torch.cat([v * w, w], dim=-1), (0, width - d - 1))
    if pad_qk:
        q, k = F.pad(q, (0, width - d)), F.pad(k, (0, width - d))
    out = F.scaled_dot_product_attention(q, k, v2, scale=d ** -0.5)
    return (out[..., :d].float() / out[..., d:d + 1].float()).to(q.dtype)
