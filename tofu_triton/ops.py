"""Public ops: input checks, backend dispatch, ``torch.library`` custom ops, autograd.

Ops (each defined in ``reference.py``; its kernels in one file per op under
``kernels/``): ``bipartite_match``, ``merge_tokens``, ``token_fusion`` (match
+ merge on a given metric), ``token_fusion_step`` (a ViT block's whole step
from its attention keys, on the launches the card measured fastest), and for the Stable Diffusion step
``spatial_partition``, ``spatial_match``, ``spatial_merge``, ``spatial_unmerge``.

Dispatch: ``backend="auto"`` sends CUDA tensors to the Triton kernels and CPU
tensors to ``reference.py``; ``"triton"`` forces the kernels (on CPU only under
``TRITON_INTERPRET=1``); ``"reference"`` forces the reference.

The Triton path has three ways in, one per caller (docs/design.md §3.3):

* ``torch.library.custom_op`` ops (``tofu_triton::match``, ``merge``,
  ``merge_backward``, ``step``, ``spatial_partition``, ``spatial_match``,
  ``spatial_merge``, ``spatial_merge_backward``, ``spatial_unmerge``) with
  fake implementations and registered autograd, so ``torch.compile(fullgraph=True)``
  and CUDA graphs see one opaque node per op whose output shapes depend only
  on ``N``, ``r`` and ``protected``; used while compiling and whenever a
  gradient is needed. ``custom_op`` rather than ``triton_op``: ``triton_op``
  does not trace under the CPU interpreter.
* The launchers themselves, called directly in eager inference (no
  gradient, not compiling): the custom op's dispatch costs host time that
  a batch-1 server pays on every block, and buys nothing there.
* ``triton_op`` twins, used only while ``torch.export`` traces CUDA tensors,
  so AOTInductor packages the kernels.

The reference is plain torch code and needs no op around it.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import dispatch, reference
from .reference import MODES, Match, Partition, SpatialMatch, Step, effective_r, split_sizes

BACKENDS = ("auto", "triton", "reference")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REFERENCE_DTYPES = TRITON_DTYPES + (torch.float64,)


_KERNELS = []


def _kernels():
    """The kernel package (its op modules: ``_kernels().step`` ...), imported on first use:
    only the Triton path needs it, and TRITON_INTERPRET must be set before it is imported."""
    if not _KERNELS:  # an import statement costs microseconds even when done: once is enough
        from . import kernels

        _KERNELS.append(kernels)
    return _KERNELS[0]


def _use_triton(t: Tensor, backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return False
    if t.device.type == "cuda":
        return True
    if backend == "triton":
        if t.device.type == "cpu" and _kernels().common.interpreting():
            return True
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors (got {t.device.type}); on the CPU "
            "set TRITON_INTERPRET=1 before importing tofu_triton to run the kernels "
            "in Triton's interpreter, or use backend='reference'"
        )
    return False  # auto on a non-CUDA device


def _launch_directly(x: Tensor) -> bool:
    """Eager inference: call the launcher itself instead of the custom op
    (no autograd needed, nobody tracing)."""
    return not (x.requires_grad and torch.is_grad_enabled()) and not torch.compiler.is_compiling()


def _check_float(name: str, t: Tensor, use_triton: bool) -> None:
    allowed = TRITON_DTYPES if use_triton else REFERENCE_DTYPES
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} must have dtype {names}; got {t.dtype}")


def _check_3d(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 3:
        raise ValueError(f"{name} must have shape [B, N, C] (3 dims); got {tuple(t.shape)}")


def check_int(name: str, v, low: int = 0) -> int:
    """``v`` if it is an int >= ``low`` (bool is not), else TypeError/ValueError naming ``name``."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__} ({v!r})")
    if v < low:
        raise ValueError(f"{name} must be >= {low}, got {v}")
    return v


def _check_size(size: Optional[Tensor], x: Tensor) -> None:
    if size is None:
        return
    if not isinstance(size, Tensor):
        raise TypeError(f"size must be a torch.Tensor or None, got {type(size).__name__}")
    if tuple(size.shape) != (x.shape[0], x.shape[1], 1):
        raise ValueError(f"size must have shape [B, N, 1] = {(x.shape[0], x.shape[1], 1)}; got {tuple(size.shape)}")
    if size.device != x.device:
        raise ValueError(f"size is on {size.device} but x is on {x.device}")
    if size.dtype != torch.float32:
        raise TypeError(f"size must be float32, got {size.dtype}")
    # Sizes count original tokens: > 0, or 0 for padding. Reading the values back costs a device-to-host sync
    # on CUDA (none is allowed in a forward, docs/design.md §4) and breaks graph capture while compiling, so
    # only CPU tensors outside compilation are checked; elsewhere a negative or NaN size is the caller's bug.
    if size.device.type == "cpu" and not torch.compiler.is_compiling() and not bool((size >= 0).all()):
        raise ValueError("size must be >= 0 (original tokens per token, 0 for padding); it has a negative or NaN "
                         "entry")


# --------------------------------------------------------------------------- launches
# What each Triton op launches, given the kernels' ``wrap`` (see ops' docstring).


def _match_launch(metric: Tensor, r: int, protected: int, wrap=None) -> List[Tensor]:
    k = _kernels()
    wrap = wrap or k.common.plain
    node_max, node_idx = k.match.match_scores(metric, protected, wrap=wrap)
    return list(k.select.select(node_max, node_idx, r, split_sizes(metric.shape[1], protected)[1], wrap=wrap))


def _merge_launch(x: Tensor, size: Optional[Tensor], unm_idx: Tensor, dst_start: Tensor, dst_src: Tensor,
                  protected: int, mode: str, wrap=None) -> Tuple[Tensor, Tensor]:
    k = _kernels()
    return k.merge.merge_forward(x, size, unm_idx, dst_start, dst_src, protected, mode, wrap=wrap or k.common.plain)


def _step_launch(x: Tensor, keys: Tensor, size: Optional[Tensor], r: int, protected: int, mode: str,
                 bias_dtype: Optional[torch.dtype], path: str, merge: str = "rows",
                 wrap=None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    k = _kernels()
    return k.step.token_fusion_step(x, keys, size, r, protected, mode, bias_dtype, wrap=wrap or k.common.plain,
                                    path=path, merge=merge)


# --------------------------------------------------------------------------- custom ops
# Only the Triton path goes through these ops. The reference backend calls
# reference.py directly: it is plain torch code, so autograd and
# torch.compile see through it without help.


@torch.library.custom_op("tofu_triton::match", mutates_args=())
def _match_op(metric: Tensor, r: int, protected: int) -> List[Tensor]:
    return _match_launch(metric, r, protected)


@_match_op.register_fake
def _(metric, r, protected):
    batch, n, _ = metric.shape
    na, nb = split_sizes(n, protected)
    new = lambda *shape: metric.new_empty(shape, dtype=torch.int64)  # noqa: E731
    return [new(batch, na - r), new(batch, r), new(batch, r), new(batch, nb + 1), new(batch, r)]


@torch.library.custom_op("tofu_triton::merge", mutates_args=())
def _merge_op(
    x: Tensor, size: Optional[Tensor], unm_idx: Tensor, dst_start: Tensor, dst_src: Tensor,
    protected: int, mode: str,
) -> Tuple[Tensor, Tensor]:
    return _merge_launch(x, size, unm_idx, dst_start, dst_src, protected, mode)


@_merge_op.register_fake
def _(x, size, unm_idx, dst_start, dst_src, protected, mode):
    batch, n, c = x.shape
    n_out = n - dst_src.shape[1]
    return x.new_empty(batch, n_out, c), x.new_empty(batch, n_out, 1, dtype=torch.float32)


@torch.library.custom_op("tofu_triton::merge_backward", mutates_args=())
def _merge_backward_op(
    grad_out: Tensor, x: Tensor, size: Optional[Tensor], unm_idx: Tensor, dst_start: Tensor,
    dst_src: Tensor, protected: int, mode: str,
) -> Tensor:
    return _kernels().merge.merge_backward(grad_out, x, size, unm_idx, dst_start, dst_src, protected, mode)


@_merge_backward_op.register_fake
def _(grad_out, x, size, unm_idx, dst_start, dst_src, protected, mode):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _merge_setup_context(ctx, inputs, output):
    x, size, unm_idx, dst_start, dst_src, protected, mode = inputs
    ctx.save_for_backward(x, size, unm_idx, dst_start, dst_src)
    ctx.protected, ctx.mode = protected, mode
    ctx.mark_non_differentiable(output[1])  # sizes are counts, not differentiable


def _merge_backward(ctx, grad_out, grad_size_out):
    x, size, unm_idx, dst_start, dst_src = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = _merge_backward_op(grad_out, x, size, unm_idx, dst_start, dst_src, ctx.protected, ctx.mode)
    return grad_x, None, None, None, None, None, None


_merge_op.register_autograd(_merge_backward, setup_context=_merge_setup_context)


@torch.library.custom_op("tofu_triton::step", mutates_args=())
def _step_op(x: Tensor, keys: Tensor, size: Optional[Tensor], r: int, protected: int, mode: str,
             bias_dtype: Optional[torch.dtype], path: str, merge: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return _step_launch(x, keys, size, r, protected, mode, bias_dtype, path, merge)


@_step_op.register_fake
def _(x, keys, size, r, protected, mode, bias_dtype, path, merge):
    step = _kernels().step
    batch, n, c = x.shape
    n_out = n - r
    bias = x.new_empty(batch, step.bias_row(n_out) if bias_dtype is not None else 0, dtype=bias_dtype or x.dtype)
    index = x.new_empty(batch * sum(step.index_fields(n, protected, r)), dtype=torch.int64)
    return x.new_empty(batch, n_out, c), x.new_empty(batch, n_out, 1, dtype=torch.float32), bias, index


def _step_setup_context(ctx, inputs, output):
    x, keys, size, r, protected, mode, bias_dtype, path, merge = inputs
    ctx.save_for_backward(x, size, output[3])
    ctx.r, ctx.protected, ctx.mode = r, protected, mode
    ctx.mark_non_differentiable(*output[1:])


def _step_backward(ctx, grad_out, *_):
    # The keys only choose the match (no gradient); x's gradient is the merge's.
    x, size, index = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        unm_idx, _, _, dst_start, dst_src = _split_index(index, x.shape[0], x.shape[1], ctx.protected, ctx.r)
        grad_x = _merge_backward_op(grad_out, x, size, unm_idx, dst_start, dst_src, ctx.protected, ctx.mode)
    return grad_x, None, None, None, None, None, None, None, None


_step_op.register_autograd(_step_backward, setup_context=_step_setup_context)


def _split_index(index: Tensor, batch: int, n: int, protected: int, r: int) -> List[Tensor]:
    """The five match tensors ([B, k] int64, contiguous views) of the step's flat index buffer."""
    return _kernels().step.split_index(index, batch, n, protected, r)


# --------------------------------------------------------------------------- Stable Diffusion step ops
# The same pattern for the spatial partition (docs/design.md §5): the
# partition travels as position arrays, shapes depend only on N, Na, Nb, r.


@torch.library.custom_op("tofu_triton::spatial_partition", mutates_args=())
def _spatial_partition_op(step: Tensor, h: int, w: int, sx: int, sy: int, seed: int, block: int,
                          rand: bool) -> List[Tensor]:
    return list(_kernels().partition.spatial_partition(step, h, w, sx, sy, seed, block, rand))


@_spatial_partition_op.register_fake
def _(step, h, w, sx, sy, seed, block, rand):
    n, nb = h * w, (h // sy) * (w // sx)
    return [step.new_empty(n - nb), step.new_empty(nb), step.new_empty(n)]


# Candidates of the SD match's two halves (kernels.match.SPATIAL_SCORES_CANDIDATES,
# kernels.select.SPATIAL_SELECT_CANDIDATES). On CUDA the measured winner runs
# (tofu_triton.dispatch, tables written by bench/tournament_sd.py); until a table
# has a row, the defaults are the kernels a card has measured ("match" and
# "radix64", the H200 of 2026-12-04): a candidate becomes the default by a
# committed measurement, never by expectation, however likely "sort" is to win
# (its core, one argsort, measured 0.030 ms against radix64's 0.224 ms at
# N = 4096; docs/design.md §5.1). The CPU (interpreter) runs the same two.
SPATIAL_SCORES_DEFAULT, SPATIAL_SELECT_DEFAULT = "match", "radix64"
# The shape keys of those tables' rows (bench/tournament_sd.py writes them with these).
SPATIAL_TABLE_KEYS = {"spatial_scores": ("B", "N", "C"), "spatial_select": ("B", "N")}


def _spatial_candidates(metric: Tensor) -> Tuple[str, str]:
    """(scores, select) candidate names for the SD match of ``metric`` [B, N, C]."""
    if metric.device.type != "cuda":
        return "match", "radix64"
    from . import dispatch

    sizes = dict(zip("BNC", metric.shape))
    k = _kernels()
    shape = {op: {key: sizes[key] for key in keys} for op, keys in SPATIAL_TABLE_KEYS.items()}
    scores = dispatch.winner("spatial_scores", metric.device, metric.dtype, SPATIAL_SCORES_DEFAULT,
                             allowed=tuple(k.match.SPATIAL_SCORES_CANDIDATES), **shape["spatial_scores"])
    select = dispatch.winner("spatial_select", metric.device, metric.dtype, SPATIAL_SELECT_DEFAULT,
                             allowed=tuple(k.select.SPATIAL_SELECT_CANDIDATES), **shape["spatial_select"])
    return scores, select


@torch.library.custom_op("tofu_triton::spatial_match", mutates_args=())
def _spatial_match_op(metric: Tensor, a_pos: Tensor, b_pos: Tensor, r: int, scores: str = "match",
                      select: str = "radix64") -> List[Tensor]:
    k = _kernels()
    node_max, node_idx = k.match.SPATIAL_SCORES_CANDIDATES[scores](metric, a_pos, b_pos)
    return list(k.select.SPATIAL_SELECT_CANDIDATES[select](node_max, node_idx, r, b_pos.numel()))


@_spatial_match_op.register_fake
def _(metric, a_pos, b_pos, r, scores="match", select="radix64"):
    batch, na, nb = metric.shape[0], a_pos.shape[0], b_pos.shape[0]
    new = lambda *shape: metric.new_empty(shape, dtype=torch.int64)  # noqa: E731
    return [new(batch, na - r), new(batch, nb + 1), new(batch, r), new(batch, na)]


@torch.library.custom_op("tofu_triton::spatial_merge", mutates_args=())
def _spatial_merge_op(x: Tensor, a_pos: Tensor, b_pos: Tensor, unm_idx: Tensor, dst_start: Tensor,
                      dst_src: Tensor, mode: str) -> Tensor:
    return _kernels().merge.merge_forward(x, None, unm_idx, dst_start, dst_src, 0, mode, positions=(a_pos, b_pos),
                                          with_size=False)[0]


@_spatial_merge_op.register_fake
def _(x, a_pos, b_pos, unm_idx, dst_start, dst_src, mode):
    return x.new_empty(x.shape[0], x.shape[1] - dst_src.shape[1], x.shape[2])


@torch.library.custom_op("tofu_triton::spatial_merge_backward", mutates_args=())
def _spatial_merge_backward_op(grad_out: Tensor, x: Tensor, a_pos: Tensor, b_pos: Tensor, unm_idx: Tensor,
                               dst_start: Tensor, dst_src: Tensor, mode: str) -> Tensor:
    return _kernels().merge.merge_backward(grad_out, x, None, unm_idx, dst_start, dst_src, 0, mode,
                                           positions=(a_pos, b_pos))


@_spatial_merge_backward_op.register_fake
def _(grad_out, x, a_pos, b_pos, unm_idx, dst_start, dst_src, mode):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _spatial_merge_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:6])
    ctx.mode = inputs[6]


def _spatial_merge_backward(ctx, grad_out):
    x, *index = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = _spatial_merge_backward_op(grad_out, x, *index, ctx.mode)
    return grad_x, None, None, None, None, None, None


_spatial_merge_op.register_autograd(_spatial_merge_backward, setup_context=_spatial_merge_setup_context)


# The unmerge's kernel reads y, the residual, slot and a_row; the op also
# takes the partition's positions and the match's CSR lists because its
# gradient is the merge in mode "sum", which needs them, and register_autograd
# can save only what the op was given.
@torch.library.custom_op("tofu_triton::spatial_unmerge", mutates_args=())
def _spatial_unmerge_op(y: Tensor, residual: Optional[Tensor], a_pos: Tensor, b_pos: Tensor, slot: Tensor,
                        unm_idx: Tensor, dst_start: Tensor, dst_src: Tensor, a_row: Tensor) -> Tensor:
    return _kernels().unmerge.spatial_unmerge(y, residual, slot, a_row)


@_spatial_unmerge_op.register_fake
def _(y, residual, a_pos, b_pos, slot, unm_idx, dst_start, dst_src, a_row):
    return y.new_empty(y.shape[0], slot.shape[0], y.shape[2])


def _spatial_unmerge_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[2:4], *inputs[5:8])
    ctx.has_residual = inputs[1] is not None


def _spatial_unmerge_backward(ctx, grad_out):
    # The unmerge copies row y[o] to every position it holds, so its gradient
    # sums those positions' gradients: the merge's gather in mode "sum".
    a_pos, b_pos, unm_idx, dst_start, dst_src = ctx.saved_tensors
    grad_y = None
    if ctx.needs_input_grad[0]:
        grad_y = _spatial_merge_op(grad_out, a_pos, b_pos, unm_idx, dst_start, dst_src, "sum")
    grad_res = grad_out if ctx.has_residual and ctx.needs_input_grad[1] else None
    return grad_y, grad_res, None, None, None, None, None, None, None


_spatial_unmerge_op.register_autograd(_spatial_unmerge_backward, setup_context=_spatial_unmerge_setup_context)


# --------------------------------------------------------------------------- export
# torch.export + AOTInductor cannot call a Python custom op from the packaged
# model; they compile user Triton kernels only when the op is a
# ``torch.library.triton_op`` whose body launches them through ``wrap_triton``.
# Those ops are used only while torch.export traces CUDA tensors: everywhere
# else the custom ops above run (``triton_op`` cannot trace under the CPU
# interpreter, and eager/compile/CUDA-graph runs are verified on the custom
# ops). Forward only: an exported model is for inference.

_EXPORT_OPS = {}


def _export_ops() -> dict:
    """{"match", "merge", "step"}: the triton_op twins, registered on first use."""
    if not _EXPORT_OPS:
        if not hasattr(torch.library, "triton_op"):
            raise RuntimeError(f"exporting the Triton path needs torch.library.triton_op (torch >= 2.6); this is "
                               f"torch {torch.__version__}. Export with backend='reference' instead.")
        from torch.library import triton_op, wrap_triton

        @triton_op("tofu_triton::match_export", mutates_args=())
        def match_export(metric: Tensor, r: int, protected: int) -> List[Tensor]:
            return _match_launch(metric, r, protected, wrap=wrap_triton)

        @triton_op("tofu_triton::merge_export", mutates_args=())
        def merge_export(x: Tensor, size: Optional[Tensor], unm_idx: Tensor, dst_start: Tensor, dst_src: Tensor,
                         protected: int, mode: str) -> Tuple[Tensor, Tensor]:
            return _merge_launch(x, size, unm_idx, dst_start, dst_src, protected, mode, wrap=wrap_triton)

        @triton_op("tofu_triton::step_export", mutates_args=())
        def step_export(x: Tensor, keys: Tensor, size: Optional[Tensor], r: int, protected: int, mode: str,
                        bias_dtype: Optional[torch.dtype], path: str = "one_launch",
                        merge: str = "rows") -> Tuple[Tensor, Tensor, Tensor, Tensor]:
            return _step_launch(x, keys, size, r, protected, mode, bias_dtype, path, merge, wrap=wrap_triton)

        _EXPORT_OPS.update(match=match_export, merge=merge_export, step=step_export)
    return _EXPORT_OPS


def _triton_path(name: str, x: Tensor):
    """The callable that runs op ``name`` on the Triton path for this caller (see
    the module docstring): the export twin, the custom op, or the launcher itself."""
    if x.is_cuda and dispatch.exporting():
        return _export_ops()[name]
    if _launch_directly(x):
        return _LAUNCHES[name]
    return _CUSTOM_OPS[name]


_LAUNCHES = {"match": _match_launch, "merge": _merge_launch, "step": _step_launch}
_CUSTOM_OPS = {"match": _match_op, "merge": _merge_op, "step": _step_op}


# --------------------------------------------------------------------------- public API


def bipartite_match(metric: Tensor, r: int, protected: int = 1, backend: str = "auto") -> Match:
    """Which ``r`` tokens of set A merge into which tokens of set B (docs/design.md §1).

    metric: [B, N, D] float32/float16/bfloat16 (float64 on the reference
    backend), any strides. ``r`` larger than Nb = floor((N - protected) / 2)
    is clamped to Nb; the returned Match has ``r`` = the clamped value.
    No gradient flows into ``metric``.
    """
    _check_3d("metric", metric)
    check_int("r", r)
    check_int("protected", protected)
    n = metric.shape[1]
    if protected > n:
        raise ValueError(f"protected must be <= N = {n}, got {protected}")
    use_triton = _use_triton(metric, backend)
    _check_float("metric", metric, use_triton)
    r = effective_r(n, r, protected)
    metric = metric.detach()
    if r == 0 or not use_triton:  # an empty match needs no kernel
        return reference.bipartite_match(metric, r, protected)
    return Match(*_triton_path("match", metric)(metric, r, protected), protected)


def merge_tokens(
    x: Tensor, match: Match, size: Optional[Tensor] = None, mode: str = "mean", backend: str = "auto"
) -> Tuple[Tensor, Tensor]:
    """Apply a :class:`Match` to ``x`` (docs/design.md §1.5).

    x: [B, N, C] float, any strides; size: [B, N, 1] float32 or None (ones).
    Returns (x_out [B, N - r, C] in x's dtype, size_out [B, N - r, 1] float32).
    With ``match.r == 0`` returns ``x`` itself and ``size`` (or ones).
    """
    _check_3d("x", x)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(match, Match):
        raise TypeError(f"match must be a tofu_triton.Match, got {type(match).__name__}")
    use_triton = _use_triton(x, backend)
    _check_float("x", x, use_triton)
    _check_size(size, x)
    if match.unm_idx.device != x.device:
        raise ValueError(f"match is on {match.unm_idx.device} but x is on {x.device}")
    na, nb = split_sizes(x.shape[1], match.protected)
    same_shape = (match.unm_idx.shape[0] == x.shape[0] and match.unm_idx.shape[1] + match.r == na
                  and match.dst_start.shape[1] == nb + 1)
    if not same_shape:
        raise ValueError(
            f"match was made for a different shape: it has B={match.unm_idx.shape[0]}, "
            f"Na={match.unm_idx.shape[1] + match.r}, Nb={match.dst_start.shape[1] - 1}; "
            f"x has B={x.shape[0]}, Na={na}, Nb={nb}"
        )
    if match.r == 0 or not use_triton:  # an empty match needs no kernel
        return reference.merge_tokens(x, match, size, mode)
    return _triton_path("merge", x)(x, size, match.unm_idx.contiguous(), match.dst_start.contiguous(),
                                    match.dst_src.contiguous(), match.protected, mode)


def token_fusion(
    x: Tensor,
    metric: Tensor,
    r: int,
    size: Optional[Tensor] = None,
    mode: str = "mlerp",
    protected: int = 1,
    backend: str = "auto",
) -> Tuple[Tensor, Tensor]:
    """One ToFu step: match on ``metric`` [B, N, D], merge ``x`` [B, N, C].

    Returns (x_out [B, N - r', C], size_out [B, N - r', 1] float32) with
    r' = min(r, Nb). See :func:`bipartite_match` and :func:`merge_tokens`.
    """
    _check_3d("x", x)
    _check_3d("metric", metric)
    if metric.shape[:2] != x.shape[:2]:
        raise ValueError(f"metric and x must share [B, N]; got {tuple(metric.shape[:2])} and {tuple(x.shape[:2])}")
    if metric.device != x.device:
        raise ValueError(f"metric is on {metric.device} but x is on {x.device}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    match = bipartite_match(metric, r, protected, backend)
    return merge_tokens(x, match, size, mode, backend)


def token_fusion_step(
    x: Tensor,
    keys: Tensor,
    r: int,
    size: Optional[Tensor] = None,
    mode: str = "mlerp",
    protected: int = 1,
    bias_dtype: Optional[torch.dtype] = None,
    backend: str = "auto",
    with_match: bool = True,
    path: Optional[str] = None,
) -> Step:
    """A ViT block's whole step from its attention keys (docs/design.md §3.1).

    x: [B, N, C] float; keys: [B, H, N, D] the block's attention keys (any
    strides, e.g. a view into the qkv projection), averaged over heads as
    :func:`tofu_triton.reference.head_mean` into the metric; size: [B, N, 1]
    float32 or None (ones); bias_dtype: also return the next attention's
    bias log(size) [B, 1, 1, N - r'] in this dtype (its rows 16-element
    aligned on the Triton path, which SDPA takes without a copy).
    Returns a :class:`tofu_triton.reference.Step` (x, size, bias, match) with
    r' = min(r, Nb) tokens removed; ``with_match=False`` may leave its match
    None (the Triton path then skips building it: host time a model that
    needs no match saves on every block).

    ``path``: which Triton implementation runs (``kernels.step.STEP_PATHS``:
    "one_launch", "two_launch", "three_launch", "four_launch", "mean_plan"; docs/design.md §3.1-3.2). None
    (the default) takes on CUDA the fastest measured on this card for the nearest
    measured shape (``tofu_triton.dispatch``, table "vit_step"; an eager caller at
    a batch the card measured host-bound also weighs each path's host time), and
    in the interpreter the one-launch step where it applies. All give the same result
    (merged rows up to rounding); the reference backend ignores it. Gradients reach x only.
    """
    _check_3d("x", x)
    if not isinstance(keys, Tensor) or keys.dim() != 4:
        raise ValueError(f"keys must be a [B, H, N, D] tensor; got {getattr(keys, 'shape', type(keys).__name__)}")
    batch, n, c = x.shape
    if keys.shape[0] != batch or keys.shape[2] != n:
        raise ValueError(f"keys [B, H, N, D] = {tuple(keys.shape)} do not belong to x [B, N, C] = {tuple(x.shape)}")
    if keys.device != x.device:
        raise ValueError(f"keys are on {keys.device} but x is on {x.device}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_int("r", r)
    check_int("protected", protected)
    if protected > n:
        raise ValueError(f"protected must be <= N = {n}, got {protected}")
    if bias_dtype is not None and not (isinstance(bias_dtype, torch.dtype) and bias_dtype.is_floating_point):
        raise TypeError(f"bias_dtype must be a floating torch.dtype or None, got {bias_dtype!r}")
    use_triton = step_backend(x, backend)
    _check_float("keys", keys, use_triton)
    _check_size(size, x)
    return block_step(x, keys, r, size, mode, protected, bias_dtype, use_triton, with_match, path)


def step_backend(x: Tensor, backend: str) -> bool:
    """What :func:`token_fusion_step` checks of ``x`` and ``backend`` and every block of a forward
    shares: whether the step runs the Triton kernels (a ValueError for an unknown backend, a
    RuntimeError for "triton" where it cannot run, a TypeError for a dtype the path does not take).
    The patches call it once per forward and pass the answer to :func:`block_step`."""
    use_triton = _use_triton(x, backend)
    _check_float("x", x, use_triton)
    return use_triton


def block_step(x: Tensor, keys: Tensor, r: int, size: Optional[Tensor], mode: str, protected: int,
               bias_dtype: Optional[torch.dtype], use_triton: bool, with_match: bool = True,
               path: Optional[str] = None) -> Step:
    """:func:`token_fusion_step` without its argument checks, for the patched models' blocks, which
    check once per forward what every block shares (``use_triton``: :func:`step_backend`'s answer)
    and pass tensors they built themselves
    (docs/design.md §3.3: the checks cost host time on every block of an eager forward)."""
    n = x.shape[1]
    r = effective_r(n, r, protected)
    if keys.requires_grad:
        keys = keys.detach()
    if r == 0 or not use_triton:  # an empty match needs no kernel
        return reference.token_fusion_step(x, keys, r, size, mode, protected, bias_dtype)
    path = _step_path(path, x, n, x.shape[2], keys.shape[3], protected)  # after the reference: it imports kernels
    merge = _merge_variant(x) if path != "one_launch" else "rows"
    outputs = _triton_path("step", x)(x, keys, size, r, protected, mode, bias_dtype, path, merge)
    return _as_step(*outputs, n, protected, r, bias_dtype is not None, with_match)


def _step_path(path: Optional[str], x: Tensor, n: int, c: int, head_dim: int, protected: int) -> str:
    """The step's Triton implementation for these sizes (see token_fusion_step's ``path``)."""
    step = _kernels().step
    allowed = step.paths_for(n, c, head_dim, protected, x.dtype, x.device.type)
    if path is not None:
        if path not in step.STEP_PATHS:
            raise ValueError(f"path must be one of {step.STEP_PATHS} or None, got {path!r}")
        if path not in allowed:
            raise ValueError(f"path {path!r} does not handle N={n}, C={c}, head dim {head_dim}, "
                             f"{str(x.dtype).replace('torch.', '')} on {x.device.type}: use one of {allowed} or None")
        return path
    if x.device.type == "cuda":  # a constant to torch.compile (dispatch.winner's docstring)
        return dispatch.winner("vit_step", x.device, x.dtype, "three_launch", allowed=allowed, B=x.shape[0], N=n,
                               C=c, D=head_dim)
    return "one_launch" if "one_launch" in allowed else "three_launch"  # the interpreter: as before the tables


def _merge_variant(x: Tensor) -> str:
    """The step's merge variant (``kernels.merge.MERGE_VARIANTS``) for x [B, N, C]: on CUDA the fastest
    measured on this card (table "vit_merge", bench/tournament_vit.py), else one row per program."""
    if x.device.type != "cuda":
        return "rows"
    return dispatch.winner("vit_merge", x.device, x.dtype, "rows", allowed=tuple(_kernels().merge.MERGE_VARIANTS),
                           B=x.shape[0], N=x.shape[1], C=x.shape[2])


def _as_step(x: Tensor, size: Tensor, bias: Tensor, index: Tensor, n: int, protected: int, r: int,
             with_bias: bool, with_match: bool = True) -> Step:
    """The step kernel's outputs as a Step: the bias [B, 1, 1, N - r] a view of its
    aligned rows, the match (if asked for) five views of the flat index buffer."""
    bias = bias[:, None, None, : n - r] if with_bias else None
    match = Match(*_split_index(index, x.shape[0], n, protected, r), protected) if with_match else None
    return Step(x, size, bias, match)


# --------------------------------------------------------------------------- public API, Stable Diffusion step


def _check_partition(partition, n: int, device) -> Partition:
    if not isinstance(partition, Partition):
        raise TypeError(f"partition must be a tofu_triton.reference.Partition (from spatial_partition), "
                        f"got {type(partition).__name__}")
    na, nb = partition.a_pos.numel(), partition.b_pos.numel()
    if na + nb != n or partition.slot.numel() != n:
        raise ValueError(f"partition covers {na} + {nb} = {na + nb} tokens but the tensor has N = {n}: "
                         "build it with spatial_partition(h, w, ...) for this grid (h * w = N)")
    if partition.a_pos.device != device:
        raise ValueError(f"partition is on {partition.a_pos.device} but the tokens are on {device}")
    return Partition(*(t.contiguous() for t in partition))


def _check_spatial_match(match, batch: int, partition: Partition, device) -> None:
    if not isinstance(match, SpatialMatch):
        raise TypeError(f"match must be a tofu_triton.reference.SpatialMatch (from spatial_match), "
                        f"got {type(match).__name__}")
    na, nb = partition.a_pos.numel(), partition.b_pos.numel()
    if (match.a_row.shape[0] != batch or match.a_row.shape[1] != na or match.dst_start.shape[1] != nb + 1
            or match.unm_idx.shape[1] + match.r != na):
        raise ValueError(f"match was made for a different shape: it has B={match.a_row.shape[0]}, "
                         f"Na={match.a_row.shape[1]}, Nb={match.dst_start.shape[1] - 1}; the tokens have "
                         f"B={batch}, Na={na}, Nb={nb}")
    if match.a_row.device != device:
        raise ValueError(f"match is on {match.a_row.device} but the tokens are on {device}")


def spatial_partition(h: int, w: int, sx: int = 2, sy: int = 2, *, seed: Optional[int] = None,
                      step: Optional[Tensor] = None, block: int = 0, device=None, backend: str = "auto") -> Partition:
    """The partition of an ``h x w`` token grid into ``sy x sx`` cells (docs/design.md §5).

    Each full cell gives one destination (set B): its top-left token, or with
    ``seed`` the one picked by :func:`tofu_triton.reference.cell_choice` from
    ``(seed, step, block, cell)`` (``step``: int64 scalar tensor, default 0).
    All other tokens form set A. On CUDA one kernel launch builds it.
    """
    for name, value in (("h", h), ("w", w), ("sx", sx), ("sy", sy)):
        check_int(name, value, low=1)
    check_int("block", block)
    if seed is not None:
        check_int("seed", seed)
    if step is None:
        step = torch.zeros((), dtype=torch.int64, device=device)
    elif not isinstance(step, Tensor) or step.numel() != 1:
        raise TypeError(f"step must be an int64 scalar tensor, got {step!r}")
    step = step.reshape(()).to(device=device if device is not None else step.device, dtype=torch.int64)
    cells = (h // sy) * (w // sx)
    if cells == 0 or not _use_triton(step, backend):
        choice = None if seed is None else reference.cell_choice(seed, step, block, (h // sy, w // sx), sx * sy)
        return reference.spatial_partition(h, w, sx, sy, choice, device=step.device)
    return Partition(*_spatial_partition_op(step, h, w, sx, sy, seed or 0, block, seed is not None))


def spatial_match(metric: Tensor, partition: Partition, r: int, backend: str = "auto") -> SpatialMatch:
    """Which ``r`` A tokens of a spatial partition merge into which B tokens (docs/design.md §5).

    metric: [B, N, D] float32/float16/bfloat16 (float64 on the reference
    backend), any strides; partition from :func:`tofu_triton.reference.spatial_partition`
    on metric's device. ``r`` is clamped to Na (to 0 when Nb = 0); the returned
    match has ``r`` = the clamped value. No gradient flows into ``metric``.
    """
    _check_3d("metric", metric)
    check_int("r", r)
    partition = _check_partition(partition, metric.shape[1], metric.device)
    use_triton = _use_triton(metric, backend)
    _check_float("metric", metric, use_triton)
    na, nb = partition.a_pos.numel(), partition.b_pos.numel()
    r = min(r, na) if nb else 0
    metric = metric.detach()
    if r == 0 or not use_triton:
        return reference.spatial_match(metric, partition, r)
    return SpatialMatch(*_spatial_match_op(metric, partition.a_pos, partition.b_pos, r, *_spatial_candidates(metric)))


def spatial_merge(x: Tensor, match: SpatialMatch, partition: Partition, mode: str = "mean",
                  backend: str = "auto") -> Tensor:
    """x [B, N, C] -> [B, N - r, C] in x's dtype: [unmerged A ascending, B] (sizes all 1).

    ``mode``: "mean" (ToMe), "mlerp" (ToFu) or "prune". Returns ``x`` itself when r = 0.
    """
    _check_3d("x", x)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    partition = _check_partition(partition, x.shape[1], x.device)
    _check_spatial_match(match, x.shape[0], partition, x.device)
    use_triton = _use_triton(x, backend)
    _check_float("x", x, use_triton)
    if match.r == 0 or not use_triton:
        return reference.spatial_merge(x, match, partition, mode)
    return _spatial_merge_op(x, partition.a_pos, partition.b_pos, match.unm_idx, match.dst_start, match.dst_src,
                             mode)


def spatial_unmerge(y: Tensor, match: SpatialMatch, partition: Partition, residual: Optional[Tensor] = None,
                    backend: str = "auto") -> Tensor:
    """y [B, N - r, C] (the order of :func:`spatial_merge`) -> [B, N, C]: each position
    gets the row that holds it, plus ``residual`` [B, N, C] (y's dtype) if given."""
    _check_3d("y", y)
    n = partition.slot.numel() if isinstance(partition, Partition) else -1
    partition = _check_partition(partition, n, y.device)
    _check_spatial_match(match, y.shape[0], partition, y.device)
    if y.shape[1] != n - match.r:
        raise ValueError(f"y must have N - r = {n - match.r} rows (the merged tokens), got {y.shape[1]}")
    use_triton = _use_triton(y, backend)
    _check_float("y", y, use_triton)
    if residual is not None:
        _check_3d("residual", residual)
        if tuple(residual.shape) != (y.shape[0], n, y.shape[2]) or residual.dtype != y.dtype:
            raise ValueError(f"residual must be [B, N, C] = {(y.shape[0], n, y.shape[2])} in {y.dtype}; "
                             f"got {tuple(residual.shape)} in {residual.dtype}")
        if residual.device != y.device:
            raise ValueError(f"residual is on {residual.device} but y is on {y.device}")
    if match.r == 0 or not use_triton:
        return reference.spatial_unmerge(y, match, partition, residual)
    return _spatial_unmerge_op(y, residual, *partition, match.unm_idx, match.dst_start, match.dst_src, match.a_row)
