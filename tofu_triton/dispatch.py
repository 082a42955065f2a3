"""Which implementation of an op runs on a given card, decided by measurement.

Every op with more than one GPU implementation ("candidates") looks its choice up
here instead of hard-coding it. The answers come from tables committed under
``tofu_triton/tables/<op>.json`` (shipped as package data), which the tournaments
write: ``python bench/tournament_<name>.py --out DIR --write-table`` on a GPU times
every candidate at every target shape (CUDA-graph replay), checks each one's output
against the reference first, and rewrites the table. A table may hold rows from
several runs and cards::

    {"op": "vit_step",
     "provenance": {"card": ..., "date": ..., "commit": ..., "torch": ..., "triton": ..., "command": ...},
     "rows": [{"card": "NVIDIA H200", "dtype": "float16", "shape": {"B": 1, "N": 197, "C": 768, "D": 64},
               "winner": "three_launch", "us": {"three_launch": 28.1, "one_launch": 105.3}}]}

``winner`` answers from the nearest measured shape (distance: sum over the shape's
keys of |log2 a - log2 b|) on this card; without a row for this card, from the rows
of the card measured last (the card of the table's last row); without any table or
row, the caller's default. Answers are cached, so a forward pays one dict lookup:
no file I/O after the first call and no device synchronisation, and the same
arguments always give the same answer (a CUDA graph or torch.compile sees one path).
On the CPU the callers do not consult it.
"""
from __future__ import annotations

import functools
import json
import math
import operator
from pathlib import Path
from typing import Optional

import torch

TABLE_DIR = Path(__file__).resolve().parent / "tables"


def exporting() -> bool:
    """Whether ``torch.export`` is tracing, as opposed to any ``torch.compile``.

    Before torch 2.14, Dynamo answers True to ``torch.compiler.is_exporting()``
    inside every ``torch.compile`` (it keeps the function in its table of
    tracing-state answers), so a compiled model would take the export-only
    paths (the H200 run of torch 2.11: ``triton_op`` registered mid-trace, a
    graph break under fullgraph). The flag export itself sets is read instead;
    Dynamo reads a module global as the constant it is."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    if flag is None:  # a torch without the flag: its is_exporting() is all there is
        return getattr(torch.compiler, "is_exporting", lambda: False)()
    return bool(flag)


@functools.lru_cache(maxsize=None)
def _load(op: str) -> Optional[dict]:
    path = TABLE_DIR / f"{op}.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"dispatch table {path} is not valid JSON ({err}); rewrite it with its tournament") from None


def table(op: str) -> dict:
    """The parsed table of ``op`` (``{"op", "provenance", "rows"}``); ``{}`` when none is committed."""
    return _load(op) or {}


@functools.lru_cache(maxsize=None)
def _card(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    return torch.cuda.get_device_name(device)


def _distance(shape: dict, row_shape: dict) -> float:
    return sum(abs(math.log2(max(shape[k], 1)) - math.log2(max(row_shape[k], 1))) for k in shape)


def _row_winner(row: dict, allowed: Optional[tuple]) -> Optional[str]:
    if allowed is None or row.get("winner") in allowed:
        return row.get("winner")
    times = {name: us for name, us in row.get("us", {}).items() if name in allowed and us is not None}
    return min(sorted(times), key=times.__getitem__) if times else None


@functools.lru_cache(maxsize=None)
def _winner(op: str, card: str, dtype: str, default: str, allowed: Optional[tuple], shape: tuple) -> str:
    rows = (_load(op) or {}).get("rows", [])
    wanted = dict(shape)
    # Rows measured at this shape's keys, whose winner (or fastest allowed candidate) may run.
    usable = [(r, w) for r in rows if set(r.get("shape", {})) == set(wanted)
              for w in [_row_winner(r, allowed)] if w is not None]
    if not usable:
        return default
    cards = {r["card"] for r, _ in usable}
    card = card if card in cards else usable[-1][0]["card"]
    usable = [(r, w) for r, w in usable if r["card"] == card]
    same_dtype = [(r, w) for r, w in usable if r.get("dtype") == dtype]
    usable = same_dtype or usable
    # Nearest shape; among equally near rows the later one (tournaments append newer runs).
    best = min(range(len(usable)), key=lambda i: (_distance(wanted, usable[i][0]["shape"]), -i))
    return usable[best][1]


def winner(op: str, device, dtype: torch.dtype, default: str, allowed=None, **shape: int) -> str:
    """The measured fastest candidate of ``op`` for ``shape`` (integer sizes such as
    ``B=8, N=197, C=768``) in ``dtype`` on ``device``'s card, or ``default`` when the
    table has nothing to say. ``allowed``: the candidate names that may win (the
    caller's options for this call); a row whose winner is not allowed answers with
    its fastest allowed candidate.

    Under ``torch.compile`` the sizes are specialised (``operator.index`` guards each
    one), so the answer is a constant the graph is built around: Dynamo never traces
    the lookup (file I/O and ``min`` with a key would break the graph), and a new size
    recompiles, as the ops' output shapes do anyway."""
    if not torch.compiler.is_compiling():
        # Eager: a forward asks this per block, so answer from one dict lookup on the
        # arguments as given (~1 us) before any normalising (~6 us on a CPU core).
        key = (op, device, dtype, default, tuple(allowed) if isinstance(allowed, list) else allowed, *shape.items())
        answer = _ANSWERS.get(key)
        if answer is None:
            answer = _ANSWERS[key] = _normalised(op, device, dtype, default, allowed, shape)
        return answer
    return _normalised(op, device, dtype, default, allowed, shape)


_ANSWERS: dict = {}


def _normalised(op: str, device, dtype: torch.dtype, default: str, allowed, shape: dict) -> str:
    device = torch.device(device)
    sizes = tuple(sorted((name, operator.index(size)) for name, size in shape.items()))
    return _lookup(op, device.type, device.index, str(dtype).replace("torch.", ""), default,
                   None if allowed is None else tuple(allowed), sizes)


@torch.compiler.assume_constant_result
def _lookup(op: str, device_type: str, device_index: Optional[int], dtype: str, default: str,
            allowed: Optional[tuple], shape: tuple) -> str:
    return _winner(op, _card(torch.device(device_type, device_index)), dtype, default, allowed, shape)


def update_table(op: str, provenance: dict, rows: list, table_dir=None) -> Path:
    """Write a tournament's ``rows`` (``{"card", "dtype", "shape", "winner", "us", ...}``) into
    ``tables/<op>.json``: each replaces the old row of the same card, dtype and shape; every other row
    stays (other cards, shapes a budgeted run did not reach). The file's provenance becomes this run's.
    The one writer of the format :func:`winner` reads; returns the file's path."""
    path = Path(table_dir or TABLE_DIR) / f"{op}.json"
    old = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    key = lambda row: (row["card"], row["dtype"], json.dumps(row["shape"], sort_keys=True))  # noqa: E731
    fresh = {key(row) for row in rows}
    kept = [row for row in old.get("rows", []) if key(row) not in fresh]
    rest = {name: value for name, value in old.items() if name != "note"}  # a seed's "no rows yet" note
    path.write_text(json.dumps(dict(rest, op=op, provenance=provenance, rows=kept + list(rows)), indent=1) + "\n",
                    encoding="utf-8")
    clear_cache()
    return path


def clear_cache() -> None:
    """Forget loaded tables and answers (after a tournament rewrote a table, or in tests)."""
    _ANSWERS.clear()
    _load.cache_clear()
    _winner.cache_clear()
    _card.cache_clear()
