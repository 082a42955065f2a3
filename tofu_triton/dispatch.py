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

import contextlib
import functools
import json
import math
import operator
import threading
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


def _row_winner(row: dict, allowed: Optional[tuple], host: Optional[dict] = None) -> Optional[str]:
    """The row's winner among ``allowed``; with ``host`` (candidate -> host us per call) each candidate
    costs max(its device time, its host time): what an eager caller waits for per call."""
    if host is None and (allowed is None or row.get("winner") in allowed):
        return row.get("winner")
    times = {name: max(us, (host or {}).get(name, 0.0)) for name, us in row.get("us", {}).items()
             if (allowed is None or name in allowed) and us is not None}
    if host and any(name in host for name in times):
        # A candidate whose host time this card never measured would count as free on the host: it may not
        # win an eager call (a new path's first tournament comes before its first host profile).
        times = {name: t for name, t in times.items() if name in host}
    # Ties go to the first in the tournament's order (the attention's puts the float mask first).
    return min(times if host else sorted(times), key=times.__getitem__) if times else None


@functools.lru_cache(maxsize=None)
def _winner(op: str, card: str, dtype: str, default: str, allowed: Optional[tuple], shape: tuple,
            eager: bool = False) -> str:
    table = _load(op) or {}
    rows = table.get("rows", [])
    wanted = dict(shape)
    # Rows measured at this shape's keys, whose winner (or fastest allowed candidate) may run.
    usable = [r for r in rows if set(r.get("shape", {})) == set(wanted) and _row_winner(r, allowed) is not None]
    if not usable:
        return default
    card = card if card in {r["card"] for r in usable} else usable[-1]["card"]
    # Eager callers pay each candidate's host time too, where this card's was measured (bench/host_profile.py),
    # at the batches where a patched forward measured host-bound on it (above them the GPU's queue hides it).
    bound = table.get("host_bound_batch", {}).get(card, 0)
    host = table.get("host_us", {}).get(card) if eager and wanted.get("B", 0) <= bound else None
    usable = [(r, _row_winner(r, allowed, host)) for r in usable if r["card"] == card]
    same_dtype = [(r, w) for r, w in usable if r.get("dtype") == dtype]
    usable = same_dtype or usable
    # Nearest shape; among equally near rows the later one (tournaments append newer runs).
    best = min(range(len(usable)), key=lambda i: (_distance(wanted, usable[i][0]["shape"]), -i))
    return usable[best][1]


def eager() -> bool:
    """Whether the caller runs eagerly: not traced by torch.compile or torch.export, not being
    captured into a CUDA graph and not warming up for a capture (:func:`for_graphs`). Only then
    does every call pay its host time (Python, Triton's launch path, allocations) again; a graph
    or a compiled model pays device time alone."""
    return _mode() == "eager"


def _mode() -> str:
    """"eager"; "graphs" (torch.compile, torch.export, or :func:`for_graphs`); or "capture" (a CUDA
    graph being captured without :func:`for_graphs` around its warm-up)."""
    if torch.compiler.is_compiling() or getattr(_THREAD, "for_graphs", 0):
        return "graphs"
    if _CUDA[0] is None:
        _CUDA[0] = torch.cuda.is_available()  # once: asking a machine without a driver raises
    return "capture" if _CUDA[0] and torch.cuda.is_current_stream_capturing() else "eager"


_CUDA = [None]
_THREAD = threading.local()


@contextlib.contextmanager
def for_graphs():
    """Choose as inside a CUDA graph while this block runs (in this thread): wrap the warm-up calls
    before a capture in it, so they run, and compile, the kernels the capture will record. Without
    it a warm-up is an eager call and may pick other candidates (eager callers weigh host time); the
    capture then keeps the warm-up's choice (its kernels are compiled; compiling mid-capture would
    load modules during it), which is right but may not be the fastest in a graph.
    ``tofu_triton.graphs`` and ``bench/``'s captures use it."""
    _THREAD.for_graphs = getattr(_THREAD, "for_graphs", 0) + 1
    try:
        yield
    finally:
        _THREAD.for_graphs -= 1


def winner(op: str, device, dtype: torch.dtype, default: str, allowed=None, **shape: int) -> str:
    """The measured fastest candidate of ``op`` for ``shape`` (integer sizes such as
    ``B=8, N=197, C=768``) in ``dtype`` on ``device``'s card, or ``default`` when the
    table has nothing to say. ``allowed``: the candidate names that may win (the
    caller's options for this call); a row whose winner is not allowed answers with
    its fastest allowed candidate.

    The rows hold device times (CUDA-graph replays): the right cost inside a CUDA graph
    or a compiled model. An :func:`eager` caller also waits for each call's host time,
    which at small batch exceeds the device time (H200, B = 1: the four-launch step 24 us
    on the GPU, 268 us on the host; bench/results/h200-2026-12-04-run4). Where the table
    holds this card's host times (``"host_us": {card: {candidate: us}}``) and the batch
    ``B`` is at most the largest at which a patched forward measured host-bound on it in
    eager (``"host_bound_batch": {card: B}``; both written by ``bench/host_profile.py``),
    each candidate costs max(device, host). Above that batch the GPU's queue hides the
    host time and device time alone decides.

    Under ``torch.compile`` the sizes are specialised (``operator.index`` guards each
    one), so the answer is a constant the graph is built around: Dynamo never traces
    the lookup (file I/O and ``min`` with a key would break the graph), and a new size
    recompiles, as the ops' output shapes do anyway."""
    if not torch.compiler.is_compiling():
        # Eager: a forward asks this per block, so answer from one dict lookup on the
        # arguments as given (~1 us) before any normalising (~6 us on a CPU core).
        mode = _mode()
        key = (op, device, dtype, default, tuple(allowed) if isinstance(allowed, list) else allowed, mode == "eager",
               *shape.items())
        answer = _ANSWERS.get(key)
        if answer is None and mode == "capture":
            # A capture whose warm-up ran eagerly (no for_graphs): record what the warm-up ran and compiled;
            # a Triton kernel compiled mid-capture would load its module during the capture.
            answer = _ANSWERS.get(key[:5] + (True,) + key[6:])
        if answer is None:
            answer = _ANSWERS[key] = _normalised(op, device, dtype, default, allowed, shape, mode == "eager")
        return answer
    return _normalised(op, device, dtype, default, allowed, shape, False)


_ANSWERS: dict = {}


def _normalised(op: str, device, dtype: torch.dtype, default: str, allowed, shape: dict, eager: bool) -> str:
    device = torch.device(device)
    sizes = tuple(sorted((name, operator.index(size)) for name, size in shape.items()))
    return _lookup(op, device.type, device.index, str(dtype).replace("torch.", ""), default,
                   None if allowed is None else tuple(allowed), sizes, eager)


@torch.compiler.assume_constant_result
def _lookup(op: str, device_type: str, device_index: Optional[int], dtype: str, default: str,
            allowed: Optional[tuple], shape: tuple, eager: bool) -> str:
    return _winner(op, _card(torch.device(device_type, device_index)), dtype, default, allowed, shape, eager)


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


def update_host(op: str, card: str, host_us: dict, bound_batch: int, provenance: dict, table_dir=None) -> Path:
    """Write ``card``'s host time per call of each candidate (``{candidate: us}``) and the largest batch at
    which a patched forward was host-bound in eager (bench/host_profile.py) into ``tables/<op>.json`` beside
    its rows; other cards' entries and every row stay."""
    path = Path(table_dir or TABLE_DIR) / f"{op}.json"
    old = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"op": op, "rows": []}
    new = dict(old, host_us=dict(old.get("host_us", {}), **{card: dict(sorted(host_us.items()))}),
               host_bound_batch=dict(old.get("host_bound_batch", {}), **{card: int(bound_batch)}),
               host_provenance=dict(old.get("host_provenance", {}), **{card: provenance}))
    path.write_text(json.dumps(new, indent=1) + "\n", encoding="utf-8")
    clear_cache()
    return path


def clear_cache() -> None:
    """Forget loaded tables and answers (after a tournament rewrote a table, or in tests)."""
    _ANSWERS.clear()
    _load.cache_clear()
    _winner.cache_clear()
    _card.cache_clear()
