"""tofu_triton.dispatch: the measured-winner lookup, on tables this test writes (never the committed ones)."""
import json
import threading
from pathlib import Path

import pytest
import torch

from tofu_triton import dispatch


def _row(card, b, winner, us, dtype="float16", n=197):
    return {"card": card, "dtype": dtype, "shape": {"B": b, "N": n}, "winner": winner, "us": us}


@pytest.fixture
def tables(tmp_path, monkeypatch):
    """Point dispatch at an empty tmp directory; returns a writer ``write(op, rows)``."""
    monkeypatch.setattr(dispatch, "TABLE_DIR", tmp_path)
    dispatch.clear_cache()

    def write(op, rows):
        (tmp_path / f"{op}.json").write_text(json.dumps({"op": op, "provenance": {"card": "x"}, "rows": rows}))
        dispatch.clear_cache()

    yield write
    dispatch.clear_cache()


@pytest.fixture
def card(monkeypatch):
    """The card name torch reports for a CUDA device (no GPU here: the tests pass "cuda:0")."""
    name = {"value": "Card A"}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name["value"])
    return name


def test_default_without_table(tables, card):
    assert dispatch.winner("op_x", "cuda:0", torch.float16, "dflt", B=1, N=197) == "dflt"
    assert dispatch.table("op_x") == {}


def test_nearest_shape_in_log2(tables, card):
    tables("op_x", [_row("Card A", 1, "small", {"small": 1, "big": 2}),
                    _row("Card A", 256, "big", {"small": 9, "big": 3})])
    # 8 is 3 octaves from 1 and 5 from 256; 32 is 5 from 1 and 3 from 256 (linearly 32 is nearer 1).
    assert dispatch.winner("op_x", "cuda:0", torch.float16, "dflt", B=8, N=197) == "small"
    assert dispatch.winner("op_x", "cuda:0", torch.float16, "dflt", B=32, N=197) == "big"
    # A shape with other keys than the rows' is not comparable: the default.
    assert dispatch.winner("op_x", "cuda:0", torch.float16, "dflt", B=32, N=197, C=768) == "dflt"
    assert dispatch.table("op_x")["rows"][1]["winner"] == "big"


def test_dtype_rows_first(tables, card):
    tables("op_x", [_row("Card A", 8, "half", {"half": 1}), _row("Card A", 8, "single", {"single": 1}, "float32")])
    assert dispatch.winner("op_x", "cuda:0", torch.float32, "dflt", B=8, N=197) == "single"
    assert dispatch.winner("op_x", "cuda:0", torch.float16, "dflt", B=8, N=197) == "half"
    # No bfloat16 row on this card: its other rows answer rather than the default.
    assert dispatch.winner("op_x", "cuda:0", torch.bfloat16, "dflt", B=8, N=197) in {"half", "single"}


def test_card_fallback_to_last_measured(tables, card):
    tables("op_x", [_row("Card A", 8, "a_wins", {"a_wins": 1}), _row("Card B", 8, "b_wins", {"b_wins": 1})])
    assert dispatch.winner("op_x", "cuda:0", torch.float16, "dflt", B=8, N=197) == "a_wins"
    card["value"] = "Card C"
    dispatch.clear_cache()
    assert dispatch.winner("op_x", "cuda:0", torch.float16, "dflt", B=8, N=197) == "b_wins"


def test_allowed_filter(tables, card):
    tables("op_x", [_row("Card A", 8, "fast", {"fast": 1.0, "middle": 2.0, "slow": 3.0})])
    assert dispatch.winner("op_x", "cuda:0", torch.float16, "dflt", B=8, N=197) == "fast"
    assert dispatch.winner("op_x", "cuda:0", torch.float16, "dflt", allowed=("slow", "middle"), B=8, N=197) == "middle"
    assert dispatch.winner("op_x", "cuda:0", torch.float16, "dflt", allowed=("other",), B=8, N=197) == "dflt"


def test_no_file_io_after_first_call(tables, card, monkeypatch):
    tables("op_x", [_row("Card A", 8, "fast", {"fast": 1.0})])
    assert dispatch.winner("op_x", "cuda:0", torch.float16, "dflt", B=8, N=197) == "fast"

    def no_io(*args, **kwargs):
        raise AssertionError("dispatch read a file after its first call")

    monkeypatch.setattr(Path, "read_text", no_io)
    monkeypatch.setattr(Path, "is_file", no_io)
    monkeypatch.setattr("builtins.open", no_io)
    for _ in range(3):
        assert dispatch.winner("op_x", "cuda:0", torch.float16, "dflt", B=8, N=197) == "fast"
    # Another shape of the same op: the table is already parsed.
    assert dispatch.winner("op_x", "cuda:0", torch.float16, "dflt", B=64, N=197) == "fast"


def test_broken_table_names_the_file(tables, card, tmp_path):
    (tmp_path / "op_x.json").write_text("{not json")
    with pytest.raises(ValueError, match="op_x.json"):
        dispatch.winner("op_x", "cuda:0", torch.float16, "dflt", B=8, N=197)


def test_committed_vit_step_table_is_well_formed():
    """The shipped table parses and says where its numbers come from (its content is the tournament's)."""
    dispatch.clear_cache()
    t = dispatch.table("vit_step")
    assert t["op"] == "vit_step"
    assert {"card", "date", "commit", "torch", "triton", "command"} <= set(t["provenance"])
    for row in t["rows"]:
        timed = {k: v for k, v in row["us"].items() if v is not None}  # None: failed its check, never timed
        assert row["winner"] in timed and min(timed.values()) == timed[row["winner"]]


def test_exporting_is_true_under_export_only(monkeypatch):
    # torch < 2.14's Dynamo answers True to is_exporting() inside every torch.compile; on the H200 (torch 2.11)
    # that sent a compiled step to the export-only triton_op and broke fullgraph. Stand in for that answer.
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(dispatch.exporting())
            return x + 1

    assert not dispatch.exporting()
    torch._dynamo.reset()
    torch.compile(Probe(), backend="eager", fullgraph=True)(torch.zeros(2))
    assert seen == [False]
    torch.export.export(Probe(), (torch.zeros(2),))
    assert seen[1:] and all(seen[1:])


def test_eager_callers_weigh_host_time_up_to_the_host_bound_batch(tables, card, tmp_path, monkeypatch):
    # One launch: slow on the GPU, cheap on the host; four launches: the reverse (the H200's step at B = 1).
    rows = [_row("Card A", b, "four", {"one": 69.0 * b, "four": 24.0 * b}) for b in (1, 64, 256)]
    tables("op_x", rows)
    dispatch.update_host("op_x", "Card A", {"one": 97.0, "four": 268.0}, 8, {"command": "host_profile"})
    mode = {"value": "eager"}
    monkeypatch.setattr(dispatch, "_mode", lambda: mode["value"])
    assert dispatch.winner("op_x", "cuda:0", torch.float16, "dflt", B=1, N=197) == "one"  # max(69, 97) < max(24, 268)
    assert dispatch.winner("op_x", "cuda:0", torch.float16, "dflt", B=64, N=197) == "four"  # above the bound
    mode["value"] = "graphs"  # for a CUDA graph or a compiled model: device time alone
    assert dispatch.winner("op_x", "cuda:0", torch.float16, "dflt", B=1, N=197) == "four"
    mode["value"] = "eager"
    card["value"] = "Card B"  # another card's host times never apply: its rows fall back to Card A's, host too
    assert dispatch.winner("op_x", "cuda:1", torch.float16, "dflt", B=1, N=197) == "one"
    # The writer keeps the rows and names its source.
    table = json.loads((tmp_path / "op_x.json").read_text())
    assert table["rows"] == rows and table["host_bound_batch"] == {"Card A": 8}
    assert table["host_provenance"]["Card A"]["command"] == "host_profile"


def test_a_candidate_without_a_host_time_never_wins_an_eager_call(tables, card, monkeypatch):
    # "new" is fastest on the GPU but its host time was never measured on this card: eagerly it cannot be
    # weighed, so the measured candidates decide; in a graph device time alone decides, and it wins.
    tables("op_x", [_row("Card A", 1, "new", {"one": 69.0, "four": 24.0, "new": 10.0})])
    dispatch.update_host("op_x", "Card A", {"one": 97.0, "four": 268.0}, 8, {})
    mode = {"value": "eager"}
    monkeypatch.setattr(dispatch, "_mode", lambda: mode["value"])
    assert dispatch.winner("op_x", "cuda:0", torch.float16, "d", B=1, N=197) == "one"
    mode["value"] = "graphs"
    assert dispatch.winner("op_x", "cuda:0", torch.float16, "d", B=1, N=197) == "new"


def test_eager_is_false_inside_torch_compile():
    seen = []

    def probe(x):
        seen.append(dispatch.eager())
        return x + 1

    assert dispatch.eager()  # here: eager (no GPU, so never capturing)
    torch._dynamo.reset()
    torch.compile(probe, backend="eager", fullgraph=True)(torch.zeros(2))
    assert seen == [False]


def test_for_graphs_makes_this_thread_choose_as_a_capture(tables, card):
    # Warm-up calls before a capture must compile what the capture records, so they choose by device time.
    tables("op_x", [_row("Card A", 1, "four", {"one": 69.0, "four": 24.0})])
    dispatch.update_host("op_x", "Card A", {"one": 97.0, "four": 268.0}, 8, {})
    assert dispatch.eager() and dispatch.winner("op_x", "cuda:0", torch.float16, "d", B=1, N=197) == "one"
    with dispatch.for_graphs():
        assert not dispatch.eager() and dispatch.winner("op_x", "cuda:0", torch.float16, "d", B=1, N=197) == "four"
        seen = []
        other = threading.Thread(target=lambda: seen.append(dispatch.eager()))
        other.start()
        other.join()
        assert seen == [True]  # another thread (a server's eager request) is not affected
    assert dispatch.eager()


def test_a_capture_without_for_graphs_keeps_what_its_eager_warm_up_ran(tables, card, monkeypatch):
    tables("op_x", [_row("Card A", 1, "four", {"one": 69.0, "four": 24.0})])
    dispatch.update_host("op_x", "Card A", {"one": 97.0, "four": 268.0}, 8, {})
    mode = {"value": "eager"}
    monkeypatch.setattr(dispatch, "_mode", lambda: mode["value"])
    ask = lambda: dispatch.winner("op_x", "cuda:0", torch.float16, "d", B=1, N=197)  # noqa: E731
    mode["value"] = "capture"
    assert ask() == "four"  # no warm-up asked before: device time
    dispatch.clear_cache()
    mode["value"] = "eager"
    assert ask() == "one"  # the warm-up ran (and compiled) the one-launch path ...
    mode["value"] = "capture"
    assert ask() == "one"  # ... so the capture records it, not a kernel it would compile mid-capture
    mode["value"] = "graphs"
    assert ask() == "four"  # for_graphs / compile: device time
