"""How many tokens each layer removes, and how (docs/design.md §2).

Three plain functions:

* :func:`parse_r` turns the user's ``r`` (int, list or ``(r, inflect)``) into
  one int per layer.
* :func:`parse_modes` turns a model-wide mode (``"tofu"``, ``"tome"``,
  ``"prune"``, ``"mlerp"``) into one op mode per layer.
* :func:`plan_layers` walks the token count through the layers: the ``r``
  each step really removes (clamped to what it can), the tokens in and out,
  and whether sizes can differ from 1 at that layer's attention, which is
  what switches proportional attention and size-weighted pooling on. It is
  decided from the schedule alone, never from data, so a patched model has
  no data-dependent branch (no GPU sync, nothing to break graph capture).
"""
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

from .ops import check_int
from .reference import MODES, effective_r

# Model-wide modes; an op mode from MODES ("mean", "mlerp", "prune") is also
# accepted and then used in every layer.
MODEL_MODES = ("tofu", "tome", "prune", "mlerp")

RSpec = Union[int, Sequence[int], Tuple[int, float]]


def parse_r(r: RSpec, depth: int) -> List[int]:
    """Tokens to remove in each of ``depth`` layers.

    r: an int (the same in every layer); a list of ints, one per layer, where
    missing trailing layers remove 0 (a list longer than ``depth`` is a
    ValueError); or a tuple ``(r, inflect)`` with ToMe's meaning: a linear
    ramp from ``int(r * (1 - inflect))`` to ``2r - that`` over the layers
    (``inflect > 0`` removes more late, ``< 0`` more early), each value
    truncated with ``int`` as ToMe does. ``inflect`` must lie in [-1, 1] so
    no layer gets a negative ``r``. With ``depth == 1`` the ramp is its first
    value.

    Returns a new list of ``depth`` non-negative ints. These are requests: a
    step removes at most half of its non-prefix tokens (see plan_layers).
    """
    check_int("depth", depth)
    if isinstance(r, tuple):
        if len(r) != 2:
            raise ValueError(f"r as a tuple must be (r, inflect); got {r!r}")
        r0, inflect = r
        check_int("r", r0)
        if isinstance(inflect, bool) or not isinstance(inflect, (int, float)):
            raise TypeError(f"inflect must be a number, got {type(inflect).__name__}")
        if not -1.0 <= inflect <= 1.0:
            raise ValueError(f"inflect must lie in [-1, 1] (else some layer's r < 0); got {inflect}")
        first = int(r0 * (1.0 - inflect))
        last = 2 * r0 - first
        if depth <= 1:
            return [first] * depth
        step = (last - first) / (depth - 1)
        return [int(first + step * i) for i in range(depth)]
    if isinstance(r, (list,)) or (isinstance(r, Sequence) and not isinstance(r, (str, bytes))):
        values = [check_int(f"r[{i}]", v) for i, v in enumerate(r)]
        if len(values) > depth:
            raise ValueError(f"r has {len(values)} entries but the model has only {depth} layers")
        return values + [0] * (depth - len(values))
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"r must be an int, a list of ints or a tuple (r, inflect); got {type(r).__name__}")
    check_int("r", r)
    return [r] * depth


def parse_modes(mode: Union[str, Sequence[str]], depth: int, prune_layers: Optional[int] = None) -> List[str]:
    """The op mode ("mean", "mlerp" or "prune") of each of ``depth`` layers.

    mode: ``"tofu"``: "prune" in the first ``prune_layers`` layers, then
    "mlerp" (default ``prune_layers = depth // 2``: ToFu's best for a
    12-block ViT-B is 6); ``"tome"`` (or ``"mean"``): "mean" everywhere;
    ``"prune"`` / ``"mlerp"``: that op everywhere. A list of op modes, one per
    layer, is taken as it is. ``prune_layers`` only matters for "tofu" and
    must lie in ``[0, depth]``.
    """
    check_int("depth", depth)
    if prune_layers is not None:
        check_int("prune_layers", prune_layers)
        if prune_layers > depth:
            raise ValueError(f"prune_layers must be <= depth = {depth}, got {prune_layers}")
    if isinstance(mode, str):
        if mode == "tofu":
            d = depth // 2 if prune_layers is None else prune_layers
            return ["prune"] * d + ["mlerp"] * (depth - d)
        if mode == "tome":
            return ["mean"] * depth
        if mode in MODES:
            return [mode] * depth
        raise ValueError(f"mode must be one of {MODEL_MODES} (or an op mode {MODES}); got {mode!r}")
    if isinstance(mode, Sequence):
        modes = list(mode)
        if len(modes) != depth:
            raise ValueError(f"a list of modes needs one per layer ({depth}); got {len(modes)}")
        for i, m in enumerate(modes):
            if m not in MODES:
                raise ValueError(f"mode[{i}] must be one of {MODES}; got {m!r}")
        return modes
    raise TypeError(f"mode must be a string or a list of strings; got {type(mode).__name__}")


class LayerPlan(NamedTuple):
    """What one layer does to the tokens (all plain Python values)."""

    n_in: int  # tokens entering the layer
    r: int  # tokens its step removes: the request clamped to Nb of n_in
    mode: str  # op mode of its step ("mean", "mlerp", "prune")
    sized: bool  # sizes may differ from 1 at this layer's attention (proportional attention on)

    @property
    def n_out(self) -> int:
        return self.n_in - self.r


def plan_layers(n_tokens: int, protected: int, r: Sequence[int], modes: Sequence[str]) -> List[LayerPlan]:
    """Walk ``n_tokens`` (prefix included) through layers with per-layer ``r`` and ``modes``.

    ``sized`` of a layer is True once an earlier layer ran a "mean" or
    "mlerp" step that removed at least one token: before that every size is
    1 (a "prune" step keeps the B token's size) and proportional attention
    would add log(1) = 0. Use :func:`sized_after` for the state after the
    last layer (pooling).
    """
    if len(r) != len(modes):
        raise ValueError(f"r has {len(r)} layers but modes has {len(modes)}")
    plan, n = [], n_tokens
    for r_i, mode in zip(r, modes):
        plan.append(LayerPlan(n, effective_r(n, r_i, protected), mode, sized_after(plan)))
        n = plan[-1].n_out
    return plan


def sized_after(plan: Sequence[LayerPlan]) -> bool:
    """Whether sizes may differ from 1 after the last layer of ``plan``: once
    any step merged (not pruned) at least one token."""
    return any(p.r >= 1 and p.mode != "prune" for p in plan)


def token_counts(plan: Sequence[LayerPlan]) -> List[int]:
    """Tokens entering each layer, then the tokens leaving the last one."""
    return [p.n_in for p in plan] + ([plan[-1].n_out] if plan else [])


_PLANS: dict = {}
_MAX_PLANS = 256


def _frozen(value):
    """A hashable key for a setting that tells apart what the parsers tell apart
    (a list from a tuple, True from 1); raises TypeError on anything unhashable."""
    if isinstance(value, (list, tuple)):
        return type(value), tuple(_frozen(v) for v in value)
    hash(value)
    return type(value), value


def cached_plan(n_tokens: int, protected: int, depth: int, r: RSpec, mode, prune_layers: Optional[int]
                ) -> Tuple[LayerPlan, ...]:
    """``plan_layers`` of a model's settings (``parse_r``, ``parse_modes``), remembered.

    Patched models call this on every forward; parsing the settings and
    walking the schedule is most of their Python time per call otherwise.
    Bad settings raise exactly as the parsers do, at every call.
    """
    try:
        key = (n_tokens, protected, depth, _frozen(r), _frozen(mode), _frozen(prune_layers))
    except TypeError:  # not hashable: a bad setting, which the parsers below name
        key = None
    plan = _PLANS.get(key) if key is not None else None
    if plan is None:
        plan = tuple(plan_layers(n_tokens, protected, parse_r(r, depth), parse_modes(mode, depth, prune_layers)))
        if key is not None:
            if len(_PLANS) >= _MAX_PLANS:
                _PLANS.clear()
            _PLANS[key] = plan
    return plan
