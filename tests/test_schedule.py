"""Schedules across a model (docs/design.md §2): r per layer, mode per layer, token plan."""
import pytest

from tofu_triton.schedule import parse_modes, parse_r, plan_layers, sized_after, token_counts


def test_r_int_is_constant():
    assert parse_r(8, 4) == [8, 8, 8, 8]
    assert parse_r(0, 3) == [0, 0, 0]


def test_r_list_pads_with_zeros():
    assert parse_r([3, 1], 4) == [3, 1, 0, 0]
    assert parse_r([], 2) == [0, 0]


def test_r_list_longer_than_depth_is_an_error():
    with pytest.raises(ValueError, match="only 2 layers"):
        parse_r([1, 2, 3], 2)


@pytest.mark.parametrize("r, inflect, depth, expected", [
    # ToMe's parse_r: ramp from int(r(1-inflect)) to 2r - that, int() of each value.
    (16, 0.0, 4, [16, 16, 16, 16]),
    (16, -0.5, 12, [24, 22, 21, 19, 18, 16, 15, 13, 12, 10, 9, 8]),
    (8, 1.0, 5, [0, 4, 8, 12, 16]),
    (8, -1.0, 3, [16, 8, 0]),
    (5, 0.5, 1, [2]),
])
def test_r_inflect_ramp(r, inflect, depth, expected):
    out = parse_r((r, inflect), depth)
    assert out == expected
    assert len(out) == depth
    if depth > 1:
        assert sum(out) == pytest.approx(r * depth, abs=depth)  # the same total, shifted in depth


@pytest.mark.parametrize("bad, err", [
    (-1, ValueError), ([1, -2], ValueError), ((4, 1.5), ValueError), ((4,), ValueError), ((5, 4, 3, 2), ValueError),
    (2.0, TypeError), (True, TypeError), ("8", TypeError), ([1, 2.5], TypeError), ((4, "x"), TypeError),
])
def test_r_bad_values(bad, err):
    with pytest.raises(err):
        parse_r(bad, 4)


def test_modes():
    assert parse_modes("tofu", 12) == ["prune"] * 6 + ["mlerp"] * 6
    assert parse_modes("tofu", 5) == ["prune"] * 2 + ["mlerp"] * 3
    assert parse_modes("tofu", 4, prune_layers=1) == ["prune", "mlerp", "mlerp", "mlerp"]
    assert parse_modes("tofu", 4, prune_layers=0) == ["mlerp"] * 4
    assert parse_modes("tofu", 4, prune_layers=4) == ["prune"] * 4
    assert parse_modes("tome", 3) == ["mean"] * 3
    assert parse_modes("prune", 2) == ["prune"] * 2
    assert parse_modes("mlerp", 2) == ["mlerp"] * 2
    assert parse_modes(["mean", "prune"], 2) == ["mean", "prune"]


@pytest.mark.parametrize("mode, kwargs, err", [
    ("fast", {}, ValueError), ("tofu", {"prune_layers": 5}, ValueError),
    ("tofu", {"prune_layers": -1}, ValueError), ("tofu", {"prune_layers": 1.5}, TypeError),
    (["mean"], {}, ValueError), (["mean", "avg", "prune", "mlerp"], {}, ValueError), (3, {}, TypeError),
])
def test_modes_bad_values(mode, kwargs, err):
    with pytest.raises(err):
        parse_modes(mode, 4, **kwargs)


def test_plan_clamps_r_and_counts_tokens():
    # 17 tokens, 1 protected: 16 split 8/8, so r=6 is taken whole, then 10 -> 5 per set.
    plan = plan_layers(17, 1, [6, 6, 6], ["mean"] * 3)
    assert [p.r for p in plan] == [6, 5, 2]
    assert token_counts(plan) == [17, 11, 6, 4]
    assert plan_layers(17, 1, [0, 0], ["mean"] * 2)[-1].n_out == 17


def test_plan_sized_only_after_a_merging_step():
    # Sizes stay 1 through prune steps and r=0 steps; proportional attention
    # switches on in the layer after the first mean/mlerp step with r >= 1.
    plan = plan_layers(33, 1, [2, 2, 0, 2, 2], ["prune", "prune", "mlerp", "mlerp", "mlerp"])
    assert [p.sized for p in plan] == [False, False, False, False, True]
    assert sized_after(plan)
    plan = plan_layers(33, 1, [2, 2], ["prune", "prune"])
    assert not any(p.sized for p in plan) and not sized_after(plan)
    # r requested but nothing left to remove: still not sized.
    plan = plan_layers(2, 1, [4, 4], ["mean", "mean"])
    assert [p.r for p in plan] == [0, 0] and not sized_after(plan)
