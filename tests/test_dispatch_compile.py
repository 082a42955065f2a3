"""dispatch.winner inside torch.compile(fullgraph=True): the lookup (file I/O, min with a key)
must never be traced, or every patched model that consults it breaks its graph on CUDA, where
the CPU suite would never see it (on the CPU the callers skip the table)."""
import json

import torch

from tofu_triton import dispatch


def test_winner_is_a_constant_inside_a_full_graph(tmp_path, monkeypatch):
    table = {"op": "demo", "provenance": {}, "rows": [
        {"card": "cpu", "dtype": "float32", "shape": {"B": 1}, "winner": "small"},
        {"card": "cpu", "dtype": "float32", "shape": {"B": 64}, "winner": "large"},
    ]}
    (tmp_path / "demo.json").write_text(json.dumps(table))
    monkeypatch.setattr(dispatch, "TABLE_DIR", tmp_path)
    dispatch.clear_cache()

    def f(x):
        chosen = dispatch.winner("demo", x.device, x.dtype, "none", allowed=("small", "large"), B=x.shape[0])
        return x + 1 if chosen == "small" else x - 1

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    try:
        for batch, want in ((2, 1.0), (48, -1.0), (3, 1.0)):  # a new batch recompiles and asks again
            assert torch.equal(compiled(torch.zeros(batch)), torch.full((batch,), want))
    finally:
        dispatch.clear_cache()
